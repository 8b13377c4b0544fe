"""Repository secrets never reach the disk, the log or an answer in clear."""

from __future__ import annotations

import json
import stat
import uuid


def _files(data_dir):
    return sorted(p for p in data_dir.rglob("*") if p.is_file())


def _leaks(fx, data_dir, needles):
    """(where, needle) for every needle found, as bytes, in any file of the
    data directory or in the store on disk (a PostgreSQL's files too)."""
    found = []
    places = [(path.name, path.read_bytes()) for path in _files(data_dir)]
    places.append(("the store", fx.store_bytes(data_dir)))
    for name, blob in places:
        for needle in needles:
            if needle.encode() in blob:
                found.append((name, needle))
    return found


def test_repo_password_env_and_url_credentials_are_encrypted_at_rest(fleetd_factory, fx, tmp_path):
    env = fleetd_factory("--log-level", "debug")
    host = fx.uniq("vault")
    env.ctl("enroll", host)
    password = f"repo-password-{uuid.uuid4().hex}"
    env_value = f"env-value-{uuid.uuid4().hex}"
    stdin_password = f"stdin-password-{uuid.uuid4().hex}"
    url_secret = f"urlsecret{uuid.uuid4().hex}"
    needles = [password, env_value, stdin_password, url_secret]

    pwfile = tmp_path / "pw"
    pwfile.write_text(password + "\n")
    url = f"rest:https://backup:{url_secret}@rest.example:8000/{host}"
    env.ctl(
        "repo",
        "set",
        host,
        "--url",
        url,
        "--password-file",
        pwfile,
        "--env",
        f"AWS_SECRET_ACCESS_KEY={env_value}",
    )
    other = fx.uniq("vault")
    env.ctl("enroll", other)
    env.ctl(
        "repo",
        "set",
        other,
        "--url",
        "/srv/other",
        "--password-file",
        "-",
        input=stdin_password + "\n",
    )

    # what fleetd answers never carries them
    answers = [
        env.ctl("repo", "show", host, "--json").stdout,
        env.ctl("repo", "show", host).stdout,
        env.ctl("repo", "show", other, "--json").stdout,
        env.ctl("audit", "--json").stdout,
        env.ctl("hosts", "show", host, "--json").stdout,
    ]
    for answer in answers:
        for needle in needles:
            assert needle not in answer
    assert json.loads(answers[0])["env"] == {"AWS_SECRET_ACCESS_KEY": "********"}

    # on disk while running (the write may sit in fleet.db-wal, or
    # PostgreSQL's WAL)
    files = {p.name for p in _files(env.data_dir)}
    assert ("fleet.db" if fx.STORE == "sqlite" else "database") in files
    assert _leaks(fx, env.data_dir, needles) == []
    # the scan works: plain data such as the host name is found
    assert {n for _, n in _leaks(fx, env.data_dir, [host, other])} == {host, other}

    # and after a clean stop (the WAL checkpointed into fleet.db)
    fx.stop_and_check(env.fleetd)
    assert _leaks(fx, env.data_dir, needles) == []
    assert _leaks(fx, env.data_dir, [host]) != []
    log = env.fleetd.log()
    assert "received SIGTERM" in log  # the log was captured
    for needle in needles:
        assert needle not in log
    assert stat.S_IMODE((env.data_dir / "secret.key").stat().st_mode) == 0o600

    # the key persisted: a new fleetd on the same directory still decrypts
    again = fx.Fleetd(env.data_dir, tmp_path / "again.log").start()
    try:
        token = fx.api_login(again.url, "admin", fx.ADMIN_PASSWORD)["token"]
        shown = fx.run_ctl(
            ("repo", "show", host, "--json"), server=again.url, token=token, config_dir=tmp_path
        )
        doc = json.loads(shown.stdout)
        assert doc["url"] == f"rest:https://backup:********@rest.example:8000/{host}"
        assert doc["password"] == "********"
    finally:
        fx.stop_and_check(again)
    assert _leaks(fx, env.data_dir, needles) == []
    for needle in needles:
        assert needle not in again.log()
