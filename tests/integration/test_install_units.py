"""systemd units (the `fleetctl enroll --install` snippet: test_agent_delivery.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleet import units

REPO_ROOT = Path(__file__).resolve().parents[2]
UNITS = ("fleetd.service", "fleet-agent.service")


@pytest.mark.parametrize("name", UNITS)
def test_build_systemd_holds_the_units_the_package_ships(name: str) -> None:
    assert (REPO_ROOT / "build" / "systemd" / name).read_text() == units.unit(name)


@pytest.mark.parametrize("name", UNITS)
def test_units_restart_on_failure_and_are_hardened(name: str) -> None:
    text = units.unit(name)
    for line in (
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
    ):
        assert line in text.splitlines(), line
    if name == "fleet-agent.service":
        assert "AmbientCapabilities=CAP_DAC_READ_SEARCH" in text
        assert "StateDirectory=fleet-agent" in text  # writable under ProtectSystem=strict
        assert "--state-dir /var/lib/fleet-agent" in text
        # refused for good (exit 3): not restarted for ever
        assert "RestartPreventExitStatus=3" in text.splitlines()
        # it replaces its own file when upgraded (the install snippet's directory)
        assert "ReadWritePaths=-/usr/local/lib/fleet" in text.splitlines()


@pytest.mark.parametrize("name", UNITS)
def test_units_verify(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / name
    path.write_text(units.unit(name))
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # what systemd-analyze may say here without a booted systemd: missing man pages and binaries
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip()
        and "man " not in line
        and "is not executable" not in line
        and "No such file" not in line
        and "Failed to" not in line
    ]
    assert not problems, problems
