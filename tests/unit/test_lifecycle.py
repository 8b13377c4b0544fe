"""Every job transition of fleet.server.jobs.lifecycle against a real SQLite
file: claim (oldest due first, init first, one job with the agent per host,
due times, auto-init), requeue, start, end (and its retries), cancel, lose,
the events each one appends, and Lifecycle.apply publishing after commit."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import peewee as pw
import pytest

from fleet.server.events import Bus, JobDispatched, JobEnded, JobQueued, JobStarted
from fleet.server.jobs import lifecycle
from fleet.server.store.db import Store, open_database
from fleet.server.store.models import Host, HostRepository, Job, Repository, SourceGroup, utcnow

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture
def database(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    yield database
    database.close()


@pytest.fixture
def host(database) -> Host:
    return Host.create(name="web-01")


@pytest.fixture
def other(database) -> Host:
    return Host.create(name="db-01")


def new_job(host: Host, kind: str = "backup", **kw) -> Job:
    return lifecycle.create([], host.id, kind, "user", **kw)


def status(job: Job) -> str:
    return Job.get_by_id(job.id).status


def dispatched(job: Job) -> JobDispatched:
    """The event a claim of this job publishes: what command.run needs."""
    row = Job.get_by_id(job.id)
    return JobDispatched(
        row.id,
        row.host_id,
        row.kind,
        row.params,
        row.uid,
        row.repository_id,
        row.from_repository_id,
    )


def set_status(job: Job, value: str) -> None:
    Job.update(status=value).where(Job.id == job.id).execute()


def claim(host: Host, now: dt.datetime = NOW) -> tuple[Job | None, list]:
    events: list = []
    return lifecycle.claim(events, host.id, now), events


def set_repo(host: Host, updated_at: dt.datetime) -> None:
    """The host's repository, changed at `updated_at` (and taken then)."""
    repo, _ = Repository.get_or_create(
        name=f"{host.name}-repo",
        defaults={"url_enc": b"url", "password_enc": b"pw", "env_names": [], "aad": "x"},
    )
    Repository.update(updated_at=updated_at).where(Repository.id == repo.id).execute()
    HostRepository.insert(host=host.id, repository=repo.id, attached_at=updated_at).on_conflict(
        conflict_target=[HostRepository.host, HostRepository.repository],
        preserve=[HostRepository.attached_at],
    ).execute()


# -- create ----------------------------------------------------------------


def test_create_queues_a_job_and_says_so(host) -> None:
    events: list = []
    job = lifecycle.create(events, host.id, "backup", "user", params={"tag": "etc"})
    row = Job.get_by_id(job.id)
    assert (row.status, row.kind, row.actor_kind, row.params) == (
        "queued",
        "backup",
        "user",
        {"tag": "etc"},
    )
    assert events == [JobQueued(job.id, host.id, due=True)]

    events = []
    later = lifecycle.create(events, host.id, "backup", "user", not_before=NOW)
    assert events == [JobQueued(later.id, host.id, due=False)]
    assert Job.get_by_id(later.id).not_before == NOW


# -- claim -----------------------------------------------------------------


def test_claim_returns_none_for_an_empty_queue(host) -> None:
    job, events = claim(host)
    assert job is None
    assert events == []
    assert Job.select().count() == 0  # no repository: no auto-init either


def test_claim_takes_the_oldest_due_job(host) -> None:
    first, second, third = (new_job(host) for _ in range(3))
    job, events = claim(host)
    assert job is not None and job.id == first.id
    row = Job.get_by_id(first.id)
    assert row.status == "dispatched" and row.dispatched_at == NOW
    assert events == [dispatched(first)]
    assert [status(second), status(third)] == ["queued", "queued"]


def test_claim_takes_init_first(host) -> None:
    backup = new_job(host)
    init = new_job(host, "init")
    job, _ = claim(host)
    assert job.id == init.id
    assert status(backup) == "queued"


def test_claim_never_hands_out_a_second_job_while_one_is_with_the_agent(host) -> None:
    first, second = new_job(host), new_job(host)
    job, _ = claim(host)
    assert job.id == first.id
    # dispatched: a second claim gets nothing and appends nothing
    again, events = claim(host)
    assert again is None and events == []
    assert status(second) == "queued"
    # running: still nothing
    assert lifecycle.start([], host.id, first.id, NOW)
    again, events = claim(host)
    assert again is None and events == []
    assert status(second) == "queued"
    # once it ended, the next one goes
    assert lifecycle.end([], host.id, first.id, "succeeded", finished_at=NOW)
    job, events = claim(host)
    assert job.id == second.id
    assert events == [dispatched(second)]


def test_claim_is_per_host(host, other) -> None:
    theirs, mine = new_job(other), new_job(host)
    assert claim(other)[0].id == theirs.id
    assert claim(host)[0].id == mine.id


def test_claim_respects_not_before(host) -> None:
    retry = new_job(host, not_before=NOW + dt.timedelta(seconds=60))
    job, events = claim(host, NOW)
    assert job is None and events == []
    # an older job that is not due yet does not hold back a due one
    plain = new_job(host)
    assert claim(host, NOW)[0].id == plain.id
    lifecycle.end([], host.id, plain.id, "succeeded")
    assert claim(host, NOW + dt.timedelta(seconds=59))[0] is None
    job, _ = claim(host, NOW + dt.timedelta(seconds=60))  # due at exactly not_before
    assert job.id == retry.id


def test_auto_init_once_per_repository_setting(host) -> None:
    set_repo(host, utcnow() - dt.timedelta(seconds=1))
    job, events = claim(host)
    init = Job.get_by_id(job.id)
    assert (init.kind, init.actor_kind, init.status) == ("init", "system", "dispatched")
    assert events == [JobQueued(init.id, host.id, due=True), dispatched(init)]

    # while it is with the agent, and after it ended, no second init
    backup = new_job(host)
    assert claim(host) == (None, [])
    lifecycle.end([], host.id, init.id, "failed", error="wrong password")
    job, events = claim(host)  # a failed init is not retried by itself
    assert job.id == backup.id and events == [dispatched(backup)]
    lifecycle.end([], host.id, backup.id, "succeeded")
    assert claim(host) == (None, [])
    assert Job.select().where(Job.kind == "init").count() == 1

    # the repository is set again: one new init
    set_repo(host, init.created_at + dt.timedelta(microseconds=1))
    job, events = claim(host)
    assert job.kind == "init" and job.id not in (init.id, backup.id)
    assert events == [JobQueued(job.id, host.id, due=True), dispatched(job)]
    assert Job.select().where(Job.kind == "init").count() == 2


def test_auto_init_is_created_even_while_the_host_is_busy_but_only_once(host) -> None:
    busy = new_job(host)
    assert claim(host)[0].id == busy.id
    set_repo(host, utcnow() - dt.timedelta(seconds=1))
    job, events = claim(host)
    assert job is None
    (init,) = Job.select().where(Job.kind == "init")
    assert events == [JobQueued(init.id, host.id, due=True)]
    assert claim(host) == (None, [])
    assert Job.select().where(Job.kind == "init").count() == 1


# -- requeue ---------------------------------------------------------------


def test_requeue_puts_a_dispatched_job_back(host) -> None:
    new_job(host)
    job = claim(host, NOW)[0]
    events: list = []
    assert lifecycle.requeue(events, job.id, "busy")
    row = Job.get_by_id(job.id)
    assert row.status == "queued" and row.dispatched_at is None
    assert events == [JobQueued(job.id, host.id, due=True)]
    # claimed again, then requeued without an immediate offer
    assert claim(host)[0].id == job.id
    events = []
    assert lifecycle.requeue(events, job.id, "busy", due=False)
    assert events == [JobQueued(job.id, host.id, due=False)]


@pytest.mark.parametrize("state", ["queued", "running", "succeeded", "cancelled", "lost"])
def test_requeue_only_moves_dispatched_jobs(host, state) -> None:
    job = new_job(host)
    set_status(job, state)
    events: list = []
    assert not lifecycle.requeue(events, job.id, "busy")
    assert status(job) == state and events == []
    assert not lifecycle.requeue(events, 10_000, "no such job")


def test_requeue_of_a_job_whose_cancel_was_asked_ends_it_cancelled(host) -> None:
    new_job(host)
    job = claim(host)[0]
    assert lifecycle.cancel([], job.id, NOW) == "requested"
    events: list = []
    assert lifecycle.requeue(events, job.id, "its link dropped")
    row = Job.get_by_id(job.id)
    assert row.status == "cancelled" and row.finished_at is not None
    assert events == [JobEnded(job.id, host.id, "cancelled")]


# -- start -----------------------------------------------------------------


def test_start_from_dispatched(host) -> None:
    new_job(host)
    job = claim(host)[0]
    started = NOW + dt.timedelta(seconds=3)
    events: list = []
    assert lifecycle.start(events, host.id, job.id, started)
    row = Job.get_by_id(job.id)
    assert (row.status, row.started_at) == ("running", started)
    assert events == [JobStarted(job.id, host.id, cancel_requested=False)]
    # a second job.started (a resend) changes nothing
    events = []
    assert not lifecycle.start(events, host.id, job.id, started)
    assert events == []


def test_start_refuses_another_hosts_job_and_finished_ones(host, other) -> None:
    job = new_job(host)
    events: list = []
    assert not lifecycle.start(events, other.id, job.id, NOW)
    assert status(job) == "queued"
    for state in ("succeeded", "cancelled", "lost"):
        set_status(job, state)
        assert not lifecycle.start(events, host.id, job.id, NOW)
        assert status(job) == state
    assert events == []


# -- end -------------------------------------------------------------------


@pytest.mark.parametrize("state", ["queued", "dispatched", "running", "lost"])
def test_end_from_an_active_or_lost_job(host, state) -> None:
    job = new_job(host)
    set_status(job, state)
    events: list = []
    finished = NOW + dt.timedelta(minutes=5)
    assert lifecycle.end(
        events,
        host.id,
        job.id,
        "warning",
        finished_at=finished,
        exit_code=3,
        summary={"files_new": 1},
        error="some files unreadable",
    )
    row = Job.get_by_id(job.id)
    assert (row.status, row.finished_at, row.exit_code, row.summary, row.error) == (
        "warning",
        finished,
        3,
        {"files_new": 1},
        "some files unreadable",
    )
    assert events == [JobEnded(job.id, host.id, "warning")]


@pytest.mark.parametrize("state", ["succeeded", "warning", "failed", "cancelled"])
def test_end_never_changes_a_final_job(host, state) -> None:
    job = new_job(host)
    set_status(job, state)
    events: list = []
    for final in ("succeeded", "failed", "cancelled", "lost"):
        assert not lifecycle.end(events, host.id, job.id, final)
    assert status(job) == state and events == []


def test_a_late_report_cannot_undo_a_cancel(host) -> None:
    job = new_job(host)
    assert lifecycle.cancel([], job.id, NOW) == "cancelled"
    events: list = []
    assert not lifecycle.end(events, host.id, job.id, "succeeded", exit_code=0)
    assert status(job) == "cancelled" and events == []


def test_end_refuses_another_hosts_job(host, other) -> None:
    job = new_job(host)
    events: list = []
    assert not lifecycle.end(events, other.id, job.id, "succeeded")
    assert status(job) == "queued" and events == []


def test_lost_only_from_a_job_with_the_agent(host) -> None:
    job = new_job(host)
    events: list = []
    assert not lifecycle.end(events, host.id, job.id, "lost")  # queued: never left fleetd
    set_status(job, "lost")
    assert not lifecycle.end(events, host.id, job.id, "lost")
    assert events == []


def test_a_failed_backup_is_retried_after_the_groups_delay(host) -> None:
    group = SourceGroup.create(host=host, name="etc", includes=["/etc"], retries=1, retry_delay=60)
    job = new_job(host, group=group, params={"tag": "etc"})
    set_status(job, "running")
    events: list = []
    assert lifecycle.end(events, host.id, job.id, "failed", exit_code=1, now=NOW)
    retry = Job.select().where(Job.id != job.id).get()
    assert events == [
        JobEnded(job.id, host.id, "failed"),
        JobQueued(retry.id, host.id, due=False),
    ]
    assert (retry.status, retry.kind, retry.group_id, retry.group_name) == (
        "queued",
        "backup",
        group.id,
        "etc",
    )
    assert retry.not_before == NOW + dt.timedelta(seconds=60)
    assert retry.params == {"tag": "etc", "attempt": 2}
    # the retry fails too: that was the last attempt
    set_status(retry, "running")
    events = []
    assert lifecycle.fail(events, host.id, retry.id, "still broken")
    assert events == [JobEnded(retry.id, host.id, "failed")]
    assert Job.select().count() == 2


# -- cancel ----------------------------------------------------------------


def test_cancel_a_queued_job_ends_it_at_once(host) -> None:
    job = new_job(host)
    events: list = []
    assert lifecycle.cancel(events, job.id, NOW) == "cancelled"
    row = Job.get_by_id(job.id)
    assert row.status == "cancelled" and row.finished_at is not None
    assert events == [JobEnded(job.id, host.id, "cancelled")]


def test_cancel_a_dispatched_job_is_requested_and_start_says_so(host) -> None:
    new_job(host)
    job = claim(host)[0]
    events: list = []
    assert lifecycle.cancel(events, job.id, NOW) == "requested"
    row = Job.get_by_id(job.id)
    assert (row.status, row.cancel_requested_at) == ("dispatched", NOW)
    assert events == []  # the agent's report ends it
    assert lifecycle.start(events, host.id, job.id, NOW)
    assert events == [JobStarted(job.id, host.id, cancel_requested=True)]
    # the agent's report is what ends it
    events = []
    assert lifecycle.end(events, host.id, job.id, "cancelled")
    assert events == [JobEnded(job.id, host.id, "cancelled")]


def test_cancel_a_running_job_is_requested(host) -> None:
    job = new_job(host)
    set_status(job, "running")
    events: list = []
    assert lifecycle.cancel(events, job.id, NOW) == "requested"
    row = Job.get_by_id(job.id)
    assert (row.status, row.cancel_requested_at) == ("running", NOW)
    assert events == []


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled", "lost"])
def test_cancel_a_finished_job_returns_its_status(host, state) -> None:
    job = new_job(host)
    set_status(job, state)
    events: list = []
    assert lifecycle.cancel(events, job.id, NOW) == state
    row = Job.get_by_id(job.id)
    assert (row.status, row.cancel_requested_at) == (state, None)
    assert events == []


# -- lose ------------------------------------------------------------------


def test_lose_running_jobs_requeues_dispatched_and_keeps_the_kept(host, other) -> None:
    running, dispatched, kept, queued = (new_job(host) for _ in range(4))
    set_status(running, "running")
    set_status(dispatched, "dispatched")
    set_status(kept, "running")
    theirs = new_job(other)
    set_status(theirs, "running")
    events: list = []
    lost = lifecycle.lose(events, host.id, kept.id, "the agent restarted")
    assert lost == [running.id]
    row = Job.get_by_id(running.id)
    assert (row.status, row.error) == ("lost", "the agent restarted")
    assert status(dispatched) == "queued" and Job.get_by_id(dispatched.id).dispatched_at is None
    assert status(kept) == "running"
    assert status(queued) == "queued"
    assert status(theirs) == "running"
    assert sorted(events, key=repr) == sorted(
        [JobEnded(running.id, host.id, "lost"), JobQueued(dispatched.id, host.id, due=True)],
        key=repr,
    )


def test_lose_without_keep_loses_every_running_job(host) -> None:
    job = new_job(host)
    set_status(job, "running")
    events: list = []
    assert lifecycle.lose(events, host.id, None, "gone") == [job.id]
    assert events == [JobEnded(job.id, host.id, "lost")]
    events = []
    assert lifecycle.lose(events, host.id, None, "gone") == []
    assert events == []


# -- ids -------------------------------------------------------------------


def test_job_ids_are_never_reused(host) -> None:
    first, newest = new_job(host), new_job(host)
    Job.delete().where(Job.id == newest.id).execute()
    again = new_job(host)
    assert again.id > newest.id > first.id


def test_uids_are_unique(host) -> None:
    jobs = [new_job(host) for _ in range(50)]
    uids = [Job.get_by_id(j.id).uid for j in jobs]
    assert len(set(uids)) == 50
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    # a uid minted elsewhere is kept, and cannot be taken twice
    mine = lifecycle.create([], host.id, "backup", "schedule", uid="a" * 32)
    assert Job.get_by_id(mine.id).uid == "a" * 32
    with pytest.raises(pw.IntegrityError):
        lifecycle.create([], host.id, "backup", "schedule", uid="a" * 32)


# -- Lifecycle.apply ---------------------------------------------------------


def test_apply_publishes_after_commit_and_nothing_on_rollback(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    seen: list = []

    def committed_status(job_id: int) -> str | None:
        raw = sqlite3.connect(path)
        try:
            row = raw.execute("SELECT status FROM job WHERE id = ?", (job_id,)).fetchone()
        finally:
            raw.close()
        return row[0] if row else None

    class Boom(Exception):
        pass

    def claim_then_fail(events: list, host_id: int) -> None:
        lifecycle.claim(events, host_id, NOW)
        assert events
        raise Boom

    async def main() -> None:
        store = Store(path)
        await store.open()
        try:
            bus = Bus()
            bus.subscribe(JobQueued, lambda e: seen.append((e, committed_status(e.job_id))))
            bus.subscribe(JobDispatched, lambda e: seen.append((e, committed_status(e.job_id))))
            life = lifecycle.Lifecycle(store, bus)
            host_id = await store.run(lambda: Host.create(name="web-01").id)
            job = await life.apply(lifecycle.create, host_id, "backup", "user")
            assert seen == [(JobQueued(job.id, host_id), "queued")]
            with pytest.raises(Boom):
                await life.apply(claim_then_fail, host_id)
            assert len(seen) == 1  # rolled back: nothing published
            assert committed_status(job.id) == "queued"
            claimed = await life.apply(lifecycle.claim, host_id, NOW)
            assert claimed.id == job.id
            assert seen[1:] == [
                (JobDispatched(job.id, host_id, "backup", {}, job.uid), "dispatched")
            ]
        finally:
            await store.close()

    asyncio.run(main())


def test_dispatch_sends_on_the_committed_claim_and_requeues_a_failed_send(tmp_path) -> None:
    """The command goes out from the claim's JobDispatched, whoever claimed
    (the dispatcher, or a run-now in its own transaction); a send that finds
    the link gone puts the job back in the queue."""
    from fleet.server.clock import FakeClock
    from fleet.server.jobs.dispatch import Dispatcher

    class Sessions:
        def __init__(self) -> None:
            self.link_up = True
            self.sent: list[tuple[int, int, str]] = []
            self.done = asyncio.Event()

        def ready(self, host_id: int) -> bool:
            return self.link_up

        async def send_command(self, host_id: int, job_id: int, frame: str) -> bool:
            self.sent.append((host_id, job_id, frame))
            self.done.set()
            return self.link_up

    async def main() -> None:
        store = Store(tmp_path / "fleet.db")
        await store.open()
        try:
            bus = Bus()
            life = lifecycle.Lifecycle(store, bus)
            sessions = Sessions()
            dispatcher = Dispatcher(life, sessions, FakeClock(NOW))
            host_id = await store.run(lambda: Host.create(name="web-01").id)

            def run_now(events: list, host_id: int) -> int:
                job = lifecycle.create(events, host_id, "check", "user")
                claimed = dispatcher.claim_now(events, host_id)
                assert claimed is not None and claimed.id == job.id
                return job.id

            first = await life.apply(run_now, host_id)
            await asyncio.wait_for(sessions.done.wait(), 10)
            assert [(h, j) for h, j, _ in sessions.sent] == [(host_id, first)]
            assert '"kind":"check"' in sessions.sent[0][2].replace(" ", "")
            await store.run(lifecycle.end, [], host_id, first, "succeeded")

            # the link goes between the claim and the send: back in the queue
            requeued = asyncio.Event()
            bus.subscribe(JobQueued, lambda e: requeued.set())

            def run_now_then_drop(events: list, host_id: int) -> int:
                job_id = run_now(events, host_id)
                sessions.link_up = False
                return job_id

            sessions.done = asyncio.Event()
            second = await life.apply(run_now_then_drop, host_id)
            await asyncio.wait_for(sessions.done.wait(), 10)
            requeued.clear()  # the run-now's own JobQueued
            await asyncio.wait_for(requeued.wait(), 10)
            row = await store.run(lambda: Job.get_by_id(second))
            assert (row.status, row.dispatched_at) == ("queued", None)
            assert len(sessions.sent) == 2  # sent once, not twice
        finally:
            await store.close()

    asyncio.run(main())
