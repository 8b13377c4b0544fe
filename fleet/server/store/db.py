"""Opening the database and running store work off the event loop.

fleetd's event loop never waits on disk: every store call runs on one
dedicated thread (SQLite allows one writer at a time anyway, and one
thread means one connection and no lock contention inside the process).

Results come back to the loop through one coalesced wake-up: the store
thread appends finished calls to a deque and calls call_soon_threadsafe
only when the deque was empty. (run_in_executor would write one byte per
call to asyncio's self-pipe, which signal.set_wakeup_fd shares: a flood of
store calls could fill it and a SIGTERM's byte would be dropped.)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import peewee as pw

from .migrations import migrate
from .models import db

T = TypeVar("T")

PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
    # FULL: an acknowledged write survives a power cut, not just a crash.
    "synchronous": "full",
}


def open_database(path: Path) -> pw.SqliteDatabase:
    """Open (creating if needed) the SQLite file, bind the models, migrate."""
    database = pw.SqliteDatabase(str(path), pragmas=PRAGMAS)
    db.initialize(database)
    database.connect(reuse_if_open=True)
    try:
        migrate(database)
    except Exception:
        database.close()
        raise
    return database


class Store:
    """Runs callables on the store thread: `await store.run(fn, *args)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._database: pw.SqliteDatabase | None = None
        # (future, ok, value) of finished calls, delivered to the loop in bulk
        self._done: collections.deque[tuple[asyncio.Future, bool, Any]] = collections.deque()
        self._done_lock = threading.Lock()
        self.wakeups = 0  # call_soon_threadsafe calls made (for tests)

    async def open(self) -> None:
        self._database = await self.run(open_database, self.path)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._executor.submit(self._call, future, functools.partial(fn, *args, **kwargs))
        return await future

    def _call(self, future: asyncio.Future, call: Callable[[], Any]) -> None:
        """On the store thread: run one call (unless its caller is gone) and
        hand the outcome over."""
        if future.cancelled():  # a cancelled caller's work is skipped, as run_in_executor does
            return
        try:
            outcome: tuple[asyncio.Future, bool, Any] = (future, True, call())
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (future, False, exc)
        with self._done_lock:
            wake = not self._done
            self._done.append(outcome)
        if wake:
            self.wakeups += 1
            try:
                future.get_loop().call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _deliver(self) -> None:
        """On the loop: complete every call finished so far."""
        with self._done_lock:
            done, self._done = self._done, collections.deque()
        for future, ok, value in done:
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def atomic(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn inside one transaction on the store thread."""

        def call() -> T:
            with db.atomic():
                return fn(*args, **kwargs)

        return await self.run(call)

    async def close(self) -> None:
        if self._database is not None:
            await self.run(self._database.close)
            self._database = None
        self._executor.shutdown(wait=True)
