"""History pruning (fleet.server.scheduling.history) against SQLite: which
ended jobs go with their log lines and which stay (the newest N of each
host, group and kind, the newest failure, active jobs, recent ones), that
batch and read sizes change nothing but the number of transactions, that a
job whose state moved after the read is re-checked, and the ticker source's
due times on a FakeClock."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Optional

import pytest

from fleet.server.clock import FakeClock
from fleet.server.scheduling.history import HistoryPruning, Pass, Policy, batches, prune
from fleet.server.scheduling.ticker import Ticker
from fleet.server.store.db import Store
from fleet.server.store.models import AuditLog, Host, Job, JobLog, SourceGroup
from fleet.server.store.queries import history as queries

NOW = dt.datetime(2026, 6, 1, 12, 0, 0)
TIMEOUT = 5.0


def ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


async def open_store(path: Path) -> Store:
    store = Store(path)
    await store.open()
    return store


def run(main) -> None:
    asyncio.run(main())


async def settle(rounds: int = 100) -> None:
    """Let every ready task run (yields only; nothing waits on time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Seed:
    """Jobs made by name, each with `lines` log lines; `.ids` maps names to ids."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def job(
        self,
        name: str,
        host: Host,
        kind: str,
        status: str,
        ended: Optional[float],  # days ago; None: not ended
        group: Optional[SourceGroup] = None,
        lines: int = 2,
        finished: bool = True,  # False: an ended job without an end time (old rows)
    ) -> None:
        created = ago(ended + 0.01) if ended is not None else ago(200)
        job = Job.create(
            host=host,
            kind=kind,
            status=status,
            actor_kind="system",
            group=group,
            group_name=group.name if group else None,
            created_at=created,
            finished_at=ago(ended) if ended is not None and finished else None,
        )
        JobLog.insert_many(
            [
                {"job": job.id, "seq": i, "ts": created, "stream": "stdout", "payload": f"l{i}"}
                for i in range(1, lines + 1)
            ]
        ).execute()
        self.ids[name] = job.id


def seed() -> dict[str, int]:
    """Two hosts; with keep=3 and 90 days, the names starting with "gone"
    are the jobs to prune."""
    s = Seed()
    web = Host.create(name="web")
    db_host = Host.create(name="db")
    etc = SourceGroup.create(host=web, name="etc", includes=["/etc"])
    home = SourceGroup.create(host=web, name="home", includes=["/home"])
    db_etc = SourceGroup.create(host=db_host, name="etc", includes=["/etc"])
    # web/etc backups: old ones beyond the newest 3 go, except the newest failure
    s.job("gone-etc-1", web, "backup", "succeeded", 300, etc, lines=5)
    s.job("gone-etc-failed-older", web, "backup", "failed", 290, etc)
    s.job("etc-last-failure", web, "backup", "failed", 280, etc)
    s.job("gone-etc-2", web, "backup", "warning", 270, etc)
    s.job("gone-etc-3", web, "backup", "cancelled", 260, etc, lines=0)
    s.job("gone-etc-4", web, "backup", "succeeded", 250, etc, finished=False)
    s.job("etc-old-3rd", web, "backup", "succeeded", 240, etc)
    s.job("etc-old-2nd", web, "backup", "succeeded", 100, etc)
    s.job("etc-recent", web, "backup", "succeeded", 1, etc)
    # active jobs, however old, neither go nor count among the kept
    s.job("etc-queued", web, "backup", "queued", None, etc)
    s.job("etc-running", web, "backup", "running", None, etc)
    # web/home: old, but only two
    s.job("home-1", web, "backup", "succeeded", 400, home)
    s.job("home-2", web, "backup", "failed", 390, home)
    # web, no group: by kind
    for i in range(1, 6):
        s.job(f"{'gone-' if i <= 2 else ''}prune-{i}", web, "prune", "succeeded", 200 - i)
    s.job("check-lost", web, "check", "lost", 500)
    s.job("gone-check-1", web, "check", "succeeded", 400)
    s.job("check-2", web, "check", "succeeded", 399)
    s.job("check-3", web, "check", "succeeded", 398)
    s.job("check-4", web, "check", "succeeded", 397)
    s.job("init", web, "init", "succeeded", 1000)
    # web, a run of recent jobs beyond 3: young enough to stay
    for i in range(1, 6):
        s.job(f"forget-recent-{i}", web, "forget", "succeeded", 80 - i)
    # db's group "etc" is another group than web's
    s.job("gone-db-etc-1", db_host, "backup", "succeeded", 200, db_etc)
    for i in range(2, 5):
        s.job(f"db-etc-{i}", db_host, "backup", "succeeded", 200 - i, db_etc)
    AuditLog.create(actor="system", action="job.run", target="web", at=ago(500))
    return s.ids


def survivors() -> tuple[set[int], dict[int, int]]:
    """Job ids left, and log lines left per job."""
    jobs = {j.id for j in Job.select(Job.id)}
    lines: dict[int, int] = {}
    for row in JobLog.select(JobLog.job):
        lines[row.job_id] = lines.get(row.job_id, 0) + 1
    return jobs, lines


POLICY = Policy(days=90, keep=3)


def test_prunes_old_ended_jobs_and_their_lines_and_keeps_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            _, lines_before = await store.run(survivors)
            done = await prune(store, POLICY, NOW)
            jobs, lines = await store.run(survivors)
            gone = {n for n in ids if n.startswith("gone")}
            assert {n for n, i in ids.items() if i not in jobs} == gone
            assert jobs == {ids[n] for n in ids if n not in gone}
            # the lines of the jobs that stay are all there; none of the others
            assert lines == {i: c for i, c in lines_before.items() if i in jobs}
            assert (done.jobs, done.lines) == (
                len(gone),
                sum(c for i, c in lines_before.items() if i not in jobs),
            )
            assert await store.run(AuditLog.select().count) == 1
            # a second pass finds nothing more
            again = await prune(store, POLICY, NOW)
            assert (again.jobs, again.lines) == (0, 0)
        finally:
            await store.close()

    run(main)


def test_keep_counts_the_newest_ended_jobs_whatever_their_age(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            await prune(store, Policy(days=90, keep=1), NOW)
            jobs, _ = await store.run(survivors)
            left = {n for n, i in ids.items() if i in jobs}
            assert {n for n in left if n.startswith(("etc", "prune", "check", "home"))} == {
                "etc-recent",  # the newest, and young anyway
                "etc-last-failure",  # the newest failure
                "etc-queued",  # active
                "etc-running",
                "prune-5",
                "check-4",
                "check-lost",
                "home-2",  # the newest, and the newest failure: home-1 goes
            }
        finally:
            await store.close()

    run(main)


def test_history_days_0_keeps_everything(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            forever = Policy(days=0, keep=1)
            done = await prune(store, forever, NOW + dt.timedelta(days=10_000))
            jobs, _ = await store.run(survivors)
            assert jobs == set(ids.values())
            assert (done.jobs, done.lines) == (0, 0)
            source = HistoryPruning(store, forever, NOW, delay=0)
            assert await source.next_due(NOW) is None
        finally:
            await store.close()

    run(main)


@pytest.mark.parametrize(
    "sizes",
    [
        {"batch_jobs": 3},
        {"batch_jobs": 1, "hosts_per_read": 1},
        {"batch_lines": 2},
        {"batch_jobs": 500, "batch_lines": 1, "hosts_per_read": 2},
    ],
)
def test_batch_and_read_sizes_give_the_same_result(tmp_path: Path, sizes: dict) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            writes = []
            bulk = store.bulk

            async def counted(fn, *args):
                writes.append(args[0])
                return await bulk(fn, *args)

            store.bulk = counted  # type: ignore[method-assign]
            done = await prune(store, POLICY, NOW, **sizes)
            jobs, _ = await store.run(survivors)
            assert jobs == {i for n, i in ids.items() if not n.startswith("gone")}
            assert done.jobs == sum(n.startswith("gone") for n in ids)
            assert all(len(w) <= sizes.get("batch_jobs", 500) for w in writes)
            if sizes == {"batch_jobs": 3}:  # 9 jobs, one read (both hosts)
                assert [len(w) for w in writes] == [3, 3, 3]
        finally:
            await store.close()

    run(main)


def test_batches_bound_jobs_and_lines() -> None:
    found = [(i, 1) for i in range(1, 11)]
    assert [len(b) for b in batches(found, 3, 1000)] == [3, 3, 3, 1]
    assert list(batches([(1, 5), (2, 5), (3, 5)], 10, 10)) == [[1, 2], [3]]
    # a job with more lines than a batch holds goes alone
    assert list(batches([(1, 1), (2, 50), (3, 1)], 10, 10)) == [[1], [2], [3]]
    assert list(batches([], 3, 3)) == []


def test_a_job_whose_state_moved_after_the_read_is_checked_again(tmp_path: Path) -> None:
    """The ids come from a read; the delete re-checks what may have changed
    since: a lost job reported ended after all, a new end time."""

    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:

            def setup() -> dict[str, int]:
                s = Seed()
                web = Host.create(name="web")
                s.job("older-failure", web, "check", "failed", 300)
                s.job("last-failure", web, "check", "lost", 280)
                s.job("lost", web, "prune", "lost", 270)
                s.job("failure", web, "prune", "failed", 260)
                for kind in ("check", "prune"):
                    for i in range(3):
                        s.job(f"{kind}-new-{i}", web, kind, "succeeded", 10 + i)
                return s.ids

            ids = await store.run(setup)
            cutoff = ago(90)
            found = await store.read(queries.prunable, 1, 1, cutoff, 3)
            assert [i for i, _ in found] == [ids["older-failure"], ids["lost"]]

            def moved() -> None:
                # the newest check failure was reported succeeded after all:
                # the one before it is the newest failure now
                Job.update(status="succeeded").where(Job.id == ids["last-failure"]).execute()
                # and the lost prune was reported ended, yesterday
                Job.update(status="failed", finished_at=ago(1)).where(
                    Job.id == ids["lost"]
                ).execute()

            await store.run(moved)

            def delete() -> tuple[int, int]:
                return queries.delete_jobs([i for i, _ in found], cutoff)

            assert await store.atomic(delete) == (0, 0)
            jobs, _ = await store.run(survivors)
            assert jobs == set(ids.values())
        finally:
            await store.close()

    run(main)


# -- the ticker source -----------------------------------------------------------


def test_the_source_is_due_after_the_delay_then_a_day_after_each_pass(
    tmp_path: Path, caplog
) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            source = HistoryPruning(store, POLICY, NOW, delay=60)
            start = NOW + dt.timedelta(seconds=60)
            assert await source.next_due(NOW) == start
            steps = 0
            while True:
                await source.run_due(start)
                steps += 1
                if source.current is None:
                    break
                assert await source.next_due(start) == start  # a pass under way is due at once
            assert steps == 2  # one read (both hosts), one batch
            assert source.passes == 1
            assert await source.next_due(start) == start + dt.timedelta(days=1)
            jobs, _ = await store.run(survivors)
            assert jobs == {i for n, i in ids.items() if not n.startswith("gone")}
        finally:
            await store.close()

    with caplog.at_level(logging.INFO, logger="fleetd.history"):
        run(main)
    reports = [r.getMessage() for r in caplog.records if r.name == "fleetd.history"]
    assert len(reports) == 1
    assert reports[0].startswith("pruned 9 jobs and 19 log lines")


def test_the_source_on_the_ticker_runs_once_a_day(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            ids = await store.run(seed)
            clock = FakeClock(NOW)
            source = HistoryPruning(store, POLICY, NOW, delay=300)
            finished = asyncio.Event()
            run_due = source.run_due

            async def watched(now: dt.datetime) -> None:
                await run_due(now)
                if source.current is None:
                    finished.set()

            source.run_due = watched  # type: ignore[method-assign]
            task = asyncio.ensure_future(Ticker(clock, [source]).run())
            try:
                await settle()
                clock.advance(299)
                await settle()
                assert source.passes == 0 and source.current is None
                clock.advance(1)
                await asyncio.wait_for(finished.wait(), TIMEOUT)
                assert source.passes == 1
                jobs, _ = await store.run(survivors)
                assert jobs == {i for n, i in ids.items() if not n.startswith("gone")}
                finished.clear()
                clock.advance(24 * 3600 - 1)
                await settle()
                assert source.passes == 1
                clock.advance(1)
                await asyncio.wait_for(finished.wait(), TIMEOUT)
                assert source.passes == 2
                assert await source.next_due(clock.now()) == NOW + dt.timedelta(seconds=300, days=2)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await store.close()

    run(main)


def test_a_pass_is_done_at_once_when_history_is_kept_for_ever(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "fleet.db")
        try:
            assert not await Pass(store, Policy(days=0), NOW).step()
        finally:
            await store.close()

    run(main)
