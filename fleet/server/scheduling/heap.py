"""Keeping the garbage collector's pauses short with 10,000 connections.

CPython's full (generation 2) collection walks every tracked object; with
10,000 agent connections that is a pause of 0.5-2 s, every few seconds
while the heap grows and every few tens of seconds after. Every minute
this source moves the objects that survived so far into the permanent
generation (gc.freeze), so automatic collections only walk what is new;
once an hour it unfreezes and runs one full collection, so garbage cycles
that were frozen (a connection that closed) are freed at last.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import time
from typing import Optional

log = logging.getLogger("fleetd.heap")

FREEZE_EVERY = dt.timedelta(seconds=60)
FULL_EVERY = dt.timedelta(hours=1)


class HeapKeeper:
    name = "heap keeper"

    def __init__(self, started_at: dt.datetime) -> None:
        self.next_freeze = started_at
        self.next_full = started_at + FULL_EVERY
        self.full_collections = 0

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        return min(self.next_freeze, self.next_full)

    async def run_due(self, now: dt.datetime) -> None:
        if now >= self.next_full:
            started = time.monotonic()
            gc.unfreeze()
            collected = gc.collect()
            self.full_collections += 1
            self.next_full = now + FULL_EVERY
            log.info(
                "full collection: %d objects freed in %.0f ms",
                collected,
                (time.monotonic() - started) * 1000,
            )
        gc.freeze()
        self.next_freeze = now + FREEZE_EVERY
