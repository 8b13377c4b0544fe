"""The operator's big reads as plain SQL: a page of 500 hosts through the
ORM built 1,000 model objects (every column of each host and of its newest
backup job, JSON fields decoded) to use nine values of each."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple, Optional, Union

from . import rows


class HostRow(NamedTuple):
    name: str
    enrolled: bool  # an agent redeemed the host's enrollment
    online: bool
    last_seen_at: Optional[str]  # as stored: "YYYY-MM-DD HH:MM:SS[.ffffff]"
    agent_version: Optional[str]
    restic_version: Optional[str]
    repo_locks: Optional[int]
    backup_id: Optional[int]  # the newest backup job, if any
    backup_status: Optional[str]
    backup_created_at: Optional[str]
    backup_finished_at: Optional[str]  # None while it has not ended
    schedule_lagging: bool  # its agent has not acknowledged the latest schedule set
    labels: str  # as stored: a JSON object
    tls_trust: Optional[str]  # how its agent trusts fleetd (Host.tls_trust)
    tls_pins: Optional[str]  # as stored: a JSON list
    served_pin: Optional[str]  # the key fleetd serves (the same on every row)


def hosts_page(after: Optional[str], limit: int) -> list[HostRow]:
    """Hosts by name after `after` (None: from the first), at most `limit`,
    each with its newest backup job: one statement."""
    where = 'WHERE "h"."name" > ? ' if after is not None else ""
    params = ([after] if after is not None else []) + [limit]
    return [
        HostRow(*row)
        for row in rows(
            'SELECT "h"."name", "h"."agent_token_hash" IS NOT NULL, "h"."online", '
            '"h"."last_seen_at", "h"."agent_version", "h"."restic_version", "h"."repo_locks", '
            '"j"."id", "j"."status", "j"."created_at", "j"."finished_at", '
            '"h"."applied_schedule_version" < "h"."schedule_version", "h"."labels", '
            '"h"."tls_trust", "h"."tls_pins", '
            '(SELECT "t"."pin" FROM "tls_key" AS "t" WHERE "t"."state" = ?) '
            'FROM "host" AS "h" LEFT OUTER JOIN "job" AS "j" ON "j"."id" = ('
            'SELECT "n"."id" FROM "job" AS "n" WHERE "n"."host_id" = "h"."id" '
            'AND "n"."kind" = ? ORDER BY "n"."created_at" DESC, "n"."id" DESC LIMIT 1) '
            f'{where}ORDER BY "h"."name" LIMIT ?',
            "served",
            "backup",
            *params,
        )
    ]


def served_pin() -> Optional[str]:
    """The pin of the key fleetd serves, as recorded at its start and at each
    activation (None: it serves no TLS itself)."""
    found = rows('SELECT "pin" FROM "tls_key" WHERE "state" = ?', "served")
    return found[0][0] if found else None


def wire_time(stored: Union[str, dt.datetime, None]) -> Optional[str]:
    """A stored time as the wire has it (RFC 3339, to the second): SQLite's
    text cut without parsing it into a datetime first; PostgreSQL's driver
    hands a datetime already."""
    if stored is None:
        return None
    if isinstance(stored, dt.datetime):
        return stored.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stored[:10]}T{stored[11:19]}Z"
