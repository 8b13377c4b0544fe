"""Agent upgrades end to end: agents run from real zipapps (the session's
build, 0.1.0, each from a copy of its own, which it replaces), fleetd serves
another file, and `fleetctl agents upgrade` rolls it out: a second build
stamped 0.1.1, or a broken one made here (it passes the self-check, then
dies at start), which the agents roll back from."""

from __future__ import annotations

import os
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest

OLD, NEW, BROKEN = "0.1.0", "0.1.1", "0.1.2"


@pytest.fixture(scope="module")
def new_pyz(zipapp, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zipapp.build(tmp_path_factory.mktemp("new") / "fleet-agent.pyz", version=NEW)


def broken_pyz(path: Path) -> Path:
    """Says it is fleet-agent 0.1.2 when asked (--version), dies at start."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "__main__.py",
            "import sys\n"
            "if '--version' in sys.argv:\n"
            f"    print('fleet-agent {BROKEN} (protocol 1)')\n"
            "    sys.exit(0)\n"
            f"sys.exit('fleet-agent {BROKEN}: broken on purpose')\n",
        )
        zf.writestr("site-packages/fleet/__init__.py", f'__version__ = "{BROKEN}"\n')
    return path


def hosts_from_pyz(e2e, fleet, fx, pyz: Path, python: str, n: int) -> list:
    """n hosts whose agents run from copies of `pyz`, online; sorted by name
    (the order a rollout goes in)."""
    hosts = []
    for _ in range(n):
        bin_dir = e2e.tmp_path / fx.uniq("bin")
        bin_dir.mkdir()
        program = bin_dir / "fleet-agent.pyz"
        shutil.copy(pyz, program)
        h = e2e.host(fleet, set_repo=False, agent_prefix=(python, str(program)))
        h.program = program
        hosts.append(h)
    return sorted(hosts, key=lambda h: h.name)


def versions(fleet) -> dict[str, tuple[str, str]]:
    listed = fleet.ctl_json("agents", "list")["agents"]
    return {a["host"]: (a["agent_version"], a["state"]) for a in listed}


def test_agents_upgrade_goes_host_by_host_and_each_agent_replaces_itself(
    e2e, fx, fleetd_factory, pyz, new_pyz, agent_prefix
) -> None:
    fleet = fleetd_factory("--agent-pyz", str(new_pyz))
    h1, h2 = hosts_from_pyz(e2e, fleet, fx, pyz, agent_prefix[0], 2)
    assert versions(fleet) == {h1.name: (OLD, "behind"), h2.name: (OLD, "behind")}
    pids = [h1.agent.proc.pid, h2.agent.proc.pid]

    code, out, err = e2e.fleetctl(fleet, "agents", "upgrade", "--batch", "1", "--timeout", "30s")
    assert code == 0, out + err
    # batch by batch: the second host only once the first is back with the new version
    assert out.splitlines() == [
        f"batch 1 {h1.name}: upgrading {OLD} -> {NEW}",
        f"batch 1 {h1.name}: upgraded {OLD} -> {NEW}",
        f"batch 2 {h2.name}: upgrading {OLD} -> {NEW}",
        f"batch 2 {h2.name}: upgraded {OLD} -> {NEW}",
    ]
    assert f"of fleet-agent {NEW} succeeded (2 upgraded)" in err
    assert versions(fleet) == {h1.name: (NEW, "current"), h2.name: (NEW, "current")}
    for h, pid in zip((h1, h2), pids):
        # the same process, exec'd into the new file, which replaced the old one
        assert h.agent.running() and h.agent.proc.pid == pid
        assert f"upgrade to fleet-agent {NEW} confirmed" in h.agent.log()
        assert h.program.read_bytes() == new_pyz.read_bytes()
        assert Path(f"{h.program}.prev").read_bytes() == pyz.read_bytes()
        assert not (h.agent.state_dir / "upgrade.json").exists()
        status = h.agent.cli("status", "--state-dir", h.agent.state_dir, "--json")
        assert f'"agent_version": "{NEW}"' in status.stdout
    again = fleet.ctl_json("agents", "upgrade", "--status")
    e2e.fx.check_json(again, "rollout")  # the fields fleetctl(1) documents
    e2e.fx.check_json(again["hosts"], "rollout host")
    assert (again["status"], again["outcome"], again["counts"]) == (
        "succeeded",
        "ok",
        {"upgraded": 2},
    )
    assert fleet.ctl_json("audit", "--action", "agents.upgrade")[0]["detail"]["hosts"] == 2
    # nothing left to do: every host is current, and the rollout ends at once
    code, out, err = e2e.fleetctl(fleet, "agents", "upgrade")
    assert code == 0 and out.count("at 0.1.1 already") == 2, out + err


def test_a_new_agent_that_dies_at_start_is_rolled_back_and_the_rollout_halts(
    e2e, fx, fleetd_factory, pyz, agent_prefix, tmp_path: Path
) -> None:
    fleet = fleetd_factory("--agent-pyz", str(broken_pyz(tmp_path / "broken.pyz")))
    h1, h2 = hosts_from_pyz(e2e, fleet, fx, pyz, agent_prefix[0], 2)

    code, out, err = e2e.fleetctl(fleet, "agents", "upgrade", "--timeout", "9s")
    assert code == 1, out + err
    assert (
        f"batch 1 {h1.name}: failed: rolled back: the new agent {BROKEN} exited before "
        "fleetd welcomed it" in out
    )
    assert f"batch 2 {h2.name}: pending (not tried)" in out
    assert f"halted: {h1.name}: rolled back" in err
    # the new agent died (the process the test started); the guard put the
    # old file back and started the old agent, under another pid
    assert h1.agent.proc.wait(10) != 0
    log = h1.agent.log()
    assert f"fleet-agent {BROKEN}: broken on purpose" in log
    assert f"upgrade to {BROKEN} rolled back" in log
    pid = int((h1.agent.state_dir / "agent.lock").read_text())
    try:
        assert pid != h1.agent.proc.pid
        assert h1.program.read_bytes() == pyz.read_bytes()
        fx.wait_until(
            lambda: versions(fleet)[h1.name] == (OLD, "behind"), timeout=20, what="the old agent"
        )
        # it has told fleetd: the marker is gone
        fx.wait_until(
            lambda: not (h1.agent.state_dir / "upgrade.json").exists(),
            timeout=10,
            what="the rollback to be reported",
        )
        # the host after it was never asked
        assert h2.agent.running() and not Path(f"{h2.program}.prev").exists()
        assert versions(fleet)[h2.name] == (OLD, "behind")
    finally:
        stop_pid(pid)


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the agent the rollback started (not a child of this process)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            return
        if state == "Z":  # exited; its parent (init) reaps it
            return
        time.sleep(0.05)  # polling interval; the deadline decides
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"the restored agent {pid} did not stop on SIGTERM")
