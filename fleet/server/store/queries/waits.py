"""What queued jobs wait for, in words, for `jobs list` and `jobs show`: the
same rules as the claim (hot.claim), read for a page of jobs in four
queries, not one a job."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any, Optional

from ....common.timefmt import iso
from ..models import Job
from . import rows, when
from .hot import EXCLUSIVE, WITH_AGENT


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def reasons(jobs: list[Job], now: dt.datetime) -> dict[int, str]:
    """job id -> why it is still queued, for the queued ones among `jobs`
    (none when it goes out at the next look)."""
    queued = [j for j in jobs if j.status == "queued"]
    if not queued:
        return {}
    hosts = sorted({j.host_id for j in queued})
    online = {
        hid: bool(on)
        for hid, on in rows(
            f'SELECT "id", "online" FROM "host" WHERE "id" IN ({_marks(len(hosts))})', *hosts
        )
    }
    busy: dict[int, tuple[int, str]] = {}
    for hid, jid, kind in rows(
        'SELECT "host_id", "id", "kind" FROM "job" '
        f'WHERE "host_id" IN ({_marks(len(hosts))}) AND "status" IN (?, ?)',
        *hosts,
        *WITH_AGENT,
    ):
        busy[hid] = (jid, kind)
    repo_of: dict[int, tuple[int, str]] = {}
    for hid, rid, name in rows(
        'SELECT "hr"."host_id", "r"."id", "r"."name" FROM "host_repository" AS "hr" '
        'JOIN "repository" AS "r" ON "r"."id" = "hr"."repository_id" '
        f'WHERE "hr"."host_id" IN ({_marks(len(hosts))}) ORDER BY "hr"."position" DESC',
        *hosts,
    ):
        repo_of[hid] = (rid, name)  # the first position last: it wins
    others: dict[int, list[tuple[int, str, str, str, int, Any, bool]]] = defaultdict(list)
    repos = sorted({rid for rid, _ in repo_of.values()})
    if repos:
        for rid, jid, kind, status, hid, name, not_before, on in rows(
            'SELECT "hr"."repository_id", "j"."id", "j"."kind", "j"."status", "j"."host_id", '
            '"h"."name", "j"."not_before", "h"."online" FROM "job" AS "j" '
            'JOIN "host_repository" AS "hr" ON "hr"."host_id" = "j"."host_id" '
            'JOIN "host" AS "h" ON "h"."id" = "j"."host_id" '
            f'WHERE "hr"."repository_id" IN ({_marks(len(repos))}) '
            'AND ("j"."status" IN (?, ?) OR ("j"."status" = \'queued\' '
            f'AND "j"."kind" IN ({_marks(len(EXCLUSIVE))}) AND "j"."agent_job" IS NULL)) '
            'ORDER BY "j"."id"',
            *repos,
            *WITH_AGENT,
            *EXCLUSIVE,
        ):
            others[rid].append((jid, kind, status, name, hid, not_before, bool(on)))
    stamp = when(now)
    out: dict[int, str] = {}
    for j in queued:
        why = _why(j, now, stamp, online, busy, repo_of, others)
        if why:
            out[j.id] = why
    return out


def _why(
    j: Job,
    now: dt.datetime,
    stamp: Any,
    online: dict[int, bool],
    busy: dict[int, tuple[int, str]],
    repo_of: dict[int, tuple[int, str]],
    others: dict[int, list],
) -> Optional[str]:
    if j.agent_job is not None:
        return "its agent runs it on its own"
    if j.not_before is not None and j.not_before > now:
        return f"a retry, due at {iso(j.not_before)}"
    if not online.get(j.host_id):
        return "its host is offline"
    if j.host_id in busy:
        jid, kind = busy[j.host_id]
        return f"its host runs job {jid} ({kind})"
    alone = (*EXCLUSIVE, "init")  # see hot.claim
    if j.host_id not in repo_of or j.kind not in ("backup", *alone):
        return None
    rid, repo = repo_of[j.host_id]
    for jid, kind, status, name, hid, not_before, on in others[rid]:
        if hid == j.host_id:
            continue
        running = status in WITH_AGENT
        if j.kind in alone and running and (kind == "backup" or kind in alone):
            return f"repository {repo}: {kind} job {jid} of {name} runs"
        if j.kind == "backup" and kind in alone:
            if running:
                return f"repository {repo}: {kind} job {jid} of {name} runs"
            if (
                kind in EXCLUSIVE
                and jid < j.id
                and on
                and (not_before is None or str(not_before) <= str(stamp))
            ):
                return f"repository {repo}: {kind} job {jid} of {name} goes first"
    return None
