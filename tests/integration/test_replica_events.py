"""Reading the event table on a real PostgreSQL (fleet.server.replicas):
an event whose transaction commits after a higher id was read, at the worst
moment (between a read and the snapshot that follows it), is still read,
once. Found by the benchmark on three replicas: a few cross-replica
run-nows in a few hundred never reached their agent."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable

import pytest

from fleet.server.events import JobQueued, encode
from fleet.server.replicas import Gaps, Replicas
from fleet.server.store.db import Store, locate

pytestmark = pytest.mark.own_store  # always PostgreSQL: run once


class Seen:
    """The bus, as far as the reader is concerned: what it published."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish_remote(self, events: list[Any]) -> None:
        self.events.extend(events)


class Hooked:
    """The reader's connection, with `hook` run once right after the first
    statement containing `after` has returned."""

    def __init__(self, conn: Any, after: str, hook: Callable[[], None]) -> None:
        self.conn, self.after, self.hook = conn, after, hook

    async def execute(self, sql: str, params: Any = None) -> Any:
        cursor = await self.conn.execute(sql, params)
        if self.hook is not None and self.after in sql:
            hook, self.hook = self.hook, None
            hook()
        return cursor


@pytest.fixture
def database(postgres) -> Iterator[Any]:
    """A migrated database; the transactions a test leaves open (it failed)
    are closed after it, so that they hold up no other test's xmin."""
    name = postgres.create_database()
    where = locate(f"postgresql:///{name}?host={postgres.root}&user=fleet", postgres.password)

    async def migrate() -> None:
        store = Store(where)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    yield name, where
    with postgres.connect(name) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


@pytest.fixture
def reader(database) -> tuple[Replicas, Seen]:
    """The reading part of a replica (no store, no listener task): the
    test calls its _catch_up as a NOTIFY or the poll would."""
    seen = Seen()
    replica = Replicas(None, seen, database[1])  # type: ignore[arg-type]
    replica._gaps = Gaps(0)
    return replica, seen


@contextlib.asynccontextmanager
async def listening(replica: Replicas) -> AsyncIterator[Any]:
    """The reader's connection, after a first look (the usual state)."""
    conn = await replica._connect()
    try:
        await replica._catch_up(conn)
        yield conn
    finally:
        await conn.close()


async def looks_until(replica: Replicas, conn: Any, done: int, timeout: float = 10) -> None:
    """Look (as a NOTIFY or the poll would) until every id up to `done` is
    settled: PostgreSQL's xmin is cluster-wide, so a transaction of anyone
    else's on the server (autovacuum's, say) may delay it a little."""
    gaps = replica._gaps
    deadline = time.monotonic() + timeout
    while True:
        await replica._catch_up(conn)
        if gaps.done >= done and not gaps.since or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


def queued(job_id: int) -> tuple[str, str]:
    return encode(JobQueued(job_id, 1))


def insert_event(conn: Any, job_id: int) -> None:
    """Another replica's JobQueued, written on `conn`."""
    conn.execute(
        "INSERT INTO event (origin, kind, body, at) VALUES ('other', %s, %s, now())",
        queued(job_id),
    )


def open_transaction(postgres, name: str, job_id: int) -> Any:
    """A transaction that took its id, then an event id, as record() does,
    and is left open."""
    conn = postgres.connect(name)
    conn.autocommit = False
    conn.execute("SELECT pg_current_xact_id()")
    insert_event(conn, job_id)
    return conn


def committed(postgres, name: str, job_id: int) -> None:
    with postgres.connect(name) as conn:
        insert_event(conn, job_id)


@pytest.mark.parametrize(
    "commit_after",
    [
        'WHERE "id" > ',  # the read that first finds the gap (then the snapshot)
        'WHERE "id" = ANY',  # the next look's read of the missing ids
    ],
)
def test_an_event_committed_after_a_higher_one_is_read_once(
    postgres, database, reader, commit_after
):
    name = database[0]
    replica, seen = reader

    async def scenario() -> None:
        async with listening(replica) as conn:
            late = open_transaction(postgres, name, 1)  # event 1, not committed yet
            committed(postgres, name, 2)  # event 2, committed
            if commit_after.startswith('WHERE "id" = ANY'):
                await replica._catch_up(conn)  # finds 2, notices 1 missing
                assert [e.job_id for e in seen.events] == [2]
            # the late transaction commits right after the read named
            await replica._catch_up(Hooked(conn, commit_after, late.commit))
            late.close()
            await looks_until(replica, conn, 2)  # the looks that follow (NOTIFY or the poll)

    asyncio.run(scenario())
    assert sorted(e.job_id for e in seen.events) == [1, 2]
    assert replica._gaps.done == 2 and not replica._gaps.since


def test_an_event_of_a_transaction_younger_than_every_ended_one_is_waited_for(
    postgres, database, reader
):
    """The transaction holding the missing id took its xid after the one
    that committed the higher id: a snapshot then puts it past its xmax,
    in neither its running list nor its xmin, and xmin may equal that
    xmax. Waiting until xmin passes the xmax would give the id up while
    its transaction is still running."""
    name = database[0]
    replica, seen = reader

    async def scenario() -> None:
        async with listening(replica) as conn:
            older = postgres.connect(name)
            older.autocommit = False
            older.execute("SELECT pg_current_xact_id()")  # the lower xid
            late = open_transaction(postgres, name, 1)  # the higher xid, event 1
            insert_event(older, 2)
            older.commit()  # event 2: the newest ended transaction is older than `late`
            older.close()
            for _ in range(3):  # looks while `late` runs: 2 read, 1 waited for
                await replica._catch_up(conn)
            assert [e.job_id for e in seen.events] == [2]
            assert replica._gaps.done == 0 and 1 in replica._gaps.since
            late.commit()
            late.close()
            await looks_until(replica, conn, 2)

    asyncio.run(scenario())
    assert sorted(e.job_id for e in seen.events) == [1, 2]
    assert replica._gaps.done == 2 and not replica._gaps.since


class Failing:
    """The reader's connection, failing the first statement containing
    `at` (the link to PostgreSQL dropping then)."""

    def __init__(self, conn: Any, at: str) -> None:
        self.conn, self.at, self.failed = conn, at, False

    async def execute(self, sql: str, params: Any = None) -> Any:
        if not self.failed and self.at in sql:
            self.failed = True
            raise OSError("connection lost")
        return await self.conn.execute(sql, params)


def test_events_read_before_a_failed_statement_are_published_once(postgres, database, reader):
    name = database[0]
    replica, seen = reader

    async def scenario() -> None:
        async with listening(replica) as conn:
            committed(postgres, name, 1)
            with pytest.raises(OSError):
                await replica._catch_up(Failing(conn, "pg_current_snapshot"))
            committed(postgres, name, 2)
            for _ in range(2):
                await replica._catch_up(conn)

    asyncio.run(scenario())
    assert [e.job_id for e in seen.events] == [1, 2]


def test_an_id_rolled_back_is_passed_over(postgres, database, reader):
    name = database[0]
    replica, seen = reader

    async def scenario() -> None:
        async with listening(replica) as conn:
            late = open_transaction(postgres, name, 1)
            committed(postgres, name, 2)
            await replica._catch_up(conn)
            late.rollback()
            late.close()
            committed(postgres, name, 3)
            await looks_until(replica, conn, 3)

    asyncio.run(scenario())
    assert sorted(e.job_id for e in seen.events) == [2, 3]
    assert replica._gaps.done == 3 and not replica._gaps.since
