"""Alerts: what fleet.server.health finds wrong, kept with a lifecycle.

Every ALERT_EVERY seconds (and soon after a job ends or a host goes
offline) fleetd looks at the fleet's health with the default thresholds.
A problem with no open alert of its key raises one; one that persists
updates its message and severity; an open alert whose problem is gone is
resolved. Acknowledging (`fleetctl alerts ack`) silences nothing in the
store; it says a person has seen it. Each raise and resolve is one log line.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Optional

from .. import health
from ..events import AlertChanged, Event
from ..jobs import lifecycle
from ..store.models import Alert

log = logging.getLogger("fleetd.alerts")

ALERT_EVERY = 60.0  # seconds between looks
# at most this often when jobs keep ending (each look reads the whole fleet)
MIN_GAP = dt.timedelta(seconds=10)


def key_of(problem: dict[str, Any]) -> str:
    """What makes two problems one alert: the kind and what it is about,
    not the job or the message."""
    return "|".join(str(problem.get(k) or "") for k in ("kind", "host", "group", "repository"))


def find_problems(now: dt.datetime) -> list[dict[str, Any]]:
    """The fleet's problems now, at the default thresholds (a read of the
    whole fleet: it runs on the store's scan thread, not inside a write)."""
    return health.build(now, health.DEFAULT_OFFLINE_AFTER, health.DEFAULT_UNCHECKED_AFTER, {})[
        "problems"
    ]


def evaluate(
    events: list[Event], now: dt.datetime, problems: list[dict[str, Any]]
) -> tuple[int, int]:
    """Raise, update and resolve alerts from the problems found now;
    (raised, resolved)."""
    found = {key_of(p): p for p in problems}
    open_ = {a.key: a for a in Alert.select().where(Alert.resolved_at.is_null())}
    raised = resolved = 0
    for key, p in found.items():
        alert = open_.get(key)
        if alert is None:
            created = Alert.create(
                key=key,
                kind=p["kind"],
                severity=p["severity"],
                host=p.get("host"),
                group_name=p.get("group"),
                repository=p.get("repository"),
                message=p["message"],
                raised_at=now,
                updated_at=now,
            )
            raised += 1
            log.warning("alert raised (%s): %s", p["severity"], p["message"])
            events.append(
                AlertChanged(
                    created.id,
                    True,
                    p["kind"],
                    p["severity"],
                    p.get("host"),
                    p.get("group"),
                    p["message"],
                )
            )
        elif (alert.message, alert.severity) != (p["message"], p["severity"]):
            Alert.update(message=p["message"], severity=p["severity"], updated_at=now).where(
                Alert.id == alert.id
            ).execute()
    for key, alert in open_.items():
        if key not in found:
            Alert.update(resolved_at=now, updated_at=now).where(Alert.id == alert.id).execute()
            resolved += 1
            log.info("alert %s resolved: %s", alert.id, alert.message)
            events.append(
                AlertChanged(
                    alert.id,
                    False,
                    alert.kind,
                    alert.severity,
                    alert.host,
                    alert.group_name,
                    alert.message,
                )
            )
    return raised, resolved


class AlertSource:
    """The ticker's view of alerts: a look every `every` seconds, and one
    soon after something changed (poke)."""

    name = "alerts"

    def __init__(self, lifecycle_: lifecycle.Lifecycle, every: float = ALERT_EVERY) -> None:
        self.lifecycle = lifecycle_
        self.every = dt.timedelta(seconds=every)
        self.due: Optional[dt.datetime] = None  # None: look at once
        self.last: Optional[dt.datetime] = None
        self.min_gap = min(MIN_GAP, self.every)

    def soon(self, now: dt.datetime) -> None:
        """Something changed: look within a second (no sooner than MIN_GAP
        after the last look), not a full period."""
        soon = now + dt.timedelta(seconds=1)
        if self.last is not None:
            soon = max(soon, self.last + self.min_gap)
        if self.due is None or soon < self.due:
            self.due = soon

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        return self.due or now

    async def run_due(self, now: dt.datetime) -> None:
        self.due, self.last = now + self.every, now
        found = await self.lifecycle.store.scan(find_problems, now)
        await self.lifecycle.apply(evaluate, now, found)
