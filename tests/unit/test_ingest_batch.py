"""The shared writer for agents' reports (fleet.server.agents.ingest.Ingest)
and the batched liveness writes (fleet.server.agents.session.Presence), with
a real Store: several hosts in one transaction, a savepoint per host, events
on the bus only after commit, online() done once committed, heartbeats
coalesced into one write."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleet.common.protocol import Envelope
from fleet.server.agents import ingest as ingest_mod
from fleet.server.agents import session as session_mod
from fleet.server.agents.ingest import Ingest
from fleet.server.agents.session import Presence
from fleet.server.events import Bus, JobEnded, JobLogged, JobStarted
from fleet.server.jobs import lifecycle
from fleet.server.store.db import Store
from fleet.server.store.models import Host

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)
TS = "2026-01-01T12:00:00Z"
TIMEOUT = 5.0
LINE = Envelope("job.log", {}, seq=1)  # what the queue tests weigh (one line each)
HELLO = {
    "hostname": "web-01.example",
    "agent_version": "1.2.3",
    "restic_version": "0.17.3",
    "os": "linux",
    "arch": "amd64",
    "timezone": "UTC",
}


async def settle(rounds: int = 100) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read through a separate connection: it sees committed rows only."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def dispatched_host(name: str) -> tuple[int, int]:
    host_id = Host.create(name=name).id
    lifecycle.create([], host_id, "backup", "schedule")
    job = lifecycle.claim([], host_id, NOW)
    return host_id, job.id


def started(job_id: int, seq: int) -> Envelope:
    return Envelope("job.started", {"job_id": job_id, "started_at": TS}, seq=seq)


def logline(job_id: int, line: int, seq: int) -> Envelope:
    data = {"job_id": job_id, "seq": line, "ts": TS, "stream": "stdout", "payload": f"l{line}"}
    return Envelope("job.log", data, seq=seq)


def finished(job_id: int, seq: int, status: str = "succeeded") -> Envelope:
    data = {"job_id": job_id, "status": status, "exit_code": 0, "finished_at": TS}
    return Envelope("job.finished", data, seq=seq)


def frames_for(job_id: int, count: int) -> list[Envelope]:
    """job.started, count-2 log lines, job.finished: seqs 1..count."""
    out = [started(job_id, 1)]
    out += [logline(job_id, i, i) for i in range(2, count)]
    out.append(finished(job_id, count))
    return out


class Counting:
    """Counts store.run / store.atomic calls (instance attributes shadow the methods)."""

    def __init__(self, store: Store) -> None:
        self.runs = 0
        self.atomics = 0
        self.gate: asyncio.Event | None = None  # when set: writes wait for it
        self.fail_next = 0
        real_run, real_atomic, real_bulk = store.run, store.atomic, store.bulk

        async def run(fn, *args: Any, **kw: Any):
            self.runs += 1
            return await real_run(fn, *args, **kw)

        async def bulk(fn, *args: Any, **kw: Any):  # the ingest's batches
            self.runs += 1
            return await real_bulk(fn, *args, **kw)

        async def atomic(fn, *args: Any, **kw: Any):
            self.atomics += 1
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_next:
                self.fail_next -= 1
                raise OSError("disk I/O error")
            return await real_atomic(fn, *args, **kw)

        store.run = run  # type: ignore[method-assign]
        store.atomic = atomic  # type: ignore[method-assign]
        store.bulk = bulk  # type: ignore[method-assign]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


def run_with_store(db_path: Path, body) -> Any:
    async def main() -> Any:
        store = Store(db_path)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


# -- Ingest ------------------------------------------------------------------------


def test_hosts_submitting_together_share_one_transaction(db_path: Path) -> None:
    async def body(store: Store):
        hosts = [await store.run(dispatched_host, f"web-{i}") for i in range(3)]
        ingest = Ingest(store, Bus())
        counting = Counting(store)
        results = await asyncio.gather(
            *(ingest.submit(h, frames_for(j, n)) for (h, j), n in zip(hosts, (2, 3, 4)))
        )
        return hosts, results, counting.runs

    hosts, results, runs = run_with_store(db_path, body)
    assert results == [2, 3, 4]
    assert runs == 1  # one transaction for the three hosts
    ids = tuple(h for h, _ in hosts)
    assert raw(db_path, f"SELECT id, last_seq FROM host WHERE id IN {ids} ORDER BY id") == [
        (ids[0], 2),
        (ids[1], 3),
        (ids[2], 4),
    ]
    assert [r[0] for r in raw(db_path, "SELECT status FROM job ORDER BY id")] == ["succeeded"] * 3
    assert raw(db_path, "SELECT job_id, seq FROM job_log ORDER BY job_id, seq") == [
        (hosts[1][1], 2),
        (hosts[2][1], 2),
        (hosts[2][1], 3),
    ]


def test_a_resend_is_applied_once(db_path: Path) -> None:
    async def body(store: Store):
        host, job = await store.run(dispatched_host, "web-01")
        ingest = Ingest(store, Bus())
        first = await ingest.submit(host, frames_for(job, 3)[:2])
        again = await ingest.submit(host, frames_for(job, 3))
        return first, again

    assert run_with_store(db_path, body) == (2, 3)
    assert raw(db_path, "SELECT seq FROM job_log") == [(2,)]


def test_one_hosts_broken_frames_fail_only_that_host(db_path: Path) -> None:
    published: list = []

    async def body(store: Store):
        good1 = await store.run(dispatched_host, "good-1")
        bad = await store.run(dispatched_host, "bad")
        good2 = await store.run(dispatched_host, "good-2")
        bus = Bus()
        for kind in (JobStarted, JobLogged, JobEnded):
            bus.subscribe(kind, published.append)
        ingest = Ingest(store, bus)
        broken_line = logline(bad[1], 2, 2)
        del broken_line.data["payload"]  # applying it raises, after job.started was applied
        results = await asyncio.gather(
            ingest.submit(good1[0], frames_for(good1[1], 3)),
            ingest.submit(bad[0], [started(bad[1], 1), broken_line, finished(bad[1], 3)]),
            ingest.submit(good2[0], frames_for(good2[1], 2)),
            return_exceptions=True,
        )
        return (good1, bad, good2), results

    (good1, bad, good2), results = run_with_store(db_path, body)
    assert results[0] == 3 and results[2] == 2
    assert isinstance(results[1], KeyError)
    # the bad host's savepoint rolled back all of its frames, job.started too
    assert raw(db_path, "SELECT last_seq FROM host WHERE id = ?", (bad[0],)) == [(0,)]
    assert raw(db_path, "SELECT status, started_at FROM job WHERE id = ?", (bad[1],)) == [
        ("dispatched", None)
    ]
    # the others committed
    assert raw(db_path, "SELECT last_seq FROM host WHERE id = ?", (good1[0],)) == [(3,)]
    assert raw(db_path, "SELECT last_seq FROM host WHERE id = ?", (good2[0],)) == [(2,)]
    assert raw(db_path, "SELECT status FROM job WHERE id IN (?, ?)", (good1[1], good2[1])) == [
        ("succeeded",),
        ("succeeded",),
    ]
    # and only their events were published
    assert {e.host_id for e in published} == {good1[0], good2[0]}
    assert JobEnded(good1[1], good1[0], "succeeded") in published
    assert JobEnded(good2[1], good2[0], "succeeded") in published


def test_a_failing_host_via_apply_frames_fails_only_its_submit(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ingest_mod.apply_frames

    async def body(store: Store):
        hosts = [await store.run(dispatched_host, f"web-{i}") for i in range(3)]
        victim = hosts[1][0]

        def apply_frames(events, host_id, frames, now=None):
            last = real(events, host_id, frames, now)  # applied, then the host fails
            if host_id == victim:
                raise RuntimeError("broken host")
            return last

        monkeypatch.setattr(ingest_mod, "apply_frames", apply_frames)
        ingest = Ingest(store, Bus())
        results = await asyncio.gather(
            *(ingest.submit(h, frames_for(j, 2)) for h, j in hosts), return_exceptions=True
        )
        # the ingest keeps working for the failed host afterwards
        monkeypatch.setattr(ingest_mod, "apply_frames", real)
        later = await ingest.submit(victim, frames_for(hosts[1][1], 2))
        return hosts, results, later

    hosts, results, later = run_with_store(db_path, body)
    assert results[0] == 2 and results[2] == 2
    assert isinstance(results[1], RuntimeError)
    assert later == 2
    assert [r[0] for r in raw(db_path, "SELECT last_seq FROM host ORDER BY id")] == [2, 2, 2]


def test_events_are_published_only_after_commit(db_path: Path) -> None:
    checks: list = []

    async def body(store: Store):
        host, job = await store.run(dispatched_host, "web-01")
        bus = Bus()

        def on_started(e: JobStarted) -> None:
            checks.append(
                ("started", raw(db_path, "SELECT status FROM job WHERE id = ?", (e.job_id,)))
            )

        def on_logged(e: JobLogged) -> None:
            seqs = [line["seq"] for line in e.lines]
            rows = raw(
                db_path, "SELECT seq FROM job_log WHERE job_id = ? ORDER BY seq", (e.job_id,)
            )
            checks.append(("logged", seqs, rows))

        def on_ended(e: JobEnded) -> None:
            row = raw(db_path, "SELECT status FROM job WHERE id = ?", (e.job_id,))
            seq = raw(db_path, "SELECT last_seq FROM host WHERE id = ?", (e.host_id,))
            checks.append(("ended", row, seq))

        bus.subscribe(JobStarted, on_started)
        bus.subscribe(JobLogged, on_logged)
        bus.subscribe(JobEnded, on_ended)
        ingest = Ingest(store, bus)
        assert await ingest.submit(host, frames_for(job, 4)) == 4

    run_with_store(db_path, body)
    # every subscriber read, from another connection, what its event says
    assert checks == [
        ("started", [("succeeded",)]),  # the whole batch had committed
        ("logged", [2, 3], [(2,), (3,)]),
        ("ended", [("succeeded",)], [(4,)]),
    ]


# -- Presence ----------------------------------------------------------------------


def make_hosts(n: int) -> list[int]:
    return [Host.create(name=f"web-{i:03d}").id for i in range(n)]


def test_online_is_done_once_the_host_shows_online(db_path: Path) -> None:
    async def body(store: Store):
        (host,) = await store.run(make_hosts, 1)
        counting = Counting(store)
        counting.gate = asyncio.Event()
        presence = Presence(store)
        marked = presence.online(host, HELLO)
        await settle()
        assert not marked.done()  # the write has not happened yet
        assert raw(db_path, "SELECT online FROM host WHERE id = ?", (host,)) == [(0,)]
        counting.gate.set()
        await asyncio.wait_for(marked, TIMEOUT)
        # done means committed: another connection sees it
        assert raw(
            db_path,
            "SELECT online, hostname, agent_version, restic_version, os, arch, timezone, "
            "last_seen_at IS NOT NULL FROM host WHERE id = ?",
            (host,),
        ) == [(1, "web-01.example", "1.2.3", "0.17.3", "linux", "amd64", "UTC", 1)]
        gone = presence.offline(host)
        await asyncio.wait_for(gone, TIMEOUT)
        assert raw(db_path, "SELECT online FROM host WHERE id = ?", (host,)) == [(0,)]
        return counting.atomics

    assert run_with_store(db_path, body) == 2


def test_connects_arriving_during_a_write_share_the_next_one(db_path: Path) -> None:
    async def body(store: Store):
        hosts = await store.run(make_hosts, 20)
        counting = Counting(store)
        counting.gate = asyncio.Event()
        presence = Presence(store)
        first = presence.online(hosts[0], HELLO)
        await settle()
        assert counting.atomics == 1  # the first write is under way (held at the gate)
        rest = [presence.online(h, HELLO) for h in hosts[1:]]
        counting.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT)
        return counting.atomics

    assert run_with_store(db_path, body) == 2
    assert raw(db_path, "SELECT count(*) FROM host WHERE online = 1") == [(20,)]


def test_many_heartbeats_coalesce_into_one_write(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_mod, "PRESENCE_EVERY", 0.2)  # a shorter window, same logic

    async def body(store: Store):
        hosts = await store.run(make_hosts, 50)
        counting = Counting(store)
        presence = Presence(store)
        for round_ in range(3):  # heartbeats over several turns of the loop
            for h in hosts:
                presence.seen(h)
            await asyncio.sleep(0)
            assert counting.atomics == 0, round_  # they wait for the window
        await asyncio.wait_for(presence._task, TIMEOUT)
        return counting.atomics

    assert run_with_store(db_path, body) == 1
    assert raw(db_path, "SELECT count(*) FROM host WHERE last_seen_at IS NOT NULL") == [(50,)]
    assert raw(db_path, "SELECT count(*) FROM host WHERE online = 1") == [(0,)]


def test_a_connect_ends_the_heartbeat_window_and_shares_its_write(db_path: Path) -> None:
    async def body(store: Store):
        hosts = await store.run(make_hosts, 10)
        counting = Counting(store)
        presence = Presence(store)
        for h in hosts[1:]:
            presence.seen(h)
        await settle()
        assert counting.atomics == 0
        await asyncio.wait_for(presence.online(hosts[0], HELLO), TIMEOUT)
        return counting.atomics

    assert run_with_store(db_path, body) == 1
    assert raw(db_path, "SELECT count(*) FROM host WHERE last_seen_at IS NOT NULL") == [(10,)]


def test_online_is_not_done_when_its_write_failed(db_path: Path) -> None:
    async def body(store: Store):
        (host,) = await store.run(make_hosts, 1)
        counting = Counting(store)
        counting.fail_next = 1
        presence = Presence(store)
        marked = presence.online(host, HELLO)
        try:
            await asyncio.wait_for(marked, TIMEOUT)
        except OSError:
            return "raised"
        # resolved without an error: then the host must show online
        return raw(db_path, "SELECT online FROM host WHERE id = ?", (host,))

    assert run_with_store(db_path, body) in ("raised", [(1,)])


def test_small_batches_go_ahead_of_agents_streaming_at_full_speed() -> None:
    """A follower's job at restic's pace (a few lines a batch) is applied in
    the next transaction, not behind every batch of the agents streaming as
    fast as they can; the big ones follow in arrival order."""
    from fleet.server.agents.ingest import MAX_FRAMES, Ingest, _Batch

    async def main() -> list[list[int]]:
        ingest = Ingest(None, None)  # type: ignore[arg-type]  # only its queue is used
        sizes = [1000] * 12 + [3] + [1000] * 3 + [1]
        ingest._waiting = [_Batch(host, [LINE] * n) for host, n in enumerate(sizes)]
        rounds = []
        while ingest._waiting:
            rounds.append([b.host_id for b in ingest._take()])
        return rounds

    rounds = asyncio.run(main())
    assert rounds[0][:2] == [12, 16]  # the small ones, first of all
    assert [h for r in rounds for h in r if h not in (12, 16)] == [
        *range(12),
        13,
        14,
        15,
    ]  # the rest in arrival order
    assert all(len(r) <= MAX_FRAMES // 1000 + 2 for r in rounds)


def test_a_batch_whose_caller_is_gone_is_not_applied() -> None:
    """While fleetd stops, sessions stop waiting for their reports to be
    applied (the agents resend what was not acked): those batches leave the
    queue instead of holding the stop up for seconds."""
    from fleet.server.agents.ingest import Ingest, _Batch

    async def main() -> tuple[list[int], list[int]]:
        ingest = Ingest(None, None)  # type: ignore[arg-type]  # only its queue is used
        ingest._waiting = [_Batch(host, [LINE] * 2) for host in range(6)]
        for batch in ingest._waiting[1::2]:
            batch.done.cancel()
        first = [b.host_id for b in ingest._take()]
        return first, [b.host_id for b in ingest._waiting]

    taken, left = asyncio.run(main())
    assert taken == [0, 2, 4]
    assert left == []


def logs_pack(job_id: int, first: int, lines: list[int]) -> Envelope:
    """job.logs of job log lines `lines`, spooled under seqs first, first+1, ..."""
    data = {
        "job_id": job_id,
        "first": first,
        "lines": [{"seq": n, "ts": TS, "stream": "stdout", "payload": f"l{n}"} for n in lines],
    }
    return Envelope("job.logs", data, seq=first + len(lines) - 1)


def test_a_pack_of_log_lines_is_applied_once_even_when_it_straddles_an_ack(db_path: Path) -> None:
    """After a reconnect the agent may pack differently: a job.logs frame
    that starts below what was applied adds only its new lines, to the log
    and to followers; one whose numbering does not add up is skipped."""
    seen: list[int] = []

    async def body(store: Store):
        host, job = await store.run(dispatched_host, "web-01")
        bus = Bus()
        bus.subscribe(JobLogged, lambda e: seen.extend(line["seq"] for line in e.lines))
        ingest = Ingest(store, bus)
        # seqs 1 (started), 2..4 (lines 1..3) applied one frame at a time
        first = await ingest.submit(
            host, [started(job, 1), *[logline(job, n - 1, n) for n in (2, 3, 4)]]
        )
        # then one pack of seqs 3..7 (lines 2..6): lines 2 and 3 are already in
        second = await ingest.submit(host, [logs_pack(job, 3, [2, 3, 4, 5, 6])])
        # a pack claiming seqs 8..9 but sent as seq 12: refused, passed over
        bad = logs_pack(job, 8, [7, 8])._replace(seq=12)
        third = await ingest.submit(host, [bad, logs_pack(job, 13, [9]), finished(job, 14)])
        return first, second, third

    assert run_with_store(db_path, body) == (4, 7, 14)
    assert raw(db_path, "SELECT seq FROM job_log ORDER BY seq") == [
        (n,) for n in (1, 2, 3, 4, 5, 6, 9)
    ]
    assert seen == [1, 2, 3, 4, 5, 6, 9]  # every line once, in order
    assert raw(db_path, "SELECT status FROM job") == [("succeeded",)]


def test_a_pack_weighs_its_lines_in_the_ingest_queue() -> None:
    from fleet.server.agents.ingest import _Batch

    async def main() -> list[int]:
        return [
            _Batch(1, [logs_pack(1, 1, list(range(1, 201)))]).weight,
            _Batch(2, [started(1, 1), logline(1, 1, 2)]).weight,
        ]

    assert asyncio.run(main()) == [200, 2]


def test_the_inbox_is_bounded_in_bytes_as_well_as_frames() -> None:
    """A rogue agent pipelining big frames waits (fleetd stops reading its
    socket) once 2 MiB are queued, however few frames that is; one frame
    bigger than the bound still goes, alone."""
    from fleet.server.agents.session import Inbox

    async def main() -> list[str]:
        inbox = Inbox(frames=100, size=2 << 20)
        steps: list[str] = []

        async def producer() -> None:
            for n in range(1, 5):
                await inbox.put(Envelope("job.log", {}, seq=n), 1 << 20)
                steps.append(f"put {n} ({inbox.bytes >> 20} MiB)")

        task = asyncio.ensure_future(producer())
        await settle()
        steps.append("full")
        assert (await inbox.get())[0].seq == 1
        await settle()
        assert (await inbox.get())[0].seq == 2
        assert (await inbox.get())[0].seq == 3
        await settle()
        await asyncio.wait_for(task, TIMEOUT)
        huge = Inbox(frames=100, size=1 << 20)
        await asyncio.wait_for(huge.put(Envelope("job.log", {}, seq=9), 5 << 20), TIMEOUT)
        steps.append(f"huge alone {huge.bytes >> 20} MiB")
        return steps

    assert asyncio.run(main()) == [
        "put 1 (1 MiB)",
        "put 2 (2 MiB)",
        "full",
        "put 3 (2 MiB)",  # only once one was taken
        "put 4 (1 MiB)",
        "huge alone 5 MiB",
    ]
