"""fleetd applying what agents report: each seq once, paged snapshot lists,
following the agent's spool at hello (fleet.server.agents.ingest and the job
lifecycle, real SQLite)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fleet.common.protocol import Envelope
from fleet.server.agents.ingest import apply_frames as _apply_frames
from fleet.server.agents.ingest import sync_seq
from fleet.server.events import JobEnded, JobLogged, JobQueued
from fleet.server.jobs import lifecycle
from fleet.server.jobs.lifecycle import backup_params
from fleet.server.store.db import open_database
from fleet.server.store.models import Host, Job, JobLog, Snapshot


def create_job(host, kind, actor, user=None, group=None, params=None):
    return lifecycle.create([], host.id, kind, actor, user, group, params)


def apply_frames(host_id, frames):
    events: list = []
    return _apply_frames(events, host_id, frames), events


def claim(host_id, now=None):
    return lifecycle.claim([], host_id, now or dt.datetime.utcnow())


@pytest.fixture
def host(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    yield Host.create(name="web-01")
    database.close()


def snap(i: int) -> dict:
    return {
        "id": f"{i:064x}",
        "short_id": f"{i:08x}",
        "time": "2026-11-22T00:00:00Z",
        "hostname": "web-01",
        "paths": ["/etc"],
        "tags": ["etc"],
    }


def log(job: int, line: int, seq: int) -> Envelope:
    data = {
        "job_id": job,
        "seq": line,
        "ts": "2026-11-22T00:00:00Z",
        "stream": "stdout",
        "payload": f"l{line}",
    }
    return Envelope("job.log", data, seq=seq)


def test_each_seq_is_applied_once(host) -> None:
    job = create_job(host, "backup", "user")
    last, events = apply_frames(host.id, [log(job.id, 1, 1), log(job.id, 2, 2)])
    assert last == 2 and [len(e.lines) for e in events] == [2]
    # a resend after a reconnect: the same seqs again, and one new
    last, events = apply_frames(host.id, [log(job.id, 1, 1), log(job.id, 2, 2), log(job.id, 3, 3)])
    assert last == 3 and [line["seq"] for e in events for line in e.lines] == [3]
    assert all(isinstance(e, JobLogged) for e in events)
    assert [r.seq for r in JobLog.select().order_by(JobLog.seq)] == [1, 2, 3]


def test_frames_about_another_hosts_job_are_ignored(host) -> None:
    other = Host.create(name="db-01")
    theirs = create_job(other, "backup", "user")
    finished = {
        "job_id": theirs.id,
        "status": "failed",
        "exit_code": 1,
        "finished_at": "2026-11-22T00:00:00Z",
    }
    apply_frames(host.id, [Envelope("job.finished", finished, seq=1), log(theirs.id, 1, 2)])
    assert Job.get_by_id(theirs.id).status == "queued"
    assert JobLog.select().count() == 0


def test_a_cancelled_job_stays_cancelled(host) -> None:
    job = create_job(host, "backup", "user")
    Job.update(status="cancelled").where(Job.id == job.id).execute()
    finished = {
        "job_id": job.id,
        "status": "succeeded",
        "exit_code": 0,
        "finished_at": "2026-11-22T00:00:00Z",
    }
    apply_frames(host.id, [Envelope("job.finished", finished, seq=1)])
    assert Job.get_by_id(job.id).status == "cancelled"


def test_snapshot_reports_in_pages_replace_the_list_on_the_last_page(host) -> None:
    first = {
        "snapshots": [snap(1), snap(2), snap(3)],
        "report_at": "2026-11-22T01:00:00Z",
        "last": True,
    }
    apply_frames(host.id, [Envelope("snapshots.report", first, seq=1)])
    assert Snapshot.select().count() == 3
    # snapshot 1 was forgotten; the new report comes in two pages
    page1 = {"snapshots": [snap(2)], "report_at": "2026-11-22T02:00:00Z", "last": False}
    page2 = {"snapshots": [snap(3), snap(4)], "report_at": "2026-11-22T02:00:00Z", "last": True}
    apply_frames(host.id, [Envelope("snapshots.report", page1, seq=2)])
    assert Snapshot.select().count() == 3  # nothing removed before the last page
    apply_frames(host.id, [Envelope("snapshots.report", page2, seq=3)])
    ids = sorted(int(s.snapshot_id, 16) for s in Snapshot.select())
    assert ids == [2, 3, 4]


@pytest.mark.parametrize(
    ("recorded", "spool_seq", "pending", "expected"),
    [
        (10, 12, 11, 10),  # the usual: 11 and 12 were sent but not acked
        (12, 12, 11, 12),  # applied but the ack was lost: keep, no duplicates
        (40, 3, 1, 0),  # a new agent (new state dir) numbering from 1 again
        (5, 20, 18, 17),  # fleetd's database restored from before 6..17: follow the agent
        (5, 20, 0, 20),  # restored, and nothing waits in the spool
        (40, 3, 0, 3),  # new numbering, nothing waiting
    ],
)
def test_sync_seq_follows_the_agents_spool(host, recorded, spool_seq, pending, expected) -> None:
    Host.update(last_seq=recorded).where(Host.id == host.id).execute()
    assert sync_seq(host.id, spool_seq, pending) == expected
    assert Host.get_by_id(host.id).last_seq == expected


def test_a_failed_backup_is_retried_as_its_group_allows(host) -> None:
    from fleet.server.store.models import SourceGroup

    group = SourceGroup.create(host=host, name="etc", includes=["/etc"], retries=1, retry_delay=60)
    job = create_job(host, "backup", "user", None, group, backup_params(group))
    assert claim(host.id).id == job.id
    finished = {
        "job_id": job.id,
        "status": "failed",
        "exit_code": 1,
        "finished_at": "2026-11-22T00:00:00Z",
    }
    _, events = apply_frames(host.id, [Envelope("job.finished", finished, seq=1)])
    assert events[0] == JobEnded(job.id, host.id, "failed")
    retry = [e for e in events if isinstance(e, JobQueued)]
    assert len(retry) == 1 and retry[0].due is False  # it waits for its due time
    again = Job.get_by_id(retry[0].job_id)
    assert again.status == "queued" and again.params["attempt"] == 2
    delay = (again.not_before - dt.datetime.utcnow()).total_seconds()
    assert 55 < delay <= 60
    assert claim(host.id) is None  # not due for a minute
    command = claim(host.id, again.not_before)
    assert command is not None and command.id == again.id
    from fleet.server.jobs.dispatch import command_for

    payload = command_for(command.id, command.kind, command.params)
    assert "attempt" not in payload and "not_before" not in payload  # not the agent's business
    # the retry fails too: no third attempt
    finished = {**finished, "job_id": again.id}
    _, events = apply_frames(host.id, [Envelope("job.finished", finished, seq=2)])
    assert [e for e in events if isinstance(e, JobQueued)] == []


def test_a_huge_retry_delay_is_bounded(host) -> None:
    """A retry delay of 10**12 s once overflowed a date inside the ingest and
    wedged the host's stream: it is capped at a week."""
    from fleet.server.store.models import SourceGroup

    group = SourceGroup.create(
        host=host, name="etc", includes=["/etc"], retries=1, retry_delay=10**12
    )
    job = create_job(host, "backup", "user", None, group, backup_params(group))
    finished = {"job_id": job.id, "status": "failed", "exit_code": 1, "finished_at": "x"}
    last, events = apply_frames(host.id, [Envelope("job.finished", finished, seq=1)])
    assert last == 1
    again = Job.get_by_id([e for e in events if isinstance(e, JobQueued)][0].job_id)
    assert (again.not_before - dt.datetime.utcnow()).days <= 7


def test_a_succeeded_or_cancelled_backup_is_not_retried(host) -> None:
    from fleet.server.store.models import SourceGroup

    group = SourceGroup.create(host=host, name="etc", includes=["/etc"], retries=3, retry_delay=0)
    for seq, status in enumerate(("succeeded", "cancelled", "warning"), start=1):
        job = create_job(host, "backup", "user", None, group, backup_params(group))
        finished = {
            "job_id": job.id,
            "status": status,
            "exit_code": 0,
            "finished_at": "2026-11-22T00:00:00Z",
        }
        _, events = apply_frames(host.id, [Envelope("job.finished", finished, seq=seq)])
        assert [e for e in events if isinstance(e, JobQueued)] == []
