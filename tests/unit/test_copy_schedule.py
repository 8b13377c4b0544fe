"""fleet.server.scheduling.copies on a real SQLite file, with the time
given: a group copied on its own schedule gets one copy job naming its
snapshots since the last copy, none while one waits or nothing is new, and
no copy after each backup."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fleet.server.jobs import lifecycle
from fleet.server.scheduling import copies
from fleet.server.store.db import open_database
from fleet.server.store.models import (
    Host,
    HostRepository,
    Job,
    Repository,
    Snapshot,
    SourceGroup,
)

T0 = dt.datetime(2026, 5, 4, 0, 30)


@pytest.fixture
def setup(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    main = Repository.create(name="main", url_enc=b"u", password_enc=b"p", aad="x")
    offsite = Repository.create(name="offsite", url_enc=b"u", password_enc=b"p", aad="y")
    web = Host.create(name="web-01", online=True)
    HostRepository.create(host=web, repository=main, position=0)
    HostRepository.create(host=web, repository=offsite, position=1)
    group = SourceGroup.create(
        host=web, name="www", includes=["/var/www"], copy_to=offsite, copy_cron="0 2 * * *"
    )
    yield main, offsite, web, group
    database.close()


def snap(web: Host, repo: Repository, sid: str, at: dt.datetime, tag: str = "www") -> None:
    Snapshot.create(
        host=web,
        repository=repo,
        snapshot_id=sid,
        short_id=sid[:8],
        time=at,
        hostname="web-01",
        paths=["/var/www"],
        tags=[tag],
    )


def copy_jobs() -> list[Job]:
    return list(Job.select().where(Job.kind == "copy").order_by(Job.id))


def test_a_scheduled_copy_names_the_snapshots_since_the_last_one(setup):
    main, offsite, web, group = setup
    assert copies.next_due() == dt.datetime.min  # not computed yet: look now
    copies.run_due([], T0)
    assert copies.next_due() == dt.datetime(2026, 5, 4, 2, 0)
    snap(web, main, "a" * 64, dt.datetime(2026, 5, 3, 1))
    snap(web, main, "b" * 64, dt.datetime(2026, 5, 4, 1))
    snap(web, main, "c" * 64, dt.datetime(2026, 5, 4, 1, 30), tag="other")  # another group's
    snap(web, offsite, "d" * 64, dt.datetime(2026, 5, 4, 1, 40))  # a copy: not copied again
    copies.run_due([], dt.datetime(2026, 5, 4, 1, 59))
    assert copy_jobs() == []  # not due yet
    copies.run_due([], dt.datetime(2026, 5, 4, 2, 0))
    (job,) = copy_jobs()
    assert (job.repository_id, job.from_repository_id, job.actor_kind) == (
        offsite.id,
        main.id,
        "system",
    )
    assert job.params == {"group": "www", "tag": "www", "snapshots": ["a" * 64, "b" * 64]}
    assert copies.next_due() == dt.datetime(2026, 5, 5, 2, 0)

    # still queued the next night: not made again
    snap(web, main, "e" * 64, dt.datetime(2026, 5, 5, 1))
    copies.run_due([], dt.datetime(2026, 5, 5, 2, 0))
    assert len(copy_jobs()) == 1
    # it failed for good: the next takes its snapshots again, with what is new
    lifecycle.end([], web.id, job.id, "failed", error="offsite unreachable")
    copies.run_due([], dt.datetime(2026, 5, 6, 2, 0))
    again = copy_jobs()[-1]
    assert again.params["snapshots"] == ["a" * 64, "b" * 64, "e" * 64]
    # it got through: the next takes only what is newer
    lifecycle.end([], web.id, again.id, "succeeded")
    assert SourceGroup.get_by_id(group.id).copied_until == dt.datetime(2026, 5, 5, 1)
    snap(web, main, "f" * 64, dt.datetime(2026, 5, 6, 1))
    copies.run_due([], dt.datetime(2026, 5, 7, 2, 0))
    last = copy_jobs()[-1]
    assert last.params["snapshots"] == ["f" * 64]
    # nothing new: no job
    lifecycle.end([], web.id, last.id, "succeeded")
    copies.run_due([], dt.datetime(2026, 5, 8, 2, 0))
    assert len(copy_jobs()) == 3


def test_a_group_copied_on_a_schedule_is_not_copied_after_each_backup(setup):
    main, offsite, web, group = setup
    events: list = []
    backup = lifecycle.create(events, web.id, "backup", "user", group=group)
    assert backup.repository_id == main.id
    lifecycle.end(events, web.id, backup.id, "succeeded", summary={"snapshot_id": "abcdef12"})
    assert copy_jobs() == []
    SourceGroup.update(copy_cron=None).where(SourceGroup.id == group.id).execute()
    again = lifecycle.create(events, web.id, "backup", "user", group=group)
    lifecycle.end(events, web.id, again.id, "succeeded", summary={"snapshot_id": "abcdef34"})
    (job,) = copy_jobs()
    assert job.params["snapshots"] == ["abcdef34"] and job.repository_id == offsite.id
    # a failed backup, or one that saved no snapshot, is not copied
    for status, summary in (("failed", {"snapshot_id": "abcdef56"}), ("succeeded", {})):
        other = lifecycle.create(events, web.id, "backup", "user", group=group)
        lifecycle.end(events, web.id, other.id, status, summary=summary)
    assert len(copy_jobs()) == 1
