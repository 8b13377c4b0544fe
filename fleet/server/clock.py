"""fleetd's one clock. Everything that is due at a time (retries, lost jobs,
and later schedules, maintenance and history pruning) reads the time and
sleeps through a Clock, so tests drive it by hand instead of waiting."""

from __future__ import annotations

import asyncio
import datetime as dt

from ..common.timefmt import utcnow


class Clock:
    """Wall-clock UTC (naive, as the store keeps it)."""

    def now(self) -> dt.datetime:
        return utcnow()

    async def sleep_until(self, when: dt.datetime) -> None:
        delay = (when - self.now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


class FakeClock(Clock):
    """A clock that moves only when told: `advance(seconds)` wakes sleepers."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1)
        self._moved = asyncio.Event()

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += dt.timedelta(seconds=seconds)
        self._moved.set()
        self._moved = asyncio.Event()

    async def sleep_until(self, when: dt.datetime) -> None:
        while self._now < when:
            await self._moved.wait()
