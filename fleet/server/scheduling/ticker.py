"""One ticker for everything that is due at a time.

A source says when it is next due and does what is due; the ticker sleeps
until the earliest due time of all sources (or until poked because a new,
earlier one may exist), runs what is due, and sleeps again. Nothing polls:
with nothing due, it sleeps until poked. Retries and lost jobs are sources
today; schedules, maintenance, drills and history pruning join them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, Callable, Optional, Protocol

from ..clock import Clock

log = logging.getLogger("fleetd.ticker")

FAILURE_BACKOFF = 5.0  # seconds before a source that raised is asked again


class Source(Protocol):
    name: str

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]: ...

    async def run_due(self, now: dt.datetime) -> None: ...


class RowSource:
    """A source whose due times are rows: `next_due()` (on the store
    thread) gives the earliest, dt.datetime.min for one not computed yet
    (due now); `run_due(events, now)` runs in one transaction."""

    def __init__(
        self,
        name: str,
        lifecycle: Any,  # jobs.lifecycle.Lifecycle: store and transaction
        next_due: Callable[[], Optional[dt.datetime]],
        run_due: Callable[..., None],
    ) -> None:
        self.name = name
        self.lifecycle = lifecycle
        self._next_due = next_due
        self._run_due = run_due

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        due = await self.lifecycle.store.read(self._next_due)
        return now if due == dt.datetime.min else due

    async def run_due(self, now: dt.datetime) -> None:
        await self.lifecycle.apply(self._run_due, now)


class Ticker:
    def __init__(self, clock: Clock, sources: list[Source]) -> None:
        self.clock = clock
        self.sources = list(sources)
        self._poked = asyncio.Event()
        self._backoff: dict[int, dt.datetime] = {}  # a source that raised rests until then
        self.rounds = 0  # tests: how many times due work ran

    def poke(self) -> None:
        """Something changed that may be due sooner: look again."""
        self._poked.set()

    async def run(self) -> None:
        while True:
            self._poked.clear()
            now = self.clock.now()
            earliest: Optional[dt.datetime] = None
            for source in self.sources:
                resting = self._backoff.get(id(source))
                if resting is not None and resting > now:
                    earliest = resting if earliest is None else min(earliest, resting)
                    continue  # pokes do not cut a failed source's rest short
                self._backoff.pop(id(source), None)
                try:
                    due = await source.next_due(now)
                except Exception:
                    log.exception("%s: cannot tell when it is due", source.name)
                    due = self._rest(source, now)
                if due is None:
                    continue
                if due <= now:
                    try:
                        await source.run_due(now)
                    except Exception:  # one failed pass must not stop the next ones
                        log.exception("%s failed", source.name)
                        due = self._rest(source, now)
                    else:
                        self.rounds += 1
                        self._poked.set()  # what it did may have moved its next due time
                        continue
                earliest = due if earliest is None else min(earliest, due)
            if self._poked.is_set():
                continue
            await self._sleep(earliest)

    def _rest(self, source: Source, now: dt.datetime) -> dt.datetime:
        until = now + dt.timedelta(seconds=FAILURE_BACKOFF)
        self._backoff[id(source)] = until
        return until

    async def _sleep(self, until: Optional[dt.datetime]) -> None:
        poked = asyncio.ensure_future(self._poked.wait())
        waits = {poked}
        if until is not None:
            waits.add(asyncio.ensure_future(self.clock.sleep_until(until)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
