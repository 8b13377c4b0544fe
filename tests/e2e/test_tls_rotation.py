"""fleetd's TLS certificate renewed and its key rotated under real agents
(the zipapp under CPython 3.9): a renewal that keeps the key needs nothing,
a staged key is pushed, activated and the agent follows without enrolling
again; an agent enrolled before key pins learns them from fleetd; a key served
without staging is refused by the agent, and fleetctl hosts show says why
it cannot connect."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from fleet.common import protocol, tlspins


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA (what fleetctl trusts, as --cafile) and fleetd certificates it
    signed: a, a renewal of a (same key), b and c (keys of their own)."""
    base: Path = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    ca, ca_key = base / "ca.pem", base / "ca.key"
    openssl("req", "-x509", *ec, "-subj", "/CN=fleet test CA", "-days", "1",
            "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    ext = base / "leaf.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n")
    out = {"ca": ca}
    for name, key_of in (("a", "a"), ("a2", "a"), ("b", "b"), ("c", "c")):
        key = base / f"{key_of}.key"
        if not key.exists():
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(key))  # fmt: skip
        csr, cert = base / f"{name}.csr", base / f"{name}.pem"
        openssl("req", "-new", "-key", str(key), "-subj", f"/CN=fleetd {name}", "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
        der = tlspins.pem_certificates(cert.read_text())[0]
        out[name] = {
            "cert": cert,
            "key": key,
            "pin": tlspins.spki_pin(der),
            "sha256": tlspins.cert_pin(der),
        }
    assert out["a"]["pin"] == out["a2"]["pin"] != out["b"]["pin"] != out["c"]["pin"]
    return out


class TlsFleet:
    """A fleetd serving base/cert.pem and base/key.pem, which a test replaces
    (as certbot or an operator does) before an activate or a restart."""

    def __init__(self, fx, base: Path, pki: dict, first: str) -> None:
        self.fx, self.base = fx, base
        self.cert, self.key = base / "cert.pem", base / "key.pem"
        base.mkdir(parents=True)
        self.install(pki[first])
        self.args = ("--tls-cert", str(self.cert), "--tls-key", str(self.key))
        self.env = fx.start_fleet(base / "fleet", *self.args, cafile=pki["ca"])

    def install(self, pair: dict) -> None:
        shutil.copyfile(pair["cert"], self.cert)
        shutil.copyfile(pair["key"], self.key)

    def restart(self) -> None:
        """Stopped and started again on the same port (agents dial that URL)."""
        old = self.env.fleetd
        self.fx.stop_and_check(old)
        self.env.fleetd = self.fx.Fleetd(
            old.data_dir, old.log_path, *self.args, listen=f"127.0.0.1:{old.port}"
        ).start()

    def presented(self) -> str:
        """The SHA-256 of the certificate fleetd presents to a new connection."""
        ctx = ssl.create_default_context(cafile=str(self.env.cafile))
        address = ("127.0.0.1", self.env.fleetd.port)
        with (
            socket.create_connection(address, timeout=10) as sock,
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            return tlspins.cert_pin(tls.getpeercert(binary_form=True))

    def stop(self) -> None:
        self.fx.stop_and_check(self.env.fleetd)


@pytest.fixture
def tls_fleets(fx, tmp_path):
    started: list[TlsFleet] = []

    def start(pki: dict, first: str) -> TlsFleet:
        f = TlsFleet(fx, tmp_path / f"tls{len(started)}", pki, first)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def pins_of(agent) -> list[str]:
    return json.loads((agent.state_dir / "pins.json").read_text())["pins"]


def tls_of(fleet, host: str) -> dict:
    return fleet.ctl_json("hosts", "show", host)["tls"]


def test_renewal_then_a_staged_key_activated_under_a_running_agent(e2e, fx, pki, tls_fleets):
    tf = tls_fleets(pki, "a")
    fleet = tf.env
    h = e2e.host(fleet, set_repo=False)
    assert pins_of(h.agent) == [pki["a"]["pin"]]
    assert tls_of(fleet, h.name) == {
        "trust": "pins",
        "pins": [pki["a"]["pin"]],
        "holds_served": True,
        "problem": None,
    }

    # renewed with the same key (certbot --reuse-key) and restarted: nothing else to do
    connected = h.agent.count("connected to")
    tf.install(pki["a2"])
    tf.restart()
    assert tf.presented() == pki["a2"]["sha256"]
    h.agent.wait_log("connected to", connected + 1)
    e2e.wait_host(fleet, h.name, "online")
    assert "never staged" not in fleet.fleetd.log()
    assert pins_of(h.agent) == [pki["a"]["pin"]]

    # a new key: staged, its pin pushed to the running agent
    staged = fleet.ctl_json("tls", "stage", pki["b"]["cert"])
    fx.check_json(staged, "tls change")  # the fields fleetctl(1) documents
    fx.wait_until(
        lambda: tls_of(fleet, h.name).get("holds_staged"), what="the staged pin held", interval=0.2
    )
    assert pins_of(h.agent) == [pki["a"]["pin"], pki["b"]["pin"]]
    # a host enrolled now gets both pins, though it never connects in this test
    late = e2e.host(fleet, set_repo=False, start=False)
    assert pins_of(late.agent) == [pki["a"]["pin"], pki["b"]["pin"]]

    # the new files installed; fleetd will not switch while a host may lack the pin
    tf.install(pki["b"])
    refused = fleet.ctl("tls", "activate", expect=1)
    assert late.name in refused.stderr and "never said which keys it trusts" in refused.stderr
    assert tf.presented() == pki["a2"]["sha256"]
    status = fleet.ctl_json("tls", "status")
    assert status["staged"] == pki["b"]["pin"] and status["lacking"] == [late.name]
    fx.check_json(status, "tls status")
    fx.check_json(
        [{k: v for k, v in h.items() if k not in ("host", "status")} for h in status["hosts"]],
        "host trust",
    )

    # --force: the online hosts hold it; the offline one is named
    connected = h.agent.count("connected to")
    done = fleet.ctl_json("tls", "activate", "--force")
    assert done["activated"] == pki["b"]["pin"] and done["lacking"] == [late.name]
    fx.check_json(done, "tls change")
    assert tf.presented() == pki["b"]["sha256"]
    # the agent was told to redial: it checks the new key and keeps only its pin
    h.agent.wait_log("connected to", connected + 1)
    e2e.wait_host(fleet, h.name, "online")
    fx.wait_until(
        lambda: pins_of(h.agent) == [pki["b"]["pin"]], what="the old pin dropped", interval=0.2
    )
    fx.wait_until(
        lambda: tls_of(fleet, h.name)["pins"] == [pki["b"]["pin"]], what="recorded", interval=0.2
    )
    assert fleet.ctl_json("tls", "status")["served"]["pin"] == pki["b"]["pin"]
    assert "presented a certificate" not in h.agent.log()


def test_an_older_enrollment_learns_key_pins_then_refuses_an_unstaged_key(e2e, fx, pki, tls_fleets):
    tf = tls_fleets(pki, "a")
    fleet = tf.env
    # enrolled as before key pins: agent.json holds the certificate's SHA-256 only
    h = e2e.host(fleet, set_repo=False, start=False)
    assert h.agent.identity["tls_sha256"] == pki["a"]["sha256"]
    (h.agent.state_dir / "pins.json").unlink()
    e2e.start(fleet, h)  # connects by the certificate pin, then gets the key pins
    fx.wait_until(
        lambda: (h.agent.state_dir / "pins.json").exists(), what="pins.json", interval=0.2
    )
    assert pins_of(h.agent) == [pki["a"]["pin"]]
    fx.wait_until(
        lambda: tls_of(fleet, h.name)["trust"] == "pins", what="the pins recorded", interval=0.2
    )
    token = h.agent.identity["agent_token"]

    tf.install(pki["c"])
    tf.restart()
    assert "which was never staged" in fleet.fleetd.log()
    h.agent.wait_log("presented a certificate whose key")
    log = h.agent.log()
    refusal = next(line for line in log.splitlines() if "presented a certificate" in line)
    assert tlspins.short(pki["c"]["pin"]) in refusal and tlspins.short(pki["a"]["pin"]) in refusal
    assert "redialling in" in refusal and token not in log
    e2e.wait_host(fleet, h.name, "offline")

    shown = tls_of(fleet, h.name)
    assert shown["holds_served"] is False
    assert shown["problem"].startswith("cannot connect: fleetd's certificate key")
    assert tlspins.short(pki["c"]["pin"]) in shown["problem"]
    text = fleet.ctl("hosts", "show", h.name).stdout
    assert "cannot connect" in text and "enroll it again" in " ".join(text.split())
    (listed,) = [r for r in fleet.ctl_json("hosts", "list") if r["name"] == h.name]
    assert listed["tls_refused"] is True and listed["status"] == "offline"
    assert "(refuses fleetd's key)" in fleet.ctl("hosts", "list").stdout
    # fleetctl status (and so alerts) says it at once, as critical
    result = fleet.ctl("status", "--json", expect=2)
    (problem,) = [p for p in json.loads(result.stdout)["problems"] if p["kind"] == "tls_refused"]
    assert problem["host"] == h.name and problem["severity"] == "critical"
    assert problem["message"].startswith(f"{h.name} cannot connect: fleetd's certificate key")

    status = h.agent.cli("status", "--state-dir", h.agent.state_dir, "--json")
    assert status.returncode == 0, status.stderr
    refused = json.loads(status.stdout)["tls_refused"]
    assert refused["presented_key"] == pki["c"]["pin"] and refused["pins"] == [pki["a"]["pin"]]
    assert token not in status.stdout


def test_a_renewal_waits_for_an_agent_that_pins_the_certificate(fx, pki, tls_fleets):
    """An agent enrolled before key pins that has not connected since holds
    the certificate's SHA-256: a renewal with the same key would lock it
    out, so activate names it and needs --force."""
    tf = tls_fleets(pki, "a")
    fleet = tf.env
    host = fx.uniq("old")
    enrollment = fleet.ctl_json("enroll", host)["enrollment"]
    token = protocol.parse_enrollment(enrollment)["token"]
    redeem = {"v": 1, "type": "enroll", "id": "e1", "data": {"token": token, "hostname": host}}
    with fx.ws_connect(fleet.url, "/enroll", ssl=fleet.ssl) as ws:
        ws.send(json.dumps(redeem))
        agent_token = json.loads(ws.recv(timeout=10))["data"]["agent_token"]
    # an older agent's hello: it pins a certificate (tls_pins []) and takes no key pins
    with fx.ws_connect(fleet.url, "/agent", agent_token, ssl=fleet.ssl) as ws:
        ws.send(fx.agent_hello(hostname=host, tls_pins=[]))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        assert tls_of(fleet, host)["trust"] == "certificate"
    tf.install(pki["a2"])  # the same key, a new certificate
    refused = fleet.ctl("tls", "activate", expect=1)
    assert host in refused.stderr and "pin fleetd's certificate itself" in refused.stderr
    assert tf.presented() == pki["a"]["sha256"]  # still the old one
    done = fleet.ctl_json("tls", "activate", "--force")
    assert done["renewed"] is True and tf.presented() == pki["a2"]["sha256"]
