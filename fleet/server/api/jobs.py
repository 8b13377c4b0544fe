"""Operator methods for jobs: run now, list, show, log, tail, cancel."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import peewee as pw

from ...common import protocol
from ...common.protocol import FINAL_STATUSES, JOB_KINDS, JOB_STATUSES, Field
from ...common.timefmt import iso
from ..agents.ingest import line_json
from ..events import (
    CancelRequested,
    JobDispatched,
    JobEnded,
    JobLogged,
    JobProgressed,
    JobStarted,
)
from ..jobs import lifecycle
from ..scheduling import drills
from ..security.auth import Role
from ..store.models import (
    Host,
    HostRepository,
    Job,
    JobLog,
    Repository,
    User,
    utcnow,
)
from ..store.queries import hot
from ..store.queries.waits import reasons
from . import views
from .common import audit, get_group, get_host
from .context import Context, next_or_gone
from .errors import ApiError, Conflict, Invalid, NotFound
from .hosts import selected_hosts
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

GROUP_KINDS = ("backup", "forget", "copy", "drill")  # the kinds that act on one source group


def jobs_with_names() -> Any:
    """Jobs with their host and user in the same query (a listing shows both)."""
    source = Repository.alias("source")
    return (
        Job.select(Job, Host, User, Repository, source)
        .join(Host)
        .switch(Job)
        .join(User, pw.JOIN.LEFT_OUTER, on=(Job.actor_user == User.id))
        .switch(Job)
        .join(Repository, pw.JOIN.LEFT_OUTER, on=(Job.repository == Repository.id))
        .switch(Job)
        .join(
            source,
            pw.JOIN.LEFT_OUTER,
            on=(Job.from_repository == source.id),
            attr="from_repository",
        )
    )


def get_job(job_id: int) -> Job:
    job = jobs_with_names().where(Job.id == job_id).first()
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def job_view(job: Job, ctx: Context, waits: Optional[dict[int, str]] = None) -> dict:
    progress = ctx.state.bus.progress.get(job.id) if ctx.state.bus else None
    out = views.job_view(job, progress)
    if job.status == "queued":
        out["waiting_for"] = (waits or {}).get(job.id)
    return out


@method(
    "jobs.run",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("group", "str", False, limit=64),
        Field("kind", "str", False, choices=JOB_KINDS),
        Field("repository", "str", False, limit=64),
    ),
)
def jobs_run(ctx: Context, p: dict) -> dict:
    """Create a job now (a backup of a group by default) and dispatch it.
    A job on a whole repository runs on the host's default one, or on the
    one named (which the host uses); a group's job, on the group's."""
    found = hot.host_by_name(p["host"])  # the hot path of a burst of run-nows: plain SQL
    if found is None:
        raise NotFound(f"no host named {p['host']!r}")
    return run_on(ctx, Host(id=found[0], name=found[1]), p)


@method(
    "jobs.run_selected",
    Role.OPERATOR,
    (
        Field("selector", "str", limit=1024),
        Field("group", "str", False, limit=64),
        Field("kind", "str", False, choices=JOB_KINDS),
    ),
)
def jobs_run_selected(ctx: Context, p: dict) -> dict:
    """jobs.run on every host the label selector picks: the jobs made, and
    the hosts skipped with why (one without the group, say)."""
    made, skipped = [], []
    for host in selected_hosts(p["selector"]):
        try:
            made.append(run_on(ctx, host, {**p, "host": host.name}))
        except ApiError as exc:
            skipped.append({"host": host.name, "error": exc.message})
    return {"selector": p["selector"], "jobs": made, "skipped": skipped}


def run_on(ctx: Context, host: Host, p: dict) -> dict:
    """jobs.run on one host."""
    kind = p.get("kind") or "backup"
    if kind == "restore":
        raise Invalid("a restore names a snapshot and a target: use restore.run (fleetctl restore)")
    group = None
    params: dict[str, Any] = {}
    repository = source = None
    if kind in GROUP_KINDS:
        if not p.get("group"):
            raise Invalid(f"a {kind} job needs a source group")
        if p.get("repository"):
            raise Invalid(f"a {kind} job works on its group's repository (groups edit --repo)")
        group = get_group(host, p["group"])
        if kind == "backup":
            params = lifecycle.backup_params(group)
        elif kind == "forget":
            params = {"tag": group.name, "retention": group.retention}
            if not group.retention:
                raise Invalid(f"source group {group.name} has no retention rules to forget by")
        elif kind == "drill":  # a sample of its latest snapshot, restored and checked
            snap = drills.latest_snapshot(group)
            if snap is None:
                raise Invalid(f"source group {group.name} has no snapshot to drill yet")
            params = drills.drill_params(group, snap)
            repository = snap.repository_id
        else:  # copy: every snapshot of the group its second repository lacks
            if group.copy_to_id is None:
                raise Invalid(f"source group {group.name} names no repository to copy to")
            params = lifecycle.copy_params(group)
            repository = group.copy_to_id
            source = lifecycle.repository_of(group, host.id)
    elif p.get("group"):
        raise Invalid(f"a {kind} job acts on the whole repository, not on a group")
    elif p.get("repository"):
        repository = used_repository(host, p["repository"])
    job = lifecycle.create(
        ctx.events,
        host.id,
        kind,
        "user",
        ctx.caller.user_id,
        group,
        params,
        repository=repository,
        from_repository=source,
    )
    audit(
        ctx,
        "job.run",
        f"{host.name}/{group.name}" if group else host.name,
        {"job": job.id, "kind": kind},
    )
    agents = ctx.state.agents
    if agents is not None:  # a host that is ready gets it at once: one store trip, not two
        claimed = agents.dispatcher.claim_now(ctx.events, host.id)
        if claimed is not None and claimed.id == job.id:
            job.status = claimed.status
    queued_behind = hot.active_jobs(host.id, job.id, lifecycle.ACTIVE)
    # the view from what is at hand, not from reading the new row back
    job.host = host
    job.actor_user = User(id=ctx.caller.user_id, name=ctx.caller.name)
    # connected here, or (the row says) through another replica
    online = agents is not None and (agents.connected(host.id) or bool(host.online))
    return {**job_view(job, ctx), "queued_behind": queued_behind, "host_online": online}


def used_repository(host: Host, name: str) -> int:
    """The id of a repository the host uses, by name."""
    repo = (
        Repository.select(Repository.id)
        .join(HostRepository)
        .where((Repository.name == name) & (HostRepository.host == host.id))
        .first()
    )
    if repo is None:
        raise NotFound(
            f"host {host.name} uses no repository named {name!r} (fleetctl repos attach)"
        )
    return repo.id


def parse_since(value: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(value.rstrip("Z"), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise Invalid(f"since {value!r}: expected YYYY-MM-DDTHH:MM:SSZ") from None


@method(
    "jobs.list",
    Role.VIEWER,
    (
        Field("host", "str", False, limit=64),
        Field("status", "str", False, choices=JOB_STATUSES),
        Field("kind", "str", False, choices=JOB_KINDS),
        Field("since", "str", False, limit=32),
        Field("limit", "int", False, minimum=1),
    ),
    readonly=True,
)
def jobs_list(ctx: Context, p: dict) -> list:
    """Jobs, newest first: by host, status, kind, since a time; 50 by default."""
    query = jobs_with_names().order_by(Job.id.desc())
    if p.get("host"):
        query = query.where(Job.host == get_host(p["host"]))
    if p.get("status"):
        query = query.where(Job.status == p["status"])
    if p.get("kind"):
        query = query.where(Job.kind == p["kind"])
    if p.get("since"):
        query = query.where(Job.created_at >= parse_since(p["since"]))
    jobs = list(query.limit(min(p.get("limit") or 50, 10_000)))
    waits = reasons(jobs, utcnow())
    return [job_view(j, ctx, waits) for j in jobs]


@method("jobs.show", Role.VIEWER, (Field("id", "int"),), readonly=True)
def jobs_show(ctx: Context, p: dict) -> dict:
    """One job: status, params, summary and how many log lines it has."""
    job = get_job(p["id"])
    out = job_view(job, ctx, reasons([job], utcnow()))
    out["params"] = job.params
    out["log_lines"] = JobLog.select().where(JobLog.job == job).count()
    return out


def log_lines(job_id: int, after: int = 0, limit: Optional[int] = None) -> list[dict]:
    query = (
        JobLog.select().where((JobLog.job == job_id) & (JobLog.seq > after)).order_by(JobLog.seq)
    )
    if limit:
        query = query.limit(limit)
    return [line_json(job_id, r.seq, iso(r.ts), r.stream, r.payload) for r in query]


@method(
    "jobs.log",
    Role.VIEWER,
    (
        Field("id", "int"),
        Field("after", "int", False, minimum=0),
        Field("limit", "int", False, minimum=1),
    ),
    readonly=True,
)
def jobs_log(ctx: Context, p: dict) -> dict:
    """A job and its stored log lines, after a seq, at most `limit`."""
    job = get_job(p["id"])
    return {
        "job": views.job_json(job),
        "lines": log_lines(job.id, p.get("after") or 0, p.get("limit")),
    }


@method("jobs.tail", Role.VIEWER, (Field("id", "int"), Field("after", "int", False, minimum=0)))
async def jobs_tail(ctx: Context, p: dict) -> dict:
    """Stream a job: its stored log first, then live lines and progress,
    ending with the job itself once it has finished."""
    store, bus = ctx.state.store, ctx.state.bus
    job_id = p["id"]
    job = await store.read(get_job, job_id)
    watch = bus.watch(job_id, job.host_id)  # before reading the log, so nothing falls between
    try:
        sent = await emit_stored(ctx, job_id, p.get("after") or 0)
        job = await store.read(get_job, job_id)
        if job.status not in FINAL_STATUSES:
            await ctx.emit({"type": "status", "status": job.status})
            progress = bus.progress.get(job_id)
            if progress:
                await ctx.emit({"type": "progress", "progress": progress})
            while True:
                event = await next_or_gone(watch.queue, ctx)
                if event is None:  # fell behind, or the host was removed
                    if watch.gone:
                        break
                    # too far behind for the queue: catch up from the store
                    bus.unwatch(watch)
                    watch = bus.watch(job_id, job.host_id)
                    sent = await emit_stored(ctx, job_id, sent)
                    job = await store.read(get_job, job_id)
                    if job.status in FINAL_STATUSES:
                        break
                elif isinstance(event, JobLogged):
                    if not event.lines or event.lines[0]["seq"] > sent + 1:
                        # another replica's lines (in the store), or a gap
                        # before these: read from the store what is missing
                        sent = await emit_stored(ctx, job_id, sent)
                    for line in event.lines:
                        if line["seq"] > sent:
                            sent = line["seq"]
                            await ctx.emit({"type": "log", "line": line})
                elif isinstance(event, JobProgressed):
                    await ctx.emit({"type": "progress", "progress": event.progress})
                elif isinstance(event, JobStarted):
                    await ctx.emit({"type": "status", "status": "running"})
                elif isinstance(event, JobDispatched):
                    await ctx.emit({"type": "status", "status": "dispatched"})
                elif isinstance(event, JobEnded):
                    break
            if watch.gone:
                raise NotFound(f"job {job_id} is gone: its host was removed")
            # lines committed in the same batch as the end come first; be sure of it
            await emit_stored(ctx, job_id, sent)
            job = await store.read(get_job, job_id)
        return views.job_json(job)
    finally:
        bus.unwatch(watch)


async def emit_stored(ctx: Context, job_id: int, after: int) -> int:
    """Send the stored log after line `after`, in pages; returns the last seq sent."""
    sent = after
    while True:
        page = await ctx.state.store.read(log_lines, job_id, sent, 1000)
        for line in page:
            await ctx.emit({"type": "log", "line": line})
            sent = line["seq"]
        if len(page) < 1000:
            return sent


@method("jobs.cancel", Role.OPERATOR, (Field("id", "int"),))
async def jobs_cancel(ctx: Context, p: dict) -> dict:
    """Cancel a job: a queued one at once, a running one through its agent."""
    return await cancel_one(ctx, p["id"])


@method("jobs.cancel_selected", Role.OPERATOR, (Field("selector", "str", limit=1024),))
async def jobs_cancel_selected(ctx: Context, p: dict) -> dict:
    """jobs.cancel of every job not ended on the hosts the label selector
    picks: those cancelled (or asked to stop), and those that could not be."""
    ids = await ctx.state.store.read(active_on_selected, p["selector"])
    done, failed = [], []
    for job_id in ids:
        try:
            done.append(await cancel_one(ctx, job_id))
        except ApiError as exc:
            failed.append({"job": job_id, "error": exc.message})
    return {"selector": p["selector"], "cancelled": done, "failed": failed}


def active_on_selected(selector: str) -> list[int]:
    hosts = [h.id for h in selected_hosts(selector)]
    if not hosts:
        return []
    query = Job.select(Job.id).where(Job.host.in_(hosts) & Job.status.in_(lifecycle.ACTIVE))
    return [j.id for j in query.order_by(Job.id)]


async def cancel_one(ctx: Context, job_id: int) -> dict:
    store, agents = ctx.state.store, ctx.state.agents
    job = await store.read(get_job, job_id)
    if job.status in FINAL_STATUSES:
        raise Conflict(f"job {job.id} already ended: {job.status}")
    with_agent = job.status in lifecycle.WITH_AGENT or job.agent_job is not None
    # its link may be through another replica: the store says whether it is up
    if with_agent and not (agents.connected(job.host_id) or job.host.online):
        raise Conflict(
            f"job {job.id} is with the agent of {job.host.name}, which is offline: "
            "it cannot be stopped now",
        )
    outcome = await agents.lifecycle.apply(lifecycle.cancel, job.id, utcnow())
    # a fire's backup may be the agent's own already (it ran the fire while
    # fleetd was out of reach): it knows it by its uid
    fire_uid = protocol.fire_uid_of(job.uid)
    if outcome == "requested":
        # the agent stops it and reports the end; a cancel that crosses the
        # command is sent again when the job starts
        # (by the replica its agent is connected through)
        ctx.state.bus.publish([CancelRequested(job.id, job.host_id, fire_uid)])
        await store.atomic(audit, ctx, "job.cancel", job.host.name, {"job": job.id})
        return {**views.job_json(job), "cancel": "requested"}
    if outcome == "cancelled":
        if fire_uid is not None:
            ctx.state.bus.publish([CancelRequested(job.id, job.host_id, fire_uid)])
        await store.atomic(audit, ctx, "job.cancel", job.host.name, {"job": job.id})
        return views.job_json(await store.read(get_job, job.id))
    raise Conflict(f"job {job.id} already ended: {outcome}")
