"""fleet.agent.runner: the job's end first, the snapshot refresh after it
(coalesced, pre-empted by a job), and restic's status lines kept out of the
job log. restic is a fake shell script that logs how it was called."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from fleet.agent.runner import JobRunner
from fleet.agent.state import RepoConfig, State

SNAP = "a" * 64
FAKE_RESTIC = r"""#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  snapshots)
    if [ -e "$FAKE_DIR/slow" ]; then echo $$ > "$FAKE_DIR/slow.pid"; exec sleep 30; fi
    echo '[{"id":"SNAP","short_id":"aaaaaaaa","time":"2024-01-01T00:00:00Z","hostname":"h","paths":["/src"],"tags":["g"]}]' ;;
  stats)
    case "$*" in
      *raw-data*) echo '{"total_size":4,"total_file_count":0,"total_blob_count":1,"snapshots_count":1}' ;;
      *) echo '{"total_size":10,"total_file_count":2,"snapshots_count":1}' ;;
    esac ;;
  backup)
    echo '{"message_type":"status","percent_done":0.5,"bytes_done":5}'
    echo '{"message_type":"verbose_status","action":"new","item":"/src/a"}'
    echo '{"message_type":"status","percent_done":1,"bytes_done":10}'
    echo '{"message_type":"summary","snapshot_id":"SNAP","total_bytes_processed":10,"total_files_processed":2,"data_added":3}' ;;
esac
""".replace("SNAP", SNAP)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.now: list[tuple[str, dict]] = []

    async def emit(self, type_: str, data: dict, supersede: bool = False, drop_local=None) -> None:
        self.events.append((type_, data))

    async def emit_now(self, type_: str, data: dict) -> None:
        self.now.append((type_, data))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    restic = tmp_path / "restic"
    restic.write_text(FAKE_RESTIC)
    restic.chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    state = State(tmp_path / "state")
    state.save_repo(RepoConfig(str(tmp_path / "repo"), "secret-pw"))
    return tmp_path, state, str(restic)


def calls(tmp: Path, verb: str) -> int:
    path = tmp / "calls"
    return (
        sum(line.split()[0] == verb for line in path.read_text().splitlines())
        if path.exists()
        else 0
    )


def backup(job_id: int) -> dict:
    return {"job_id": job_id, "kind": "backup", "includes": ["/src"], "tag": "g"}


async def wait_idle(runner: JobRunner, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while runner.current is not None:
        assert time.monotonic() < deadline, "the job did not end"
        await asyncio.sleep(0.01)


def test_job_finished_comes_before_the_full_refresh(fake):
    tmp, state, restic = fake
    rec = Recorder()

    async def main():
        runner = JobRunner(state, rec, restic, refresh_delay=0.5)
        runner.submit(backup(1))
        await wait_idle(runner)
        ended = rec.types().index("job.finished")
        # restic ran once for the job: no snapshots/stats before the end
        assert calls(tmp, "snapshots") == 0 and calls(tmp, "stats") == 0
        partial = [d for t, d in rec.events[:ended] if t == "snapshots.report"]
        assert len(partial) == 1 and partial[0]["last"] is False
        (snap,) = partial[0]["snapshots"]
        assert snap["id"] == SNAP and snap["paths"] == ["/src"] and snap["tags"] == ["g"]
        assert snap["size_bytes"] == 10 and snap["file_count"] == 2
        await runner.refresher.idle()
        after = rec.events[ended + 1 :]
        assert [t for t, _ in after] == ["snapshots.report", "repo.stats"]
        assert after[0][1]["last"] is True
        assert after[0][1]["snapshots"][0]["size_bytes"] == 10  # from the summary
        # read without a lock
        assert "--no-lock" in (tmp / "calls").read_text().splitlines()[-1]

    asyncio.run(main())


def test_status_lines_go_to_progress_not_to_the_log(fake):
    _, state, restic = fake
    rec = Recorder()

    async def main():
        runner = JobRunner(state, rec, restic, refresh_delay=60)
        runner.submit(backup(1))
        await wait_idle(runner)
        await runner.refresher.stop()

    asyncio.run(main())
    logged = [d["payload"] for t, d in rec.events if t == "job.log"]
    assert not any('"status"' in p for p in logged), logged
    assert any('"verbose_status"' in p for p in logged)
    assert any('"summary"' in p for p in logged)
    assert [d["seq"] for t, d in rec.events if t == "job.log"] == list(range(1, len(logged) + 1))
    progress = [d for t, d in rec.now if t == "job.progress"]
    assert progress and progress[-1]["percent_done"] == 1


def test_backups_in_a_row_make_one_refresh(fake):
    tmp, state, restic = fake
    rec = Recorder()

    async def main():
        runner = JobRunner(state, rec, restic, refresh_delay=0.3)
        for job_id in (1, 2, 3):
            runner.submit(backup(job_id))  # never refused as busy: the last one ended
            await wait_idle(runner)
        await runner.refresher.idle()
        assert runner.refresher.runs == 1
        # the first refresh measures the sizes: restore size and stored data
        assert calls(tmp, "snapshots") == 1 and calls(tmp, "stats") == 2
        assert runner.refresher.summaries == []

    asyncio.run(main())
    assert rec.types().count("job.finished") == 3


def test_a_job_kills_a_running_refresh_which_runs_again_after_it(fake):
    tmp, state, restic = fake
    rec = Recorder()
    (tmp / "slow").touch()

    async def main():
        runner = JobRunner(state, rec, restic, refresh_delay=0)
        runner.submit(backup(1))
        await wait_idle(runner)
        deadline = time.monotonic() + 10
        while not (tmp / "slow.pid").exists():  # the refresh's restic snapshots runs
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        pid = int((tmp / "slow.pid").read_text())
        (tmp / "slow").unlink()
        started = time.monotonic()
        runner.submit({"job_id": 2, "kind": "prune"})  # accepted, not busy
        assert runner.current == 2
        await wait_idle(runner)
        assert time.monotonic() - started < 5  # it did not wait for the refresh
        await asyncio.sleep(0.1)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the refresh's restic was killed
        await runner.refresher.idle()
        assert runner.refresher.runs == 2 and calls(tmp, "snapshots") == 2

    asyncio.run(main())
    types = rec.types()
    # the pre-empted refresh reported nothing; the retried one reported once
    assert types.count("repo.stats") == 1
    assert types.index("repo.stats") > [i for i, t in enumerate(types) if t == "job.finished"][-1]


def test_sizes_are_measured_once_then_grown_from_summaries_until_a_prune(fake):
    """restic stats walks every snapshot: it runs on the first refresh and
    after a forget or prune, not after every backup; in between each
    backup's summary adds to the figures."""
    tmp, state, restic = fake
    rec = Recorder()

    def stats_reports() -> list[dict]:
        return [d for t, d in rec.events if t == "repo.stats"]

    async def main():
        runner = JobRunner(state, rec, restic, refresh_delay=0)
        runner.submit(backup(1))
        await wait_idle(runner)
        await runner.refresher.idle()
        first = stats_reports()[-1]
        assert (first["size_bytes"], first["raw_size_bytes"], first["snapshot_count"]) == (
            10,
            4,
            1,
        )
        assert calls(tmp, "stats") == 2
        runner.submit(backup(2))
        await wait_idle(runner)
        await runner.refresher.idle()
        grown = stats_reports()[-1]
        assert calls(tmp, "stats") == 2  # no walk of the repository for a backup
        assert (grown["size_bytes"], grown["raw_size_bytes"], grown["file_count"]) == (20, 7, 4)
        assert grown["measured_at"] == first["measured_at"]
        runner.submit({"job_id": 3, "kind": "prune"})
        await wait_idle(runner)
        await runner.refresher.idle()
        assert calls(tmp, "stats") == 4  # a prune changed what is stored: measured again
        assert stats_reports()[-1]["raw_size_bytes"] == 4

    asyncio.run(main())
