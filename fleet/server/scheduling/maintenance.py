"""Repository maintenance on fleetd's ticker: forget, prune and check.

Each repository has a cron expression (UTC) per action and the next due
time of each as a row. When one is due, fleetd makes the jobs on one online
host that uses the repository (the least busy; actor system):

- forget: one job per source group with a retention policy, of every host
  using the repository, on that group's own host (its agent selects its
  own snapshots of the group, under the names it recorded them), queued
  there while the host is offline;
- prune: one job; check: one job, reading the repository's check subset.

What is still waiting from the last time (an offline host's forget, a
prune held by backups) is not made again.

They then wait their turn in the repository's queue (see hot.EXCLUSIVE):
never beside a backup into it. With no host online the action is skipped
and tried again OFFLINE_RETRY later, so it is caught up once one is back.
Everything here but the source runs on the store thread.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Optional

from peewee import fn

from ...common import cron
from ..events import Event
from ..jobs import lifecycle
from ..store.models import Host, HostRepository, Job, Maintenance, Repository, SourceGroup
from ..store.queries import NOT_YET, earliest_due, hot

log = logging.getLogger("fleetd.maintenance")

ACTIONS = ("forget", "prune", "check")
DEFAULTS = {
    "forget_cron": "30 4 * * *",  # daily
    "prune_cron": "0 5 * * 0",  # weekly, Sunday
    "check_cron": "0 6 * * 3",  # weekly, Wednesday
    "check_subset": "5%",
}
OFFLINE_RETRY = dt.timedelta(minutes=10)
UTC = dt.timezone.utc


def defaults(repository_id: int, now: dt.datetime) -> None:
    """A new repository's maintenance: the defaults, due from now on."""
    Maintenance.insert(repository=repository_id, updated_at=now, **DEFAULTS).execute()


def users(repository_id: int) -> bool:
    return HostRepository.select().where(HostRepository.repository == repository_id).exists()


def runner(repository_id: int) -> Optional[Host]:
    """The online host using the repository that does its maintenance: the
    one with the fewest jobs waiting or running, then the oldest."""
    active = Job.select(fn.COUNT(Job.id)).where(
        (Job.host == Host.id) & Job.status.in_((lifecycle.QUEUED, *lifecycle.WITH_AGENT))
    )
    return (
        Host.select()
        .join(HostRepository)
        .where((HostRepository.repository == repository_id) & Host.online)
        .order_by(active, Host.id)
        .first()
    )


def pending(repo: Repository, action: str) -> set[Optional[int]]:
    """The groups (None: the whole repository) whose `action` of the
    repository is still queued or dispatched: not made again meanwhile."""
    rows = Job.select(Job.group).where(
        (Job.kind == action)
        & (Job.repository == repo.id)
        & Job.status.in_((lifecycle.QUEUED, lifecycle.DISPATCHED))
    )
    return {job.group_id if action == "forget" else None for job in rows}


def retentions(repo: Repository) -> list[tuple[SourceGroup, dict]]:
    """The groups kept in `repo` and by which rules: those that back up into
    it (their retention) and those that copy into it (their copy's
    retention, else their own)."""
    hosts = [
        hid
        for (hid,) in HostRepository.select(HostRepository.host)
        .where(HostRepository.repository == repo.id)
        .tuples()
    ]
    defaults = {hid: hot.default_repository(hid) for hid in hosts}
    out = []
    groups = (
        SourceGroup.select(SourceGroup, Host)
        .join(Host)
        .where(SourceGroup.host.in_(hosts))
        .order_by(Host.name, SourceGroup.name)
    )
    for g in groups:
        if (g.repository_id or defaults[g.host_id]) == repo.id:
            out.append((g, g.retention))
        elif g.copy_to_id == repo.id:
            out.append((g, g.retention if g.copy_retention is None else g.copy_retention))
    return out


def make_jobs(
    events: list[Event],
    repo: Repository,
    action: str,
    subset: str,
    runner_host: Host,
    user: Optional[int] = None,
) -> list[int]:
    """The jobs of one maintenance action of `repo` (forget, prune, check or
    unlock); by the user who asked, or the system. Prune, check and unlock
    run on `runner_host`; a forget on each group's own host (its agent
    selects its own snapshots, by the names it recorded them under), queued
    there while it is offline. What is still waiting from the last time is
    not made again."""
    actor = ("user", user) if user is not None else ("system", None)
    base: dict[str, Any] = {"repository": repo.name, "maintenance": action}
    waiting = pending(repo, action)

    def make(host: int, kind: str, params: dict[str, Any], g: Optional[SourceGroup] = None) -> int:
        return lifecycle.create(events, host, kind, *actor, g, params, repository=repo.id).id

    if action != "forget":
        if None in waiting:
            return []
        params = {**base, "read_data_subset": subset} if action == "check" and subset else base
        return [make(runner_host.id, action, params)]
    made = []
    for g, retention in retentions(repo):
        if not retention or g.id in waiting:
            continue  # keeps everything (restic refuses an empty policy), or still waits
        params = {**base, "tag": g.name, "group": g.name, "retention": retention}
        made.append(make(g.host_id, "forget", params, g))
    return made


def run_due(events: list[Event], now: dt.datetime) -> None:
    """Every due action of every repository: its jobs made, its next due
    time set (or, with no host online, tried again later)."""
    rows = Maintenance.select(Maintenance, Repository).join(Repository)
    for m in rows:
        changes: dict[str, Any] = {}
        for action in ACTIONS:
            expr = getattr(m, f"{action}_cron")
            due = getattr(m, f"next_{action}_at")
            field = f"next_{action}_at"
            if not expr:
                if due is not None:
                    changes[field] = None
                continue
            if due is None:  # new, or just set: from now on
                changes[field] = cron.next_fire(expr, UTC, now)
                continue
            if due > now:
                continue
            host = runner(m.repository.id)
            if host is None and not users(m.repository.id):
                changes[field] = cron.next_fire(expr, UTC, now)  # nobody uses it: nothing to do
                continue
            if host is None:
                log.warning(
                    "repository %s: %s due, but no host using it is online; trying again in %s",
                    m.repository.name,
                    action,
                    OFFLINE_RETRY,
                )
                changes[field] = now + OFFLINE_RETRY
                continue
            made = make_jobs(events, m.repository, action, m.check_subset, host)
            log.info(
                "repository %s: %s on %s, job(s) %s",
                m.repository.name,
                action,
                host.name,
                ", ".join(map(str, made)) or "none (no group keeps less than everything)",
            )
            changes[field] = cron.next_fire(expr, UTC, now)
        if changes:
            Maintenance.update(**changes).where(Maintenance.repository == m.repository.id).execute()


# each enabled action's due time; NOT_YET for one not computed yet (sorts first)
_DUE = " UNION ALL ".join(
    f'SELECT COALESCE("next_{a}_at", {NOT_YET}) AS "t" FROM "maintenance" WHERE "{a}_cron" IS NOT NULL'
    for a in ACTIONS
)


def next_due() -> Optional[dt.datetime]:
    """The earliest due time (dt.datetime.min for an action whose time is
    not computed yet); None when no repository has maintenance. One query."""
    return earliest_due(f'SELECT MIN("t") FROM ({_DUE}) AS "due"')
