"""Keeping the garbage collector's pauses short with 10,000 connections.

CPython's full (generation 2) collection walks every tracked object; with
10,000 agent connections that is a pause of 0.5-2 s, every few seconds
while the heap grows and every few tens of seconds after (0.2 s every 2.5 s
with 3,000 agents streaming logs). So what survives a full collection is
moved into the permanent generation (gc.freeze) at once, and every ten
seconds so is whatever survived since (10,000 connections made at start
are frozen before a full collection walks them): automatic collections
only walk what is new. Once an hour this source unfreezes and runs one full collection, so
garbage cycles that were frozen (a connection that closed) are freed at last.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import time
from typing import Optional

log = logging.getLogger("fleetd.heap")

FREEZE_EVERY = dt.timedelta(seconds=10)
FULL_EVERY = dt.timedelta(hours=1)


def freeze_survivors(phase: str, info: dict) -> None:
    """A gc callback: what outlived a full collection is long-lived, so the
    next full collection need not walk it again."""
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


class HeapKeeper:
    name = "heap keeper"

    def __init__(self, started_at: dt.datetime) -> None:
        self.next_freeze = started_at
        self.next_full = started_at + FULL_EVERY
        self.full_collections = 0
        if freeze_survivors not in gc.callbacks:  # once per process, however many servers
            gc.callbacks.append(freeze_survivors)

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
