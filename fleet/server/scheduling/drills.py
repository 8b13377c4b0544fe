"""Restore drills on a group's own cron (UTC, on fleetd's ticker): when
one is due, a drill job restores a sample of the group's latest snapshot
(as fleetd's list knows it) on the group's host, checks it and cleans up
(fleet.agent.drill). A drill still queued from the last time is not made
again; a group with no snapshot yet has nothing to prove (its backups are
overdue, which status says)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from ...common.drills import DEFAULT_SAMPLE
from ..events import Event
from ..jobs import lifecycle
from ..store.models import Job, Snapshot, SourceGroup
from ..store.queries import NOT_YET, earliest_due
from . import group_crons


def latest_snapshot(group: SourceGroup) -> Optional[Snapshot]:
    """The group's newest snapshot in the repository it backs up into."""
    repository = lifecycle.repository_of(group, group.host_id)
    query = (
        Snapshot.select()
        .where((Snapshot.host == group.host_id) & (Snapshot.repository == repository))
        .order_by(Snapshot.time.desc())
    )
    return next((s for s in query if group.name in (s.tags or [])), None)


def drill_params(group: SourceGroup, snap: Snapshot) -> dict[str, Any]:
    return {
        "snapshot": snap.snapshot_id,
        "sample": group.drill_sample or DEFAULT_SAMPLE,
        "tag": group.name,
        "group": group.name,
    }


def pending(group: SourceGroup) -> bool:
    return (
        Job.select()
        .where(
            (Job.group == group.id)
            & (Job.kind == "drill")
            & Job.status.in_((lifecycle.QUEUED, lifecycle.DISPATCHED))
        )
        .exists()
    )


def drill_now(events: list[Event], group: SourceGroup) -> Optional[int]:
    """A due group's drill job (None: no snapshot yet, or one still waits)."""
    if pending(group):
        return None
    snap = latest_snapshot(group)
    if snap is None:
        return None
    job = lifecycle.create(
        events,
        group.host_id,
        "drill",
        "system",
        group=group,
        params=drill_params(group, snap),
        repository=snap.repository_id,
    )
    return job.id


def run_due(events: list[Event], now: dt.datetime) -> None:
    group_crons.run_due(
        events,
        now,
        SourceGroup.select().where(SourceGroup.drill_cron.is_null(False)),
        SourceGroup.drill_cron,
        SourceGroup.next_drill_at,
        drill_now,
        "drill",
        "no snapshot yet, or one still waits",
    )


def next_due() -> Optional[dt.datetime]:
    """The earliest due drill (dt.datetime.min: one not computed yet)."""
    return earliest_due(
        f'SELECT MIN(COALESCE("next_drill_at", {NOT_YET})) FROM "source_group" '
        'WHERE "drill_cron" IS NOT NULL'
    )
