"""Every transition of a job, in one place.

    queued -> dispatched -> running -> succeeded | warning | failed | cancelled
       |          |            '-> lost (the agent came back without it, or never came back)
       |          '-> queued (the agent was busy or the link dropped before it started)
       '-> cancelled (before it was dispatched)

Each function runs on the store thread inside the caller's transaction and
appends the domain events it causes to `events`; the caller publishes them
once the transaction has committed (`Lifecycle.apply` does both). Nothing
else changes a job's status or publishes its end.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import peewee as pw

from ...common import protocol
from ...common.protocol import FINAL_STATUSES
from ..events import (
    Bus,
    Event,
    JobDispatched,
    JobEnded,
    JobQueued,
    JobStarted,
    RepositoryFreed,
)
from ..store.db import Store
from ..store.models import Host, Job, Snapshot, SourceGroup, new_uid, utcnow
from ..store.queries import hot
from . import retry

log = logging.getLogger("fleetd.jobs")

Events = list[Event]
T = TypeVar("T")

SNAPSHOT_ID = re.compile(r"^[0-9a-f]{8,64}\Z")  # what restic names a snapshot by
QUEUED = "queued"
DISPATCHED = "dispatched"
RUNNING = "running"
ACTIVE = (QUEUED, DISPATCHED, RUNNING)
WITH_AGENT = hot.WITH_AGENT  # (dispatched, running): at most one per host


def create(
    events: Events,
    host_id: int,
    kind: str,
    actor_kind: str,
    actor_user: Optional[int] = None,
    group: Optional[SourceGroup] = None,
    params: Optional[dict[str, Any]] = None,
    schedule: Optional[int] = None,
    not_before: Optional[dt.datetime] = None,
    uid: Optional[str] = None,
    agent_job: Optional[int] = None,
    repository: Optional[int] = None,
    from_repository: Optional[int] = None,
) -> Job:
    """A queued job. Its repository: `repository`, else its group's, else
    the host's default (None while the host has none)."""
    if repository is None:
        repository = repository_of(group, host_id)
    values = {
        "uid": uid or new_uid(),  # fleetd's own jobs get a fresh one
        "host_id": host_id,
        "kind": kind,
        "status": QUEUED,
        "actor_kind": actor_kind,
        "actor_user_id": actor_user,
        "schedule_id": schedule,
        "group_id": group.id if group else None,
        "group_name": group.name if group else None,
        "params": params or {},
        "created_at": utcnow(),
        "not_before": not_before,
        "agent_job": agent_job,  # the agent's own job: never dispatched
        "repository_id": repository,
        "from_repository_id": from_repository,
    }
    # plain SQL, and the model built from what was inserted: building the
    # INSERT through peewee cost more than the write (3,000 run-nows at once)
    job = Job(id=hot.insert_job(values), **values)
    if group is not None:
        job.group = group
    events.append(JobQueued(job.id, host_id, due=not_before is None))
    return job


def repository_of(group: Optional[SourceGroup], host_id: int) -> Optional[int]:
    """Where a group backs up (its own repository, else its host's
    default); a job without a group, the host's default."""
    if group is not None and group.repository_id is not None:
        return group.repository_id
    return hot.default_repository(host_id)


def needs_init(host_id: int) -> list[int]:
    """Auto-init: the host's repositories that no init job was made for
    since they were set, changed or attached to it.

    A failed init is not retried by itself (it would fail again, forever):
    `fleetctl repo init` or a new `repo set` tries again.
    """
    return hot.needs_init(host_id)


def claim(events: Events, host_id: int, now: dt.datetime) -> Optional[Job]:
    """The host's next due job, moved queued -> dispatched in one statement,
    and only when the host has no job with its agent already. Init first."""
    for repository in needs_init(host_id):
        create(events, host_id, "init", "system", repository=repository)
    row = hot.claim(host_id, now)
    if row is None:
        return None
    job_id, kind, params, uid, repository, source, default = row
    off_default = source is not None or (repository is not None and repository != default)
    # what a command.run needs, without reading the row back
    job = Job(
        id=job_id,
        host=host_id,
        kind=kind,
        params=json.loads(params),
        status=DISPATCHED,
        uid=uid,
        repository=repository,
        from_repository=source,
    )
    events.append(
        JobDispatched(job_id, host_id, kind, job.params, uid, repository, source, off_default)
    )
    return job


def requeue(events: Events, job_id: int, why: str, due: bool = True) -> bool:
    """dispatched -> queued: the agent did not take it (busy, or the link
    dropped first). A job whose cancel was asked for ends cancelled instead.
    due=False: nobody offers it at once (the caller offers it later)."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None or job.status != DISPATCHED:
        return False
    if job.cancel_requested_at is not None:
        return end(events, job.host_id, job_id, "cancelled", error="cancelled before it started")
    Job.update(status=QUEUED, dispatched_at=None).where(
        (Job.id == job_id) & (Job.status == DISPATCHED)
    ).execute()
    log.info("job %s back in the queue: %s", job_id, why)
    events.append(JobQueued(job_id, job.host_id, due=due))
    freed(events, job.host_id, job_id)  # what it held of its repositories, it holds no more
    return True


def freed(events: Events, host_id: int, job_id: Optional[int] = None) -> None:
    """The hosts sharing this host's repositories (or those of job
    `job_id`) that wait: offered again."""
    waiting = hot.sharing_hosts_waiting(host_id, job_id)
    if waiting:
        events.append(RepositoryFreed(tuple(waiting)))


def start(events: Events, host_id: int, job_id: int, started_at: dt.datetime) -> bool:
    started = list(
        Job.update(status=RUNNING, started_at=started_at)
        .where((Job.id == job_id) & (Job.host == host_id) & Job.status.in_((QUEUED, DISPATCHED)))
        .returning(Job.cancel_requested_at, Job.uid, Job.agent_job, Job.kind)
        .execute()
    )
    if started:
        row = started[0]
        uid = row.uid if row.agent_job is not None else None
        asked = row.cancel_requested_at is not None
        events.append(JobStarted(job_id, host_id, asked, uid, row.agent_job, row.kind))
    return bool(started)


def end(
    events: Events,
    host_id: int,
    job_id: int,
    status: str,
    finished_at: Optional[dt.datetime] = None,
    exit_code: Optional[int] = None,
    summary: Optional[dict] = None,
    error: Optional[str] = None,
    now: Optional[dt.datetime] = None,
) -> bool:
    """Any active job -> a final status. A job fleetd gave up on (lost) may
    still report how it really ended; a cancelled or finished one stays so."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"{status!r} is not a final job status")
    now = now or utcnow()
    endable = ACTIVE + ("lost",) if status != "lost" else WITH_AGENT
    done = list(
        Job.update(
            status=status,
            finished_at=finished_at or now,
            exit_code=exit_code,
            summary=summary,
            error=error,
        )
        .where((Job.id == job_id) & (Job.host == host_id) & Job.status.in_(endable))
        .returning(Job.kind, Job.group_name)
        .tuples()
        .execute()
    )
    if not done:
        return False
    ((kind, group),) = done
    if status in ("failed", "lost"):  # one line each, for the journal
        host = Host.get_or_none(Host.id == host_id)
        log.warning(
            "job %s (%s%s) on host %s %s: %s",
            job_id,
            kind,
            f" of group {group}" if group else "",
            host.name if host else host_id,
            status,
            error or "no error given",
        )
    waiting = hot.sharing_hosts_waiting(host_id, job_id)
    events.append(JobEnded(job_id, host_id, status, tuple(waiting), kind))
    if status in ("succeeded", "warning") and kind in ("backup", "copy"):
        job = Job.get_by_id(job_id)  # only what may be followed by a copy, or end one
        copy_after(events, job, summary)
        copied(job)
    if status == "failed":
        job = Job.get_by_id(job_id)
        again = retry.after_failure(job, now)
        if again is not None:
            group, params, not_before = again
            create(
                events,
                host_id,
                job.kind,
                job.actor_kind,
                job.actor_user_id,
                group,
                params,
                schedule=job.schedule_id,
                not_before=not_before,
                repository=job.repository_id,  # the same repositories, even if the group moved
                from_repository=job.from_repository_id,
            )
    return True


def copy_after(events: Events, job: Job, summary: Optional[dict]) -> None:
    """A backup of a group that names a second repository is followed by a
    copy of its new snapshot into that one (3-2-1), a job of its own."""
    snapshot = (summary or {}).get("snapshot_id")
    if not isinstance(snapshot, str) or not SNAPSHOT_ID.match(snapshot):
        return  # not a backup, one that made no snapshot, or an id that is none
    if job.kind != "backup" or job.group_id is None:
        return
    group = SourceGroup.get_or_none(SourceGroup.id == job.group_id)
    if group is None or group.copy_to_id is None or job.repository_id is None:
        return
    if group.copy_cron:
        return  # its copies run on their own schedule (scheduling.copies)
    if group.copy_to_id == job.repository_id:
        return  # named as its own copy: nothing to do
    create(
        events,
        job.host_id,
        "copy",
        job.actor_kind,
        job.actor_user_id,
        group,
        copy_params(group, [snapshot]),
        schedule=job.schedule_id,
        repository=group.copy_to_id,
        from_repository=job.repository_id,
    )


def copied(job: Job) -> None:
    """A copy on its group's schedule that got through: the group's copies
    are made up to its newest snapshot (scheduling.copies takes those
    after). Moved on success only, so a copy that failed for good leaves its
    snapshots for the next one."""
    named = (job.params or {}).get("snapshots") or []
    if job.kind != "copy" or job.group_id is None or not named:
        return
    newest = (
        Snapshot.select(pw.fn.MAX(Snapshot.time))
        .where(
            (Snapshot.host == job.host_id)
            & (Snapshot.repository == job.from_repository_id)
            & Snapshot.snapshot_id.in_(named)
        )
        .scalar()
    )
    if newest is not None:
        SourceGroup.update(copied_until=newest).where(
            (SourceGroup.id == job.group_id)
            & SourceGroup.copy_cron.is_null(False)
            & (SourceGroup.copied_until.is_null() | (SourceGroup.copied_until < newest))
        ).execute()


def backup_params(group: SourceGroup) -> dict[str, Any]:
    """What a backup of the group carries, frozen at job creation (run now
    or fired by a schedule)."""
    return protocol.backup_params(
        group.name,
        group.includes,
        group.excludes,
        group.pre_hook,
        group.post_hook,
        group.hook_timeout,
        group.timeout,
    )


def copy_params(group: SourceGroup, snapshots: Sequence[str] = ()) -> dict[str, Any]:
    """What a copy of the group's snapshots carries: these snapshots, or
    (none named) every snapshot of the group the copy lacks."""
    params: dict[str, Any] = {"group": group.name, "tag": group.name}
    if snapshots:
        params["snapshots"] = list(snapshots)
    return params


def cancel(events: Events, job_id: int, now: dt.datetime) -> str:
    """'cancelled' when it had not left fleetd, 'requested' when it is with
    the agent (the caller tells the agent; its report ends the job), or the
    final status it already has."""
    job = Job.get_by_id(job_id)
    if job.status == QUEUED and job.agent_job is None:
        end(events, job.host_id, job_id, "cancelled", error="cancelled before it started")
        return "cancelled"
    if job.status in WITH_AGENT or job.status == QUEUED:  # queued: in the agent's own queue
        Job.update(cancel_requested_at=now).where(Job.id == job_id).execute()
        return "requested"
    return job.status


def back(
    events: Events, host_id: int, keep: Optional[int], why: str
) -> tuple[list[int], list[tuple[int, str]]]:
    """An agent is back and caught up: what it no longer has is lost (see
    lose), and the cancels asked of what it still has are to be sent again
    (the first may have crossed its link going down, or reached a replica
    it had just left). (lost ids, (id, uid) to cancel)."""
    return lose(events, host_id, keep, why), hot.cancels_pending(host_id)


def lose(events: Events, host_id: int, keep: Optional[int], why: str) -> list[int]:
    """The agent of `host_id` no longer has these jobs: running ones are
    lost; dispatched ones never started and go back in the queue. `keep` is
    the job the agent says it still runs."""
    lost = []
    if keep is not None and keep < 0:  # a job the agent made itself, by its own id
        keep = hot.job_of_agent(host_id, keep)
    for job_id, status in hot.jobs_with_agent(host_id):
        if job_id == keep:
            continue
        if status == DISPATCHED:
            requeue(events, job_id, "its agent came back without it")
        elif end(events, host_id, job_id, "lost", error=why):
            lost.append(job_id)
    return lost


def fail(events: Events, host_id: int, job_id: int, error: str) -> bool:
    return end(events, host_id, job_id, "failed", error=error)


class Lifecycle:
    """Runs transitions in one transaction, then publishes their events."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus

    async def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(events, *args)` inside one transaction; events after commit."""
        events: Events = []
        result = await self.store.publishing(events, fn, events, *args)
        self.bus.publish(events, recorded=True)
        return result
