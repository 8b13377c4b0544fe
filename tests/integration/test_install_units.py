"""systemd units and build/install-fleetd.sh (the `fleetctl enroll --install` snippet: test_agent_delivery.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fleet import __version__, units

pytestmark = pytest.mark.own_store  # the install script, whatever the store: run once

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


SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
# what each unit runs: made executable in the root it is verified against
EXECUTABLES = {
    "fleetd.service": "usr/local/bin/fleetd",
    "fleet-agent.service": "usr/bin/python3",
}
PAGES = {"fleetd.service": "man8/fleetd.8", "fleet-agent.service": "man8/fleet-agent.8"}


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None or not SYSTEMD_UNITS.is_dir():
        pytest.skip("systemd-analyze (or systemd's units) is not installed")
    return path


def systemd_root(root: Path) -> Path:
    """A root holding systemd's own units: `systemd-analyze verify --root`
    needs them (sysinit.target, ...) and no running systemd."""
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    return root


def verify(root: Path, unit: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify against `root`: the command the unit runs must
    exist there and be executable, and its man page be on the MANPATH."""
    env = {**os.environ, "MANPATH": str(root / "usr/local/share/man")}
    return subprocess.run(
        [analyze(), "verify", f"--root={root}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("name", UNITS)
def test_units_verify(name: str, tmp_path: Path) -> None:
    """Everything systemd-analyze checks, in a root holding what the unit
    names: its command (a stand-in), its man page, systemd's units."""
    analyze()
    root = systemd_root(tmp_path)
    unit = root / "etc/systemd/system" / name
    unit.parent.mkdir(parents=True)
    unit.write_text(units.unit(name))
    page = root / "usr/local/share/man" / PAGES[name]
    page.parent.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "man" / page.name, page)
    command = root / EXECUTABLES[name]
    command.parent.mkdir(parents=True, exist_ok=True)
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    proc = verify(root, unit)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    # and it does look: without the command, verify fails
    command.unlink()
    proc = verify(root, unit)
    assert proc.returncode != 0 and "is not executable" in proc.stderr


# -- build/install-fleetd.sh -----------------------------------------------------

INSTALL = REPO_ROOT / "build" / "install-fleetd.sh"


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )


def test_install_fleetd_into_a_root_and_again_to_upgrade(tmp_path: Path) -> None:
    root = systemd_root(tmp_path / "root") if shutil.which("systemd-analyze") else tmp_path
    proc = install(root)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("systemd-analyze"):
        assert f"verified {root}/etc/systemd/system/fleetd.service" in proc.stderr
    for cmd in ("fleetd", "fleetctl"):
        link = root / "usr/local/bin" / cmd
        assert link.is_symlink() and link.resolve() == root / "opt/fleet/bin" / cmd
        ran = subprocess.run([str(link), "--version"], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and __version__ in ran.stdout, ran
    man = root / "usr/local/share/man"
    for page in ("man1/fleetctl.1", "man8/fleetd.8", "man8/fleet-agent.8"):
        assert (man / page).read_text() == (REPO_ROOT / "man" / Path(page).name).read_text()
    unit = root / "etc/systemd/system/fleetd.service"
    assert unit.read_text() == units.unit("fleetd.service")
    # the unit runs what was installed, with the state directory made for it
    assert "ExecStart=/usr/local/bin/fleetd serve --data-dir /var/lib/fleetd " in unit.read_text()
    state = root / "var/lib/fleetd"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "etc/fleetd").stat().st_mode) == 0o750
    assert "fleetd init --data-dir /var/lib/fleetd" in proc.stderr  # what to do next

    # again: an upgrade in place, the state left alone
    (state / "fleet.db").write_text("kept")
    again = install(root)
    assert again.returncode == 0, again.stderr
    assert "creating the virtualenv" not in again.stderr
    assert (state / "fleet.db").read_text() == "kept"
    assert "fleetd init" not in again.stderr  # initialised: nothing to say
    ran = subprocess.run(
        [str(root / "usr/local/bin/fleetd"), "--version"], capture_output=True, text=True
    )
    assert ran.returncode == 0


@pytest.mark.parametrize(
    "args",
    [("--wheel", "/nonexistent/fleet.whl"), ("--start",), ("--bogus",)],
    ids=["no-wheel", "start-under-root", "unknown"],
)
def test_install_fleetd_refuses_bad_arguments(tmp_path: Path, args: tuple) -> None:
    proc = install(tmp_path, *args)
    assert proc.returncode == 2 and "install-fleetd: " in proc.stderr
    assert not (tmp_path / "opt").exists()  # refused before anything was made
