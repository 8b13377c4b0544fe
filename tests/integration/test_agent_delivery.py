"""Agent delivery: fleetd serving the agent file (GET /agent.pyz over TLS, who
may fetch it), the `fleetctl enroll --install` snippet's download run for real
against it (pin, token, checksum), and what fleetd and fleetctl say when there
is no file. The file is a small zipapp made here: fleetd only reads the
version packed in it (the real agent's upgrade is tests/e2e/test_agent_upgrade.py).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fleet import units
from fleet.common.protocol import parse_enrollment

VERSION = "7.7.7"


def fake_agent(path: Path, version: str = VERSION) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__main__.py", "print('not a real agent')\n")
        zf.writestr("site-packages/fleet/__init__.py", f'__version__ = "{version}"\n')
        zf.writestr("padding.bin", bytes(range(256)) * 2000)  # some size to stream
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    cert_file, key_file = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [
            *shlex.split("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key_file), "-out", str(cert_file)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"cert": cert_file, "key": key_file}


@pytest.fixture(scope="module")
def served(tmp_path_factory, cert, fx):
    """A TLS fleetd serving a fake agent file: (fleet, the file's bytes)."""
    base = tmp_path_factory.mktemp("delivery")
    pyz = fake_agent(base / "fleet-agent.pyz")
    env = fx.start_fleet(
        base / "fleet",
        "--tls-cert",
        str(cert["cert"]),
        "--tls-key",
        str(cert["key"]),
        "--agent-pyz",
        str(pyz),
        cafile=cert["cert"],
    )
    yield env, pyz.read_bytes()
    fx.stop_and_check(env.fleetd)


@pytest.fixture(scope="module")
def bare(tmp_path_factory, fx):
    """A fleetd that serves no agent file."""
    env = fx.start_fleet(tmp_path_factory.mktemp("bare"), "--no-agent-pyz")
    yield env
    fx.stop_and_check(env.fleetd)


def redeem(env, fx, host: str) -> str:
    """Enroll `host` as its agent would (over TLS); its agent token."""
    token = parse_enrollment(env.ctl_json("enroll", host)["enrollment"])["token"]
    frame = {"v": 1, "type": "enroll", "id": "e1", "data": {"token": token, "hostname": host}}
    with fx.ws_connect(env.url, "/enroll", ssl=env.ssl) as ws:
        ws.send(json.dumps(frame))
        reply = json.loads(ws.recv(timeout=10))
    assert reply["type"] == "enrolled", reply
    return reply["data"]["agent_token"]


def get(env, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
    host, port = env.url.split("://")[1].rsplit(":", 1)
    if env.url.startswith("wss://"):
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, int(port), context=env.ssl, timeout=10
        )
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.headers), body


def test_fleetd_serves_the_agent_file_with_its_checksum_and_version(served) -> None:
    env, data = served
    digest = hashlib.sha256(data).hexdigest()
    status, headers, body = get(env, "/agent.pyz", env.admin_token)
    assert status == 200
    assert body == data
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Fleet-Agent-Version"] == VERSION
    assert headers["X-Fleet-Agent-SHA256"] == digest
    # the checksum alone, to anyone, as sha256sum prints it
    status, _, body = get(env, "/agent.pyz.sha256")
    assert (status, body.decode()) == (200, f"{digest}  fleet-agent.pyz\n")
    assert env.rpc("agents.served") == {
        "version": VERSION,
        "sha256": digest,
        "size_bytes": len(data),
    }


def test_the_agent_file_takes_a_token(served, fx) -> None:
    env, data = served
    status, headers, body = get(env, "/agent.pyz")
    assert status == 401 and b"Authorization: Bearer" in body
    assert get(env, "/agent.pyz", "not-a-token")[0] == 401
    # an enrollment token not yet used, and an agent's token; not a used one
    enrollment = parse_enrollment(env.ctl_json("enroll", fx.uniq("tok"))["enrollment"])
    assert get(env, "/agent.pyz", enrollment["token"])[2] == data
    host = fx.uniq("tok")
    enrollment = parse_enrollment(env.ctl_json("enroll", host)["enrollment"])
    frame = {
        "v": 1,
        "type": "enroll",
        "id": "e1",
        "data": {"token": enrollment["token"], "hostname": host},
    }
    with fx.ws_connect(env.url, "/enroll", ssl=env.ssl) as ws:
        ws.send(json.dumps(frame))
        agent_token = json.loads(ws.recv(timeout=10))["data"]["agent_token"]
    assert get(env, "/agent.pyz", agent_token)[2] == data
    assert get(env, "/agent.pyz", enrollment["token"])[0] == 401


def test_the_install_snippet_fetches_the_agent_over_the_pinned_certificate(
    served, tmp_path: Path
) -> None:
    env, data = served
    result = env.ctl_json("enroll", "web-install", "--install")
    snippet = result["install"]
    assert result["agent"]["version"] == VERSION
    assert snippet.startswith(
        f"# as root on the server (Debian or Ubuntu, systemd): fleet-agent {VERSION}"
    )
    assert "{ apt-get update && apt-get install -y restic; }" in snippet
    assert f"enroll {result['enrollment']} --state-dir /var/lib/fleet-agent" in snippet
    assert units.unit("fleet-agent.service").rstrip("\n") in snippet
    assert "systemctl enable --now fleet-agent" in snippet
    script = tmp_path / "install.sh"
    script.write_text(snippet)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    # the download step, for real, into a temp dir instead of /usr/local/lib/fleet
    download = re.search(r"<<'PY'\n(.*?)\nPY\n", snippet, re.S).group(1)
    dest = tmp_path / "fleet-agent.pyz"
    run = subprocess.run(
        [sys.executable, "-", str(dest)], input=download, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert dest.read_bytes() == data
    assert f"fleet-agent {VERSION}" in run.stdout

    # another certificate than the pinned one: nothing is asked, nothing written
    pin = parse_enrollment(result["enrollment"])["sha256"]
    other = tmp_path / "other.pyz"
    run = subprocess.run(
        [sys.executable, "-", str(other)],
        input=download.replace(pin, "0" * 64),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "pinned" in run.stderr
    assert not other.exists()

    # a file other than the one announced: refused, nothing left behind
    run = subprocess.run(
        [sys.executable, "-", str(other)],
        input=download.replace(result["agent"]["sha256"], "1" * 64),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "refusing" in run.stderr
    assert list(tmp_path.glob("*.tmp")) == [] and not other.exists()

    table = env.ctl("enroll", "web-install-2", "--install")
    assert table.stdout.startswith("# as root on the server")


def test_the_install_download_tries_each_replica_in_turn(served, tmp_path: Path) -> None:
    """With replicas the enrollment names every one: the download goes on
    to the next when one is down, and says what each answered when none
    does."""
    import socket

    from fleet.common.protocol import format_enrollment
    from fleet.ctl.hosts import download_script

    env, data = served
    result = env.ctl_json("enroll", "web-install-3", "--install")
    doc = parse_enrollment(result["enrollment"])
    with socket.socket() as closed:  # a port nothing listens on: refused
        closed.bind(("127.0.0.1", 0))
        down = f"wss://127.0.0.1:{closed.getsockname()[1]}"
    both = format_enrollment(down, doc["token"], doc["sha256"], urls=[down, doc["url"]])
    dest = tmp_path / "fleet-agent.pyz"
    run = subprocess.run(
        [sys.executable, "-", str(dest)],
        input=download_script(both, result["agent"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert dest.read_bytes() == data

    none = format_enrollment(down, doc["token"], doc["sha256"], urls=[down, down + "/x"])
    run = subprocess.run(
        [sys.executable, "-", str(tmp_path / "none.pyz")],
        input=download_script(none, result["agent"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert f"GET {down.replace('wss', 'https')}/agent.pyz: " in run.stderr
    assert "/x/agent.pyz: " in run.stderr and "refused" in run.stderr.lower()
    assert not (tmp_path / "none.pyz").exists()


def test_without_an_agent_file_fleetd_and_fleetctl_say_so(bare, fx) -> None:
    status, _, body = get(bare, "/agent.pyz", bare.admin_token)
    assert status == 404 and b"--agent-pyz" in body
    assert get(bare, "/agent.pyz.sha256")[0] == 404
    host = fx.uniq("noagent")
    result = bare.ctl("enroll", host, "--install", expect=4)
    assert "serves no agent file" in result.stderr
    assert host not in [h["name"] for h in bare.ctl_json("hosts", "list")]  # no token made
    result = bare.ctl("agents", "upgrade", expect=4)
    assert "serves no agent file" in result.stderr
    listed = bare.ctl_json("agents", "list")
    assert listed["served"] is None


def test_upgrades_take_an_admin_and_a_dry_run_changes_nothing(served, fx) -> None:
    env, _ = served
    operator = env.add_user("operator")
    result = env.ctl("agents", "upgrade", "--dry-run", token=operator.token, expect=3)
    assert "admin" in result.stderr
    # enrolled, never connected: its agent is unknown, and offline
    host = fx.uniq("dry")
    redeem(env, fx, host)
    plan = env.ctl_json("agents", "upgrade", "--dry-run", "--batch", "2")
    assert plan["dry_run"] is True and plan["version"] == VERSION
    fx.check_json(plan, "rollout plan")  # the fields fleetctl(1) documents
    fx.check_json(plan["hosts"], "rollout host")
    (line,) = [h for h in plan["hosts"] if h["host"] == host]
    assert (line["status"], line["detail"], line["batch"]) == ("skipped", "offline", 1)
    listed = {a["host"]: a for a in env.ctl_json("agents", "list")["agents"]}
    assert listed[host]["state"] == "unknown" and listed[host]["status"] == "offline"
    env.ctl("agents", "upgrade", "--status", expect=4)  # nothing was started
    assert (
        "no agent rollout is under way" in env.ctl("agents", "upgrade", "--halt", expect=4).stderr
    )
    selected = env.ctl("agents", "upgrade", "--dry-run", "--selector", "role=none", expect=4)
    assert "0 host(s)" in selected.stderr
