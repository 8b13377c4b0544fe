"""The statements of an agent's connect, of a run-now and of a dispatch."""

from __future__ import annotations

import datetime as dt
import json
from typing import Optional

from ..models import AuditLog, Job
from . import execute, execute_many, on_postgresql, one, rows, when

WITH_AGENT = ("dispatched", "running")
# advisory lock keys of repositories being claimed on (PostgreSQL): this + id
CLAIMS = 0x666C6574 << 32


class Contended(Exception):
    """Another replica is claiming a job on a repository of this host's
    right now: the host is looked at again a moment later."""

    def __init__(self, host_id: int) -> None:
        super().__init__(f"host {host_id}: a repository of its is being claimed on elsewhere")
        self.host_id = host_id


def hold_repositories(host_id: int) -> bool:
    """On PostgreSQL, before a claim: the repositories the host's queued
    jobs would work on (its default for those naming none), each held to
    the end of the transaction, so that the repository rules of the claim
    read what another replica's claims on them wrote (one SQLite writer
    gives that for nothing; READ COMMITTED does not). Taken without
    waiting, in order (no deadlock): False when one is held elsewhere."""
    repositories = sorted(
        r
        for (r,) in rows(
            'SELECT "repository_id" FROM "job" WHERE "host_id" = ? AND "status" = ? '
            'UNION SELECT "from_repository_id" FROM "job" WHERE "host_id" = ? AND "status" = ? '
            f"UNION ({DEFAULT_REPOSITORY})",
            host_id,
            "queued",
            host_id,
            "queued",
            host_id,
        )
        if r is not None
    )
    for repository in repositories:
        (got,) = one("SELECT pg_try_advisory_xact_lock(?)", CLAIMS + repository)
        if not got:
            return False
    return True


def agent_by_token(token_hash: str) -> Optional[tuple[int, str]]:
    """(host id, host name) of an agent token's hash, or None."""
    return one('SELECT "id", "name" FROM "host" WHERE "agent_token_hash" = ?', token_hash)


def host_seq(host_id: int) -> tuple[str, int]:
    """(host name, last applied delivery seq)."""
    return one('SELECT "name", "last_seq" FROM "host" WHERE "id" = ?', host_id)


def set_seq(host_id: int, seq: int) -> None:
    execute('UPDATE "host" SET "last_seq" = ? WHERE "id" = ?', seq, host_id)


# the host's default repository: its first
DEFAULT_REPOSITORY = (
    'SELECT "repository_id" FROM "host_repository" WHERE "host_id" = ? '
    'ORDER BY "position", "attached_at" LIMIT 1'
)


def default_repository(host_id: int) -> Optional[int]:
    row = one(DEFAULT_REPOSITORY, host_id)
    return row[0] if row else None


def repo_secrets(host_id: int) -> list[tuple[int, str, bytes, bytes, Optional[bytes], str]]:
    """(id, name, url, password, env ciphertexts, what they are bound to) of
    each repository the host uses, its default first."""
    return rows(
        'SELECT "r"."id", "r"."name", "r"."url_enc", "r"."password_enc", "r"."env_enc", "r"."aad" '
        'FROM "host_repository" AS "hr" JOIN "repository" AS "r" ON "r"."id" = "hr"."repository_id" '
        'WHERE "hr"."host_id" = ? ORDER BY "hr"."position", "hr"."attached_at"',
        host_id,
    )


def jobs_with_agent(host_id: int) -> list[tuple[int, str]]:
    """(id, status) of the host's dispatched and running jobs."""
    return rows(
        'SELECT "id", "status" FROM "job" WHERE "host_id" = ? AND "status" IN (?, ?)',
        host_id,
        *WITH_AGENT,
    )


def cancels_pending(host_id: int) -> list[tuple[int, str]]:
    """(id, uid) of the host's jobs with its agent (an agent's own queued
    one too) whose cancel was asked for and that have not ended."""
    return rows(
        'SELECT "id", "uid" FROM "job" WHERE "host_id" = ? AND "cancel_requested_at" IS NOT NULL '
        'AND ("status" IN (?, ?) OR ("status" = ? AND "agent_job" IS NOT NULL)) ORDER BY "id"',
        host_id,
        *WITH_AGENT,
        "queued",
    )


def job_of_agent(host_id: int, agent_job: int) -> Optional[int]:
    """fleetd's id of the job the host's agent runs under its own id."""
    row = one('SELECT "id" FROM "job" WHERE "host_id" = ? AND "agent_job" = ?', host_id, agent_job)
    return row[0] if row else None


def needs_init(host_id: int) -> list[int]:
    """The repositories the host uses that no init job was made for since
    they were changed or the host took them."""
    return [
        row[0]
        for row in rows(
            'SELECT "hr"."repository_id" FROM "host_repository" AS "hr" '
            'JOIN "repository" AS "r" ON "r"."id" = "hr"."repository_id" '
            'WHERE "hr"."host_id" = ? AND NOT EXISTS (SELECT 1 FROM "job" AS "j" '
            'WHERE "j"."host_id" = "hr"."host_id" AND "j"."kind" = ? '
            'AND "j"."repository_id" = "hr"."repository_id" '
            'AND "j"."created_at" >= "r"."updated_at" AND "j"."created_at" >= "hr"."attached_at") '
            'ORDER BY "hr"."position", "hr"."attached_at"',
            host_id,
            "init",
        )
    ]


# jobs that take their repository for themselves (restic's exclusive lock,
# or Fleet's word for unlock): they wait until no backup into it runs, and
# backups wait while they run (or wait queued, on an online host, before them)
EXCLUSIVE = ("forget", "prune", "check", "unlock")
_IN_EXCLUSIVE = "(" + ", ".join(f"'{k}'" for k in EXCLUSIVE) + ")"
# an init too: two restic inits of one new repository at once could leave it
# with two master keys; one at a time, the next finds it and checks its key
_IN_ALONE = "(" + ", ".join(f"'{k}'" for k in (*EXCLUSIVE, "init")) + ")"
# jobs that write into a repository without taking it (restic's shared
# lock): backups, and copies (into one, reading the other)
WRITERS = ("backup", "copy")
_IN_WRITERS = "(" + ", ".join(f"'{k}'" for k in WRITERS) + ")"
_IN_WITH_AGENT = "(" + ", ".join(f"'{k}'" for k in WITH_AGENT) + ")"
# what makes job "o" of another host keep job "j" waiting when both work on
# one repository; its one parameter is the time now
_CONFLICT = (
    f'"o"."status" IN (\'queued\', \'dispatched\', \'running\') AND "o"."host_id" <> "j"."host_id" AND ('
    f'("j"."kind" IN {_IN_ALONE} AND "o"."status" IN {_IN_WITH_AGENT} '
    f'AND ("o"."kind" IN {_IN_WRITERS} OR "o"."kind" IN {_IN_ALONE})) '
    f'OR ("j"."kind" IN {_IN_WRITERS} AND "o"."kind" IN {_IN_ALONE} AND ("o"."status" IN {_IN_WITH_AGENT} '
    f'OR ("o"."status" = \'queued\' AND "o"."kind" IN {_IN_EXCLUSIVE} AND "o"."id" < "j"."id" '
    'AND "o"."agent_job" IS NULL AND ("o"."not_before" IS NULL OR "o"."not_before" <= ?) '
    'AND EXISTS (SELECT 1 FROM "host" AS "oh" WHERE "oh"."id" = "o"."host_id" AND "oh"."online")))))'
)
# one look per pair of ends (a copy has two), each an index search on the
# repository and the active statuses, never a walk of its history
_PAIRS = (
    ("repository_id", "repository_id"),
    ("from_repository_id", "repository_id"),
    ("repository_id", "from_repository_id"),
    ("from_repository_id", "from_repository_id"),
)
_REPOSITORY_BUSY = " OR ".join(
    f'EXISTS (SELECT 1 FROM "job" AS "o" WHERE "o"."{mine}" = "j"."{theirs}" AND {_CONFLICT})'
    for mine, theirs in _PAIRS
)


def claim(
    host_id: int, now: dt.datetime
) -> Optional[tuple[int, str, str, str, Optional[int], Optional[int], Optional[int]]]:
    """queued -> dispatched for the host's next due job, in one statement and
    only when none is with its agent and its repositories let it (see
    EXCLUSIVE); (id, kind, params JSON, uid, repository, from repository,
    the host's default repository) or None. A job an agent made
    itself (agent_job) is the agent's to run: never claimed."""
    stamp = when(now)
    if on_postgresql() and not hold_repositories(host_id):
        raise Contended(host_id)
    return one(
        'UPDATE "job" SET "status" = ?, "dispatched_at" = ? WHERE "status" = ? AND "id" = ('
        'SELECT "j"."id" FROM "job" AS "j" WHERE "j"."host_id" = ? AND "j"."status" = ? '
        'AND "j"."agent_job" IS NULL AND ("j"."not_before" IS NULL OR "j"."not_before" <= ?) '
        f"AND NOT ({_REPOSITORY_BUSY}) "
        'ORDER BY "j"."kind" <> ?, "j"."id" LIMIT 1) '
        'AND NOT EXISTS (SELECT 1 FROM "job" WHERE "host_id" = ? AND "status" IN (?, ?)) '
        'RETURNING "id", "kind", "params", "uid", "repository_id", "from_repository_id", '
        # the host's default, to tell a job off it (JobDispatched.off_default); a
        # value, not a test: SQLite 3.40 answers IS NULL wrongly in a RETURNING
        '(SELECT "hr"."repository_id" FROM "host_repository" AS "hr" '
        'WHERE "hr"."host_id" = "job"."host_id" ORDER BY "hr"."position", "hr"."attached_at" '
        "LIMIT 1)",
        "dispatched",
        stamp,
        "queued",
        host_id,
        "queued",
        stamp,
        *[stamp] * len(_PAIRS),
        "init",
        host_id,
        *WITH_AGENT,
    )


def sharing_hosts_waiting(host_id: int, job_id: Optional[int] = None) -> list[int]:
    """The other hosts with jobs queued on a repository this host uses, or
    that job `job_id` held (the host may have let it go meanwhile): the end
    of a job here may be what they wait for."""
    held = (
        'SELECT "repository_id" FROM "host_repository" WHERE "host_id" = ? '
        'UNION SELECT "repository_id" FROM "job" WHERE "id" = ? '
        'UNION SELECT "from_repository_id" FROM "job" WHERE "id" = ?'
    )
    return [
        row[0]
        for row in rows(
            f'WITH "held"("r") AS ({held}) '
            'SELECT "host_id" FROM "job" WHERE "status" = ? AND "host_id" <> ? '
            'AND "repository_id" IN (SELECT "r" FROM "held") '
            'UNION SELECT "host_id" FROM "job" WHERE "status" = ? AND "host_id" <> ? '
            'AND "from_repository_id" IN (SELECT "r" FROM "held")',
            host_id,
            job_id or 0,
            job_id or 0,
            "queued",
            host_id,
            "queued",
            host_id,
        )
    ]


def host_by_name(name: str) -> Optional[tuple[int, str]]:
    return one('SELECT "id", "name" FROM "host" WHERE "name" = ?', name)


JOB_COLUMNS = (
    "uid",
    "host_id",
    "kind",
    "status",
    "actor_kind",
    "actor_user_id",
    "schedule_id",
    "group_id",
    "group_name",
    "params",
    "created_at",
    "not_before",
    "agent_job",
    "repository_id",
    "from_repository_id",
)


def insert_job(values: dict) -> int:
    """A new job row from JOB_COLUMNS' values (params as a dict, times as
    datetimes); returns its id."""
    row = {**values, "params": Job.params.db_value(values["params"])}
    row["created_at"], row["not_before"] = when(row["created_at"]), when(row["not_before"])
    columns = ", ".join(f'"{c}"' for c in JOB_COLUMNS)
    marks = ", ".join("?" for _ in JOB_COLUMNS)
    return one(
        f'INSERT INTO "job" ({columns}) VALUES ({marks}) RETURNING "id"',
        *(row[c] for c in JOB_COLUMNS),
    )[0]


def insert_audit(
    at: dt.datetime,
    actor: str,
    action: str,
    target: Optional[str],
    detail: Optional[dict],
    address: Optional[str],
) -> None:
    execute(
        'INSERT INTO "audit_log" ("at", "actor", "action", "target", "detail", "address") '
        "VALUES (?, ?, ?, ?, ?, ?)",
        when(at),
        actor,
        action,
        target,
        AuditLog.detail.db_value(detail),
        address,
    )


def active_jobs(host_id: int, but: int, statuses: tuple[str, ...]) -> int:
    """How many of the host's jobs other than `but` are in `statuses`."""
    marks = ", ".join("?" for _ in statuses)
    return one(
        f'SELECT COUNT(*) FROM "job" WHERE "host_id" = ? AND "id" <> ? AND "status" IN ({marks})',
        host_id,
        but,
        *statuses,
    )[0]


def mark_online(
    now: dt.datetime, replica: Optional[str], hellos: list[tuple[int, dict]]
) -> dict[int, int]:
    """Hosts whose agents said hello: online through this replica, seen now,
    with what they told, each with a new link number (session_epoch);
    returns those numbers."""
    stamp = when(now)
    execute_many(
        'UPDATE "host" SET "online" = ?, "last_seen_at" = ?, "hostname" = ?, "agent_version" = ?, '
        '"restic_version" = ?, "os" = ?, "arch" = ?, "timezone" = ?, "tls_trust" = ?, '
        '"tls_pins" = ?, "tls_pins_at" = ?, "session_replica" = ?, '
        '"session_epoch" = "session_epoch" + 1, "agent_features" = ? WHERE "id" = ?',
        [
            (
                True,
                stamp,
                h["hostname"],
                h["agent_version"],
                h["restic_version"],
                h["os"],
                h["arch"],
                h.get("timezone"),
                h.get("tls_trust"),
                json.dumps(h["tls_pins"], separators=(",", ":")) if "tls_pins" in h else None,
                stamp,
                replica,
                json.dumps(sorted(h.get("features") or ()), separators=(",", ":")),
                host_id,
            )
            for host_id, h in hellos
        ],
    )
    epochs: dict[int, int] = {}
    ids = [host_id for host_id, _ in hellos]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        epochs.update(
            rows(f'SELECT "id", "session_epoch" FROM "host" WHERE "id" IN ({marks})', *chunk)
        )
    return epochs


def mark_back(replica: str, links: list[tuple[int, int]]) -> list[int]:
    """Hosts whose links (host, epoch) through this replica are still up,
    online again after the replica was taken for dead, unless a newer link
    of theirs was made since; returns them."""
    back = []
    for host_id, epoch in links:
        row = one(
            'UPDATE "host" SET "online" = ?, "session_replica" = ? '
            'WHERE "id" = ? AND "session_epoch" = ? RETURNING "id"',
            True,
            replica,
            host_id,
            epoch,
        )
        if row is not None:
            back.append(row[0])
    return back


def link_features(host_id: int) -> Optional[frozenset[str]]:
    """What the host's agent can do if it is connected (through any
    replica); None when it is offline."""
    row = one('SELECT "online", "agent_features" FROM "host" WHERE "id" = ?', host_id)
    if row is None or not row[0]:
        return None
    return frozenset(json.loads(row[1])) if row[1] else frozenset()


def mark_offline(now: dt.datetime, links: list[tuple[int, Optional[int]]]) -> list[int]:
    """The hosts whose links (host, epoch) ended, unless a newer link of
    theirs (through another replica) is up: those stay online. An epoch of
    None: the link's number was never known here (its connect was not
    written): the host goes offline unless another replica holds it.
    Returns the hosts marked offline."""
    stamp = when(now)
    update = (
        'UPDATE "host" SET "online" = ?, "last_seen_at" = ?, "session_replica" = NULL '
        'WHERE "id" = ? AND '
    )
    gone: list[int] = []
    for host_id, epoch in links:
        if epoch is None:
            cond, params = '("session_replica" IS NULL OR NOT "online")', ()
        else:
            cond, params = '"session_epoch" = ?', (epoch,)
        row = one(update + cond + ' RETURNING "id"', False, stamp, host_id, *params)
        if row is not None:
            gone.append(row[0])
    return gone
