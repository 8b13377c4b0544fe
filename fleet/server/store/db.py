"""Opening the database and running store work off the event loop.

fleetd's event loop never waits on disk: every write runs on one
dedicated thread (SQLite allows one writer at a time anyway, and one
writing thread means no lock contention inside the process), and
transactions that queue up behind one another commit together. Reads that
need no transaction (listings, `jobs.show`, a log page) run on a second
thread with its own read-only connection: under WAL they see the last
commit and never wait for the writer, so a dispatch does not queue behind
a page of 500 hosts, nor a listing behind a batch of log lines.

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
import traceback
from collections.abc import Callable
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


def in_savepoints(calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    """Run each call under its own savepoint, all in one transaction: a call
    that raises undoes its own writes only. Returns (ok, result or
    exception) per call; raises when the commit itself fails."""
    outcomes: list[tuple[bool, Any]] = []
    with db.atomic():
        for call in calls:
            try:
                with db.atomic():
                    outcomes.append((True, call()))
            except Exception as exc:
                outcomes.append((False, exc))
    return outcomes


class StoreClosed(RuntimeError):
    """The store was closed: fleetd is stopping."""

    def __init__(self) -> None:
        super().__init__("the store is closed")


def _snapshot(call: Callable[[], T]) -> T:
    """A read in one transaction: its queries see one state of the store,
    whatever the writer commits meanwhile."""
    with db.atomic():
        return call()


class _Call:
    __slots__ = ("future", "call", "atomic")

    def __init__(self, future: asyncio.Future, call: Callable[[], Any], atomic: bool) -> None:
        self.future = future
        self.call = call
        self.atomic = atomic


GROUP_MAX = 500  # transactions committed together at most


class Store:
    """Runs callables on the store thread: `await store.run(fn, *args)`, or
    `await store.atomic(fn, *args)` for one transaction.

    Group commit: transactions that wait while another commits are run
    together, each under its own savepoint, and committed with one fsync;
    each caller hears of its own outcome once that commit is done (a call
    that raises rolls back its savepoint only). A burst of small writes
    (3,000 run-nows, every agent's reports) costs a few commits, not one
    each.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._database: pw.SqliteDatabase | None = None
        self._calls: collections.deque[_Call] = collections.deque()
        self._bulk: collections.deque[_Call] = collections.deque()  # served when nothing else waits
        self._ready = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._reads: collections.deque[_Call] = collections.deque()
        self._reads_ready = threading.Condition()
        self._reads_closed = False
        self._reader: threading.Thread | None = None
        # (future, ok, value) of finished calls, delivered to the loop in bulk
        self._done: collections.deque[tuple[asyncio.Future, bool, Any]] = collections.deque()
        self._done_lock = threading.Lock()
        self.wakeups = 0  # call_soon_threadsafe calls made (for tests)
        self.commits = 0  # group commits made (for tests)

    async def open(self) -> None:
        self._database = await self.run(open_database, self.path)

    def _submit(
        self, fn: Callable[..., Any], args: Any, kwargs: Any, atomic: bool, bulk: bool = False
    ) -> asyncio.Future:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._closed:
                raise StoreClosed()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="store", daemon=True)
                self._thread.start()
            queue = self._bulk if bulk else self._calls
            queue.append(_Call(future, functools.partial(fn, *args, **kwargs), atomic))
            self._ready.notify()
        return future

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._submit(fn, args, kwargs, atomic=False)

    async def atomic(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn inside one transaction on the store thread."""
        return await self._submit(fn, args, kwargs, atomic=True)

    async def bulk(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like run, for big work (a batch of reports, a page of a listing):
        it waits while smaller calls (a dispatch, an operator's request)
        are queued, so those are not held up behind it."""
        return await self._submit(fn, args, kwargs, atomic=False, bulk=True)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the reader thread: it may only read (the connection is
        query_only), and it sees every write whose call has returned."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        with self._reads_ready:
            if self._reads_closed or self._database is None:
                raise StoreClosed()
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read_work, name="store-read", daemon=True
                )
                self._reader.start()
            self._reads.append(_Call(future, functools.partial(fn, *args, **kwargs), False))
            self._reads_ready.notify()
        return await future

    # -- the store threads --------------------------------------------------

    def _read_work(self) -> None:
        database = db.obj
        # this thread's own connection: peewee keeps one per thread
        database.connect(reuse_if_open=True)
        try:
            database.execute_sql("PRAGMA query_only = 1")
            while True:
                with self._reads_ready:
                    while not self._reads and not self._reads_closed:
                        self._reads_ready.wait()
                    if not self._reads:
                        return  # closed and drained
                    call = self._reads.popleft()
                if not call.future.cancelled():
                    self._finish(call, *self._outcome(functools.partial(_snapshot, call.call)))
        finally:
            database.close()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._calls and not self._bulk and not self._closed:
                    self._ready.wait()
                if not self._calls and not self._bulk:
                    return  # closed and drained
                first = self._calls.popleft() if self._calls else self._bulk.popleft()
                group = [first]
                if first.atomic:  # every transaction already waiting joins it
                    while self._calls and self._calls[0].atomic and len(group) < GROUP_MAX:
                        group.append(self._calls.popleft())
            group = [c for c in group if not c.future.cancelled()]  # their callers are gone
            if not group:
                continue
            if group[0].atomic:
                self._transactions(group)
            else:
                self._finish(group[0], *self._outcome(group[0].call))

    @staticmethod
    def _outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, call()
        except BaseException as exc:  # handed to the awaiting coroutine
            # without the frames' locals: a cursor they hold would keep its
            # connection open after close (and the WAL file with it)
            traceback.clear_frames(exc.__traceback__)
            return False, exc

    def _transactions(self, group: list[_Call]) -> None:
        try:
            outcomes = in_savepoints([c.call for c in group])
            self.commits += 1
        except BaseException as exc:  # the commit itself failed: nobody's write happened
            outcomes = [(False, exc)] * len(group)
        for c, (ok, value) in zip(group, outcomes):
            self._finish(c, ok, value)

    def _finish(self, c: _Call, ok: bool, value: Any) -> None:
        with self._done_lock:
            wake = not self._done
            self._done.append((c.future, ok, value))
        if wake:
            self.wakeups += 1
            try:
                c.future.get_loop().call_soon_threadsafe(self._deliver)
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

    async def close(self) -> None:
        with self._reads_ready:  # the reader closes its connection as it ends
            self._reads_closed = True
            self._reads_ready.notify()
        if self._reader is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._reader.join)
        if self._database is not None:
            await self.run(self._database.close)
            self._database = None
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
