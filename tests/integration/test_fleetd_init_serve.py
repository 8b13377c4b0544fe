"""`fleetd init` and `fleetd serve`: the data directory, refusals, /healthz, signals."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import stat

import pytest
from websockets.exceptions import ConnectionClosed


@pytest.mark.sqlite_file
def test_init_creates_data_dir_key_and_database(tmp_path, fx):
    data_dir = tmp_path / "nested" / "data"
    proc = fx.init_data_dir(data_dir)

    assert f"initialised {data_dir}" in proc.stdout
    assert "admin user: admin" in proc.stdout
    assert "password" not in proc.stdout  # it was given, so it is not printed
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    key = data_dir / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    db = data_dir / "fleet.db"
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0


@pytest.mark.sqlite_file
def test_init_refuses_an_initialised_dir_and_never_touches_the_key(tmp_path, fx):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    key = data_dir / "secret.key"
    key_bytes, key_stat = key.read_bytes(), key.stat()
    db_bytes = (data_dir / "fleet.db").read_bytes()

    again = fx.run_fleetd(
        "init", "--data-dir", str(data_dir), env=fx.clean_env(FLEET_ADMIN_PASSWORD="another-pw-1")
    )
    assert again.returncode != 0
    assert "already initialised" in again.stderr
    assert "Traceback" not in again.stderr
    assert key.read_bytes() == key_bytes
    assert key.stat().st_mtime_ns == key_stat.st_mtime_ns
    assert (data_dir / "fleet.db").read_bytes() == db_bytes

    # a key without a database is still someone's key: not replaced either
    for name in ("fleet.db", "fleet.db-wal", "fleet.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    third = fx.run_fleetd(
        "init", "--data-dir", str(data_dir), env=fx.clean_env(FLEET_ADMIN_PASSWORD="another-pw-1")
    )
    assert third.returncode != 0
    assert "already initialised" in third.stderr
    assert key.read_bytes() == key_bytes
    assert not (data_dir / "fleet.db").exists()


def test_init_prints_a_generated_password_that_logs_in(tmp_path, fx):
    data_dir = tmp_path / "data"
    proc = fx.run_fleetd(
        "init", "--data-dir", str(data_dir), env=fx.clean_env(FLEET_ADMIN_PASSWORD=None)
    )
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"^admin password \(shown once\): (\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    password = match.group(1)
    assert len(password) >= 16

    fleetd = fx.Fleetd(data_dir, tmp_path / "fleetd.log").start()
    try:
        xdg = tmp_path / "xdg"
        login = fx.run_ctl(
            ("login", "--server", fleetd.url, "--password-stdin"),
            server=None,
            token=None,
            config_dir=xdg,
            input=password + "\n",
        )
        assert "as admin (admin)" in login.stderr
        me = fx.run_ctl(("whoami", "--json"), server=None, token=None, config_dir=xdg)
        assert json.loads(me.stdout)["role"] == "admin"
        with pytest.raises(fx.RpcError) as refused:
            fx.api_login(fleetd.url, "admin", password + "x")
        assert refused.value.code == "unauthorized"
    finally:
        fx.stop_and_check(fleetd)


def test_init_with_a_short_password_is_a_usage_error_and_leaves_no_key(tmp_path, fx):
    data_dir = tmp_path / "data"
    proc = fx.run_fleetd(
        "init", "--data-dir", str(data_dir), env=fx.clean_env(FLEET_ADMIN_PASSWORD="short")
    )
    assert proc.returncode == 2
    assert "at least 8" in proc.stderr
    assert not (data_dir / "secret.key").exists()
    # nothing half-done blocks a correct retry
    fx.init_data_dir(data_dir)


def test_serve_refuses_a_non_loopback_address_without_tls(tmp_path, fx):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    proc = fx.run_fleetd("serve", "--data-dir", str(data_dir), "--listen", "0.0.0.0:0", timeout=30)
    assert proc.returncode == 2
    assert "without TLS" in proc.stderr and "--insecure" in proc.stderr
    assert "listening" not in proc.stdout

    # --insecure allows it
    fleetd = fx.Fleetd(data_dir, tmp_path / "fleetd.log", "--insecure", listen="0.0.0.0:0").start()
    try:
        status, body = _get(fleetd.port, "/healthz")
        assert (status, body) == (200, "ok\n")
    finally:
        fx.stop_and_check(fleetd)


def _get(port, path, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_serve_refuses_bad_arguments(tmp_path, fx):
    data_dir = tmp_path / "data"
    missing = fx.run_fleetd("serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0")
    assert missing.returncode == 1
    assert "fleetd init" in missing.stderr

    fx.init_data_dir(data_dir)
    bad_listen = fx.run_fleetd("serve", "--data-dir", str(data_dir), "--listen", "nowhere")
    assert bad_listen.returncode == 2
    assert "HOST:PORT" in bad_listen.stderr

    cert = tmp_path / "cert.pem"
    cert.write_text("not used")
    half_tls = fx.run_fleetd(
        "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--tls-cert", str(cert)
    )
    assert half_tls.returncode == 2
    assert "--tls-cert and --tls-key go together" in half_tls.stderr

    for proc in (missing, bad_listen, half_tls):
        assert "Traceback" not in proc.stderr


def test_serve_refuses_a_key_file_readable_by_others(tmp_path, fx):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    key = data_dir / "secret.key"
    os.chmod(key, 0o644)
    proc = fx.run_fleetd("serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0")
    assert proc.returncode == 1
    assert "chmod 600" in proc.stderr
    assert "listening" not in proc.stdout

    os.chmod(key, 0o600)
    key.write_bytes(key.read_bytes()[:16])
    short = fx.run_fleetd("serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0")
    assert short.returncode == 1
    assert "16 bytes" in short.stderr


def test_serve_on_a_port_in_use_fails_cleanly(fleet, fx, tmp_path):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    proc = fx.run_fleetd(
        "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{fleet.fleetd.port}"
    )
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_healthz_answers_plain_http(fleet):
    status, body = _get(fleet.fleetd.port, "/healthz")
    assert (status, body) == (200, "ok\n")
    status, body = _get(fleet.fleetd.port, "/healthz?probe=1")
    assert status == 200
    status, _ = _get(fleet.fleetd.port, "/no-such-endpoint")
    assert status == 404


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_fleetd_with_a_ctl_client_connected(fleetd_factory, fx, sig):
    env = fleetd_factory()
    with fx.ws_connect(env.url, "/ctl", env.admin_token) as ws:
        assert fx.rpc_on(ws, "auth.whoami")["user"] == "admin"
        assert env.fleetd.stop(sig) == 0
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    # fleetd closed the socket itself ("going away"), it did not just vanish
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    log = env.fleetd.log()
    assert f"received {signal.Signals(sig).name}" in log
    assert "stopped" in log
    assert "Traceback" not in log


def test_serve_with_an_unreadable_certificate_fails_cleanly(tmp_path, fx):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    proc = fx.run_fleetd(
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(garbage),
        "--tls-key",
        str(garbage),
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("fleetd: error: ")
    assert "TLS certificate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


def test_init_in_a_directory_that_cannot_be_created_fails_cleanly(tmp_path, fx):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = fx.run_fleetd(
        "init",
        "--data-dir",
        str(blocker / "data"),
        env=fx.clean_env(FLEET_ADMIN_PASSWORD="pw-123456"),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fleetd: error: ")


@pytest.mark.parametrize("name", ["", "two words"], ids=["empty", "space"])
def test_init_refuses_an_invalid_admin_name(tmp_path, fx, name):
    data_dir = tmp_path / "data"
    proc = fx.run_fleetd(
        "init",
        "--data-dir",
        str(data_dir),
        "--admin",
        name,
        env=fx.clean_env(FLEET_ADMIN_PASSWORD="pw-123456"),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fleetd: error: ") and "Traceback" not in proc.stderr
    assert not (data_dir / "fleet.db").exists()
    assert not (data_dir / "secret.key").exists()
