"""The one ticker (fleet.server.scheduling.ticker) on a FakeClock with fake
sources: it runs what is due and nothing before, sleeps until poked when
nothing is due, picks the earliest source, survives a source that raises,
and never spins. Then the real sources of fleet.server.scheduling.due
(Retries, LostJobs) against SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Optional

from websockets.exceptions import ConnectionClosed

from fleet.common import protocol
from fleet.common.timefmt import utcnow
from fleet.server.agents.session import Agents
from fleet.server.clock import FakeClock
from fleet.server.events import Bus, HostOffline, JobEnded, JobQueued
from fleet.server.jobs import lifecycle
from fleet.server.scheduling import ticker as ticker_mod
from fleet.server.scheduling.due import LostJobs, Retries
from fleet.server.scheduling.ticker import FAILURE_BACKOFF, Ticker
from fleet.server.store.db import Store
from fleet.server.store.models import Host, Job

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
TIMEOUT = 5.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def settle(rounds: int = 100) -> None:
    """Let every ready task run (yields only; nothing waits on time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeSource:
    """Due at `due` (None: nothing due); running it moves it to `then`."""

    def __init__(self, name: str, due: Optional[dt.datetime], then=None) -> None:
        self.name = name
        self.due = due
        self.then = then
        self.asked = 0
        self.ran: list[dt.datetime] = []
        self.fail_next_due = 0
        self.fail_run_due = 0
        self._ran = asyncio.Event()

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        self.asked += 1
        if self.fail_next_due:
            self.fail_next_due -= 1
            raise RuntimeError(f"{self.name}: cannot read")
        return self.due

    async def run_due(self, now: dt.datetime) -> None:
        if self.fail_run_due:
            self.fail_run_due -= 1
            raise RuntimeError(f"{self.name}: broken")
        self.ran.append(now)
        self.due = self.then
        self._ran.set()

    async def wait_ran(self, times: int) -> None:
        async def until() -> None:
            while len(self.ran) < times:
                self._ran.clear()
                await self._ran.wait()

        await asyncio.wait_for(until(), TIMEOUT)


@contextlib.asynccontextmanager
async def running(ticker: Ticker):
    task = asyncio.ensure_future(ticker.run())
    try:
        await settle()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the ticker with fake sources ------------------------------------------------


def test_runs_a_source_when_due_and_not_before() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("s", at(10))
        ticker = Ticker(clock, [source])
        async with running(ticker) as task:
            assert source.ran == []
            clock.advance(5)
            await settle()
            assert source.ran == []
            clock.advance(4.999)
            await settle()
            assert source.ran == []
            clock.advance(0.001)
            await source.wait_ran(1)
            assert source.ran == [at(10)]
            assert ticker.rounds == 1
            await settle()
            assert not task.done()

    asyncio.run(main())


def test_a_source_already_due_runs_at_once() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("s", at(-60))
        async with running(Ticker(clock, [source])):
            await source.wait_ran(1)
            assert source.ran == [T0]

    asyncio.run(main())


def test_sleeps_with_nothing_due_until_poked() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("s", None)
        ticker = Ticker(clock, [source])
        async with running(ticker):
            assert source.asked == 1
            # something became due, but nobody said so: the ticker sleeps on
            source.due = T0
            clock.advance(3600)  # time passing does not wake a ticker with nothing due
            await settle()
            assert source.asked == 1 and source.ran == []
            ticker.poke()
            await source.wait_ran(1)
            assert source.ran == [at(3600)]
            await settle()
            # ran once, asked again once (its due time may have moved), then asleep
            assert source.asked == 3

    asyncio.run(main())


def test_a_poke_finds_an_earlier_due_time() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("s", at(3600))
        ticker = Ticker(clock, [source])
        async with running(ticker):
            source.due = at(10)
            ticker.poke()
            await settle()
            clock.advance(10)
            await source.wait_ran(1)
            assert source.ran == [at(10)]

    asyncio.run(main())


def test_picks_the_earliest_of_several_sources() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        late = FakeSource("late", at(30))
        soon = FakeSource("soon", at(10))
        idle = FakeSource("idle", None)
        async with running(Ticker(clock, [late, idle, soon])):
            clock.advance(10)
            await soon.wait_ran(1)
            await settle()
            assert soon.ran == [at(10)] and late.ran == [] and idle.ran == []
            clock.advance(19)
            await settle()
            assert late.ran == []
            clock.advance(1)
            await late.wait_ran(1)
            assert late.ran == [at(30)] and soon.ran == [at(10)] and idle.ran == []

    asyncio.run(main())


def test_a_periodic_source_runs_at_each_due_time() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("every minute", at(60))

        async def run_due(now: dt.datetime) -> None:
            source.ran.append(now)
            source.due = now + dt.timedelta(seconds=60)
            source._ran.set()

        source.run_due = run_due  # type: ignore[method-assign]
        async with running(Ticker(clock, [source])):
            for minute in range(1, 4):
                clock.advance(60)
                await source.wait_ran(minute)
            assert source.ran == [at(60), at(120), at(180)]

    asyncio.run(main())


def test_survives_a_source_whose_run_raises(caplog) -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        broken = FakeSource("broken", T0)
        broken.fail_run_due = 1
        ticker = Ticker(clock, [broken])
        async with running(ticker) as task:
            assert broken.ran == [] and not task.done()
            asked = broken.asked
            await settle(500)
            assert broken.asked == asked == 1  # no busy retry: it waits for the backoff
            clock.advance(FAILURE_BACKOFF - 0.5)
            await settle()
            assert broken.ran == []
            clock.advance(0.5)
            await broken.wait_ran(1)
            assert broken.ran == [at(FAILURE_BACKOFF)]

    with caplog.at_level(logging.ERROR, logger=ticker_mod.log.name):
        asyncio.run(main())
    assert any("broken failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_raising_source_does_not_stop_the_others() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        broken = FakeSource("broken", T0)
        broken.fail_run_due = 1_000_000
        healthy = FakeSource("healthy", at(10))
        ticker = Ticker(clock, [broken, healthy])
        async with running(ticker) as task:
            clock.advance(10)
            await healthy.wait_ran(1)
            assert healthy.ran == [at(10)] and not task.done()
            await settle(500)
            assert broken.asked < 10  # at most a few looks, not a spin

    asyncio.run(main())


def test_a_raising_source_waits_for_the_backoff_even_when_poked() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        broken = FakeSource("broken", T0)
        broken.fail_run_due = 1
        ticker = Ticker(clock, [broken])
        async with running(ticker):
            assert broken.asked == 1 and broken.ran == []
            ticker.poke()  # e.g. a retry was queued: unrelated to the broken source
            await settle()
            assert broken.ran == []  # FAILURE_BACKOFF has not passed

    asyncio.run(main())


def test_survives_a_source_whose_next_due_raises(caplog) -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        source = FakeSource("flaky", T0)
        source.fail_next_due = 1
        async with running(Ticker(clock, [source])) as task:
            assert source.ran == [] and not task.done()
            asked = source.asked
            await settle(500)
            assert source.asked == asked == 1
            clock.advance(FAILURE_BACKOFF)
            await source.wait_ran(1)
            assert source.ran == [at(FAILURE_BACKOFF)]

    with caplog.at_level(logging.ERROR, logger=ticker_mod.log.name):
        asyncio.run(main())
    assert any("cannot tell when it is due" in r.getMessage() for r in caplog.records)


def test_never_spins() -> None:
    async def main() -> None:
        clock = FakeClock(T0)
        waiting = FakeSource("waiting", at(600))
        idle = FakeSource("idle", None)
        ticker = Ticker(clock, [waiting, idle])
        async with running(ticker):
            await settle(1000)
            assert (waiting.asked, idle.asked) == (1, 1)
            # time moving short of the due time wakes nobody up
            for _ in range(10):
                clock.advance(1)
                await settle(20)
            assert (waiting.asked, idle.asked) == (1, 1)
            # one poke: one more look at every source
            ticker.poke()
            await settle(1000)
            assert (waiting.asked, idle.asked) == (2, 2)
            assert ticker.rounds == 0

    asyncio.run(main())


# -- the real sources against SQLite ---------------------------------------------


class FakeDispatcher:
    def __init__(self) -> None:
        self.offers: list[tuple[int, ...]] = []
        self.offered = asyncio.Event()

    def offer(self, *host_ids: int) -> None:
        self.offers.append(host_ids)
        self.offered.set()


class Observed:
    """A source wrapper whose next_due answers are awaited by the test."""

    def __init__(self, source) -> None:
        self.source = source
        self.name = source.name
        self.answers: asyncio.Queue = asyncio.Queue()

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        due = await self.source.next_due(now)
        self.answers.put_nowait(due)
        return due

    async def run_due(self, now: dt.datetime) -> None:
        await self.source.run_due(now)

    async def answer(self) -> Optional[dt.datetime]:
        return await asyncio.wait_for(self.answers.get(), TIMEOUT)


async def open_store(path: Path) -> Store:
    store = Store(path)
    await store.open()
    return store


def make_host(name: str, **kw) -> int:
    return Host.create(name=name, **kw).id


def make_job(host_id: int, status: str = "queued", **kw) -> int:
    job = lifecycle.create([], host_id, "backup", "schedule", **kw)
    Job.update(status=status).where(Job.id == job.id).execute()
    return job.id


def job_status(job_id: int) -> str:
    return Job.get_by_id(job_id).status


def test_retries_offers_the_host_of_a_retry_once_when_due(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            clock = FakeClock(T0)
            life = lifecycle.Lifecycle(store, Bus())
            dispatcher = FakeDispatcher()
            web = await store.run(make_host, "web-01")
            db = await store.run(make_host, "db-01")
            await store.run(make_job, web, not_before=at(60))
            await store.run(make_job, db, not_before=at(120))
            await store.run(make_job, db)  # not a retry: dispatch's business, not the ticker's
            source = Observed(Retries(life, dispatcher))
            async with running(Ticker(clock, [source])):
                assert await source.answer() == at(60)
                await settle()
                assert dispatcher.offers == []
                clock.advance(59)
                await settle()
                assert dispatcher.offers == []
                clock.advance(1)
                await asyncio.wait_for(dispatcher.offered.wait(), TIMEOUT)
                assert dispatcher.offers == [(web,)]
                # next: the later retry, the first is not offered again
                assert await source.answer() == at(60)  # the pass that ran it
                assert await source.answer() == at(120)
                clock.advance(30)
                await settle()
                assert dispatcher.offers == [(web,)]
                dispatcher.offered.clear()
                clock.advance(30)
                await asyncio.wait_for(dispatcher.offered.wait(), TIMEOUT)
                assert dispatcher.offers == [(web,), (db,)]
                assert await source.answer() == at(120)
                assert await source.answer() is None
                clock.advance(3600)
                await settle()
                assert dispatcher.offers == [(web,), (db,)]
        finally:
            await store.close()

    asyncio.run(main())


def test_retries_direct_calls(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            life = lifecycle.Lifecycle(store, Bus())
            dispatcher = FakeDispatcher()
            retries = Retries(life, dispatcher)
            web = await store.run(make_host, "web-01")
            assert await retries.next_due(T0) is None
            job = await store.run(make_job, web, not_before=at(60))
            assert await retries.next_due(T0) == at(60)
            await retries.run_due(at(59))
            assert [o for o in dispatcher.offers if o] == []  # nothing due yet
            assert await retries.next_due(at(59)) == at(60)
            await retries.run_due(at(60))
            assert [o for o in dispatcher.offers if o] == [(web,)]
            assert await retries.next_due(at(60)) is None
            # a dispatched or finished retry is not waited for
            await store.run(lambda: Job.update(status="succeeded").where(Job.id == job).execute())
            await store.run(make_job, web, status="dispatched", not_before=at(90))
            assert await retries.next_due(at(60)) is None
        finally:
            await store.close()

    asyncio.run(main())


def test_lost_jobs_loses_and_requeues_for_silent_hosts_only(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            bus = Bus()
            published: list = []
            bus.subscribe(JobEnded, published.append)
            bus.subscribe(JobQueued, published.append)
            life = lifecycle.Lifecycle(store, bus)
            started = at(-3600)  # fleetd has been up for an hour

            def setup() -> dict[str, tuple[int, int]]:
                rows = {}
                for name, online, seen, state in [
                    ("gone", False, at(-100), "running"),  # silent 100 s > 90 s
                    ("gone2", False, at(-100), "dispatched"),
                    ("recent", False, at(-30), "running"),  # silent 30 s
                    ("online", True, at(-1000), "running"),  # connected
                    ("linked", False, at(-1000), "running"),  # connected, row not yet online
                    ("idle", False, at(-1000), "queued"),  # nothing with the agent
                ]:
                    host_id = make_host(name, online=online, last_seen_at=seen)
                    rows[name] = (host_id, make_job(host_id, state))
                return rows

            rows = await store.run(setup)
            connected = {rows["online"][0], rows["linked"][0]}
            lost = LostJobs(life, 90, started, lambda h: h in connected)
            assert await lost.next_due(T0) == at(-10)
            await lost.run_due(T0)
            statuses = {n: await store.run(job_status, j) for n, (_, j) in rows.items()}
            assert statuses == {
                "gone": "lost",
                "gone2": "queued",
                "recent": "running",
                "online": "running",
                "linked": "running",
                "idle": "queued",
            }
            gone, gone2 = rows["gone"], rows["gone2"]
            assert sorted(published, key=repr) == sorted(
                [JobEnded(gone[1], gone[0], "lost"), JobQueued(gone2[1], gone2[0], due=True)],
                key=repr,
            )
            # next: the host silent for 30 s, at 90 s of silence
            assert await lost.next_due(T0) == at(60)
            await lost.run_due(at(59))
            assert await store.run(job_status, rows["recent"][1]) == "running"
            await lost.run_due(at(60))
            assert await store.run(job_status, rows["recent"][1]) == "lost"
            assert await lost.next_due(at(60)) is None
        finally:
            await store.close()

    asyncio.run(main())


def test_lost_jobs_gives_hosts_offline_before_start_the_full_grace(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            life = lifecycle.Lifecycle(store, Bus())

            def setup() -> tuple[int, int]:
                old = make_host("old", last_seen_at=at(-86400))
                never = make_host("never")  # never seen: created before the start
                Host.update(created_at=at(-86400)).where(Host.id == never).execute()
                return make_job(old, "running"), make_job(never, "running")

            old_job, never_job = await store.run(setup)
            lost = LostJobs(life, 90, T0, lambda h: False)
            assert await lost.next_due(T0) == at(90)
            await lost.run_due(at(89))
            assert [await store.run(job_status, j) for j in (old_job, never_job)] == [
                "running",
                "running",
            ]
            await lost.run_due(at(90))
            assert [await store.run(job_status, j) for j in (old_job, never_job)] == [
                "lost",
                "lost",
            ]
        finally:
            await store.close()

    asyncio.run(main())


def test_lost_jobs_on_the_ticker(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            bus = Bus()
            ended = asyncio.Event()
            bus.subscribe(JobEnded, lambda e: ended.set())
            life = lifecycle.Lifecycle(store, bus)
            clock = FakeClock(T0)
            host = await store.run(make_host, "web-01", last_seen_at=T0)
            job = await store.run(make_job, host, "running")
            source = Observed(LostJobs(life, 90, T0, lambda h: False))
            async with running(Ticker(clock, [source])):
                assert await source.answer() == at(90)
                clock.advance(89)
                await settle()
                assert await store.run(job_status, job) == "running"
                clock.advance(1)
                await asyncio.wait_for(ended.wait(), TIMEOUT)
                assert await store.run(job_status, job) == "lost"
                assert await source.answer() == at(90)  # the pass that lost it
                assert await source.answer() is None  # then nothing left to wait for
        finally:
            await store.close()

    asyncio.run(main())


# -- a host going offline wakes the ticker (the wiring of app.py) ------------------


class FakeConnection:
    """Just enough of a websockets ServerConnection for Agents.serve."""

    def __init__(self, hello: str) -> None:
        self._frames = [hello]
        self.dropped = asyncio.Event()
        self.sent: list[str] = []
        self.welcomed = asyncio.Event()
        self.transport = self

    async def recv(self) -> str:
        if self._frames:
            return self._frames.pop(0)
        await self.dropped.wait()
        raise ConnectionClosed(None, None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        # websockets ends `async for` quietly when the link closes
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, frame: str) -> None:
        self.sent.append(frame)
        if '"welcome"' in frame:
            self.welcomed.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.dropped.set()

    def abort(self) -> None:
        self.dropped.set()


class GatedStore:
    """The store as Presence sees it: its writes wait while `gate` is clear."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, fn, *args, **kw):
        return await self._store.run(fn, *args, **kw)

    async def read(self, fn, *args, **kw):
        return await self._store.read(fn, *args, **kw)

    async def atomic(self, fn, *args, **kw):
        await self.gate.wait()
        return await self._store.atomic(fn, *args, **kw)


def test_a_disconnect_during_a_presence_write_still_arms_the_lost_job_timer(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            clock = FakeClock(utcnow())  # Presence stamps last_seen_at with the wall clock
            bus = Bus()
            lost_event = asyncio.Event()
            bus.subscribe(JobEnded, lambda e: e.status == "lost" and lost_event.set())
            agents = Agents(store, bus, box=None, clock=clock)  # type: ignore[arg-type]
            gated = GatedStore(store)
            agents.presence.store = gated  # type: ignore[assignment]
            source = Observed(LostJobs(agents.lifecycle, 90, clock.now(), agents.connected))
            ticker = Ticker(clock, [source])
            agents.bus.subscribe(HostOffline, lambda e: ticker.poke())  # as app.py wires it
            other = await store.run(make_host, "other")
            host_id = await store.run(make_host, "web-01")
            job = await store.run(make_job, host_id, "running")
            hello = protocol.encode(
                "hello",
                {
                    "protocol_version": protocol.PROTOCOL_VERSION,
                    "agent_version": "1.0",
                    "restic_version": "0.17.3",
                    "hostname": "web-01",
                    "os": "linux",
                    "arch": "amd64",
                    "running_job": job,
                },
                id="h1",
            )
            conn = FakeConnection(hello)
            host = await store.run(Host.get_by_id, host_id)
            serving = asyncio.ensure_future(agents.serve(conn, host.id, host.name))  # type: ignore[arg-type]
            await asyncio.wait_for(conn.welcomed.wait(), TIMEOUT)
            await asyncio.wait_for(agents.presence._task, TIMEOUT)
            async with running(ticker):
                assert await source.answer() is None  # connected: nothing to wait for
                # another host's presence write is in flight when web-01's link drops
                gated.gate.clear()
                agents.presence.online(other, {**protocol.decode(hello).data})
                await settle()
                conn.dropped.set()
                await settle(300)  # the session ends; its offline write waits behind the other
                gated.gate.set()
                await asyncio.wait_for(serving, TIMEOUT)
                await asyncio.wait_for(agents.presence._task, TIMEOUT)
                assert await store.run(lambda: Host.get_by_id(host_id).online) is False
                clock.advance(120)  # well past lost_after
                await asyncio.wait_for(lost_event.wait(), 2.0)
                assert await store.run(job_status, job) == "lost"
        finally:
            await store.close()

    asyncio.run(main())
