"""Copies on a group's own schedule (3-2-1): a group with a copy cron is
not copied after each backup; when the cron is due (UTC, on fleetd's
ticker), one copy job takes the group's snapshots in its first repository
that are newer than the last copy's, as fleetd's snapshot list knows them.
Naming them (rather than "all the copy lacks") keeps a snapshot the copy's
own retention forgot from being copied back.

The job is queued on the group's host, online or not, and waits its turn
in both repositories' queues; a copy still queued from the last time is
not made again. The group's copies count as made up to a time only once a
copy succeeded: one that failed for good leaves its snapshots to the next.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from ...common.protocol import MAX_COPY_SNAPSHOTS
from ..events import Event
from ..jobs import lifecycle
from ..store.models import Job, Snapshot, SourceGroup
from ..store.queries import NOT_YET, earliest_due
from . import group_crons


def scheduled() -> list[SourceGroup]:
    return list(
        SourceGroup.select().where(
            SourceGroup.copy_cron.is_null(False) & SourceGroup.copy_to.is_null(False)
        )
    )


def pending(group: SourceGroup) -> bool:
    return (
        Job.select()
        .where(
            (Job.group == group.id)
            & (Job.kind == "copy")
            & Job.status.in_((lifecycle.QUEUED, lifecycle.DISPATCHED))
        )
        .exists()
    )


def new_snapshots(group: SourceGroup, source: Optional[int]) -> list[Snapshot]:
    """The group's snapshots in its first repository since the last copy
    (all of them before a first), oldest first."""
    query = Snapshot.select().where(
        (Snapshot.host == group.host_id) & (Snapshot.repository == source)
    )
    if group.copied_until is not None:
        query = query.where(Snapshot.time > group.copied_until)
    return [s for s in query.order_by(Snapshot.time) if group.name in (s.tags or [])]


def copy_now(events: list[Event], group: SourceGroup, now: dt.datetime) -> Optional[int]:
    """The copy job of a due group's new snapshots (None: nothing new, or
    one still waits)."""
    if pending(group):
        return None
    source = lifecycle.repository_of(group, group.host_id)
    snaps = new_snapshots(group, source)[:MAX_COPY_SNAPSHOTS]  # the rest next time
    if not snaps or source is None:
        return None
    job = lifecycle.create(
        events,
        group.host_id,
        "copy",
        "system",
        group=group,
        params=lifecycle.copy_params(group, [s.snapshot_id for s in snaps]),
        repository=group.copy_to_id,
        from_repository=source,
    )
    return job.id  # copied_until moves when it succeeds (lifecycle.copied)


def run_due(events: list[Event], now: dt.datetime) -> None:
    group_crons.run_due(
        events,
        now,
        scheduled(),
        SourceGroup.copy_cron,
        SourceGroup.next_copy_at,
        lambda evs, group: copy_now(evs, group, now),
        "copy",
        "nothing new, or one still waits",
    )


def next_due() -> Optional[dt.datetime]:
    """The earliest due copy (dt.datetime.min: one not computed yet)."""
    return earliest_due(
        f'SELECT MIN(COALESCE("next_copy_at", {NOT_YET})) FROM "source_group" '
        'WHERE "copy_cron" IS NOT NULL AND "copy_to_id" IS NOT NULL'
    )
