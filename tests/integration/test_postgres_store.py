"""The store on PostgreSQL (issue 13), first steps: a real server started
by the harness as an unprivileged user, and the models' tables created and
used on it through peewee and psycopg 3."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import peewee as pw

from fleet.server.store import models as m


def test_a_real_postgresql_runs_as_an_unprivileged_user(postgres):
    with postgres.connect() as conn:
        pid, user = conn.execute("SELECT pg_backend_pid(), current_user").fetchone()
        version = conn.execute("SHOW server_version_num").fetchone()[0]
    assert user == "fleet" and int(version) >= 150000
    uid = next(
        line.split()[1]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
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
