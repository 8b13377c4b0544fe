"""fleetd with --tls-cert/--tls-key: wss:// for fleetctl, a pinned fingerprint for agents."""

from __future__ import annotations

import hashlib
import http.client
import json
import shlex
import ssl
import stat
import subprocess

import pytest

from fleet.common import protocol


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1/localhost, made by the openssl binary."""
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
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert_file), "-outform", "DER"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(cert_file), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    spki = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pub,
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return {
        "cert": cert_file,
        "key": key_file,
        "sha256": hashlib.sha256(der).hexdigest(),
        "pin": hashlib.sha256(spki).hexdigest(),  # of its key, as openssl extracts it
    }


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory, cert, fx):
    env = fx.start_fleet(
        tmp_path_factory.mktemp("tlsfleet"),
        "--tls-cert",
        str(cert["cert"]),
        "--tls-key",
        str(cert["key"]),
        cafile=cert["cert"],
    )
    yield env
    fx.stop_and_check(env.fleetd)


def test_fleetd_announces_wss_and_serves_healthz_over_tls(tls_fleet, cert):
    assert tls_fleet.url.startswith("wss://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(cert["cert"]))
    conn = http.client.HTTPSConnection("127.0.0.1", tls_fleet.fleetd.port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok\n")
    finally:
        conn.close()


def test_login_over_wss_with_cafile_then_list_hosts(tls_fleet, cert, fx, tmp_path):
    xdg = tmp_path / "xdg"
    no_env = {"FLEET_CAFILE": None}
    tls_fleet.ctl(
        "login",
        "--server",
        tls_fleet.url,
        "--cafile",
        str(cert["cert"]),
        "--password-stdin",
        server=None,
        token=None,
        config_dir=xdg,
        input=fx.ADMIN_PASSWORD + "\n",
        env=no_env,
    )
    saved = json.loads((xdg / "fleet" / "config.json").read_text())
    assert saved["server"] == tls_fleet.url
    assert saved["cafile"] == str(cert["cert"])

    host = fx.uniq("tls-host")
    tls_fleet.ctl("enroll", host, "--json")  # with the harness's admin token
    # everything below comes from the saved config: server, token and cafile
    rows = tls_fleet.ctl_json("hosts", "list", server=None, token=None, config_dir=xdg, env=no_env)
    assert host in [h["name"] for h in rows]
    table = tls_fleet.ctl("hosts", "list", server=None, token=None, config_dir=xdg, env=no_env)
    assert host in table.stdout


def test_enrollment_string_carries_wss_url_key_pins_and_certificate_fingerprint(
    tls_fleet, cert, fx
):
    result = tls_fleet.ctl_json("enroll", "web-01")
    doc = protocol.parse_enrollment(result["enrollment"])
    assert doc["url"] == tls_fleet.url
    assert doc["url"].startswith("wss://")
    assert doc["sha256"] == cert["sha256"]  # what agents from before key pins check
    assert doc["pins"] == [cert["pin"]]  # the served key; no key is staged
    assert doc["token"].startswith("enroll_")
    assert result["command"] == f"fleet-agent enroll {result['enrollment']}"


def test_wss_without_the_certificate_is_unreachable(tls_fleet, tmp_path):
    # default trust store: the self-signed certificate is refused
    result = tls_fleet.ctl("hosts", "list", env={"FLEET_CAFILE": None}, expect=5)
    assert "TLS" in result.stderr or "certificate" in result.stderr
    # plain ws:// against a TLS port cannot talk either
    plain = tls_fleet.url.replace("wss://", "ws://")
    result = tls_fleet.ctl("hosts", "list", server=plain, expect=5)
    assert result.stderr.startswith("fleetctl: error:")


def test_tls_private_key_is_not_copied_into_the_data_dir(tls_fleet, cert):
    # the private key stays private: fleetd never copies it into its data dir
    key_bytes = cert["key"].read_bytes()
    for path in tls_fleet.data_dir.iterdir():
        assert key_bytes not in path.read_bytes()
    assert stat.S_IMODE((tls_fleet.data_dir / "secret.key").stat().st_mode) == 0o600
