"""The agent as one file: build dist/fleet-agent.pyz, check it, run it end to end
under the oldest and newest Pythons here (3.9, 3.13) and the system python3."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

MAX_SIZE = 5 * 1024 * 1024


def test_two_builds_are_identical_small_and_pure(pyz: Path, zipapp, tmp_path: Path) -> None:
    again = zipapp.build(tmp_path / "again.pyz")
    assert (
        hashlib.sha256(pyz.read_bytes()).hexdigest()
        == hashlib.sha256(again.read_bytes()).hexdigest()
    )
    assert pyz.stat().st_size < MAX_SIZE
    with zipfile.ZipFile(pyz) as zf:
        names = zf.namelist()
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    assert not compiled, compiled
    # the agent carries its own code, websockets and the scheduler's cron
    # matching (croniter, dateutil) and zone data, nothing of fleetd or fleetctl's
    tops = {n.split("/")[1] for n in names if n.startswith("site-packages/") and n.count("/") > 1}
    assert {"fleet", "websockets", "croniter", "dateutil", "tzdata"} <= tops
    assert not {"peewee", "rich", "click", "nacl", "argon2"} & tops
    packages = {
        n.split("/")[2] for n in names if n.startswith("site-packages/fleet/") and n.count("/") > 2
    }
    assert {"agent", "common"} <= packages
    assert not {"server", "ctl"} & packages, packages


@pytest.mark.parametrize("python", ["3.9", "3.13", "system"])
def test_zipapp_runs_the_agent_end_to_end(
    python: str, pyz: Path, zipapp, fleet, e2e, tmp_path: Path
) -> None:
    py = zipapp.interpreter(python)
    version = subprocess.run(
        [py, str(pyz), "--version"],
        env={**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "fleet-agent 0.1.0 (protocol 1)"

    h = e2e.host(fleet, agent_prefix=(py, str(pyz)))
    e2e.write_tree(h.src, {"keep/a.txt": "hello from the zipapp\n", "skip.tmp": "scratch\n"})
    group = e2e.group(fleet, h, "--exclude", "*.tmp")
    result = fleet.ctl("run", h.name, group, "--follow")
    assert "succeeded" in result.stderr
    job = e2e.jobs(fleet, h.name, kind="backup")[-1]
    assert job["status"] == "succeeded"
    snapshot_id = job["summary"]["snapshot_id"]

    listing = e2e.restic(h.repo, h.password, "ls", snapshot_id)
    assert listing.returncode == 0, listing.stderr
    assert f"{h.src}/keep/a.txt" in listing.stdout
    assert "skip.tmp" not in listing.stdout
    info = e2e.host_info(fleet, h.name)
    assert info["agent_version"] == "0.1.0"
    assert h.agent.proc is not None
    # the process really is the zipapp under that interpreter
    cmdline = Path(f"/proc/{h.agent.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:2] == [py.encode(), str(pyz).encode()]
