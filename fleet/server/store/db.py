"""Opening the database and running store work off the event loop.

fleetd's event loop never waits on disk: every write runs on one
dedicated thread (SQLite allows one writer at a time anyway, and one
writing thread means no lock contention inside the process), and
transactions that queue up behind one another commit together. Reads that
need no transaction (listings, `jobs.show`, a log page) run on a second
thread with its own read-only connection: under WAL they see the last
commit and never wait for the writer, so a dispatch does not queue behind
a page of 500 hosts, nor a listing behind a batch of log lines. Reads of
the whole fleet's health (`status`, /metrics, the alerts' look: most of a
second at 10,000 hosts) have a third thread and connection of their own
(`scan`), so an operator's small reads do not queue behind them either.

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


class _Reader:
    """A reading thread with its own query_only connection (peewee keeps one
    per thread) and its own queue, started on its first call."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.calls: collections.deque[_Call] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None

    def submit(self, call: Callable[[], Any]) -> asyncio.Future:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        with self.ready:
            if self.closed or self.store._database is None:
                raise StoreClosed()
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self.thread.start()
            self.calls.append(_Call(future, call, False))
            self.ready.notify()
        return future

    def _work(self) -> None:
        database = db.obj
        database.connect(reuse_if_open=True)
        try:
            database.execute_sql("PRAGMA query_only = 1")
            while True:
                with self.ready:
                    while not self.calls and not self.closed:
                        self.ready.wait()
                    if not self.calls:
                        return  # closed and drained
                    call = self.calls.popleft()
                if not call.future.cancelled():
                    self.store._finish(
                        call, *self.store._outcome(functools.partial(_snapshot, call.call))
                    )
        finally:
            database.close()

    async def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join)


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
        self._reader = _Reader(self, "store-read")
        self._scanner = _Reader(self, "store-scan")
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
        return await self._reader.submit(functools.partial(fn, *args, **kwargs))

    async def scan(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like read, on a thread of its own: for reads of the whole fleet
        that take long enough to hold up everyone else's."""
        return await self._scanner.submit(functools.partial(fn, *args, **kwargs))

    # -- the store threads --------------------------------------------------

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
        for reader in (self._reader, self._scanner):  # each closes its connection as it ends
            await reader.close()
        if self._database is not None:
            await self.run(self._database.close)
            self._database = None
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
