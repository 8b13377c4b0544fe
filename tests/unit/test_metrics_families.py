"""fleet.server.metrics on a real SQLite file: a group's restore drills
show as its last proven time and its last drill's outcome, through
prometheus-client's own parser."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleet.server import metrics
from fleet.server.store.db import open_database
from fleet.server.store.models import Host, Job, SourceGroup

NOW = dt.datetime(2026, 5, 4, 12, 0)


def test_drills_show_as_last_proven_and_last_outcome(tmp_path: Path) -> None:
    database = open_database(tmp_path / "fleet.db")
    try:
        web = Host.create(name="web-01", online=True, enrolled_at=NOW)
        good = SourceGroup.create(host=web, name="www", includes=["/var/www"])
        bad = SourceGroup.create(host=web, name="db", includes=["/var/db"])
        proven_at = NOW - dt.timedelta(hours=2)
        for group, status, ended in (
            (good, "succeeded", proven_at),
            (bad, "succeeded", NOW - dt.timedelta(days=3)),
            (bad, "failed", NOW - dt.timedelta(hours=1)),
        ):
            Job.create(
                host=web,
                kind="drill",
                status=status,
                actor_kind="system",
                group=group,
                group_name=group.name,
                started_at=ended - dt.timedelta(minutes=1),
                finished_at=ended,
                summary={"drill": {"snapshot": "a" * 64, "files": 20, "mismatches": 0}},
            )
        text = metrics.render(metrics.families(NOW)).decode()
    finally:
        database.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    www = (("group", "www"), ("host", "web-01"))
    db = (("group", "db"), ("host", "web-01"))
    assert samples[("fleet_group_last_proven_timestamp_seconds", www)] == (
        proven_at.replace(tzinfo=dt.timezone.utc).timestamp()
    )
    assert samples[("fleet_group_last_drill_ok", www)] == 1
    assert samples[("fleet_group_last_drill_ok", db)] == 0  # its last one failed
    assert ("fleet_group_last_proven_timestamp_seconds", db) in samples  # proven before
    assert samples[("fleet_problems", (("kind", "drill_failed"), ("severity", "critical")))] == 1
