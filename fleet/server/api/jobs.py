"""Operator methods for jobs: run now, list, show, log, tail, cancel."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Optional

import peewee as pw
from websockets.exceptions import ConnectionClosedOK

from ...common.protocol import FINAL_STATUSES, JOB_KINDS, JOB_STATUSES, Field
from .. import jobs
from ..auth import Role
from ..store.models import Host, Job, JobLog, User
from . import views
from .common import audit, get_group, get_host
from .context import Context
from .errors import Conflict, Invalid, NotFound
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

GROUP_KINDS = ("backup", "forget")  # the kinds that act on one source group


def jobs_with_names() -> Any:
    """Jobs with their host and user in the same query (a listing shows both)."""
    return (
        Job.select(Job, Host, User)
        .join(Host)
        .switch(Job)
        .join(User, pw.JOIN.LEFT_OUTER, on=(Job.actor_user == User.id))
    )


def get_job(job_id: int) -> Job:
    job = jobs_with_names().where(Job.id == job_id).first()
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def job_view(job: Job, ctx: Context) -> dict:
    progress = ctx.state.hub.progress.get(job.id) if ctx.state.hub else None
    return views.job_view(job, progress)


@method(
    "jobs.run",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("group", "str", False, limit=64),
        Field("kind", "str", False, choices=JOB_KINDS),
    ),
)
def jobs_run(ctx: Context, p: dict) -> dict:
    """Create a job now (a backup of a group by default) and dispatch it."""
    host = get_host(p["host"])
    kind = p.get("kind") or "backup"
    group = None
    params: dict[str, Any] = {}
    if kind in GROUP_KINDS:
        if not p.get("group"):
            raise Invalid(f"a {kind} job needs a source group")
        group = get_group(host, p["group"])
        params = (
            jobs.backup_params(group)
            if kind == "backup"
            else {"tag": group.name, "retention": group.retention}
        )
        if kind == "forget" and not group.retention:
            raise Invalid(f"source group {group.name} has no retention rules to forget by")
    elif p.get("group"):
        raise Invalid(f"a {kind} job acts on the whole repository, not on a group")
    job = jobs.create_job(host, kind, "user", ctx.caller.user_id, group, params)
    audit(
        ctx,
        "job.run",
        f"{host.name}/{group.name}" if group else host.name,
        {"job": job.id, "kind": kind},
    )
    if ctx.state.hub is not None:
        hub, host_id = ctx.state.hub, host.id
        ctx.after.append(lambda: hub.dispatch(host_id))
    queued_behind = (
        Job.select()
        .where((Job.host == host) & (Job.status.in_(jobs.ACTIVE)) & (Job.id != job.id))
        .count()
    )
    return {**job_view(get_job(job.id), ctx), "queued_behind": queued_behind}


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
    query = query.limit(min(p.get("limit") or 50, 10_000))
    return [job_view(j, ctx) for j in query]


@method("jobs.show", Role.VIEWER, (Field("id", "int"),))
def jobs_show(ctx: Context, p: dict) -> dict:
    """One job: status, params, summary and how many log lines it has."""
    job = get_job(p["id"])
    out = job_view(job, ctx)
    out["params"] = job.params
    out["log_lines"] = JobLog.select().where(JobLog.job == job).count()
    return out


def log_lines(job_id: int, after: int = 0, limit: Optional[int] = None) -> list[dict]:
    query = (
        JobLog.select().where((JobLog.job == job_id) & (JobLog.seq > after)).order_by(JobLog.seq)
    )
    if limit:
        query = query.limit(limit)
    return [jobs.line_json(job_id, r.seq, r.ts, r.stream, r.payload) for r in query]


@method(
    "jobs.log",
    Role.VIEWER,
    (
        Field("id", "int"),
        Field("after", "int", False, minimum=0),
        Field("limit", "int", False, minimum=1),
    ),
)
def jobs_log(ctx: Context, p: dict) -> dict:
    """A job and its stored log lines, after a seq, at most `limit`."""
    job = get_job(p["id"])
    return {
        "job": jobs.job_json(job),
        "lines": log_lines(job.id, p.get("after") or 0, p.get("limit")),
    }


@method("jobs.tail", Role.VIEWER, (Field("id", "int"), Field("after", "int", False, minimum=0)))
async def jobs_tail(ctx: Context, p: dict) -> dict:
    """Stream a job: its stored log first, then live lines and progress,
    ending with the job itself once it has finished."""
    store, hub = ctx.state.store, ctx.state.hub
    job_id = p["id"]
    queue = hub.subscribe(job_id)  # before reading the store, so nothing falls between
    try:
        job = await store.run(get_job, job_id)
        sent = p.get("after") or 0
        while True:  # the stored log, in pages
            page = await store.run(log_lines, job_id, sent, 1000)
            for line in page:
                await ctx.emit({"type": "log", "line": line})
                sent = line["seq"]
            if len(page) < 1000:
                break
        job = await store.run(get_job, job_id)
        if job.status not in FINAL_STATUSES:
            await ctx.emit({"type": "status", "status": job.status})
            progress = hub.progress.get(job_id)
            if progress:
                await ctx.emit({"type": "progress", "progress": progress})
            while True:
                event = await next_event(queue, ctx)
                if event["type"] == "log":
                    if event["line"]["seq"] <= sent:
                        continue
                    sent = event["line"]["seq"]
                    await ctx.emit({"type": "log", "line": event["line"]})
                elif event["type"] == "progress":
                    await ctx.emit({"type": "progress", "progress": event["progress"]})
                elif event["type"] == "status":
                    await ctx.emit({"type": "status", "status": event["status"]})
                elif event["type"] == "finished":
                    break
            # lines committed in the same batch as the end come first; be sure of it
            for line in await store.run(log_lines, job_id, sent):
                await ctx.emit({"type": "log", "line": line})
            job = await store.run(get_job, job_id)
        return jobs.job_json(job)
    finally:
        hub.unsubscribe(job_id, queue)


async def next_event(queue: asyncio.Queue, ctx: Context) -> dict:
    """The next event for a tail, unless its operator has gone away."""
    getter = asyncio.ensure_future(queue.get())
    waits = {getter} if ctx.closed is None else {getter, ctx.closed}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        raise ConnectionClosedOK(None, None)  # nobody left to stream to
    return getter.result()


@method("jobs.cancel", Role.OPERATOR, (Field("id", "int"),))
async def jobs_cancel(ctx: Context, p: dict) -> dict:
    """Cancel a job: a queued one at once, a running one through its agent."""
    store, hub = ctx.state.store, ctx.state.hub
    job = await store.run(get_job, p["id"])
    if job.status in FINAL_STATUSES:
        raise Conflict(f"job {job.id} already ended: {job.status}")
    # under the host's dispatch lock: the job is either with the agent or not, not in between
    async with hub.dispatch_lock(job.host_id):
        if await hub.cancel(job.host_id, job.id):
            await store.atomic(audit, ctx, "job.cancel", job.host.name, {"job": job.id})
            return {**jobs.job_json(job), "cancel": "requested"}

        def cancel_queued() -> bool:
            done = (
                Job.update(
                    status="cancelled",
                    finished_at=jobs.utcnow(),
                    error="cancelled before it started",
                )
                .where((Job.id == job.id) & (Job.status == "queued"))
                .execute()
            )
            if done:
                audit(ctx, "job.cancel", job.host.name, {"job": job.id})
            return bool(done)

        if await store.atomic(cancel_queued):
            hub.publish({"job_id": job.id, "type": "finished", "status": "cancelled"})
            return jobs.job_json(await store.run(get_job, job.id))
    raise Conflict(
        f"job {job.id} is running on {job.host.name}, which is offline: it cannot be stopped now",
    )
