"""The heap keeper: survivors are frozen every minute (automatic collections
skip them), and once an hour everything is unfrozen and collected, so a
frozen garbage cycle is freed at last."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import weakref

from fleet.server.scheduling.heap import FREEZE_EVERY, FULL_EVERY, HeapKeeper


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freezes_every_minute_and_frees_frozen_cycles_every_hour() -> None:
    start = dt.datetime(2026, 1, 1)
    keeper = HeapKeeper(start)
    try:
        assert asyncio.run(keeper.next_due(start)) == start  # at once: what start-up made
        garbage = Cycle()
        alive = weakref.ref(garbage)
        asyncio.run(keeper.run_due(start))
        assert gc.get_freeze_count() > 0
        del garbage
        gc.collect()
        assert alive() is not None  # frozen: no collection sees it
        assert asyncio.run(keeper.next_due(start)) == start + FREEZE_EVERY
        for minutes in range(1, 60):
            asyncio.run(keeper.run_due(start + minutes * FREEZE_EVERY))
        assert keeper.full_collections == 0 and alive() is not None
        asyncio.run(keeper.run_due(start + FULL_EVERY))
        assert keeper.full_collections == 1
        assert alive() is None  # the hourly full collection freed the cycle
        assert gc.get_freeze_count() > 0  # and froze the survivors again
    finally:
        gc.unfreeze()
