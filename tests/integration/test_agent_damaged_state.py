"""`fleet-agent run` over a damaged spool or state file: one line naming the
file, and exit 3, the status the shipped unit does not restart after
(RestartPreventExitStatus=3), instead of a traceback and a redial (or a
restart) for ever. Issue 12's "agent robustness"."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.agent.spool import Spool
from fleet.agent.state import Identity, State

UNREACHABLE = "ws://127.0.0.1:9"  # the agents that fail before they dial
GOOD_FIRE = {"schedule_id": 1, "fired_at": "2026-11-22T00:00:00Z"}
LOG_LINE = {"job_id": 1, "seq": 1, "ts": "2026-11-22T00:00:00Z", "stream": "stdout"}


def state_dir(tmp_path: Path, url: str = UNREACHABLE, token: str = "agent_" + "x" * 43) -> State:
    state = State(tmp_path / "state")
    state.save_identity(Identity(url, 1, "web", token))
    return state


def spool_with(state: State, type_: str, data: dict) -> None:
    """A spool holding one frame whose data is then cut short."""
    spool = Spool(state.spool_path)
    seq = spool.append(type_, data)
    spool.close()
    db = sqlite3.connect(str(state.spool_path))
    with db:
        db.execute("UPDATE frames SET data = substr(data, 1, 9) WHERE seq = ?", (seq,))
    db.close()


def run_agent(state: State) -> subprocess.CompletedProcess:
    # a regression redials for ever: the timeout fails it
    return subprocess.run(
        [sys.executable, "-m", "fleet.agent.cli", "run", "--state-dir", str(state.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_refused(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("fleet-agent: error:")]
    assert str(path) in line


def test_a_fire_frame_that_is_not_json(tmp_path):
    state = state_dir(tmp_path)
    spool_with(state, "schedule.fire", {**GOOD_FIRE, "note": "x" * 20})
    proc = run_agent(state)
    assert_refused(proc, state.spool_path)
    assert "is not JSON" in proc.stderr and "move it aside" in proc.stderr


def test_a_spool_that_is_not_a_database(tmp_path):
    state = state_dir(tmp_path)
    state.spool_path.write_bytes(b"not SQLite at all\n" * 200)
    assert_refused(run_agent(state), state.spool_path)


@pytest.mark.parametrize("name", ["agent.json", "schedules.json"])
def test_a_state_file_that_is_not_json(tmp_path, name):
    state = state_dir(tmp_path)
    (state.root / name).write_text('{"server_url": "ws://')
    assert_refused(run_agent(state), state.root / name)


def test_a_log_frame_damaged_is_found_when_sending_to_fleetd(fleet, fx, tmp_path):
    """The frame is read only once connected, by the sender: the session
    ends the agent instead of redialling for ever."""
    host = fx.uniq("damaged")
    token = fx.enroll_agent(fleet, host, hostname=host)["agent_token"]
    state = state_dir(tmp_path, fleet.url, token)
    spool_with(state, "job.log", {**LOG_LINE, "payload": "y" * 20})
    proc = run_agent(state)
    assert_refused(proc, state.spool_path)
    assert f"connected to {fleet.url}" in proc.stderr  # it did dial: the sender found it
