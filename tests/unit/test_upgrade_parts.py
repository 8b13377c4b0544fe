"""The pure parts of agent upgrades: the agent's marker and checks
(fleet.agent.upgrade), fleetd's agent file and rollout plan
(fleet.server.agentfile, fleet.server.agents.rollout), and fleetctl's lines
and install snippet. The real thing runs in tests/e2e/test_agent_upgrade.py."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from fleet.agent import cli, upgrade
from fleet.agent.state import Identity, State
from fleet.common import protocol
from fleet.common.exitcodes import Exit
from fleet.ctl import agents as ctl_agents
from fleet.ctl.hosts import download_script, install_snippet
from fleet.server import agentfile
from fleet.server.agents import rollout


def zipapp(path: Path, version: str, main: str | None = None) -> Path:
    """A zipapp fleetd reads `version` from; `main` is what it runs."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__main__.py", main or f"print('fleet-agent {version} (protocol 1)')\n")
        zf.writestr("site-packages/fleet/__init__.py", f'"""x"""\n\n__version__ = "{version}"\n')
    return path


def marker(**kw) -> upgrade.Marker:
    fields = {
        "to": "0.2.0",
        "previous": "0.1.0",
        "program": "/p/fleet-agent.pyz",
        "deadline": 1000.0,
    }
    return upgrade.Marker(**{**fields, **kw})


# -- the agent: what the marker says at start ------------------------------------------


@pytest.mark.parametrize(
    "m, version, now, expected",
    [
        (None, "0.1.0", 0.0, ("none", "")),
        (marker(), "0.2.0", 10.0, ("trial", "")),
        (marker(starts=2), "0.2.0", 10.0, ("trial", "")),
        (marker(starts=3), "0.2.0", 10.0, ("rollback", "started 3 times")),
        (marker(), "0.2.0", 1000.0, ("rollback", "by its deadline")),
        # the old agent, after a rollback or a swap that never happened
        (marker(state="rolled_back", error="boom"), "0.1.0", 10.0, ("report", "boom")),
        (marker(), "0.1.0", 10.0, ("report", "the agent started as 0.1.0, not 0.2.0")),
    ],
)
def test_on_start(m, version, now, expected) -> None:
    action, why = upgrade.on_start(m, version, now)
    assert action == expected[0]
    assert expected[1] in why


def test_the_marker_round_trips_and_a_damaged_one_is_dropped(tmp_path: Path) -> None:
    state = State(tmp_path)
    assert upgrade.load_marker(state) is None
    m = marker(argv=["run", "--state-dir", str(tmp_path)], pid=42)
    upgrade.save_marker(state, m)
    assert upgrade.load_marker(state) == m
    assert (tmp_path / "upgrade.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "upgrade.json").write_text("{not json")
    assert upgrade.load_marker(state) is None
    assert not (tmp_path / "upgrade.json").exists()


def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = zipapp(tmp_path / "fleet-agent.pyz", "0.1.0")
    assert upgrade.refusal(program, None) is None
    busy = upgrade.refusal(program, 7)
    assert busy is not None and busy.code == "busy" and "job 7" in str(busy)
    checkout = upgrade.refusal(None, None)
    assert checkout is not None and checkout.code == "unsupported"
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    readonly = upgrade.refusal(program, None)
    assert readonly is not None and readonly.code == "unsupported"
    assert f"cannot replace {program}" in str(readonly)


def test_running_program_is_a_pyz_file(tmp_path: Path) -> None:
    pyz = zipapp(tmp_path / "fleet-agent.pyz", "0.1.0")
    assert upgrade.running_program(str(pyz)) == pyz.absolute()
    assert upgrade.running_program(str(tmp_path / "missing.pyz")) is None
    (tmp_path / "cli.py").write_text("")
    assert upgrade.running_program(str(tmp_path / "cli.py")) is None  # a checkout
    (tmp_path / "fake.pyz").write_text("not a zip")
    assert upgrade.running_program(str(tmp_path / "fake.pyz")) is None


def test_check_download() -> None:
    digest = hashlib.sha256(b"abc").hexdigest()
    upgrade.check_download(3, digest, 3, digest.upper())
    with pytest.raises(upgrade.UpgradeError, match="downloaded 2 bytes, fleetd announced 3"):
        upgrade.check_download(2, digest, 3, digest)
    with pytest.raises(upgrade.UpgradeError, match="has SHA-256") as info:
        upgrade.check_download(3, "0" * 64, 3, digest)
    assert info.value.code == "checksum"


def test_self_check_runs_the_new_file(tmp_path: Path) -> None:
    good = zipapp(tmp_path / "good.pyz", "0.2.0")
    upgrade.self_check(sys.executable, good, "0.2.0")
    with pytest.raises(upgrade.UpgradeError, match=r"self-check \(0.3.0\)") as info:
        upgrade.self_check(sys.executable, good, "0.3.0")
    assert info.value.code == "self_check"
    bad = zipapp(tmp_path / "bad.pyz", "0.2.0", main="raise SystemExit('cannot import x')\n")
    with pytest.raises(upgrade.UpgradeError, match="cannot import x"):
        upgrade.self_check(sys.executable, bad, "0.2.0")


def test_install_keeps_the_old_file_and_roll_back_puts_it_back(tmp_path: Path) -> None:
    state = State(tmp_path / "state")
    program = tmp_path / "bin" / "fleet-agent.pyz"
    program.parent.mkdir()
    program.write_bytes(b"old")
    new = program.with_name(".fleet-agent-x.pyz.new")
    new.write_bytes(b"new")
    m = marker(program=str(program))
    upgrade.install(state, program, new, m)
    assert program.read_bytes() == b"new" and not new.exists()
    assert upgrade.backup_of(program).read_bytes() == b"old"
    assert upgrade.load_marker(state) == m
    upgrade.roll_back(state, m, "no hello")
    assert program.read_bytes() == b"old"
    assert os.access(program, os.X_OK)
    saved = upgrade.load_marker(state)
    assert (saved.state, saved.error) == ("rolled_back", "no hello")
    assert sorted(p.name for p in program.parent.iterdir()) == [
        "fleet-agent.pyz",
        "fleet-agent.pyz.prev",
    ]


def test_the_guard_looks_after_the_new_agents_own_timer() -> None:
    now = time.time()
    m = marker(deadline=now + 10)
    assert m.deadline + 1 <= upgrade.guard_wake(m) <= m.deadline + 30


class Serve(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200
    requests = 0  # GETs received (each carries the token)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        Serve.requests += 1
        assert self.headers["Authorization"] == "Bearer agent-token"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_what_comes(server, tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{server.server_address[1]}"
    body = b"x" * 100_000
    Serve.body, Serve.status = body, 200
    digest = hashlib.sha256(body).hexdigest()
    got = upgrade.download(url, "agent-token", None, tmp_path, len(body), digest)
    assert got.parent == tmp_path and got.read_bytes() == body
    assert got.stat().st_mode & 0o777 == 0o755
    got.unlink()
    with pytest.raises(upgrade.UpgradeError, match="more than the 10 bytes") as info:
        upgrade.download(url, "agent-token", None, tmp_path, 10, digest)
    assert info.value.code == "checksum"
    Serve.body, Serve.status = b"fleetd serves no agent file", 404
    with pytest.raises(upgrade.UpgradeError, match="HTTP 404 fleetd serves no agent file") as info:
        upgrade.download(url, "agent-token", None, tmp_path, 10, digest)
    assert info.value.code == "download"
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    "url, expected",
    [
        ("ws://127.0.0.1:8433", "http://127.0.0.1:8433/agent.pyz"),
        ("wss://fleet.example:8433/", "https://fleet.example:8433/agent.pyz"),
        ("wss://proxy.example/fleet", "https://proxy.example/fleet/agent.pyz"),
    ],
)
def test_agent_file_url(url: str, expected: str) -> None:
    assert protocol.agent_file_url(url) == expected


def test_agent_file_url_wants_a_websocket_url() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.agent_file_url("http://x")


# -- fleetd: the agent file and the plan -----------------------------------------------


def test_fleetd_reads_the_version_packed_in_the_agent_file(tmp_path: Path) -> None:
    pyz = zipapp(tmp_path / "fleet-agent.pyz", "1.2.3+hotfix")
    agent = agentfile.load(pyz)
    assert agent.version == "1.2.3+hotfix"
    assert agent.sha256 == hashlib.sha256(pyz.read_bytes()).hexdigest()
    assert agent.describe() == {
        "version": "1.2.3+hotfix",
        "sha256": agent.sha256,
        "size_bytes": agent.size,
    }
    assert agentfile.sha256_line(agent) == f"{agent.sha256}  fleet-agent.pyz\n"


def test_fleetd_refuses_a_file_that_is_no_agent(tmp_path: Path) -> None:
    (tmp_path / "text.pyz").write_text("hello")
    with pytest.raises(agentfile.AgentFileError, match="not a zipapp"):
        agentfile.load(tmp_path / "text.pyz")
    with zipfile.ZipFile(tmp_path / "other.pyz", "w") as zf:
        zf.writestr("__main__.py", "")
    with pytest.raises(agentfile.AgentFileError, match="not a fleet-agent zipapp"):
        agentfile.load(tmp_path / "other.pyz")
    with zipfile.ZipFile(tmp_path / "noversion.pyz", "w") as zf:
        zf.writestr("site-packages/fleet/__init__.py", "x = 1\n")
    with pytest.raises(agentfile.AgentFileError, match="names no __version__"):
        agentfile.load(tmp_path / "noversion.pyz")
    with pytest.raises(agentfile.AgentFileError, match="cannot read"):
        agentfile.load(tmp_path / "missing.pyz")


def test_fleetd_looks_for_the_agent_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, dist = tmp_path / "data", tmp_path / "dist"
    data_dir.mkdir()
    dist.mkdir()
    monkeypatch.setattr(
        agentfile, "candidates", lambda d: [d / "fleet-agent.pyz", dist / "fleet-agent.pyz"]
    )
    assert agentfile.find(None, data_dir) is None
    zipapp(dist / "fleet-agent.pyz", "0.0.9")
    assert agentfile.find(None, data_dir).version == "0.0.9"
    zipapp(data_dir / "fleet-agent.pyz", "0.1.0")
    assert agentfile.find(None, data_dir).version == "0.1.0"  # its data dir first
    assert agentfile.find(zipapp(tmp_path / "x.pyz", "9.9"), data_dir).version == "9.9"


@pytest.mark.parametrize(
    "version, served, expected",
    [
        ("0.1.0", "0.1.0", "current"),
        ("0.1.0", "0.1.1", "behind"),
        ("0.9.1", "0.10.0", "behind"),  # numbers, not strings
        ("0.2.0", "0.1.9", "ahead"),
        ("1.0rc1", "1.0", "behind"),
        ("1.0", "1.0.1", "behind"),
        (None, "0.1.0", "unknown"),
        ("0.1.0", None, "unknown"),
    ],
)
def test_compare_versions(version, served, expected) -> None:
    assert rollout.compare(version, served) == expected


def test_plan_batches_in_order_and_leaves_the_current_out() -> None:
    hosts = [
        (1, "a", "0.1.0"),
        (2, "b", "0.2.0"),
        (3, "c", None),
        (4, "d", "0.1.0"),
        (5, "e", "0.1.0"),
    ]
    planned = rollout.plan(hosts, "0.2.0", 2)
    assert [(p.name, p.batch, p.status) for p in planned] == [
        ("a", 1, "pending"),
        ("b", 0, "current"),
        ("c", 1, "pending"),
        ("d", 2, "pending"),
        ("e", 2, "pending"),
    ]
    assert [p.batch for p in rollout.plan(hosts, "0.2.0", 1)] == [1, 0, 2, 3, 4]
    with pytest.raises(ValueError):
        rollout.plan(hosts, "0.2.0", 0)


@pytest.mark.parametrize(
    "status, host_states, expected, exit_code",
    [
        ("succeeded", ["upgraded", "current"], "ok", Exit.OK),
        ("succeeded", ["upgraded", "skipped"], "partial", Exit.ERROR),
        ("halted", ["upgraded", "failed", "pending"], "halted", Exit.ERROR),
        ("succeeded", [], "none", Exit.NOT_FOUND),
    ],
)
def test_outcome_and_fleetctl_exit(status, host_states, expected, exit_code) -> None:
    hosts = [{"status": s} for s in host_states]
    assert rollout.outcome(status, hosts) == expected
    assert ctl_agents.outcome_exit({"outcome": expected}) == exit_code


# -- fleetctl: lines and the install snippet -------------------------------------------


def test_rollout_lines() -> None:
    line = {
        "host": "web-1",
        "batch": 2,
        "from_version": "0.1.0",
        "status": "failed",
        "detail": "rolled back: x",
    }
    assert ctl_agents.line_text(line, "0.2.0") == "batch 2 web-1: [red]failed[/]: rolled back: x"
    line.update(status="upgraded", detail=None)
    assert ctl_agents.line_text(line, "0.2.0") == "batch 2 web-1: [green]upgraded[/] 0.1.0 -> 0.2.0"
    line.update(status="current", batch=0)
    assert ctl_agents.line_text(line, "0.2.0") == "web-1: [green]current[/] (at 0.2.0 already)"
    summary = ctl_agents.summary(
        {
            "id": 3,
            "version": "0.2.0",
            "status": "halted",
            "reason": "web-1: x",
            "counts": {"failed": 1, "pending": 2},
        }
    )
    assert summary == "rollout 3 of fleet-agent 0.2.0 halted: web-1: x (1 failed, 2 pending)"


def test_the_install_download_asks_each_replica_of_the_enrollments_scheme_only() -> None:
    """A token is never sent over http:// when the fleet enrolled over wss://,
    whatever other URLs the string names."""
    enrollment = protocol.format_enrollment(
        "wss://a.example:8433",
        "enr-tok",
        "ab" * 32,
        urls=["wss://a.example:8433", "ws://b.example:8080", "wss://c.example:8433/fleet"],
    )
    agent = {"version": "0.2.0", "sha256": "cd" * 32, "size_bytes": 1234}
    script = download_script(enrollment, agent)
    assert "(['https://a.example:8433/agent.pyz', 'https://c.example:8433/fleet/agent.pyz'], " in (
        script
    )
    assert "http://" not in script


def test_the_install_snippet_pins_checks_and_updates_apt() -> None:
    enrollment = protocol.format_enrollment("wss://fleet.example:8433", "enr-tok", "AB" * 32)
    agent = {"version": "0.2.0", "sha256": "cd" * 32, "size_bytes": 1234}
    script = download_script(enrollment, agent)
    assert "(['https://fleet.example:8433/agent.pyz'], '" + "ab" * 32 + "', 'enr-tok', '" in script
    assert "'" + "cd" * 32 + "', 1234, '0.2.0')" in script
    compile(script, "download", "exec")  # what python3 will run is Python
    snippet = install_snippet(enrollment, agent)
    assert (
        "command -v restic >/dev/null || { apt-get update && apt-get install -y restic; }"
        in snippet
    )
    assert "install -d -m 0755 -o fleet-agent -g fleet-agent /usr/local/lib/fleet" in snippet
    assert "python3 - /usr/local/lib/fleet/fleet-agent.pyz <<'PY'\n" + script + "\nPY\n" in snippet


def test_fleet_agent_status_shows_an_upgrade_on_trial_and_a_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = State(tmp_path)
    state.save_identity(Identity("ws://127.0.0.1:1", 1, "h1", "agent-token"))

    def status(*extra: str):
        cli.main(["status", "--state-dir", str(tmp_path), *extra])
        return capsys.readouterr().out

    assert json.loads(status("--json"))["upgrade"] is None
    assert "upgrade" not in status()
    upgrade.save_marker(state, marker())
    assert json.loads(status("--json"))["upgrade"] == {
        "to": "0.2.0",
        "from": "0.1.0",
        "state": "on trial",
        "error": None,
    }
    upgrade.save_marker(state, marker(state="rolled_back", error="no hello"))
    assert "upgrade                  to 0.2.0 from 0.1.0: rolled back (no hello)" in status()


def test_download_over_tls_sends_the_token_only_to_a_pinned_key(server, tmp_path: Path) -> None:
    """The upgrade's download trusts fleetd as the link does, by key pin,
    checked before the request (and its token) is sent."""
    import ssl
    import subprocess

    from fleet.agent.trust import Trust
    from fleet.common import tlspins

    pem, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-subj", "/CN=fleetd", "-days", "1", "-keyout", str(key), "-out", str(pem),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pin = tlspins.spki_pin(tlspins.pem_certificates(pem.read_text())[0])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    Serve.body, Serve.status = b"new agent", 200
    url = f"wss://127.0.0.1:{server.server_address[1]}"
    digest = hashlib.sha256(b"new agent").hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    got = upgrade.download(url, "agent-token", Trust([pin]), out, 9, digest)
    assert got.read_bytes() == b"new agent"
    got.unlink()
    requests_before = Serve.requests
    with pytest.raises(upgrade.UpgradeError, match="refusing to send it anything") as info:
        upgrade.download(url, "agent-token", Trust(["f" * 64]), out, 9, digest)
    assert info.value.code == "download"
    assert Serve.requests == requests_before  # the token never left
    assert list(out.iterdir()) == []


def test_an_unexpected_failure_is_answered_not_left_to_fleetds_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or any error that is not an UpgradeError) while preparing
    an upgrade: fleetd hears `failed` and why at once, and the agent goes on."""
    import asyncio
    import types

    from fleet.agent import handlers

    program = tmp_path / "fleet-agent.pyz"
    program.write_bytes(b"old")
    monkeypatch.setattr(upgrade, "running_program", lambda: program)
    monkeypatch.setattr(upgrade, "refusal", lambda program, current: None)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(upgrade, "download", full_disk)
    sent: list[tuple[str, dict]] = []

    async def emit_now(kind: str, data: dict) -> None:
        sent.append((kind, data))

    agent = types.SimpleNamespace(
        upgrading=True,
        runner=types.SimpleNamespace(current=None),
        identity=types.SimpleNamespace(server_url="ws://127.0.0.1:9", agent_token="t"),
        server_url="ws://127.0.0.1:9",  # the replica of this link
        emit_now=emit_now,
        stop_for=lambda *a: pytest.fail("an upgrade that failed must not stop the agent"),
    )
    data = {"version": "0.2.0", "sha256": "ab" * 32, "size": 10, "deadline": 60}
    asyncio.run(handlers.prepare_upgrade(agent, data))
    ((kind, result),) = sent
    assert kind == "upgrade.result" and result["accepted"] is False
    assert result["code"] == "failed" and "No space left" in result["error"]
    assert agent.upgrading is False and program.read_bytes() == b"old"


def test_a_new_agent_that_cannot_read_its_state_puts_the_old_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fleet-agent run on trial with a state it cannot read: the old file
    comes back and is exec'd at once, instead of the new one exiting 3
    (which its unit would not restart) or looping."""
    import time as time_

    from fleet import __version__
    from fleet.agent import cli
    from fleet.agent.state import State

    state = State(tmp_path / "state")
    state.root.mkdir()
    program = tmp_path / "fleet-agent.pyz"
    program.write_bytes(b"new agent")
    Path(f"{program}.prev").write_bytes(b"old agent")
    m = marker(to=__version__, program=str(program), deadline=time_.time() + 300)
    upgrade.save_marker(state, m)
    execs: list[tuple[str, list]] = []

    def restart(program: str, argv: list) -> None:
        execs.append((program, argv))
        raise SystemExit("exec'd")

    monkeypatch.setattr(upgrade, "restart", restart)
    with pytest.raises(SystemExit, match="exec'd"):
        cli.give_way(state, "agent.json is damaged")
    assert program.read_bytes() == b"old agent" and execs == [(str(program), m.argv)]
    back = upgrade.load_marker(state)
    assert back is not None and back.state == "rolled_back"
    assert "could not start: agent.json is damaged" in (back.error or "")
    # no upgrade on trial: nothing to give way to
    upgrade.clear_marker(state)
    cli.give_way(state, "agent.json is damaged")
    assert len(execs) == 1
