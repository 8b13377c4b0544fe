"""Enrollment, the agent's link, online/offline, refused tokens (real processes)."""

from __future__ import annotations

import json
import signal
import stat
import subprocess

from fleet import __version__
from fleet.common.protocol import format_enrollment


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_saves_private_state_with_server_and_token(fleet, e2e):
    h = e2e.host(fleet)  # enrolled, repository set, agent connected, init done
    state = h.agent.state_dir

    assert mode(state / "agent.json") == 0o600
    assert mode(state / "repo.json") == 0o600  # written when fleetd pushed config.update
    assert mode(state / "spool.db") == 0o600
    assert mode(state) & 0o077 == 0, f"state dir is {oct(mode(state))}"

    identity = h.agent.identity
    assert identity["server_url"] == fleet.url
    assert identity["host_name"] == h.name
    assert identity["agent_token"].startswith("agent") and len(identity["agent_token"]) > 20
    repo_name = fleet.ctl_json("repo", "show", h.name)["name"]
    (repo,) = json.loads((state / "repo.json").read_text())["repositories"]
    assert repo["url"] == str(h.repo) and repo["name"] == repo_name and repo["id"] > 0
    assert repo["password"] == h.password  # the agent needs it; 0600 protects it

    status = h.agent.cli("status", "--state-dir", state, "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["host"] == h.name and doc["server"] == fleet.url
    assert doc["repository_configured"] is True and doc["repositories"] == [repo_name]
    assert identity["agent_token"] not in status.stdout and h.password not in status.stdout


def test_used_enrollment_string_is_refused(fleet, e2e):
    h = e2e.host(fleet, set_repo=False, start=False)  # h.enrollment is now used
    other = e2e.agent("second-agent")
    proc = other.enroll(h.enrollment, hostname="intruder")
    assert proc.returncode == 3, proc
    assert "fleet-agent: error: enrollment refused" in proc.stderr
    assert "already used" in proc.stderr
    assert not (other.state_dir / "agent.json").exists()
    # the first enrollment still stands
    assert e2e.host_info(fleet, h.name)["hostname"] == h.name


def test_garbage_or_unreachable_enrollment_string(fleet, e2e):
    agent = e2e.agent("garbage")
    proc = agent.enroll("this-is-not-an-enrollment-string")
    assert proc.returncode == 2, proc
    assert "fleet-agent: error:" in proc.stderr and "enrollment string" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = agent.enroll("fleet1:@@@damaged@@@")
    assert proc.returncode == 2, proc
    assert "damaged" in proc.stderr

    # a well-formed string for a server that is not there: unreachable (5)
    dead = format_enrollment("ws://127.0.0.1:9", "enroll_does-not-matter")
    proc = agent.enroll(dead)
    assert proc.returncode == 5, proc
    assert "cannot reach the server" in proc.stderr
    assert not (agent.state_dir / "agent.json").exists()


def test_host_online_with_versions_then_offline_after_sigterm(fleet, e2e):
    h = e2e.host(fleet, set_repo=False)
    info = e2e.host_info(fleet, h.name)
    version = subprocess.run([e2e.RESTIC, "version"], capture_output=True, text=True).stdout
    assert info["status"] == "online"
    assert info["agent_version"] == __version__
    assert info["restic_version"] and version.startswith(f"restic {info['restic_version']} ")
    assert info["os"] == "linux"
    assert info["hostname"]  # see test_enroll_hostname_is_what_the_agent_reports
    assert info["arch"]
    assert info["last_seen_at"]

    assert h.agent.stop() == 0
    assert "received SIGTERM: stopping" in h.agent.log()
    e2e.wait_host(fleet, h.name, "offline", timeout=10)
    assert e2e.host_info(fleet, h.name)["agent_version"] == __version__  # kept while offline


def test_enroll_hostname_is_what_the_agent_reports(fleet, e2e):
    h = e2e.host(fleet, set_repo=False, start=False)  # enrolled with --hostname h.name
    assert e2e.host_info(fleet, h.name)["hostname"] == h.name
    e2e.start(fleet, h)
    assert e2e.host_info(fleet, h.name)["hostname"] == h.name


def test_silent_agent_goes_offline_and_comes_back(fleet_hb1, e2e):
    """fleetd --heartbeat-interval 1: a frozen agent is marked offline, and
    once thawed it notices the dropped link, redials and is online again."""
    fleet = fleet_hb1
    h = e2e.host(fleet, set_repo=False)
    h.agent.signal(signal.SIGSTOP)
    try:
        e2e.wait_host(fleet, h.name, "offline", timeout=15)
    finally:
        h.agent.signal(signal.SIGCONT)
    assert "silent for 3 s: marking it offline" in fleet.fleetd.log()
    h.agent.wait_log("connected to", 2, timeout=20)  # it notices, backs off, redials
    e2e.wait_host(fleet, h.name, "online", timeout=10)
    assert "redialling" in h.agent.log()


def test_silent_agent_is_offline_after_three_heartbeats(fleet_hb1, e2e):
    fleet = fleet_hb1
    h = e2e.host(fleet, set_repo=False)
    h.agent.signal(signal.SIGSTOP)
    try:
        _, took = e2e.timed(lambda: e2e.host_info(fleet, h.name)["status"] == "offline", timeout=5)
    finally:
        h.agent.signal(signal.SIGCONT)
    assert took < 5  # 3 s of silence, and some slack


def test_garbage_agent_token_is_refused(fleet, e2e):
    h = e2e.host(fleet, set_repo=False, start=False)
    path = h.agent.state_dir / "agent.json"
    doc = json.loads(path.read_text())
    doc["agent_token"] = "agent_" + "x" * 40
    path.write_text(json.dumps(doc))
    h.agent.start()
    code = h.agent.wait(timeout=20)
    assert code == 3, h.agent.log()
    assert "refused this agent's token" in h.agent.log()
    assert e2e.host_info(fleet, h.name)["status"] == "offline"


def test_removed_host_disconnects_its_agent(fleet, e2e):
    h = e2e.host(fleet, set_repo=False)
    fleet.ctl("hosts", "remove", h.name, "--yes")
    code = h.agent.wait(timeout=20)
    assert code == 3, h.agent.log()
    assert "refused this agent's token" in h.agent.log()
    assert fleet.ctl("hosts", "show", h.name, expect=4).exit_code == 4
