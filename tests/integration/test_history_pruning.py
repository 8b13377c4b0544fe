"""History pruning on a real fleetd: old job rows are written into its
store (SQLite file or PostgreSQL) while it is stopped; started again with a short history and its
first pruning at once, it deletes the old ended jobs with their log lines
and keeps the newest of each host, group and kind, the last failure, the
jobs still queued, the recent ones, and the audit log."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from typing import Any


def stamp(days_ago: float) -> str:
    when = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=days_ago)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def seed(fx: Any, data_dir: Path, host: str, group: str) -> dict[str, int]:
    """Jobs by name (3 log lines each); those named "gone..." are to go with
    --history-days 30 --history-keep 2."""
    jobs = [
        # name, kind, group?, status, ended days ago (None: still queued)
        ("gone-older-failure", "backup", True, "failed", 310),
        ("last-failure", "backup", True, "failed", 300),
        ("gone-1", "backup", True, "succeeded", 250),
        ("gone-2", "backup", True, "warning", 240),
        ("gone-3", "backup", True, "succeeded", 230),
        ("second-newest", "backup", True, "succeeded", 220),
        ("newest", "backup", True, "succeeded", 1),
        ("queued", "backup", True, "queued", None),
        ("gone-prune-1", "prune", False, "succeeded", 200),
        ("gone-prune-2", "prune", False, "cancelled", 190),
        ("prune-3", "prune", False, "succeeded", 180),
        ("prune-4", "prune", False, "succeeded", 170),
        ("recent-forget-1", "forget", False, "succeeded", 3),
        ("recent-forget-2", "forget", False, "succeeded", 2),
        ("recent-forget-3", "forget", False, "succeeded", 1),
    ]
    ids = {}
    with fx.store_sql(data_dir) as sql:
        ((host_id, group_id),) = sql(
            'SELECT "h"."id", "g"."id" FROM "host" AS "h" JOIN "source_group" AS "g" '
            'ON "g"."host_id" = "h"."id" WHERE "h"."name" = ? AND "g"."name" = ?',
            host,
            group,
        )
        for name, kind, grouped, status, ended in jobs:
            created = stamp(ended + 0.01 if ended is not None else 400)
            ((job_id,),) = sql(
                'INSERT INTO "job" ("uid", "host_id", "kind", "status", "actor_kind", "group_id", '
                '"group_name", "params", "created_at", "finished_at") '
                "VALUES (?, ?, ?, ?, 'system', ?, ?, '{}', ?, ?) RETURNING \"id\"",
                uuid.uuid4().hex,
                host_id,
                kind,
                status,
                group_id if grouped else None,
                group if grouped else None,
                created,
                stamp(ended) if ended is not None else None,
            )
            for seq in (1, 2, 3):
                sql(
                    'INSERT INTO "job_log" ("job_id", "seq", "ts", "stream", "payload") '
                    "VALUES (?, ?, ?, 'stdout', ?)",
                    job_id,
                    seq,
                    created,
                    f"line {seq}",
                )
            ids[name] = job_id
    return ids


def log_lines(fx: Any, data_dir: Path, job_ids: list[int]) -> int:
    marks = ", ".join("?" for _ in job_ids)
    with fx.store_sql(data_dir) as sql:
        return sql(f'SELECT COUNT(*) FROM "job_log" WHERE "job_id" IN ({marks})', *job_ids)[0][0]


def audit_rows(fx: Any, data_dir: Path) -> list[tuple]:
    with fx.store_sql(data_dir) as sql:
        return sql('SELECT * FROM "audit_log" ORDER BY "id"')


def test_old_jobs_go_with_their_logs_and_the_newest_and_last_failure_stay(
    fleetd_factory, fx
) -> None:
    fleet = fleetd_factory()
    host = fx.uniq("hist")
    fleet.ctl("enroll", host)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"])
    other = fx.uniq("hist")  # a host with nothing to prune
    fleet.ctl("enroll", other)
    assert fleet.fleetd.stop() == 0

    data_dir = fleet.data_dir
    ids = seed(fx, data_dir, host, "etc")
    audit = audit_rows(fx, data_dir)
    gone = {n for n in ids if n.startswith("gone")}
    kept = {ids[n] for n in ids if n not in gone}

    fleet.fleetd = fx.Fleetd(
        fleet.data_dir,
        fleet.fleetd.log_path,
        "--history-days",
        "30",
        "--history-keep",
        "2",
        "--history-delay",
        "0",
    ).start()

    def left() -> set[int]:
        return {j["id"] for j in fleet.rpc("jobs.list", host=host, limit=1000)}

    fx.wait_until(lambda: left() == kept, timeout=15, what="the old jobs to be pruned")
    assert log_lines(fx, data_dir, [ids[n] for n in gone]) == 0
    assert log_lines(fx, data_dir, sorted(kept)) == 3 * len(kept)
    assert [line["payload"] for line in fleet.rpc("jobs.log", id=ids["last-failure"])["lines"]] == [
        "line 1",
        "line 2",
        "line 3",
    ]
    assert fleet.rpc("jobs.show", id=ids["queued"])["status"] == "queued"
    try:
        fleet.rpc("jobs.show", id=ids["gone-1"])
    except fx.RpcError as exc:
        assert exc.code == "not_found"
    else:
        raise AssertionError("a pruned job is still there")
    assert audit_rows(fx, data_dir)[: len(audit)] == audit  # the audit log is not pruned
    report = fx.wait_until(
        lambda: re.search(
            r"fleetd.history: pruned (\d+) jobs and (\d+) log lines", fleet.fleetd.log()
        ),
        what="the pruning's log line",
    )
    assert (int(report.group(1)), int(report.group(2))) == (len(gone), 3 * len(gone))
