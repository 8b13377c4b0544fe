"""The statements of history pruning (the rule is in scheduling/history.py):
which ended jobs may go, a few hosts at a time, and the deletion of a batch
of them with their log lines."""

from __future__ import annotations

import datetime as dt

from ....common.protocol import FINAL_STATUSES
from . import execute, rows, when

FAILURES = ("failed", "lost")  # the newest of these is kept, however old

_FINAL = ", ".join("?" for _ in FINAL_STATUSES)


def hosts_after(after: int, limit: int) -> list[int]:
    """Ids of the next `limit` hosts after id `after`, in order."""
    return [
        r[0]
        for r in rows('SELECT "id" FROM "host" WHERE "id" > ? ORDER BY "id" LIMIT ?', after, limit)
    ]


def prunable(first: int, last: int, cutoff: dt.datetime, keep: int) -> list[tuple[int, int]]:
    """(id, log lines) of the prunable jobs of hosts `first`..`last`, oldest
    first: ended before `cutoff`, not among the `keep` newest ended jobs of
    their (host, group, kind), not the newest failed or lost one of it. A
    NULL group is a partition of its own, so jobs without one go by (host,
    kind). One statement; the window only sees these hosts' ended jobs."""
    return [
        (r[0], r[1])
        for r in rows(
            'SELECT "id", (SELECT COUNT(*) FROM "job_log" AS "l" WHERE "l"."job_id" = "e"."id") '
            'FROM (SELECT "id", "created_at", "finished_at", '
            'ROW_NUMBER() OVER (PARTITION BY "host_id", "group_id", "kind" ORDER BY "id" DESC) '
            'AS "nth", MAX(CASE WHEN "status" IN (?, ?) THEN "id" END) '
            'OVER (PARTITION BY "host_id", "group_id", "kind") AS "last_failure" '
            f'FROM "job" WHERE "host_id" >= ? AND "host_id" <= ? AND "status" IN ({_FINAL})) AS "e" '
            'WHERE "nth" > ? AND ("last_failure" IS NULL OR "id" <> "last_failure") '
            'AND COALESCE("finished_at", "created_at") < ? ORDER BY "id"',
            *FAILURES,
            first,
            last,
            *FINAL_STATUSES,
            keep,
            when(cutoff),
        )
    ]


def delete_jobs(ids: list[int], cutoff: dt.datetime) -> tuple[int, int]:
    """Delete those of these jobs that are still prunable, with their log
    lines; (jobs, lines) deleted. Run in the caller's transaction.

    The ids were chosen from an earlier read: a job lost then may have been
    reported ended since (a new end time, or no longer a failure, which
    makes an older failure the newest again), so those two conditions are
    checked again. Being among the newest `keep` cannot have changed: ended
    jobs only become more numerous."""
    marks = ", ".join("?" for _ in ids)
    gone = [
        r[0]
        for r in rows(
            f'SELECT "id" FROM "job" AS "j" WHERE "id" IN ({marks}) AND "status" IN ({_FINAL}) '
            'AND COALESCE("finished_at", "created_at") < ? '
            'AND ("status" NOT IN (?, ?) OR EXISTS (SELECT 1 FROM "job" AS "n" '
            'WHERE "n"."host_id" = "j"."host_id" AND "n"."kind" = "j"."kind" '
            'AND ("n"."group_id" = "j"."group_id" '
            'OR ("n"."group_id" IS NULL AND "j"."group_id" IS NULL)) '
            'AND "n"."status" IN (?, ?) AND "n"."id" > "j"."id"))',
            *ids,
            *FINAL_STATUSES,
            when(cutoff),
            *FAILURES,
            *FAILURES,
        )
    ]
    if not gone:
        return 0, 0
    marks = ", ".join("?" for _ in gone)
    # the lines first, in one statement: the job's ON DELETE CASCADE would
    # find none left, and the count is the statement's own
    lines = execute(f'DELETE FROM "job_log" WHERE "job_id" IN ({marks})', *gone).rowcount
    jobs = execute(f'DELETE FROM "job" WHERE "id" IN ({marks})', *gone).rowcount
    return jobs, lines
