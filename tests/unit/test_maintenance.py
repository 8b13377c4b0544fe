"""fleet.server.scheduling.maintenance on a real SQLite file, with the time
given: defaults, due times, the jobs each action makes on the least busy
online host, and a skip (then a catch-up) when no host is online."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fleet.server.jobs import lifecycle
from fleet.server.scheduling import maintenance as mt
from fleet.server.store.db import open_database
from fleet.server.store.models import (
    Host,
    HostRepository,
    Job,
    Maintenance,
    Repository,
    SourceGroup,
)

MONDAY = dt.datetime(2026, 5, 4, 0, 0)


@pytest.fixture
def shared(tmp_path: Path):
    """Repository 'shared' used by web-01 (online, two groups, one without
    retention) and db-01 (online, one group)."""
    database = open_database(tmp_path / "fleet.db")
    repo = Repository.create(name="shared", url_enc=b"u", password_enc=b"p", aad="x")
    mt.defaults(repo.id, MONDAY)
    web = Host.create(name="web-01", online=True)
    db = Host.create(name="db-01", online=True)
    for h in (web, db):
        HostRepository.create(host=h, repository=repo)
    SourceGroup.create(host=web, name="etc", includes=["/etc"], retention={"keep_daily": 7})
    SourceGroup.create(host=web, name="tmp", includes=["/tmp"], retention={})
    SourceGroup.create(host=db, name="dump", includes=["/var/dump"], retention={"keep_last": 3})
    yield repo, web, db
    database.close()


def jobs() -> list[Job]:
    return list(Job.select().order_by(Job.id))


def test_a_new_repository_gets_the_defaults_due_from_now(shared):
    repo, _, _ = shared
    m = Maintenance.get(Maintenance.repository == repo.id)
    assert (m.forget_cron, m.prune_cron, m.check_cron, m.check_subset) == (
        "30 4 * * *",
        "0 5 * * 0",
        "0 6 * * 3",
        "5%",
    )
    assert mt.next_due() == dt.datetime.min  # times not computed yet: look now
    mt.run_due([], MONDAY)
    m = Maintenance.get(Maintenance.repository == repo.id)
    assert m.next_forget_at == dt.datetime(2026, 5, 4, 4, 30)
    assert m.next_prune_at == dt.datetime(2026, 5, 10, 5, 0)  # Sunday
    assert m.next_check_at == dt.datetime(2026, 5, 6, 6, 0)  # Wednesday
    assert mt.next_due() == dt.datetime(2026, 5, 4, 4, 30)
    assert jobs() == []  # nothing was due


def test_forget_makes_one_job_per_group_with_retention_of_every_host_on_one_runner(shared):
    repo, web, db = shared
    mt.run_due([], MONDAY)
    lifecycle.create([], web.id, "backup", "user")  # web-01 is busy: db-01 runs it
    events: list = []
    mt.run_due(events, dt.datetime(2026, 5, 4, 4, 30))
    forgets = [j for j in jobs() if j.kind == "forget"]
    assert {j.host_id for j in forgets} == {db.id}
    assert sorted((j.params["tag"], j.params["hosts"], j.params["retention"]) for j in forgets) == [
        ("dump", ["db-01"], {"keep_last": 3}),
        ("etc", ["web-01"], {"keep_daily": 7}),
    ]
    assert all(j.actor_kind == "system" and j.params["repository"] == "shared" for j in forgets)
    assert len(events) == 2  # queued: offered for dispatch once committed
    m = Maintenance.get(Maintenance.repository == repo.id)
    assert m.next_forget_at == dt.datetime(2026, 5, 5, 4, 30)  # the next day's


def test_prune_and_check_make_one_job_each_with_the_subset(shared):
    repo, web, _ = shared
    mt.run_due([], MONDAY)
    mt.run_due([], dt.datetime(2026, 5, 10, 6, 0))  # after Sunday's prune, Wednesday's check
    made = {j.kind: j for j in jobs()}
    assert set(made) == {"forget", "prune", "check"}
    assert made["check"].params["read_data_subset"] == "5%"
    assert "read_data_subset" not in made["prune"].params


def test_with_no_host_online_an_action_is_skipped_and_caught_up_later(shared):
    repo, web, db = shared
    mt.run_due([], MONDAY)
    Host.update(online=False).execute()
    due = dt.datetime(2026, 5, 4, 4, 30)
    mt.run_due([], due)
    assert jobs() == []
    m = Maintenance.get(Maintenance.repository == repo.id)
    assert m.next_forget_at == due + mt.OFFLINE_RETRY
    Host.update(online=True).where(Host.id == web.id).execute()
    mt.run_due([], due + mt.OFFLINE_RETRY)
    assert {j.host_id for j in jobs()} == {web.id}


def test_an_action_set_off_is_never_due(shared):
    repo, _, _ = shared
    Maintenance.update(forget_cron=None, prune_cron=None, check_cron=None).execute()
    assert mt.next_due() is None
    mt.run_due([], dt.datetime(2027, 1, 1))
    assert jobs() == []
