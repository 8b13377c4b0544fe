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
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase

from .migrations import migrate
from .models import db

log = logging.getLogger("fleetd.store")

SLOW = 2.0  # seconds: a store call (or group of them) taking longer is logged

T = TypeVar("T")

PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
    # FULL: an acknowledged write survives a power cut, not just a crash.
    "synchronous": "full",
}

SQLITE_NAME = "fleet.db"  # in the data directory, when no PostgreSQL is named
SCHEMES = ("postgresql", "postgres")


class LocationError(ValueError):
    """A --database that names no store fleetd can use."""


@dataclass(frozen=True)
class Location:
    """Where the store is: a SQLite file, or a PostgreSQL database given by
    libpq keywords (host, port, dbname, user, sslmode...). The password is
    never part of the URL (argv is world-readable): it comes from a file,
    the environment, or libpq's own ~/.pgpass."""

    sqlite: Optional[Path] = None
    postgresql: Optional[dict[str, str]] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def is_postgresql(self) -> bool:
        return self.postgresql is not None

    def describe(self) -> str:
        """For messages and logs: no password."""
        if self.sqlite is not None:
            return str(self.sqlite)
        where = dict(self.postgresql or {})
        host = where.get("host", "localhost")
        port = f":{where['port']}" if "port" in where else ""
        user = f"{where['user']}@" if "user" in where else ""
        return f"postgresql://{user}{host}{port}/{where.get('dbname', '')}"

    def url(self) -> str:
        """The URL that names this store again (no password), as written in
        the data directory."""
        if self.sqlite is not None:
            return f"sqlite://{self.sqlite}"
        from urllib.parse import quote, urlencode

        where = dict(self.postgresql or {})
        dbname = quote(where.pop("dbname", ""), safe="")
        return f"postgresql:///{dbname}" + (f"?{urlencode(where)}" if where else "")


def locate(url: str, password: Optional[str] = None, option: str = "--database") -> Location:
    """A --database value: `postgresql://[user@][host][:port]/dbname[?param=value...]`
    (libpq's URI: a Unix socket directory as ?host=/run/postgresql), or
    `sqlite:///path/to/fleet.db`. Raises LocationError (naming `option`)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = url[len("sqlite://") :] if url.startswith("sqlite://") else ""
        if not path.startswith("/"):
            raise LocationError(f"{url!r}: a SQLite store is sqlite:///absolute/path")
        return Location(sqlite=Path(path))
    if scheme not in SCHEMES:
        raise LocationError(
            f"{url!r}: a store is postgresql://[user@]host[:port]/dbname or sqlite:///path"
        )
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise LocationError("PostgreSQL needs psycopg 3: pip install 'fleet[postgresql]'") from None
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own words
        raise LocationError(f"{url!r}: {exc}") from None
    if "password" in params:
        raise LocationError(
            f"the {option} URL holds a password, which every user of this machine can read "
            "on a command line: give it in --database-password-file or "
            "FLEETD_DATABASE_PASSWORD (or libpq's ~/.pgpass) instead"
        )
    if not params.get("dbname"):
        raise LocationError(f"{url!r}: name the database (postgresql://host/DBNAME)")
    return Location(postgresql=params, password=password)


class FleetPostgres(PooledPostgresqlDatabase):
    """PostgreSQL as the store sees it: SQLite's INTEGER holds 64 bits, so
    every integer here is BIGINT (ids BIGSERIAL)."""

    field_types = {**pw.PostgresqlDatabase.field_types, "AUTO": "BIGSERIAL", "INT": "BIGINT"}


# connections one fleetd holds at most: the writer, the reader, the scan,
# the events' listener, and a few for the moments a thread reconnects
POOL_SIZE = 8


def libpq_params(where: Location, application_name: str = "fleetd") -> dict[str, str]:
    """libpq's keywords for a PostgreSQL location, its password included."""
    params = dict(where.postgresql or {})
    if where.password is not None:
        params["password"] = where.password
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", "10")
    return params


def connect(where: Union[Path, Location]) -> pw.Database:
    """The database object for a location, not yet connected nor bound."""
    if isinstance(where, Path):
        where = Location(sqlite=where)
    if where.sqlite is not None:
        return pw.SqliteDatabase(str(where.sqlite), pragmas=PRAGMAS)
    params = libpq_params(where)
    dbname = params.pop("dbname")
    # stale_timeout: a connection idle that long is made anew (a PostgreSQL
    # restart or a proxy's idle cut would otherwise surface on first use)
    return FleetPostgres(dbname, max_connections=POOL_SIZE, stale_timeout=300, **params)


def open_database(where: Union[Path, Location]) -> pw.Database:
    """Open (creating if needed) the store, bind the models, migrate."""
    database = connect(where)
    db.initialize(database)
    database.connect(reuse_if_open=True)
    try:
        migrate(database)
    except Exception:
        database.close()
        raise
    return database


def usable(database: pw.Database, reader: bool = False) -> None:
    """Before a call on this thread: a PostgreSQL connection the server
    dropped (a restart, a failover, a proxy's cut), or never made (it was
    down), is made now, so one call fails with it, not every call after;
    a reader's is made read-only again (never by peewee's autoconnect,
    which would not). Raises when PostgreSQL is still out of reach."""
    if not isinstance(database, pw.PostgresqlDatabase):
        return
    if not database.is_closed():
        if database.is_connection_usable():
            return
        database.manual_close()  # not back to the pool: it is broken
    database.connect()
    if reader:
        read_only(database)


def close_connection(database: pw.Database) -> None:
    """Close this thread's connection for good (a pooled one is closed, not
    kept: a reader's is read-only, and must not become a writer's)."""
    if isinstance(database, PooledPostgresqlDatabase):
        if not database.is_closed():
            database.manual_close()  # not close_all(): that closes other threads' too
    else:
        database.close()


def read_only(database: pw.Database) -> None:
    """Make this thread's connection a reader's: it cannot write, and each
    of its transactions sees one state of the store."""
    if isinstance(database, pw.PostgresqlDatabase):
        database.execute_sql(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        )
    else:
        database.execute_sql("PRAGMA query_only = 1")


def in_savepoints(
    calls: list[Callable[[], Any]],
    before_commit: Optional[Callable[[list[tuple[bool, Any]]], None]] = None,
) -> list[tuple[bool, Any]]:
    """Run each call under its own savepoint, all in one transaction: a call
    that raises undoes its own writes only. Returns (ok, result or
    exception) per call; raises when the commit itself fails.
    before_commit(outcomes) runs last inside the transaction."""
    outcomes: list[tuple[bool, Any]] = []
    with db.atomic():
        for call in calls:
            try:
                with db.atomic():
                    outcomes.append((True, call()))
            except Exception as exc:
                outcomes.append((False, exc))
        if before_commit is not None:
            before_commit(outcomes)
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
        try:
            if not isinstance(database, pw.PostgresqlDatabase):
                database.connect(reuse_if_open=True)
                read_only(database)
            while True:
                with self.ready:
                    while not self.calls and not self.closed:
                        self.ready.wait()
                    if not self.calls:
                        return  # closed and drained
                    call = self.calls.popleft()
                if call.future.cancelled():
                    continue
                ready = self.store._outcome(functools.partial(usable, database, True))
                if not ready[0]:  # PostgreSQL out of reach: this call fails, the next tries
                    self.store._finish(call, *ready)
                    continue
                self.store._finish(
                    call, *self.store._outcome(functools.partial(_snapshot, call.call))
                )
        finally:
            close_connection(database)

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


def describe(group: list[_Call]) -> str:
    """The functions of a group of calls, for a log line."""
    names = collections.Counter(
        getattr(getattr(c.call, "func", c.call), "__qualname__", "?") for c in group
    )
    return ", ".join(f"{n} x{k}" if k > 1 else n for n, k in names.most_common(5))


class _Call:
    __slots__ = ("future", "call", "atomic", "events")

    def __init__(
        self,
        future: asyncio.Future,
        call: Callable[[], Any],
        atomic: bool,
        events: Optional[list] = None,
    ) -> None:
        self.future = future
        self.call = call
        self.atomic = atomic
        self.events = events  # what the call makes, recorded before the commit


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

    def __init__(self, where: Union[Path, Location]) -> None:
        self.where = where
        self._database: pw.Database | None = None
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
        # writes events into the event table, on the store thread, inside a
        # transaction (fleet.server.replicas); None: one fleetd alone
        self.recorder: Optional[Callable[[list], None]] = None
        self.wakeups = 0  # call_soon_threadsafe calls made (for tests)
        self.commits = 0  # group commits made (for tests)

    async def open(self) -> None:
        self._database = await self.run(open_database, self.where)

    def _submit(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        atomic: bool,
        bulk: bool = False,
        events: Optional[list] = None,
    ) -> asyncio.Future:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._closed:
                raise StoreClosed()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="store", daemon=True)
                self._thread.start()
            queue = self._bulk if bulk else self._calls
            queue.append(_Call(future, functools.partial(fn, *args, **kwargs), atomic, events))
            self._ready.notify()
        return future

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._submit(fn, args, kwargs, atomic=False)

    async def atomic(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn inside one transaction on the store thread."""
        return await self._submit(fn, args, kwargs, atomic=True)

    async def publishing(self, events: list, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like atomic, for a transaction that makes events (fn appends them
        to `events`): with replicas (`recorder` set), they are written to
        the event table in that same transaction, so another replica hears
        of exactly what committed: those of every call of a group commit
        at once, before it commits (a call that raised adds none)."""
        return await self._submit(fn, args, kwargs, atomic=True, events=events)

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
                    break  # closed and drained
                first = self._calls.popleft() if self._calls else self._bulk.popleft()
                group = [first]
                if first.atomic:  # every transaction already waiting joins it
                    while self._calls and self._calls[0].atomic and len(group) < GROUP_MAX:
                        group.append(self._calls.popleft())
            group = [c for c in group if not c.future.cancelled()]  # their callers are gone
            if not group:
                continue
            if self._database is not None:
                ready = self._outcome(functools.partial(usable, self._database))
                if not ready[0]:  # PostgreSQL out of reach: these fail, the next try again
                    for c in group:
                        self._finish(c, *ready)
                    continue
            began = time.monotonic()
            if group[0].atomic:
                self._transactions(group)
            else:
                self._finish(group[0], *self._outcome(group[0].call))
            took = time.monotonic() - began
            if took > SLOW:  # every caller waited behind it: say what it was
                log.warning("the store's writer spent %.1f s on %s", took, describe(group))
        if self._database is not None:  # after the last call: none runs on a closed one
            close_connection(self._database)

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
        def record(outcomes: list[tuple[bool, Any]]) -> None:
            made = [e for c, (ok, _) in zip(group, outcomes) if ok and c.events for e in c.events]
            if made and self.recorder is not None:
                self.recorder(made)

        try:
            outcomes = in_savepoints([c.call for c in group], record)
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
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        elif self._database is not None:
            close_connection(self._database)
        self._database = None
