"""What the ticker wakes for today: retries whose delay ran out, and running
jobs of hosts that went silent for longer than lost_after."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, Optional

from peewee import fn

from ..jobs import lifecycle
from ..jobs.dispatch import Dispatcher
from ..store.models import Host, Job

log = logging.getLogger("fleetd.due")


class Retries:
    """Queued jobs with a due time (a retry's delay): offered to their host when due."""

    name = "retries"

    def __init__(self, lifecycle_: lifecycle.Lifecycle, dispatcher: Dispatcher) -> None:
        self.lifecycle = lifecycle_
        self.dispatcher = dispatcher
        self.horizon: Optional[dt.datetime] = None  # due times up to here were offered

    def _after(self):
        cond = (Job.status == lifecycle.QUEUED) & Job.not_before.is_null(False)
        return cond if self.horizon is None else cond & (Job.not_before > self.horizon)

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        cond = self._after()
        return await self.lifecycle.store.read(
            lambda: Job.select(fn.MIN(Job.not_before)).where(cond).scalar()
        )

    async def run_due(self, now: dt.datetime) -> None:
        cond = self._after() & (Job.not_before <= now)
        hosts = await self.lifecycle.store.read(
            lambda: [r.host_id for r in Job.select(Job.host).where(cond).distinct()]
        )
        self.horizon = now
        self.dispatcher.offer(*hosts)  # offline ones get theirs when they are back


class LostJobs:
    """A job with an agent that has been offline for lost_after seconds is
    lost (running) or back in the queue (dispatched, never started). Hosts
    offline since before this fleetd started get the full grace from its start."""

    name = "lost jobs"

    def __init__(
        self,
        lifecycle_: lifecycle.Lifecycle,
        lost_after: float,
        started_at: dt.datetime,
        connected: Callable[[int], bool],
    ) -> None:
        self.lifecycle = lifecycle_
        self.lost_after = dt.timedelta(seconds=lost_after)
        self.started_at = started_at
        self.connected = connected

    @staticmethod
    def _silent():
        return (
            Host.select(Host.id, Host.last_seen_at, Host.created_at)
            .join(Job, on=(Job.host == Host.id))
            .where((Host.online == False) & Job.status.in_(lifecycle.WITH_AGENT))  # noqa: E712
            .distinct()
        )

    def _seen(self, host: Host) -> dt.datetime:
        return max(host.last_seen_at or host.created_at, self.started_at)

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        def earliest() -> Optional[dt.datetime]:
            seen = [self._seen(row) for row in self._silent() if not self.connected(row.id)]
            return min(seen) + self.lost_after if seen else None

        return await self.lifecycle.store.read(earliest)

    async def run_due(self, now: dt.datetime) -> None:
        cutoff = now - self.lost_after

        def expire(events: list) -> list[int]:
            lost = []
            for row in self._silent():
                if self.connected(row.id) or self._seen(row) > cutoff:
                    continue
                lost += lifecycle.lose(
                    events,
                    row.id,
                    None,
                    "the host went offline during the job and did not come back in time",
                )
            return lost

        for job_id in await self.lifecycle.apply(expire):
            log.warning(
                "job %s lost: its host has been offline for over %d s",
                job_id,
                self.lost_after.total_seconds(),
            )
