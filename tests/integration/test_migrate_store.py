"""`fleetd migrate-store`: a fleet made on SQLite by a real fleetd moved into
the real PostgreSQL of the harness (tests/postgres.py), then served from
there; and the moves that must be refused or fail leaving the target
empty and the data directory as it was.

The source is a SQLite file whatever FLEET_TEST_STORE says: these tests
init their data directories without --database."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from fleet.server.security.secrets import create_key_file, load_key_file, repository_aad
from fleet.server.store import models as m
from fleet.server.store.db import locate, open_database
from fleet.server.store.transfer import copy_order

pytestmark = pytest.mark.own_store  # always SQLite into PostgreSQL: run once

TABLES = [model._meta.table_name for model in copy_order()]


def _url(postgres: Any, name: str) -> str:
    return f"postgresql:///{name}?host={postgres.root}&user=fleet"


def _sqlite_data_dir(fx: Any, base: Path) -> Path:
    data_dir = base / "data"
    made = fx.run_fleetd(
        "init", "--data-dir", data_dir, env=fx.clean_env(FLEET_ADMIN_PASSWORD=fx.ADMIN_PASSWORD)
    )
    assert made.returncode == 0, made.stderr
    assert (data_dir / "fleet.db").exists() and not (data_dir / "database").exists()
    return data_dir


def _migrate(fx: Any, data_dir: Path, to: str, password: str | None, *extra: Any):
    env = fx.clean_env(FLEETD_DATABASE_PASSWORD=password)
    return fx.run_fleetd(
        "migrate-store", "--data-dir", data_dir, "--to", to, *extra, env=env, timeout=300
    )


def _sqlite_counts(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "fleet.db") as conn:
        return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in TABLES}


def _pg_counts(postgres: Any, name: str) -> dict[str, int]:
    with postgres.connect(name) as conn:
        return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in TABLES}


def _seed_log(data_dir: Path, jobs: int, lines: int) -> None:
    """`jobs` ended backups of one new host with `lines` log lines each,
    written into the SQLite file through the models."""
    database = open_database(data_dir / "fleet.db")
    ts = dt.datetime(2026, 12, 1, 3, 0, 0, 250_000)
    try:
        with database.bind_ctx(m.MODELS), database.atomic():
            host = m.Host.create(name=f"logged-{jobs}x{lines}", labels={"role": "db"})
            fields = [m.JobLog.job, m.JobLog.seq, m.JobLog.ts, m.JobLog.stream, m.JobLog.payload]
            for _ in range(jobs):
                job = m.Job.create(host=host, kind="backup", actor_kind="system", status="failed")
                for first in range(1, lines + 1, 1000):
                    rows = [
                        (
                            job.id,
                            seq,
                            ts,
                            "stderr" if seq % 7 == 0 else "stdout",
                            f"{job.id}/{seq} é",
                        )
                        for seq in range(first, min(first + 1000, lines + 1))
                    ]
                    m.JobLog.insert_many(rows, fields=fields).execute()
    finally:
        database.close()


class Fleet:
    """A running fleetd on `data_dir`, logged in as admin."""

    def __init__(self, fx: Any, data_dir: Path, base: Path, *serve: str) -> None:
        self.fx = fx
        base.mkdir(parents=True, exist_ok=True)
        self.fleetd = fx.Fleetd(data_dir, base / "fleetd.log", *serve).start()
        self.config_dir = base / "xdg"
        self.config_dir.mkdir(exist_ok=True)
        self.token = fx.api_login(self.fleetd.url, "admin", fx.ADMIN_PASSWORD)["token"]

    def ctl(self, *args: Any, expect: int = 0) -> Any:
        result = self.fx.run_ctl(
            args,
            server=self.fleetd.url,
            token=self.token,
            config_dir=self.config_dir,
            expect=expect,
        )
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def rpc(self, method: str, **params: Any) -> Any:
        with self.fx.ws_connect(self.fleetd.url, "/ctl", self.token) as ws:
            return self.fx.rpc_on(ws, method, **params)

    def stop(self) -> None:
        self.fx.stop_and_check(self.fleetd)


def _make_fleet(fx: Any, data_dir: Path, base: Path) -> dict[str, Any]:
    """Users, tokens, hosts with labels, a repository with its password and
    environment, groups (one with a ping URL), a schedule, a template, a
    notifier, jobs; made through fleetd, which is then stopped."""
    secrets = base / "secrets"
    secrets.mkdir()
    (secrets / "pw").write_text("repo-password-1\n")
    (secrets / "env").write_text("AWS_ACCESS_KEY_ID=AKIAMOVED\nAWS_SECRET_ACCESS_KEY=s3cr3t\n")
    (secrets / "ping").write_text("https://hc.example.net/ping/0b1c2d3e\n")
    (secrets / "notify").write_text("json://127.0.0.1:9/hook?token=abc\n")
    fleet = Fleet(fx, data_dir, base)
    try:
        fleet.rpc("users.add", name="op1", password="op1-password-xyz", role="operator")
        fx.api_login(fleet.fleetd.url, "op1", "op1-password-xyz")  # an API token of op1's
        fleet.ctl("tokens", "create", "ci", "--json")
        for host, role in (("web-1", "web"), ("web-2", "web"), ("db-1", "db")):
            fleet.rpc("enroll.create", host=host, labels={"role": role})
        fleet.ctl("hosts", "label", "db-1", "tier=gold")
        fleet.ctl(
            "repos", "create", "main", "--url", "s3:https://s3.example.net/fleet/main",
            "--password-file", secrets / "pw", "--env-file", secrets / "env", "--json",
        )  # fmt: skip
        fleet.ctl("repos", "use", "main", "db-1")
        fleet.ctl(
            "groups", "create", "db-1", "etc", "--include", "/etc",
            "--ping-url-file", secrets / "ping", "--json",
        )  # fmt: skip
        fleet.ctl("schedules", "create", "db-1", "--cron", "0 3 * * *", "--group", "etc", "--json")
        spec = {
            "repositories": ["main"],
            "groups": {"www": {"includes": ["/var/www"], "retention": {"keep_daily": 7}}},
            "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["www"]}},
        }
        done = fleet.rpc("templates.set", name="web", selector="role=web", spec=spec)
        assert done["picked"] == 2, done
        fleet.ctl("notify", "add", "ops", "--url-file", secrets / "notify", "--json")
        jobs = [fleet.ctl("run", h, g, "--json") for h, g in (("db-1", "etc"), ("web-1", "www"))]
        last = fleet.ctl("run", "web-2", "www", "--json")
    finally:
        fleet.stop()
    ids = sorted(job["id"] for job in jobs)
    # the newest job goes (deleted as history pruning does): SQLite never
    # hands its id out again, and PostgreSQL must not either
    with sqlite3.connect(data_dir / "fleet.db") as conn:
        conn.execute('DELETE FROM "job" WHERE "id" = ?', (last["id"],))
        for job_id in ids:
            conn.executemany(
                'INSERT INTO "job_log" ("job_id", "seq", "ts", "stream", "payload") '
                "VALUES (?, ?, '2026-12-01 03:00:00.5', 'stdout', ?)",
                [(job_id, seq, f"line {seq}") for seq in (1, 2, 3)],
            )
    conn.close()
    return {"jobs": ids, "deleted_job": last["id"]}


def _rows(conn: Any, sql: str) -> list[tuple]:
    return [
        tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in conn.execute(sql)
    ]


def test_a_sqlite_fleet_moves_to_postgresql_and_is_served_from_there(postgres, fx, tmp_path):
    data_dir = _sqlite_data_dir(fx, tmp_path)
    made = _make_fleet(fx, data_dir, tmp_path)
    before = _sqlite_counts(data_dir)
    for table in ("user", "api_token", "host", "repository", "source_group", "schedule", "job"):
        assert before[table] > 0, table
    assert before["template"] == 1 and before["notifier"] == 1 and before["job_log"] == 6
    spot = {
        "host": 'SELECT "id", "name", "labels", "online" FROM "host" ORDER BY "id"',
        "repository": 'SELECT "id", "name", "url_enc", "password_enc", "env_enc", "aad" '
        'FROM "repository" ORDER BY "id"',
        "job": 'SELECT "id", "uid", "status", "group_name" FROM "job" ORDER BY "id"',
        "job_log": 'SELECT "job_id", "seq", "payload" FROM "job_log" ORDER BY 1, 2',
        "audit_log": 'SELECT "id", "actor", "action", "target" FROM "audit_log" ORDER BY "id"',
        "api_token": 'SELECT "id", "user_id", "name", "token_hash" FROM "api_token" ORDER BY "id"',
    }
    with sqlite3.connect(data_dir / "fleet.db") as conn:
        expected = {table: _rows(conn, sql) for table, sql in spot.items()}
    conn.close()
    untouched = hashlib.sha256((data_dir / "fleet.db").read_bytes()).hexdigest()

    name = postgres.create_database()
    pwfile = tmp_path / "pgpass"
    pwfile.write_text(postgres.password + "\n")
    moved = _migrate(fx, data_dir, _url(postgres, name), None, "--database-password-file", pwfile)
    assert moved.returncode == 0, moved.stderr
    out = moved.stdout
    assert re.search(r"^job_log +6$", out, re.M), out
    assert re.search(rf"^total +{sum(before.values())}  rows in [0-9.]+ s$", out, re.M), out
    assert "rows in" in out and "fleet.db is left as it was" in out
    assert postgres.password not in out + moved.stderr

    recorded = data_dir / "database"
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert recorded.read_text().startswith(f"postgresql:///{name}?")
    assert postgres.password not in recorded.read_text()
    assert hashlib.sha256((data_dir / "fleet.db").read_bytes()).hexdigest() == untouched

    assert _pg_counts(postgres, name) == before
    with postgres.connect(name) as conn:
        for table, sql in spot.items():  # ids kept, secrets byte for byte (0 == False)
            assert _rows(conn, sql) == expected[table], table
        hosts = _rows(conn, spot["host"])
    assert all(isinstance(online, bool) for *_, online in hosts)  # a boolean now, not 0/1

    # a fleetd on the data directory serves PostgreSQL now
    fleet = Fleet(fx, data_dir, tmp_path / "after", "--database-password-file", str(pwfile))
    try:
        shown = fleet.ctl("repos", "show", "main", "--json")
        assert shown["url"] == "s3:https://s3.example.net/fleet/main"  # decrypted with the key
        groups = fleet.ctl("groups", "list", "db-1", "--json")
        assert [g["name"] for g in groups] == ["etc"]
        job = fleet.ctl("run", "db-1", "etc", "--json")
        assert job["id"] > made["deleted_job"] > max(made["jobs"])
        fleet.rpc("enroll.create", host="after-move")
        log = fleet.ctl("jobs", "log", str(made["jobs"][0]))
        assert "line 3" in log
    finally:
        fleet.stop()
    with postgres.connect(name) as conn:
        names = {r[0] for r in conn.execute('SELECT "name" FROM "host"')}
        assert {"web-1", "web-2", "db-1", "after-move"} <= names
        assert conn.execute('SELECT 1 FROM "job" WHERE "id" = %s', (job["id"],)).fetchone()
    with sqlite3.connect(data_dir / "fleet.db") as conn:  # the fallback did not move on
        assert conn.execute('SELECT COUNT(*) FROM "host"').fetchone()[0] == before["host"]
    conn.close()


def test_a_target_with_rows_or_the_store_itself_is_refused_and_left_alone(postgres, fx, tmp_path):
    name = postgres.create_database()
    env = fx.clean_env(
        FLEET_ADMIN_PASSWORD=fx.ADMIN_PASSWORD, FLEETD_DATABASE_PASSWORD=postgres.password
    )
    other = fx.run_fleetd(
        "init", "--data-dir", tmp_path / "other", "--database", _url(postgres, name), env=env
    )
    assert other.returncode == 0, other.stderr
    rows_before = _pg_counts(postgres, name)
    data_dir = _sqlite_data_dir(fx, tmp_path)

    refused = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    assert refused.returncode == 1
    assert refused.stderr.startswith("fleetd: error: the target database is not empty (rows in ")
    assert "user" in refused.stderr and "nothing was written" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _pg_counts(postgres, name) == rows_before
    assert not (data_dir / "database").exists()

    # once moved, the data directory's store is the target: moving it there again is refused
    empty = postgres.create_database()
    assert _migrate(fx, data_dir, _url(postgres, empty), postgres.password).returncode == 0
    again = _migrate(fx, data_dir, _url(postgres, empty), postgres.password)
    assert again.returncode == 2 and "names the store being moved" in again.stderr
    elsewhere = _migrate(
        fx, data_dir, _url(postgres, postgres.create_database()), postgres.password
    )
    assert elsewhere.returncode == 1 and "PostgreSQL already" in elsewhere.stderr


def test_bad_targets_are_refused_with_a_clear_line(postgres, fx, tmp_path):
    data_dir = _sqlite_data_dir(fx, tmp_path)
    name = postgres.create_database()
    with_password = _migrate(fx, data_dir, _url(postgres, name) + "&password=hunter2", None)
    assert with_password.returncode == 2
    assert "the --to URL holds a password" in with_password.stderr
    assert "hunter2" not in with_password.stderr + with_password.stdout

    to_sqlite = _migrate(fx, data_dir, f"sqlite://{tmp_path}/other.db", None)
    assert to_sqlite.returncode == 2 and "to PostgreSQL" in to_sqlite.stderr

    unreachable = _migrate(
        fx, data_dir, f"postgresql:///{name}?host={tmp_path}/no-server&user=fleet",
        postgres.password,
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("fleetd: error: cannot open postgresql://fleet@")
    assert unreachable.stderr.count("\n") == 1 and "Traceback" not in unreachable.stderr

    missing = _migrate(fx, tmp_path / "nothing", _url(postgres, name), postgres.password)
    assert missing.returncode == 1 and "nothing to move" in missing.stderr
    for proc in (with_password, to_sqlite, unreachable, missing):
        assert postgres.password not in proc.stderr + proc.stdout
    assert not (data_dir / "database").exists()
    with postgres.connect(name) as conn:  # refused before it was even opened
        assert (
            conn.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
            == 0
        )


def _target_is_empty(postgres: Any, name: str) -> None:
    assert _pg_counts(postgres, name) == {t: 0 for t in TABLES}
    with postgres.connect(name) as conn:
        assert conn.execute('SELECT COUNT(*) FROM "schema_version"').fetchone()[0] > 0


def test_a_failure_midway_leaves_the_target_empty_and_the_move_can_run_again(
    postgres, fx, tmp_path
):
    data_dir = _sqlite_data_dir(fx, tmp_path)
    _seed_log(data_dir, jobs=5, lines=1000)
    name = postgres.create_database()
    open_database(locate(_url(postgres, name), postgres.password)).close()  # the schema
    with postgres.connect(name) as conn:
        conn.execute("CREATE SEQUENCE log_rows")
        conn.execute(
            "CREATE FUNCTION refuse_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF nextval('log_rows') = 3500 THEN RAISE EXCEPTION 'refused by the test'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            'CREATE TRIGGER refuse BEFORE INSERT ON "job_log" '
            "FOR EACH ROW EXECUTE FUNCTION refuse_row()"
        )
    failed = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    assert failed.returncode == 1
    assert "fleetd: error: the copy failed in table job_log: refused by the test" in failed.stderr
    assert "nothing was written" in failed.stderr and "Traceback" not in failed.stderr
    _target_is_empty(postgres, name)
    with postgres.connect(name) as conn:  # the trigger did see rows up to the 3,500th
        assert conn.execute("SELECT last_value FROM log_rows").fetchone()[0] == 3500
        conn.execute('DROP TRIGGER refuse ON "job_log"')
    assert not (data_dir / "database").exists()

    moved = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    assert moved.returncode == 0, moved.stderr
    assert _pg_counts(postgres, name) == _sqlite_counts(data_dir)


def test_a_secret_that_does_not_decrypt_aborts_the_move(postgres, fx, tmp_path):
    data_dir = _sqlite_data_dir(fx, tmp_path)
    box = load_key_file(data_dir / "secret.key")
    database = open_database(data_dir / "fleet.db")
    with database.bind_ctx(m.MODELS):
        repo = m.Repository.create(name="r", url_enc=b"", password_enc=b"", aad="")
        repo.aad = f"repository:{repo.id}"
        repo.url_enc = box.encrypt("/srv/r", repository_aad(repo.aad, "url"))
        repo.password_enc = box.encrypt("pw", repository_aad(repo.aad, "password"))
        repo.save()
    database.close()
    name = postgres.create_database()
    # another data directory's key: what the check is there to catch
    (data_dir / "secret.key").unlink()
    create_key_file(data_dir / "secret.key")
    refused = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    assert refused.returncode == 1
    assert "repository 'r': its url does not decrypt" in refused.stderr
    _target_is_empty(postgres, name)
    assert not (data_dir / "database").exists()


def test_a_fleetd_holding_the_sqlite_write_lock_makes_the_move_fail(postgres, fx, tmp_path):
    """The move takes SQLite's write lock (BEGIN IMMEDIATE): a writer
    holding it (as a fleetd in the midst of a write does) stops the move at
    once after the busy timeout, and the move's own lock would stop
    fleetd's writes the same way."""
    data_dir = _sqlite_data_dir(fx, tmp_path)
    name = postgres.create_database()
    writer = sqlite3.connect(data_dir / "fleet.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        locked = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert locked.returncode == 1
    assert "cannot lock the SQLite store" in locked.stderr and "stop fleetd" in locked.stderr
    _target_is_empty(postgres, name)


def test_fifty_thousand_log_lines_move_in_batches(postgres, fx, tmp_path):
    data_dir = _sqlite_data_dir(fx, tmp_path)
    _seed_log(data_dir, jobs=10, lines=5000)
    name = postgres.create_database()
    moved = _migrate(fx, data_dir, _url(postgres, name), postgres.password)
    assert moved.returncode == 0, moved.stderr
    assert re.search(r"^job_log +50000$", moved.stdout, re.M), moved.stdout
    totals = (
        'SELECT COUNT(*), SUM("seq"), SUM(LENGTH("payload")), MIN("job_id"), MAX("job_id"), '
        """SUM(CASE WHEN "stream" = 'stderr' THEN 1 ELSE 0 END) FROM "job_log" """
    )
    edges = (
        'SELECT "job_id", "seq", "ts", "stream", "payload" FROM "job_log" '
        'WHERE "seq" IN (1, 1000, 1001, 5000) ORDER BY 1, 2'
    )
    with sqlite3.connect(data_dir / "fleet.db") as conn:
        expected = conn.execute(totals).fetchone(), conn.execute(edges).fetchall()
    conn.close()
    with postgres.connect(name) as conn:
        got = conn.execute(totals).fetchone(), conn.execute(edges).fetchall()
    assert got[0] == expected[0] and got[0][0] == 50_000
    assert len(expected[1]) == 40
    assert [(j, s, str(ts), st, p) for j, s, ts, st, p in got[1]] == expected[1]
