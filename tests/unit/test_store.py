"""Tests for fleet/server/store: migrations, the models against the migrated
schema, pragmas, foreign keys and unique constraints, JSONField, and the
Store's one dedicated thread.

Every test works on a real SQLite file under tmp_path. The models are bound
to a global DatabaseProxy, so each test opens its own file and closes it at
teardown.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import threading
import time
from pathlib import Path

import peewee as pw
import pytest

from fleet.server.store import models as m
from fleet.server.store.db import Store, open_database
from fleet.server.store.migrations import MIGRATIONS, current_version, migrate

NOW = dt.datetime(2024, 5, 1, 12, 0, 0)
MAINTENANCE = "maintenance per repository, with defaults (forget daily, prune and check weekly)"
SEVERAL = MIGRATIONS[9][1]
EXPECT = MIGRATIONS[10][1]
ALERTS = MIGRATIONS[11][1]
NOTIFIERS = MIGRATIONS[12][1]
PINGS = MIGRATIONS[13][1]
LATEST = MIGRATIONS[14][1]
LISTINGS = MIGRATIONS[15][1]
DRILLS = MIGRATIONS[16][1]
LIMITS = MIGRATIONS[17][1]
LABELS = MIGRATIONS[18][1]
TEMPLATES = MIGRATIONS[19][1]
ROLLOUTS = MIGRATIONS[20][1]
TLS_PINS = MIGRATIONS[21][1]
REPLICAS = MIGRATIONS[22][1]
FEATURES = MIGRATIONS[23][1]
REPOSITORIES = (
    "repositories are named objects hosts share; each host's own becomes one named after it"
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


@pytest.fixture
def database(db_path: Path):
    database = open_database(db_path)
    yield database
    database.close()


def table_info(database: pw.Database, table: str) -> dict[str, dict]:
    cursor = database.execute_sql(f'PRAGMA table_info("{table}")')
    names = [d[0] for d in cursor.description]
    return {row[names.index("name")]: dict(zip(names, row)) for row in cursor.fetchall()}


def rows(database: pw.Database, sql: str, params: tuple = ()) -> list[tuple]:
    return list(database.execute_sql(sql, params).fetchall())


def count(model: type[m.Base]) -> int:
    return model.select().count()


def make_host(name: str = "web1") -> m.Host:
    return m.Host.create(name=name)


def make_user(name: str = "alice") -> m.User:
    return m.User.create(name=name, password_hash="x", role="admin")


def make_job(host: m.Host, **kwargs) -> m.Job:
    kwargs.setdefault("kind", "backup")
    kwargs.setdefault("actor_kind", "system")
    return m.Job.create(host=host, **kwargs)


# --- migrations -------------------------------------------------------------


def test_migrations_apply_on_fresh_file_and_are_recorded(db_path: Path) -> None:
    assert not db_path.exists()
    database = pw.SqliteDatabase(str(db_path))
    m.db.initialize(database)
    try:
        assert current_version(database) == 0
        assert migrate(database) == list(range(1, 25))
        recorded = [(v.version, v.name) for v in m.SchemaVersion.select()]
        assert recorded == [
            (1, "initial"),
            (2, "host repository locks"),
            (3, "snapshot reports in pages"),
            (
                4,
                "jobs: ids never reused, a uid either side can mint, dispatch and due times as columns",
            ),
            (5, "schedules: a name per host and a time zone"),
            (6, "jobs an agent ran on its own: the agent's id for them"),
            (7, "repository sizes: when restic stats last measured them"),
            (8, REPOSITORIES),
            (9, MAINTENANCE),
            (10, SEVERAL),
            (11, EXPECT),
            (12, ALERTS),
            (13, NOTIFIERS),
            (14, PINGS),
            (15, LATEST),
            (16, LISTINGS),
            (17, DRILLS),
            (18, LIMITS),
            (19, LABELS),
            (20, TEMPLATES),
            (21, ROLLOUTS),
            (22, TLS_PINS),
            (23, REPLICAS),
            (24, FEATURES),
        ]
        for applied_at in [v.applied_at for v in m.SchemaVersion.select()]:
            assert isinstance(applied_at, dt.datetime)
        assert current_version(database) == MIGRATIONS[-1][0] == 24
        # Every table of the models now exists.
        for model in m.MODELS:
            assert database.table_exists(model._meta.table_name), model.__name__
    finally:
        database.close()


def test_open_database_migrates_a_fresh_file(database: pw.SqliteDatabase, db_path: Path) -> None:
    assert db_path.exists()
    assert rows(database, "SELECT version, name FROM schema_version") == [
        (1, "initial"),
        (2, "host repository locks"),
        (3, "snapshot reports in pages"),
        (
            4,
            "jobs: ids never reused, a uid either side can mint, dispatch and due times as columns",
        ),
        (5, "schedules: a name per host and a time zone"),
        (6, "jobs an agent ran on its own: the agent's id for them"),
        (7, "repository sizes: when restic stats last measured them"),
        (8, REPOSITORIES),
        (9, MAINTENANCE),
        (10, SEVERAL),
        (11, EXPECT),
        (12, ALERTS),
        (13, NOTIFIERS),
        (14, PINGS),
        (15, LATEST),
        (16, LISTINGS),
        (17, DRILLS),
        (18, LIMITS),
        (19, LABELS),
        (20, TEMPLATES),
        (21, ROLLOUTS),
        (22, TLS_PINS),
        (23, REPLICAS),
        (24, FEATURES),
    ]
    assert m.Host.select().count() == 0


def test_reopening_applies_nothing_and_keeps_data(db_path: Path) -> None:
    database = open_database(db_path)
    host = make_host("keepme")
    m.SourceGroup.create(host=host, name="etc", includes=["/etc"])
    first = rows(database, "SELECT version, name, applied_at FROM schema_version")
    database.close()

    database = open_database(db_path)
    try:
        assert migrate(database) == []
        assert rows(database, "SELECT version, name, applied_at FROM schema_version") == first
        assert [h.name for h in m.Host.select()] == ["keepme"]
        assert [(g.name, g.includes) for g in m.SourceGroup.select()] == [("etc", ["/etc"])]
    finally:
        database.close()


def test_database_newer_than_the_code_is_refused(db_path: Path) -> None:
    database = open_database(db_path)
    latest = MIGRATIONS[-1][0]
    m.SchemaVersion.create(version=latest + 1, name="from the future")
    make_host("survivor")
    database.close()

    with pytest.raises(RuntimeError, match=rf"schema version {latest + 1}.*newer") as info:
        open_database(db_path)
    assert str(latest) in str(info.value)
    m.db.obj.close()

    # Nothing was changed by the refused open.
    raw = sqlite3.connect(db_path)
    try:
        versions = raw.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v, _, _ in MIGRATIONS] + [(latest + 1,)]
        assert raw.execute("SELECT name FROM host").fetchall() == [("survivor",)]
    finally:
        raw.close()


# --- the models agree with the migrated schema ------------------------------


@pytest.mark.parametrize("model", m.MODELS, ids=lambda model: model.__name__)
def test_model_columns_match_migrated_schema(database: pw.SqliteDatabase, model) -> None:
    table = model._meta.table_name
    info = table_info(database, table)
    assert info, f"table {table} is missing from the migrated schema"
    fields = {f.column_name: f for f in model._meta.sorted_fields}
    assert set(info) == set(fields), f"{table}: model and migration disagree on columns"
    for name, field in fields.items():
        assert bool(info[name]["notnull"]) == (not field.null), (
            f"{table}.{name}: model null={field.null}, schema notnull={info[name]['notnull']}"
        )


@pytest.mark.parametrize("model", m.MODELS, ids=lambda model: model.__name__)
def test_model_foreign_keys_match_migrated_schema(database: pw.SqliteDatabase, model) -> None:
    table = model._meta.table_name
    in_schema = {
        (row[3], row[2], row[4], row[6].upper())
        for row in rows(database, f'PRAGMA foreign_key_list("{table}")')
    }
    in_model = {
        (
            f.column_name,
            f.rel_model._meta.table_name,
            f.rel_field.column_name,
            (f.on_delete or "NO ACTION").upper(),
        )
        for f in model._meta.sorted_fields
        if isinstance(f, pw.ForeignKeyField)
    }
    assert in_schema == in_model


@pytest.mark.parametrize("model", m.MODELS, ids=lambda model: model.__name__)
def test_model_unique_constraints_match_migrated_schema(database: pw.SqliteDatabase, model) -> None:
    table = model._meta.table_name
    in_schema = set()
    for row in rows(database, f'PRAGMA index_list("{table}")'):
        _, index, unique, origin = row[:4]
        if unique and origin == "c":
            cols = tuple(r[2] for r in rows(database, f'PRAGMA index_info("{index}")'))
            in_schema.add(cols)
    in_model = {(f.column_name,) for f in model._meta.sorted_fields if f.unique}
    for names, unique in model._meta.indexes:
        if unique:
            in_model.add(tuple(model._meta.fields[n].column_name for n in names))
    assert in_schema == in_model


def test_every_table_in_the_schema_has_a_model(database: pw.SqliteDatabase) -> None:
    tables = {
        r[0]
        for r in rows(
            database,
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'",
        )
    }
    assert tables == {model._meta.table_name for model in m.MODELS}


# --- pragmas ----------------------------------------------------------------


def test_pragmas_in_force_after_open(database: pw.SqliteDatabase) -> None:
    def pragma(name: str):
        return database.execute_sql(f"PRAGMA {name}").fetchone()[0]

    assert pragma("journal_mode") == "wal"
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") == 5000
    assert pragma("synchronous") == 2  # FULL


# --- foreign keys -----------------------------------------------------------


def populate_host(name: str) -> m.Host:
    host = make_host(name)
    user = m.User.get_or_create(name="op", defaults={"password_hash": "x", "role": "operator"})[0]
    repo = m.Repository.create(
        name=f"{name}-repo", url_enc=b"u", password_enc=b"p", env_names=["AWS_KEY"], aad="x"
    )
    m.HostRepository.create(host=host, repository=repo)
    g1 = m.SourceGroup.create(host=host, name="etc", includes=["/etc"])
    g2 = m.SourceGroup.create(host=host, name="home", includes=["/home"])
    sched = m.Schedule.create(host=host, cron="0 3 * * *")
    m.ScheduleGroup.create(schedule=sched, group=g1)
    m.ScheduleGroup.create(schedule=sched, group=g2)
    m.Maintenance.create(repository=repo, forget_cron="0 4 * * *")
    job = make_job(host, schedule=sched, group=g1, group_name="etc", actor_user=user)
    for seq in (1, 2, 3):
        m.JobLog.create(job=job, seq=seq, ts=NOW, stream="stdout", payload=f"line {seq}")
    m.Snapshot.create(
        host=host,
        snapshot_id=f"{name}-abc",
        short_id="abc",
        time=NOW,
        hostname=name,
        paths=["/etc"],
        tags=["etc"],
    )
    m.RepoStats.create(host=host, repository=repo, size_bytes=10, snapshot_count=1)
    m.EnrollmentToken.create(host=host, token_hash=f"h-{name}", created_by=user, expires_at=NOW)
    return host


HOST_OWNED = [
    m.HostRepository,
    m.SourceGroup,
    m.Schedule,
    m.ScheduleGroup,
    m.Job,
    m.JobLog,
    m.Snapshot,
    m.RepoStats,
    m.EnrollmentToken,
]


def test_deleting_a_host_cascades_to_everything_it_owns(database: pw.SqliteDatabase) -> None:
    doomed = populate_host("doomed")
    populate_host("kept")
    before = {model: count(model) for model in HOST_OWNED}
    assert all(n > 0 for n in before.values())

    # A plain DELETE: the database, not peewee, must do the cascading.
    assert m.Host.delete().where(m.Host.id == doomed.id).execute() == 1

    kept = m.Host.get(m.Host.name == "kept")
    assert [h.name for h in m.Host.select()] == ["kept"]
    assert count(m.HostRepository) == 1 and m.HostRepository.get().host_id == kept.id
    assert count(m.Repository) == 2  # repositories are shared objects: they stay
    assert {g.host_id for g in m.SourceGroup.select()} == {kept.id}
    assert count(m.SourceGroup) == 2
    assert {s.host_id for s in m.Schedule.select()} == {kept.id}
    assert count(m.ScheduleGroup) == 2
    assert {link.schedule.host_id for link in m.ScheduleGroup.select()} == {kept.id}
    assert count(m.Maintenance) == 2  # a repository's: it stays with the repository
    assert {j.host_id for j in m.Job.select()} == {kept.id}
    assert count(m.JobLog) == 3
    assert {line.job.host_id for line in m.JobLog.select()} == {kept.id}
    assert [s.host_id for s in m.Snapshot.select()] == [kept.id]
    assert [s.host_id for s in m.RepoStats.select()] == [kept.id]
    assert [t.host_id for t in m.EnrollmentToken.select()] == [kept.id]
    # Users are not owned by a host.
    assert count(m.User) == 1
    for model in HOST_OWNED:
        assert count(model) == before[model] / 2, model.__name__


def test_foreign_keys_are_enforced(database: pw.SqliteDatabase) -> None:
    with pytest.raises(pw.IntegrityError):
        m.SourceGroup.create(host=9999, name="orphan", includes=["/"])
    assert count(m.SourceGroup) == 0


def test_deleting_a_user_or_group_keeps_the_job_and_nulls_the_link(
    database: pw.SqliteDatabase,
) -> None:
    host = populate_host("web1")
    job = m.Job.get()
    m.User.delete().execute()
    m.SourceGroup.delete().where(m.SourceGroup.name == "etc").execute()
    m.Schedule.delete().execute()
    job = m.Job.get_by_id(job.id)
    assert job.actor_user_id is None
    assert job.group_id is None
    assert job.schedule_id is None
    assert job.group_name == "etc"
    assert m.EnrollmentToken.get().created_by_id is None
    assert count(m.JobLog) == 3
    assert m.Host.get_by_id(host.id).name == "web1"


# --- unique constraints -----------------------------------------------------


def test_user_names_are_unique(database: pw.SqliteDatabase) -> None:
    make_user("alice")
    with pytest.raises(pw.IntegrityError):
        make_user("alice")
    assert [u.name for u in m.User.select()] == ["alice"]


def test_group_names_are_unique_per_host(database: pw.SqliteDatabase) -> None:
    web1, web2 = make_host("web1"), make_host("web2")
    m.SourceGroup.create(host=web1, name="etc", includes=["/etc"])
    with pytest.raises(pw.IntegrityError):
        m.SourceGroup.create(host=web1, name="etc", includes=["/srv"])
    # The same name on another host is fine.
    m.SourceGroup.create(host=web2, name="etc", includes=["/etc"])
    assert sorted((g.host.name, g.name) for g in m.SourceGroup.select()) == [
        ("web1", "etc"),
        ("web2", "etc"),
    ]


def test_job_log_seq_is_unique_per_job(database: pw.SqliteDatabase) -> None:
    host = make_host()
    job1, job2 = make_job(host), make_job(host)
    m.JobLog.create(job=job1, seq=1, ts=NOW, stream="stdout", payload="a")
    with pytest.raises(pw.IntegrityError):
        m.JobLog.create(job=job1, seq=1, ts=NOW, stream="stderr", payload="b")
    # The same seq in another job is fine.
    m.JobLog.create(job=job2, seq=1, ts=NOW, stream="stdout", payload="c")
    assert sorted((line.job_id, line.payload) for line in m.JobLog.select()) == [
        (job1.id, "a"),
        (job2.id, "c"),
    ]


# --- JSONField --------------------------------------------------------------


def test_json_field_round_trips(database: pw.SqliteDatabase) -> None:
    host = make_host()
    includes = ["/etc", "/home/zoë", "/srv/data with spaces"]
    retention = {"keep_daily": 7, "keep_within": "30d", "nested": {"a": [1, 2.5, None, True]}}
    group = m.SourceGroup.create(host=host, name="g", includes=includes, retention=retention)

    again = m.SourceGroup.get_by_id(group.id)
    assert again.includes == includes
    assert again.retention == retention
    assert again.excludes == []  # default=list

    raw = rows(database, "SELECT includes, excludes FROM source_group WHERE id = ?", (group.id,))
    assert raw == [('["/etc","/home/zo\\u00eb","/srv/data with spaces"]', "[]")]


def test_json_field_null_stays_null(database: pw.SqliteDatabase) -> None:
    host = make_host()
    job = make_job(host)
    assert m.Job.get_by_id(job.id).summary is None
    assert rows(database, "SELECT summary FROM job WHERE id = ?", (job.id,)) == [(None,)]
    m.Job.update(summary={"files_new": 3}).where(m.Job.id == job.id).execute()
    assert m.Job.get_by_id(job.id).summary == {"files_new": 3}


# --- Store ------------------------------------------------------------------


def test_store_runs_every_call_on_one_thread_off_the_loop(db_path: Path) -> None:
    seen: list[int] = []

    def record() -> int:
        seen.append(threading.get_ident())
        return len(seen)

    async def main() -> tuple[int, list[int]]:
        store = Store(db_path)
        await store.open()
        try:
            results = [await store.run(record) for _ in range(5)]
            results += await asyncio.gather(*(store.run(record) for _ in range(5)))
            assert sorted(results) == list(range(1, 11))
            # A store call that uses the database works on that thread.
            await store.run(make_host, "web1")
            assert await store.run(lambda: [h.name for h in m.Host.select()]) == ["web1"]
            await store.atomic(record)
        finally:
            await store.close()
        return threading.get_ident(), seen

    loop_thread, seen = asyncio.run(main())
    assert len(seen) == 11
    assert len(set(seen)) == 1
    assert seen[0] != loop_thread
    assert seen[0] != threading.get_ident()


def test_store_run_passes_arguments_and_returns_result(db_path: Path) -> None:
    async def main():
        store = Store(db_path)
        await store.open()
        try:
            return await store.run(lambda a, b=0: a * 10 + b, 4, b=2)
        finally:
            await store.close()

    assert asyncio.run(main()) == 42


def test_a_slow_store_call_is_logged_by_name(
    db_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller waits behind the writer: a call holding it longer than
    SLOW is named in the log (a stalled handshake is then explained)."""
    import fleet.server.store.db as store_db

    monkeypatch.setattr(store_db, "SLOW", 0.05)

    def quick() -> int:
        return 1

    def slow_one() -> int:
        time.sleep(0.2)  # the slow call itself, not a wait for something
        return 2

    async def main() -> list[int]:
        store = Store(db_path)
        await store.open()
        try:
            return [await store.run(quick), await store.atomic(slow_one)]
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="fleetd.store"):
        assert asyncio.run(main()) == [1, 2]
    said = [r.getMessage() for r in caplog.records if r.name == "fleetd.store"]
    slow = [m for m in said if "slow_one" in m]  # (a busy machine may slow others too)
    assert len(slow) == 1 and float(slow[0].split(" spent ")[1].split(" s ")[0]) >= 0.2, said


def test_store_run_propagates_exceptions(db_path: Path) -> None:
    def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        store = Store(db_path)
        await store.open()
        try:
            await store.run(boom)
        finally:
            await store.close()

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(main())


def test_publishing_records_the_events_of_a_group_once_in_its_transaction(db_path: Path) -> None:
    """Store.publishing: the events of every call of a group commit go to the
    recorder once, inside the transaction (what it writes commits with
    them); a call that raised adds none; with no recorder, nothing."""
    recorded: list[list[str]] = []

    def recorder(events: list) -> None:  # as replicas.record: written in the transaction
        recorded.append(list(events))
        for event in events:
            m.AuditLog.create(actor="test", action="event", target=event)

    class Boom(Exception):
        pass

    def make(events: list, name: str, fail: bool = False) -> None:
        make_host(name)
        events.append(f"made {name}")
        if fail:
            raise Boom

    async def main() -> list[str]:
        store = Store(db_path)
        await store.open()
        store.recorder = recorder
        try:
            evs = [[] for _ in range(3)]
            # queued together: one group commit (the store thread is held meanwhile)
            gate = threading.Event()
            held = asyncio.ensure_future(store.atomic(gate.wait))
            calls = [
                store.publishing(evs[0], make, evs[0], "a"),
                store.publishing(evs[1], make, evs[1], "b", True),
                store.publishing(evs[2], make, evs[2], "c"),
            ]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(0)  # one turn: each task submits its call, behind the held one
            gate.set()
            await held
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(outcomes[1], Boom) and outcomes[0] is None and outcomes[2] is None
            store.recorder = None
            await store.publishing([], make, [], "d")
            return await store.run(lambda: sorted(a.target for a in m.AuditLog.select()))
        finally:
            await store.close()

    assert asyncio.run(main()) == ["made a", "made c"]
    assert recorded == [["made a", "made c"]]


def test_store_atomic_rolls_back_when_fn_raises(db_path: Path) -> None:
    class Boom(Exception):
        pass

    def create_then_fail() -> None:
        make_host("ghost")
        make_user("ghost")
        assert m.Host.select().where(m.Host.name == "ghost").exists()
        raise Boom

    async def main() -> tuple[list[str], list[str]]:
        store = Store(db_path)
        await store.open()
        try:
            await store.atomic(make_host, "real")
            with pytest.raises(Boom):
                await store.atomic(create_then_fail)
            hosts = await store.run(lambda: sorted(h.name for h in m.Host.select()))
            users = await store.run(lambda: [u.name for u in m.User.select()])
            return hosts, users
        finally:
            await store.close()

    hosts, users = asyncio.run(main())
    assert hosts == ["real"]
    assert users == []

    # And from a separate connection: nothing of the failed call was committed.
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT name FROM host").fetchall() == [("real",)]
    finally:
        raw.close()


def test_store_close_closes_and_later_calls_fail(db_path: Path) -> None:
    wal = db_path.with_name(db_path.name + "-wal")

    async def main() -> None:
        store = Store(db_path)
        await store.open()
        await store.run(make_host, "web1")
        assert await store.run(lambda: not m.db.obj.is_closed())
        assert wal.exists()
        await store.close()
        # The last connection closing checkpoints and removes the WAL file.
        assert not wal.exists()
        with pytest.raises(RuntimeError):
            await store.run(lambda: None)

    asyncio.run(main())

    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT name FROM host").fetchall() == [("web1",)]
    finally:
        raw.close()


def test_a_database_at_version_1_is_migrated_forward_keeping_its_rows(db_path: Path) -> None:
    """An older fleetd's database: only migration 1 applied, with data in it."""
    raw = sqlite3.connect(db_path)
    raw.execute(
        'CREATE TABLE "schema_version" ("version" INTEGER NOT NULL PRIMARY KEY, '
        '"name" TEXT NOT NULL, "applied_at" DATETIME NOT NULL)'
    )
    for sql in MIGRATIONS[0][2]:
        raw.execute(sql)
    raw.execute("INSERT INTO schema_version VALUES (1, 'initial', '2026-01-01 00:00:00')")
    raw.execute(
        "INSERT INTO host (name, created_at, online, schedule_version, applied_schedule_version, last_seq) "
        "VALUES ('old-host', '2026-01-01 00:00:00', 0, 0, 0, 7)"
    )
    raw.execute(
        "INSERT INTO schedule (host_id, cron, enabled, created_at, updated_at) "
        "VALUES (1, '0 2 * * *', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
    )
    raw.commit()
    raw.close()
    database = open_database(db_path)
    try:
        host = m.Host.get(m.Host.name == "old-host")
        assert host.last_seq == 7
        assert host.repo_locks is None
        # schedules from before names: named after their id, in the host's zone
        old = m.Schedule.get()
        assert (old.name, old.timezone, old.cron) == ("schedule-1", None, "0 2 * * *")
        assert [v.version for v in m.SchemaVersion.select()] == [v for v, _, _ in MIGRATIONS]
    finally:
        database.close()


def test_migration_4_keeps_jobs_and_logs_and_ids_are_never_reused(db_path: Path) -> None:
    """The job table is rebuilt (AUTOINCREMENT, uid, due and dispatch times):
    jobs and their log lines survive, a retry's delay moves from its params
    into not_before, and a deleted job's id is not handed out again."""
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA foreign_keys = ON")
    raw.execute(
        'CREATE TABLE "schema_version" ("version" INTEGER NOT NULL PRIMARY KEY, '
        '"name" TEXT NOT NULL, "applied_at" DATETIME NOT NULL)'
    )
    for version, name, statements in MIGRATIONS[:3]:
        for sql in statements:
            raw.execute(sql)
        raw.execute(
            "INSERT INTO schema_version VALUES (?, ?, '2026-01-01 00:00:00')", (version, name)
        )
    raw.execute(
        "INSERT INTO host (id, name, created_at, online, schedule_version, applied_schedule_version, last_seq) "
        "VALUES (1, 'h', '2026-01-01 00:00:00', 0, 0, 0, 0)"
    )
    for job_id, params in (
        (1, "{}"),
        (2, '{"attempt":2,"not_before":"2026-01-02T03:04:05Z"}'),
        (3, "{}"),
    ):
        raw.execute(
            "INSERT INTO job (id, host_id, kind, status, actor_kind, params, created_at) "
            "VALUES (?, 1, 'backup', 'queued', 'user', ?, '2026-01-01 00:00:00')",
            (job_id, params),
        )
    raw.execute("INSERT INTO job_log VALUES (2, 1, '2026-01-01 00:00:00', 'stdout', 'kept')")
    raw.commit()
    raw.close()
    database = open_database(db_path)
    try:
        assert [j.id for j in m.Job.select().order_by(m.Job.id)] == [1, 2, 3]
        retry = m.Job.get_by_id(2)
        assert retry.not_before == dt.datetime(2026, 1, 2, 3, 4, 5)
        assert m.Job.get_by_id(1).not_before is None
        assert [r.payload for r in m.JobLog.select()] == ["kept"]
        uids = {j.uid for j in m.Job.select()}
        assert len(uids) == 3 and all(len(u) == 32 for u in uids)
        assert database.execute_sql("PRAGMA foreign_keys").fetchone() == (1,)
        m.Job.delete().where(m.Job.id == 3).execute()
        again = m.Job.create(host=1, kind="backup", actor_kind="user")
        assert again.id == 4  # not 3: ids are never reused
        assert len(again.uid) == 32 and again.uid not in uids
    finally:
        database.close()


def test_store_results_reach_the_loop_through_coalesced_wakeups(db_path: Path) -> None:
    """Thousands of store calls cost a handful of self-pipe writes, so a
    signal's wake-up byte always fits (see Store.run)."""

    async def main() -> tuple[list[int], int, int]:
        store = Store(db_path)
        await store.open()
        loop = asyncio.get_running_loop()
        writes = 0
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal writes
            writes += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        before = store.wakeups
        try:
            results = await asyncio.gather(*(store.run(lambda i=i: i * 2) for i in range(5000)))
        finally:
            loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        wakeups = store.wakeups - before
        await store.close()
        return results, writes, wakeups

    results, writes, wakeups = asyncio.run(main())
    assert results == [i * 2 for i in range(5000)]
    assert writes == wakeups
    assert writes < 500, f"{writes} wake-ups for 5000 calls"


def test_store_errors_and_cancellation(db_path: Path) -> None:
    async def main() -> None:
        store = Store(db_path)
        await store.open()
        with pytest.raises(ZeroDivisionError):
            await store.run(lambda: 1 / 0)
        gate = threading.Event()
        blocker = asyncio.ensure_future(store.run(gate.wait, 10))
        ran: list[int] = []
        queued = asyncio.ensure_future(store.run(ran.append, 1))
        await asyncio.sleep(0)
        queued.cancel()
        gate.set()
        assert await blocker is True
        assert await store.run(lambda: 7) == 7
        assert ran == []  # the cancelled call never ran
        await store.close()

    asyncio.run(main())


def test_transactions_waiting_together_commit_together(db_path: Path) -> None:
    """Group commit: 300 transactions queued at once take a few commits; one
    that raises rolls back only its own writes, and each caller hears of its
    own outcome."""

    class Boom(Exception):
        pass

    def add(i: int) -> int:
        make_host(f"h{i}")
        if i == 150:
            raise Boom(i)
        return i

    async def main() -> tuple[list, int]:
        store = Store(db_path)
        await store.open()
        gate = threading.Event()
        blocker = asyncio.ensure_future(store.run(gate.wait, 10))  # hold the thread
        await asyncio.sleep(0)
        calls = [asyncio.ensure_future(store.atomic(add, i)) for i in range(300)]
        await asyncio.sleep(0)
        before = store.commits
        gate.set()
        await blocker
        results = await asyncio.gather(*calls, return_exceptions=True)
        commits = store.commits - before
        await store.close()
        return results, commits

    results, commits = asyncio.run(main())
    assert [r for r in results if isinstance(r, Boom)] == [results[150]]
    assert [r for r in results if not isinstance(r, Boom)] == [i for i in range(300) if i != 150]
    assert commits <= 3, commits
    raw = sqlite3.connect(db_path)
    try:
        names = {n for (n,) in raw.execute("SELECT name FROM host")}
    finally:
        raw.close()
    assert len(names) == 299 and "h150" not in names


def test_bulk_work_waits_while_smaller_calls_are_queued(db_path: Path) -> None:
    """A batch of reports or a listing page (bulk) queued first still runs
    after a dispatch or an operator's request queued behind it."""

    async def main() -> list[str]:
        store = Store(db_path)
        await store.open()
        order: list[str] = []
        gate = threading.Event()
        blocker = asyncio.ensure_future(store.run(gate.wait, 10))
        await asyncio.sleep(0)
        bulk = [asyncio.ensure_future(store.bulk(order.append, f"bulk{i}")) for i in range(3)]
        small = asyncio.ensure_future(store.atomic(order.append, "claim"))
        read = asyncio.ensure_future(store.run(order.append, "request"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(blocker, small, read, *bulk)
        await store.close()
        return order

    assert asyncio.run(main()) == ["claim", "request", "bulk0", "bulk1", "bulk2"]


def test_store_read_runs_beside_the_writer_on_its_own_read_only_connection(db_path: Path) -> None:
    """Reads see every write that has returned, never wait for a write in
    progress (a page of hosts does not queue behind a batch of log lines),
    and cannot write."""
    wal = db_path.with_name(db_path.name + "-wal")

    async def main() -> None:
        store = Store(db_path)
        await store.open()
        try:
            await store.atomic(make_host, "web1")
            names = await store.read(lambda: [h.name for h in m.Host.select()])
            assert names == ["web1"]  # the committed write is visible at once
            reader = await store.read(threading.get_ident)
            writer = await store.run(threading.get_ident)
            assert reader != writer

            # a write holds the writer (and its transaction) open: reads go on
            release = threading.Event()
            entered = threading.Event()

            def slow_write() -> None:
                make_host("web2")
                entered.set()
                if not release.wait(10):
                    raise TimeoutError("never released")

            writing = asyncio.ensure_future(store.atomic(slow_write))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered.wait, 10)
            during = await asyncio.wait_for(
                store.read(lambda: sorted(h.name for h in m.Host.select())), 5
            )
            assert during == ["web1"]  # the uncommitted row is not seen
            release.set()
            await writing
            assert await store.read(lambda: m.Host.select().count()) == 2

            refused = ""
            try:
                await store.read(make_host, "sneaky")
            except pw.OperationalError as exc:
                refused = str(exc)  # (the exception is not kept: its frames hold a cursor)
            assert "readonly" in refused
            assert await store.run(lambda: m.Host.select().count()) == 2
        finally:
            await store.close()
        assert not wal.exists()  # both connections closed: the WAL was checkpointed away
        with pytest.raises(RuntimeError):
            await store.read(lambda: None)

    asyncio.run(main())


def test_migration_8_makes_each_hosts_repository_a_named_one_its_secrets_intact(
    db_path: Path,
) -> None:
    """A database at version 7: each host's own repository becomes one named
    after the host, the host's first; its ciphertexts still open, bound to
    what they were bound to."""
    from fleet.server.security.secrets import KEY_BYTES, SecretBox, repository_aad

    box = SecretBox(bytes(range(KEY_BYTES)))
    raw = sqlite3.connect(db_path)
    raw.execute(
        'CREATE TABLE "schema_version" ("version" INTEGER NOT NULL PRIMARY KEY, '
        '"name" TEXT NOT NULL, "applied_at" DATETIME NOT NULL)'
    )
    for version, name, statements in MIGRATIONS[:7]:
        for sql in statements:
            raw.execute(sql)
        raw.execute(
            "INSERT INTO schema_version VALUES (?, ?, '2026-01-01 00:00:00')", (version, name)
        )
    for host_id, name in ((1, "web1"), (2, "db1"), (3, "bare")):
        raw.execute(
            "INSERT INTO host (id, name, created_at, online, schedule_version, "
            "applied_schedule_version, last_seq) VALUES (?, ?, '2026-01-01 00:00:00', 0, 0, 0, 0)",
            (host_id, name),
        )
    for host_id in (1, 2):  # the old binding: repo:<host id>:<field>
        raw.execute(
            "INSERT INTO repo (host_id, url_enc, password_enc, env_names, env_enc, updated_at) "
            "VALUES (?, ?, ?, ?, ?, '2026-02-01 00:00:00')",
            (
                host_id,
                box.encrypt(f"/srv/restic/{host_id}", f"repo:{host_id}:url"),
                box.encrypt(f"pw-{host_id}", f"repo:{host_id}:password"),
                '["AWS_KEY"]' if host_id == 1 else "[]",
                box.encrypt('{"AWS_KEY": "k1"}', "repo:1:env") if host_id == 1 else None,
            ),
        )
    raw.commit()
    raw.close()
    database = open_database(db_path)
    try:
        assert current_version(database) == MIGRATIONS[-1][0]
        assert not database.table_exists("repo")
        # and each gets the default maintenance (migration 9)
        assert {
            (x.repository.name, x.forget_cron, x.check_subset) for x in m.Maintenance.select()
        } == {
            ("web1", "30 4 * * *", "5%"),
            ("db1", "30 4 * * *", "5%"),
        }
        by_name = {r.name: r for r in m.Repository.select()}
        assert set(by_name) == {"web1", "db1"}
        web = by_name["web1"]
        assert web.aad == "repo:1" and web.env_names == ["AWS_KEY"]
        assert box.decrypt(bytes(web.url_enc), repository_aad(web.aad, "url")) == "/srv/restic/1"
        assert box.decrypt(bytes(web.password_enc), repository_aad(web.aad, "password")) == "pw-1"
        env = box.decrypt(bytes(web.env_enc), repository_aad(web.aad, "env"))
        assert env == '{"AWS_KEY": "k1"}'
        links = {(h.host.name, h.repository.name, h.position) for h in m.HostRepository.select()}
        assert links == {("web1", "web1", 0), ("db1", "db1", 0)}
        assert m.HostRepository.get(m.HostRepository.host == 1).attached_at == dt.datetime(
            2026, 2, 1
        )
    finally:
        database.close()


def test_migration_10_binds_jobs_snapshots_sizes_and_locks_to_the_hosts_repository(
    db_path: Path,
) -> None:
    """A database at version 9: each job, snapshot and size row of a host
    belongs to its (only) repository afterwards; its lock count moves to the
    repository; a host without one keeps unbound jobs and loses nothing."""
    raw = sqlite3.connect(db_path)
    raw.execute(
        'CREATE TABLE "schema_version" ("version" INTEGER NOT NULL PRIMARY KEY, '
        '"name" TEXT NOT NULL, "applied_at" DATETIME NOT NULL)'
    )
    for version, name, statements in MIGRATIONS[:9]:
        for sql in statements:
            raw.execute(sql)
        raw.execute(
            "INSERT INTO schema_version VALUES (?, ?, '2026-01-01 00:00:00')", (version, name)
        )
    t = "'2026-01-01 00:00:00'"
    for host_id, name, locks in ((1, "web1", 2), (2, "bare", None)):
        raw.execute(
            "INSERT INTO host (id, name, created_at, online, schedule_version, "
            f"applied_schedule_version, last_seq, repo_locks) VALUES (?, ?, {t}, 0, 0, 0, 0, ?)",
            (host_id, name, locks),
        )
        raw.execute(
            "INSERT INTO job (uid, host_id, kind, status, actor_kind, params, created_at) "
            f"VALUES (?, ?, 'backup', 'succeeded', 'user', '{{}}', {t})",
            (f"u{host_id}", host_id),
        )
    raw.execute(
        "INSERT INTO repository (id, name, url_enc, password_enc, env_names, aad, created_at, "
        f"updated_at) VALUES (7, 'main', x'00', x'00', '[]', 'repository:7', {t}, {t})"
    )
    raw.execute(f"INSERT INTO host_repository VALUES (1, 7, 0, {t})")
    raw.execute(
        "INSERT INTO repository (id, name, url_enc, password_enc, env_names, aad, created_at, "
        f"updated_at) VALUES (8, 'old', x'00', x'00', '[]', 'repository:8', {t}, {t})"
    )
    raw.execute(  # a prune made for the repository the host used before: it names it
        "INSERT INTO job (uid, host_id, kind, status, actor_kind, params, created_at) VALUES "
        f"""('u9', 1, 'prune', 'succeeded', 'system', '{{"repository": "old"}}', {t})"""
    )
    raw.execute(
        "INSERT INTO snapshot (host_id, snapshot_id, short_id, time, hostname, paths, tags) "
        f"VALUES (1, 'abc', 'abc', {t}, 'web1', '[]', '[]')"
    )
    raw.execute(
        "INSERT INTO repo_stats (host_id, size_bytes, raw_size_bytes, snapshot_count, "
        f"updated_at) VALUES (1, 100, 40, 3, {t})"
    )
    raw.execute(
        "INSERT INTO repo_stats (host_id, size_bytes, snapshot_count, "
        f"updated_at) VALUES (2, 5, 1, {t})"
    )
    raw.commit()
    raw.close()
    database = open_database(db_path)
    try:
        assert current_version(database) == MIGRATIONS[-1][0]
        jobs = {(j.host.name, j.kind): j.repository_id for j in m.Job.select()}
        assert jobs == {("web1", "backup"): 7, ("web1", "prune"): 8, ("bare", "backup"): None}
        assert [(s.snapshot_id, s.repository_id) for s in m.Snapshot.select()] == [("abc", 7)]
        stats = [
            (s.host_id, s.repository_id, s.size_bytes, s.raw_size_bytes)
            for s in m.RepoStats.select()
        ]
        assert stats == [(1, 7, 100, 40)]  # a host without a repository had no sizes to keep
        repo = m.Repository.get_by_id(7)
        assert repo.locks == 2
        assert all(g.repository_id is None for g in m.SourceGroup.select())
    finally:
        database.close()


def test_a_long_scan_holds_up_neither_reads_nor_writes(db_path: Path) -> None:
    """Whole-fleet reads (status, /metrics, the alerts' look) run on a thread
    and connection of their own: small reads and writes go on beside one, and
    it cannot write either."""
    wal = db_path.with_name(db_path.name + "-wal")

    async def main() -> None:
        store = Store(db_path)
        await store.open()
        try:
            await store.atomic(make_host, "web1")
            release = threading.Event()
            entered = threading.Event()

            def long_scan() -> list[str]:
                entered.set()
                if not release.wait(10):
                    raise TimeoutError("never released")
                return [h.name for h in m.Host.select()]

            scanning = asyncio.ensure_future(store.scan(long_scan))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, entered.wait, 10)
            ids = {
                await asyncio.wait_for(store.read(threading.get_ident), 5),
                await asyncio.wait_for(store.run(threading.get_ident), 5),
            }
            assert len(ids) == 2
            await asyncio.wait_for(store.atomic(make_host, "web2"), 5)
            assert await asyncio.wait_for(store.read(lambda: m.Host.select().count()), 5) == 2
            assert not scanning.done()
            release.set()
            assert sorted(await scanning) == ["web1", "web2"]  # its first read came after web2

            refused = ""
            try:
                await store.scan(make_host, "sneaky")
            except pw.OperationalError as exc:
                refused = str(exc)
            assert "readonly" in refused
        finally:
            await store.close()
        assert not wal.exists()  # all three connections closed

    asyncio.run(main())
