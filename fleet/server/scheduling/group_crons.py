"""A source group's own cron (copies, drills): each group's next due time
is a column; a look runs what is due and moves it to the cron's next fire."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Callable, Optional

import peewee as pw

from ...common import cron
from ..events import Event
from ..store.models import SourceGroup

log = logging.getLogger("fleetd.scheduling")

UTC = dt.timezone.utc


def run_due(
    events: list[Event],
    now: dt.datetime,
    groups: Iterable[SourceGroup],
    cron_field: pw.Field,
    due_field: pw.Field,
    act: Callable[[list[Event], SourceGroup], Optional[int]],
    what: str,
    skipped: str,
) -> None:
    """For each group: a due time not computed yet (new, or its cron just
    set) is computed from now; one that has come runs `act` (a job, or None
    with `skipped` logged) and moves on to the next fire."""
    for group in groups:
        due_at = getattr(group, due_field.name)
        if due_at is not None and due_at > now:
            continue
        if due_at is not None:
            made = act(events, group)
            log.info(
                "group %s of host %s: %s %s",
                group.name,
                group.host_id,
                what,
                f"job {made}" if made else f"skipped ({skipped})",
            )
        due = cron.next_fire(getattr(group, cron_field.name), UTC, now)
        SourceGroup.update({due_field: due}).where(SourceGroup.id == group.id).execute()
