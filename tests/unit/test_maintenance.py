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


def test_forget_makes_one_job_per_group_with_retention_on_its_own_host(shared):
    repo, web, db = shared
    mt.run_due([], MONDAY)
    events: list = []
    mt.run_due(events, dt.datetime(2026, 5, 4, 4, 30))
    forgets = [j for j in jobs() if j.kind == "forget"]
    assert sorted((j.host_id, j.params["tag"], j.params["retention"]) for j in forgets) == [
        (web.id, "etc", {"keep_daily": 7}),
        (db.id, "dump", {"keep_last": 3}),
    ]
    assert all(j.actor_kind == "system" and j.params["repository"] == "shared" for j in forgets)
    assert "hosts" not in forgets[0].params  # each agent selects its own snapshots
    assert len(events) == 2  # queued: offered for dispatch once committed
    m = Maintenance.get(Maintenance.repository == repo.id)
    assert m.next_forget_at == dt.datetime(2026, 5, 5, 4, 30)  # the next day's
    # the next day, db-01's forget still waits (offline, say): not made twice
    (done,) = [j for j in forgets if j.host_id == web.id]
    lifecycle.end([], web.id, done.id, "succeeded")
    mt.run_due([], dt.datetime(2026, 5, 5, 4, 30))
    again = [j for j in jobs() if j.kind == "forget"]
    assert len(again) == 3 and again[-1].host_id == web.id


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
    # each group's forget goes to its own host (db-01's waits there till it is back)
    assert {j.host_id for j in jobs()} == {web.id, db.id}


def test_an_action_set_off_is_never_due(shared):
    repo, _, _ = shared
    Maintenance.update(forget_cron=None, prune_cron=None, check_cron=None).execute()
    assert mt.next_due() is None
    mt.run_due([], dt.datetime(2027, 1, 1))
    assert jobs() == []


def test_a_prune_still_waiting_is_not_made_again_and_an_unused_repository_is_quiet(shared, caplog):
    repo, web, db = shared
    mt.run_due([], MONDAY)
    sunday = dt.datetime(2026, 5, 10, 5, 0)
    mt.run_due([], sunday)
    mt.run_due([], sunday + dt.timedelta(days=7))  # the first prune never ran
    assert len([j for j in jobs() if j.kind == "prune"]) == 1
    HostRepository.delete().execute()
    Host.update(online=False).execute()
    mt.run_due([], sunday + dt.timedelta(days=14))
    assert "no host using it is online" not in caplog.text
