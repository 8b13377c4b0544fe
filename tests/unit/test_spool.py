"""The agent's spool: numbering, acks, restarts, the bound and its markers."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from fleet.agent.spool import Spool, SpoolDamaged


def log_frame(job: int, seq: int, payload: str = "x" * 50) -> dict:
    return {
        "job_id": job,
        "seq": seq,
        "ts": "2026-11-22T00:00:00Z",
        "stream": "stdout",
        "payload": payload,
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


def test_seqs_increase_and_survive_a_restart(path: Path) -> None:
    spool = Spool(path)
    assert [spool.append("job.log", log_frame(1, i)) for i in (1, 2, 3)] == [1, 2, 3]
    spool.close()
    again = Spool(path)
    assert again.append("job.finished", {"job_id": 1}) == 4
    assert [seq for seq, _, _ in again.pending()] == [1, 2, 3, 4]
    again.close()


def test_ack_is_cumulative_and_seqs_are_not_reused(path: Path) -> None:
    spool = Spool(path)
    for i in range(1, 6):
        spool.append("job.log", log_frame(1, i))
    assert spool.ack(3) == 3
    assert [seq for seq, _, _ in spool.pending()] == [4, 5]
    assert spool.ack(3) == 0  # a repeated ack changes nothing
    spool.ack(5)
    assert spool.count() == 0 and spool.size == 0
    assert spool.append("job.log", log_frame(1, 6)) == 6  # after a full drain, never 1 again
    spool.close()


def test_pending_after_resumes_where_the_sender_was(path: Path) -> None:
    spool = Spool(path)
    for i in range(1, 11):
        spool.append("job.log", log_frame(1, i))
    assert [s for s, _, _ in spool.pending(after=7)] == [8, 9, 10]
    assert [s for s, _, _ in spool.pending(after=0, limit=2)] == [1, 2]
    spool.close()


def test_the_file_is_private(path: Path) -> None:
    Spool(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_past_the_bound_old_log_lines_go_and_a_marker_counts_them(path: Path) -> None:
    spool = Spool(path, max_bytes=6000)
    spool.append("job.started", {"job_id": 7, "kind": "backup", "started_at": "t"})
    for i in range(1, 301):
        spool.append("job.log", log_frame(7, i))
    spool.append("job.finished", {"job_id": 7, "status": "succeeded"})
    frames = spool.pending(limit=100_000)
    assert spool.size <= 6000 * 1.2
    types = [t for _, t, _ in frames]
    assert types[0] == "job.started" and types[-1] == "job.finished"  # results are never dropped
    logs = [d for _, t, d in frames if t == "job.log"]
    markers = [d for d in logs if "dropped" in d["payload"]]
    assert len(markers) == 1  # older markers fold into the newest one
    dropped = int(markers[0]["payload"].split("fleet-agent: ")[1].split()[0])
    kept = [d["seq"] for d in logs if d is not markers[0]]
    # the marker stands at the last dropped line; every line is either kept or counted
    assert markers[0]["seq"] == dropped
    assert kept == list(range(dropped + 1, 301))
    assert dropped + len(kept) == 300
    assert spool.dropped_total == dropped
    spool.close()


def test_results_are_kept_even_over_the_bound(path: Path) -> None:
    spool = Spool(path, max_bytes=500)
    for i in range(1, 40):
        spool.append("job.finished", {"job_id": i, "status": "succeeded", "error": "e" * 40})
    assert spool.count() == 39  # nothing evictable: the bound gives way
    spool.close()


def test_markers_are_per_job(path: Path) -> None:
    spool = Spool(path, max_bytes=4000)
    for i in range(1, 101):
        spool.append("job.log", log_frame(1, i))
        spool.append("job.log", log_frame(2, i))
    logs = [d for _, t, d in spool.pending(limit=100_000) if t == "job.log"]
    for job in (1, 2):
        mine = [d for d in logs if d["job_id"] == job]
        markers = [d for d in mine if "dropped" in d["payload"]]
        assert len(markers) == 1
        dropped = int(markers[0]["payload"].split("fleet-agent: ")[1].split()[0])
        assert dropped + len(mine) - 1 == 100
    spool.close()


def test_a_spool_of_an_older_agent_is_upgraded_in_place(path: Path) -> None:
    import sqlite3

    raw = sqlite3.connect(path)
    raw.executescript(
        "CREATE TABLE frames (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    )
    raw.execute("INSERT INTO frames VALUES (1, 'job.log', ?)", (json.dumps(log_frame(1, 1)),))
    raw.execute("INSERT INTO meta VALUES ('last_seq', 1)")
    raw.commit()
    raw.close()
    spool = Spool(path)
    assert spool.size == len(json.dumps(log_frame(1, 1)))
    assert spool.append("job.log", log_frame(1, 2)) == 2
    assert [s for s, _, _ in spool.pending()] == [1, 2]
    spool.close()


def test_a_newer_snapshot_report_supersedes_unsent_ones(path: Path) -> None:
    spool = Spool(path)
    spool.append(
        "snapshots.report", {"snapshots": [], "report_at": "a", "last": False}, supersede=True
    )
    spool.append("snapshots.report", {"snapshots": [], "report_at": "a", "last": True})
    spool.append("job.finished", {"job_id": 1, "status": "succeeded"})
    spool.append(
        "snapshots.report", {"snapshots": [], "report_at": "b", "last": True}, supersede=True
    )
    kinds = [(t, d.get("report_at")) for _, t, d in spool.pending()]
    assert kinds == [("job.finished", None), ("snapshots.report", "b")]
    assert spool.size == sum(
        len(json.dumps(d, separators=(",", ":"))) for _, _, d in spool.pending()
    )
    spool.close()


def damage(path: Path, seq: int) -> None:
    """Overwrite one frame's data with what is not JSON, as a bad disk might."""
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE frames SET data = ? WHERE seq = ?", ('{"job_id": 1, "se', seq))
    db.close()


def test_a_damaged_frame_is_named_not_a_traceback(path: Path) -> None:
    spool = Spool(path)
    spool.append("job.log", log_frame(1, 1))
    spool.append("schedule.fire", {"schedule_id": 1, "fired_at": "2026-11-22T00:00:00Z"})
    spool.close()
    for seq in (1, 2):
        damage(path, seq)
    spool = Spool(path)
    for read in (spool.pending, spool.pending_fires):
        with pytest.raises(SpoolDamaged) as damaged:
            read()
        assert str(path) in str(damaged.value) and "is not JSON" in str(damaged.value)
        assert "move it aside" in str(damaged.value)
    spool.close()


def test_a_file_that_is_not_a_spool_is_damaged(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not SQLite" * 100)
    with pytest.raises(SpoolDamaged) as damaged:
        Spool(path)
    assert str(path) in str(damaged.value)
