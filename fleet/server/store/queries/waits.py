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
from .hot import EXCLUSIVE, WITH_AGENT, WRITERS


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
    # the repositories these jobs work on (a copy: both ends), by name
    wanted = sorted(
        {r for j in queued for r in (j.repository_id, j.from_repository_id) if r is not None}
    )
    names: dict[int, str] = {}
    others: dict[int, list[tuple[int, str, str, str, int, Any, bool]]] = defaultdict(list)
    if wanted:
        names = dict(
            rows(
                f'SELECT "id", "name" FROM "repository" WHERE "id" IN ({_marks(len(wanted))})',
                *wanted,
            )
        )
        for rid, source, jid, kind, status, hid, name, not_before, on in rows(
            'SELECT "j"."repository_id", "j"."from_repository_id", "j"."id", "j"."kind", '
            '"j"."status", "j"."host_id", "h"."name", "j"."not_before", "h"."online" '
            'FROM "job" AS "j" JOIN "host" AS "h" ON "h"."id" = "j"."host_id" '
            f'WHERE ("j"."repository_id" IN ({_marks(len(wanted))}) '
            f'OR "j"."from_repository_id" IN ({_marks(len(wanted))})) '
            'AND ("j"."status" IN (?, ?) OR ("j"."status" = \'queued\' '
            f'AND "j"."kind" IN ({_marks(len(EXCLUSIVE))}) AND "j"."agent_job" IS NULL)) '
            'ORDER BY "j"."id"',
            *wanted,
            *wanted,
            *WITH_AGENT,
            *EXCLUSIVE,
        ):
            row = (jid, kind, status, name, hid, not_before, bool(on))
            for r in {rid, source} - {None}:
                others[r].append(row)
    stamp = when(now)
    out: dict[int, str] = {}
    for j in queued:
        why = _why(j, now, stamp, online, busy, names, others)
        if why:
            out[j.id] = why
    return out


def _why(
    j: Job,
    now: dt.datetime,
    stamp: Any,
    online: dict[int, bool],
    busy: dict[int, tuple[int, str]],
    names: dict[int, str],
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
    if j.kind not in (*WRITERS, *alone):
        return None
    for rid in (j.repository_id, j.from_repository_id):
        why = _repository_wait(j, stamp, names.get(rid, "?"), others.get(rid, ()), alone)
        if why:
            return why
    return None


def _repository_wait(j: Job, stamp: Any, repo: str, others: Any, alone: tuple) -> Optional[str]:
    for jid, kind, status, name, hid, not_before, on in others:
        if hid == j.host_id:
            continue
        running = status in WITH_AGENT
        if j.kind in alone and running and (kind in WRITERS or kind in alone):
            return f"repository {repo}: {kind} job {jid} of {name} runs"
        if j.kind in WRITERS and kind in alone:
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
