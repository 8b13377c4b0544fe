"""The store on PostgreSQL (issue 13), first steps: a real server started
by the harness as an unprivileged user, and the models' tables created and
used on it through peewee and psycopg 3."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import peewee as pw
import pytest

from fleet.server.store import models as m
from fleet.server.store.db import Store, locate, open_database
from fleet.server.store.migrations import MIGRATIONS, migrate

pytestmark = pytest.mark.own_store  # always PostgreSQL: run once


def test_a_real_postgresql_runs_as_an_unprivileged_user(postgres):
    with postgres.connect() as conn:
        pid, user = conn.execute("SELECT pg_backend_pid(), current_user").fetchone()
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        uid = next(  # while the connection, and so its backend process, lives
            line.split()[1]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
    assert user == "fleet" and int(version) >= 150000
    assert int(uid) != 0  # PostgreSQL refuses root; the harness runs it as nobody


def test_the_models_create_and_round_trip_on_postgresql(postgres):
    name = postgres.create_database()
    database = pw.PostgresqlDatabase(
        name, host=str(postgres.root), user="fleet", password=postgres.password
    )
    with database.bind_ctx(m.MODELS):
        database.create_tables(m.MODELS)
        tables = set(database.get_tables())
        assert {model._meta.table_name for model in m.MODELS} <= tables
        host = m.Host.create(name="web-01", labels={"role": "web", "env": "prod"})
        repo = m.Repository.create(
            name="main", url_enc=b"\\x00ciphertext\\xff", password_enc=b"\\x01", aad="repository:1"
        )
        m.HostRepository.create(host=host, repository=repo)
        group = m.SourceGroup.create(
            host=host, name="www", includes=["/var/www"], retention={"keep_daily": 7}
        )
        when = dt.datetime(2026, 12, 3, 12, 0, 0, 123456)
        job = m.Job.create(
            host=host, kind="backup", actor_kind="user", group=group, created_at=when
        )
        assert m.Job.get_by_id(job.id).uid == job.uid  # minted client side, stored as is
        got = m.Host.get(m.Host.name == "web-01")
        assert got.labels == {"role": "web", "env": "prod"}
        assert bytes(m.Repository.get().url_enc) == b"\\x00ciphertext\\xff"
        assert m.SourceGroup.get().retention == {"keep_daily": 7}
        assert m.Job.get().created_at == when
        # a foreign key holds, as on SQLite
        try:
            with database.atomic():
                m.SourceGroup.create(host=999_999, name="x", includes=["/x"])
        except pw.IntegrityError:
            pass
        else:
            raise AssertionError("a group of no host was stored")
    database.close()


# --- the migrated schema on PostgreSQL agrees with the models ----------------

# what each peewee field type is on PostgreSQL (information_schema's words)
PG_TYPES = {
    "AUTO": "bigint",
    "INT": "bigint",
    "BIGINT": "bigint",
    "TEXT": "text",
    "DATETIME": "timestamp without time zone",
    "BOOL": "boolean",
    "BLOB": "bytea",
}


def _field_type(field: pw.Field) -> str:
    if isinstance(field, pw.ForeignKeyField):
        return "bigint"
    return PG_TYPES[field.field_type]


@pytest.fixture(scope="module")
def migrated(postgres):
    """A database migrated by open_database, and the SQLite schema's index
    names (what PostgreSQL's must equal)."""
    name = postgres.create_database()
    sqlite = open_database(Path(tempfile.mkdtemp()) / "fleet.db")
    sqlite_indexes = {
        row[0]
        for row in sqlite.execute_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }
    sqlite.close()
    database = open_database(
        locate(f"postgresql:///{name}?host={postgres.root}&user=fleet", postgres.password)
    )
    yield database, sqlite_indexes
    database.close()


def _rows(database, sql, *params):
    return database.execute_sql(sql, params).fetchall()


def test_postgresql_is_migrated_to_the_latest_version_with_every_version_recorded(migrated):
    database, _ = migrated
    versions = [r[0] for r in _rows(database, 'SELECT "version" FROM "schema_version" ORDER BY 1')]
    assert versions == [v for v, _, _ in MIGRATIONS]
    assert migrate(database) == []  # a second look applies nothing


@pytest.mark.parametrize("model", m.MODELS, ids=lambda model: model.__name__)
def test_model_columns_types_and_nulls_match_postgresql(migrated, model):
    database, _ = migrated
    table = model._meta.table_name
    columns = {
        name: (kind, nullable == "YES")
        for name, kind, nullable in _rows(
            database,
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s",
            table,
        )
    }
    expected = {f.column_name: (_field_type(f), bool(f.null)) for f in model._meta.sorted_fields}
    assert columns == expected


@pytest.mark.parametrize("model", m.MODELS, ids=lambda model: model.__name__)
def test_model_foreign_keys_and_unique_constraints_match_postgresql(migrated, model):
    database, _ = migrated
    table = model._meta.table_name
    foreign = {
        (column, target, target_column, rule)
        for column, target, target_column, rule in _rows(
            database,
            "SELECT kcu.column_name, ccu.table_name, ccu.column_name, rc.delete_rule "
            "FROM information_schema.referential_constraints rc "
            "JOIN information_schema.key_column_usage kcu "
            "ON kcu.constraint_name = rc.constraint_name "
            "JOIN information_schema.constraint_column_usage ccu "
            "ON ccu.constraint_name = rc.unique_constraint_name "
            "WHERE kcu.table_name = %s",
            table,
        )
    }
    assert foreign == {
        (
            f.column_name,
            f.rel_model._meta.table_name,
            f.rel_field.column_name,
            (f.on_delete or "NO ACTION").upper(),
        )
        for f in model._meta.sorted_fields
        if isinstance(f, pw.ForeignKeyField)
    }
    unique = {
        tuple(columns)
        for (columns,) in _rows(
            database,
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indrelid "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
            "WHERE c.relname = %s AND i.indisunique AND NOT i.indisprimary GROUP BY i.indexrelid",
            table,
        )
    }
    in_model = {(f.column_name,) for f in model._meta.sorted_fields if f.unique}
    for names, is_unique in model._meta.indexes:
        if is_unique:
            in_model.add(tuple(model._meta.fields[n].column_name for n in names))
    assert unique == in_model


def test_postgresql_has_the_same_tables_and_indexes_as_sqlite(migrated):
    database, sqlite_indexes = migrated
    tables = {
        r[0]
        for r in _rows(
            database, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    assert tables == {model._meta.table_name for model in m.MODELS}
    indexes = {
        r[0]
        for r in _rows(
            database,
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
            "AND indexname NOT LIKE '%%_pkey'",
        )
    }
    assert indexes == sqlite_indexes


def test_integers_hold_64_bits_as_on_sqlite(migrated):
    database, _ = migrated
    with database.bind_ctx(m.MODELS):
        host = m.Host.create(name=f"big-{uuid.uuid4().hex[:6]}", last_seq=2**62)
        assert m.Host.get_by_id(host.id).last_seq == 2**62
        host.delete_instance()


# --- fleetd init and serve on PostgreSQL ------------------------------------


def _url(postgres, name: str) -> str:
    return f"postgresql:///{name}?host={postgres.root}&user=fleet"


def test_init_and_serve_on_postgresql_with_the_password_from_a_file(postgres, fx, tmp_path):
    name = postgres.create_database()
    data_dir = tmp_path / "data"
    pwfile = tmp_path / "pw"
    pwfile.write_text(postgres.password + "\n")
    env = fx.clean_env(FLEET_ADMIN_PASSWORD=fx.ADMIN_PASSWORD, FLEETD_DATABASE_PASSWORD=None)
    made = fx.run_fleetd(
        "init", "--data-dir", data_dir, "--database", _url(postgres, name),
        "--database-password-file", pwfile, env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "database: postgresql://fleet@" in made.stdout and postgres.password not in made.stdout
    recorded = data_dir / "database"
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert recorded.read_text().startswith(f"postgresql:///{name}?")
    assert postgres.password not in recorded.read_text()
    assert not (data_dir / "fleet.db").exists()

    # serve finds the database in DATA_DIR/database; without a password it
    # says so and stops, no traceback
    refused = fx.run_fleetd("serve", "--data-dir", data_dir, "--no-agent-pyz", env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("fleetd: error: cannot open postgresql://fleet@")
    assert "Traceback" not in refused.stderr and postgres.password not in refused.stderr

    with_file = ("--database-password-file", str(pwfile), "--no-agent-pyz")
    fleetd = fx.Fleetd(data_dir, tmp_path / "fleetd.log", *with_file).start()
    try:
        token = fx.api_login(fleetd.url, "admin", fx.ADMIN_PASSWORD)["token"]
        fx.run_ctl(("enroll", "pg-web-1"), server=fleetd.url, token=token, config_dir=tmp_path)
    finally:
        fx.stop_and_check(fleetd)
    with postgres.connect(name) as conn:
        hosts = conn.execute('SELECT "name" FROM "host"').fetchall()
    assert hosts == [("pg-web-1",)]
    assert postgres.password not in fleetd.log()


def test_a_password_in_the_url_is_refused_and_nothing_is_made(postgres, fx, tmp_path):
    name = postgres.create_database()
    data_dir = tmp_path / "data"
    url = _url(postgres, name) + "&password=hunter2"
    proc = fx.run_fleetd(
        "init", "--data-dir", data_dir, "--database", url,
        env=fx.clean_env(FLEET_ADMIN_PASSWORD=fx.ADMIN_PASSWORD),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "holds a password" in proc.stderr and "hunter2" not in proc.stderr
    assert not data_dir.exists() or not any(data_dir.iterdir())
    for bad, words in (
        ("mysql://h/db", "a store is postgresql://"),
        ("postgresql://", "name the database"),
        ("sqlite://relative.db", "sqlite:///absolute/path"),
    ):
        proc = fx.run_fleetd(
            "serve", "--data-dir", tmp_path / "other", "--database", bad, env=fx.clean_env()
        )
        assert proc.returncode == 2 and words in proc.stderr, (bad, proc.stderr)


def test_a_second_init_on_one_database_is_refused_and_makes_no_key(postgres, fx, tmp_path):
    name = postgres.create_database()
    env = fx.clean_env(
        FLEET_ADMIN_PASSWORD=fx.ADMIN_PASSWORD, FLEETD_DATABASE_PASSWORD=postgres.password
    )
    first = fx.run_fleetd(
        "init", "--data-dir", tmp_path / "a", "--database", _url(postgres, name), env=env
    )
    assert first.returncode == 0, first.stderr
    second = fx.run_fleetd(
        "init", "--data-dir", tmp_path / "b", "--database", _url(postgres, name), env=env
    )
    assert second.returncode == 1
    assert "already initialised" in second.stderr and "copy" in second.stderr
    assert not (tmp_path / "b" / "secret.key").exists()
    with postgres.connect(name) as conn:
        assert conn.execute('SELECT COUNT(*) FROM "user"').fetchone()[0] == 1


def test_replicas_starting_together_on_an_empty_database_migrate_it_once(postgres, fx):
    """Four processes (replicas are processes: peewee's models are bound
    per process) open one empty database at once."""
    name = postgres.create_database()
    program = (
        "import sys, json\n"
        "from fleet.server.store.db import locate, connect, db\n"
        "from fleet.server.store.migrations import migrate\n"
        "database = connect(locate(sys.argv[1], sys.argv[2]))\n"
        "db.initialize(database)\n"
        "print(json.dumps(migrate(database)))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", program, _url(postgres, name), postgres.password],
            cwd=fx.REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outcomes.append(json.loads(out))
    applied = sorted(outcomes, key=len)
    assert applied[-1] == [v for v, _, _ in MIGRATIONS] and all(o == [] for o in applied[:-1])


def test_the_store_reconnects_after_postgresql_drops_its_connection(postgres):
    name = postgres.create_database()
    where = locate(_url(postgres, name), postgres.password)

    async def scenario() -> tuple:
        store = Store(where)
        await store.open()
        try:
            pid = await store.run(
                lambda: m.db.obj.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            )
            with postgres.connect(name) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(pw.OperationalError):
                await store.run(lambda: m.User.select().count())
            after = await store.run(lambda: m.User.select().count())  # a new connection
            read = await store.read(lambda: m.User.select().count())
            return after, read
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (0, 0)


def test_the_store_outlives_a_postgresql_restart(fx):
    """A server of its own (the shared one must not go down under other
    tests): while it is down, calls fail with its error at once; once it is
    back, the writer and the readers carry on, the readers still read-only."""
    from postgres import Postgres  # tests/ is on sys.path (rootdir conftest)

    server = Postgres().start()
    try:
        name = server.create_database()
        where = locate(_url(server, name), server.password)

        async def scenario() -> None:
            store = Store(where)
            await store.open()
            try:
                await store.atomic(lambda: m.Host.create(name="before"))
                assert await store.read(lambda: m.Host.select().count()) == 1
                assert await store.scan(lambda: m.Host.select().count()) == 1
                server.halt()
                for call in (store.atomic, store.read, store.scan):
                    with pytest.raises(pw.OperationalError):
                        await call(lambda: m.Host.select().count())
                with pytest.raises(pw.OperationalError):  # still down: tried again, fails again
                    await store.atomic(lambda: m.Host.create(name="lost"))
                server.resume()
                await store.atomic(lambda: m.Host.create(name="after"))
                assert await store.read(lambda: sorted(h.name for h in m.Host.select())) == [
                    "after",
                    "before",
                ]
                assert await store.scan(lambda: m.Host.select().count()) == 2
                with pytest.raises(pw.InternalError, match="read-only"):  # a reader, still
                    await store.read(lambda: m.Host.create(name="from-a-reader"))
            finally:
                await store.close()

        asyncio.run(scenario())
    finally:
        server.stop()
