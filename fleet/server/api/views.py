"""The JSON the operator API answers with: functions of rows already loaded.

Nothing here queries the store on its own, except where noted (group_json
follows the group's schedule links and host).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Optional

from ...common.drills import DEFAULT_SAMPLE
from ...common.timefmt import iso
from ..security.secrets import SecretBox, repository_aad
from ..security.tls import cannot_connect
from ..store.models import (
    ApiToken,
    AuditLog,
    Host,
    Job,
    Repository,
    RepoStats,
    Snapshot,
    SourceGroup,
    User,
    utcnow,
)
from ..store.queries.listing import HostRow, wire_time

REDACTED = "********"


def redact_url(url: str) -> str:
    """Hide a password embedded in a URL (rest:https://user:pw@host/)."""
    # greedy to the last "@" before the path, as restic's URL parser splits
    return re.sub(r"(://[^/:@]+:)[^/]*@", r"\1" + REDACTED + "@", url)


def user_json(u: User) -> dict:
    return {"id": u.id, "name": u.name, "role": u.role, "created_at": iso(u.created_at)}


def token_json(t: ApiToken) -> dict:
    """A token with its user (joined by the caller's query)."""
    now = utcnow()
    if t.revoked_at:
        state = "revoked"
    elif t.expires_at and t.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "id": t.id,
        "name": t.name,
        "user": t.user.name,
        "state": state,
        "created_at": iso(t.created_at),
        "expires_at": iso(t.expires_at),
        "last_used_at": iso(t.last_used_at),
    }


def host_status(host: Host) -> str:
    return status_of(host.agent_token_hash is not None, host.online)


def status_of(enrolled: bool, online: bool) -> str:
    if not enrolled:
        return "pending"  # enrollment token issued, agent never enrolled
    return "online" if online else "offline"


def host_json(h: Host, backup: Optional[Job]) -> dict:
    """A host as listed, with its latest backup job (None if it has none)."""
    return listed_host(
        h.name,
        host_status(h),
        iso(h.last_seen_at),
        h.agent_version,
        h.restic_version,
        h.repo_locks,
        None
        if backup is None
        else {
            "job": backup.id,
            "status": backup.status,
            "created_at": iso(backup.created_at),
            "finished_at": iso(backup.finished_at),
        },
        h.applied_schedule_version < h.schedule_version,
        h.labels,
    )


def host_row_json(r: HostRow) -> dict:
    """host_json of a listing's row (the same fields, read without the ORM)."""
    refused = (
        r.served_pin is not None
        and not r.online
        and cannot_connect(r.tls_trust, json.loads(r.tls_pins or "null"), r.served_pin) is not None
    )
    return listed_host(
        r.name,
        status_of(r.enrolled, r.online),
        wire_time(r.last_seen_at),
        r.agent_version,
        r.restic_version,
        r.repo_locks,
        None
        if r.backup_id is None
        else {
            "job": r.backup_id,
            "status": r.backup_status,
            "created_at": wire_time(r.backup_created_at),
            "finished_at": wire_time(r.backup_finished_at),
        },
        bool(r.schedule_lagging),
        json.loads(r.labels or "{}"),
        refused,
    )


def listed_host(
    name: str,
    status: str,
    last_seen_at: Optional[str],
    agent_version: Optional[str],
    restic_version: Optional[str],
    repo_locks: Optional[int],
    last_backup: Optional[dict],
    schedule_lagging: bool = False,
    labels: Optional[dict] = None,
    tls_refused: bool = False,
) -> dict:
    return {
        "name": name,
        "labels": dict(labels or {}),
        "status": status,
        "last_seen_at": last_seen_at,
        "agent_version": agent_version,
        "restic_version": restic_version,
        "repo_locks": repo_locks,
        "last_backup": last_backup,
        # the agent has not acknowledged the latest schedule set (offline, or
        # an agent too old to apply it): it fires from an older one
        "schedule_lagging": schedule_lagging,
        # offline, and its agent does not pin the key fleetd serves: it cannot
        # connect (hosts show says why)
        "tls_refused": tls_refused,
    }


def dedup_ratio(restore: int, raw: Optional[int]) -> Optional[float]:
    """How many bytes restored per byte stored (2.0: half the space)."""
    return round(restore / raw, 2) if raw else None


def stats_json(stats: Optional[RepoStats]) -> Optional[dict]:
    if stats is None:
        return None
    return {
        # what all snapshots restore, summed (restic's restore-size)
        "size_bytes": stats.size_bytes,
        # what the repository stores: after deduplication and compression
        "raw_size_bytes": stats.raw_size_bytes,
        "dedup_ratio": dedup_ratio(stats.size_bytes, stats.raw_size_bytes),
        "snapshot_count": stats.snapshot_count,
        "file_count": stats.file_count,
        "measured_at": iso(stats.measured_at),
        "updated_at": iso(stats.updated_at),
    }


def host_detail_json(
    h: Host,
    backup: Optional[Job],
    repo: Optional[Repository],
    stats: Optional[RepoStats],
    groups: list[str],
) -> dict:
    """A host as shown: the listing's fields and what only `hosts.show` reads."""
    out = host_json(h, backup)
    out["repo_stats"] = stats_json(stats)  # its default repository's
    out.update(
        {
            "id": h.id,
            "created_at": iso(h.created_at),
            "enrolled_at": iso(h.enrolled_at),
            "hostname": h.hostname,
            "os": h.os,
            "arch": h.arch,
            "timezone": h.timezone,
            "repo": repo is not None,
            "repository": repo.name if repo is not None else None,
            "groups": groups,
            "schedule_version": h.schedule_version,
            "applied_schedule_version": h.applied_schedule_version,
        }
    )
    return out


def repository_json(repo: Repository, box: SecretBox, hosts: Sequence[str]) -> dict:
    """A repository with every secret redacted (the URL's password too),
    and the hosts that use it."""
    url = box.decrypt(bytes(repo.url_enc), repository_aad(repo.aad, "url"))
    return {
        "name": repo.name,
        "url": redact_url(url),
        "password": REDACTED,
        "env": {name: REDACTED for name in repo.env_names},
        "hosts": list(hosts),
        "locks": repo.locks,  # restic locks in it, as a host last reported (None: not yet)
        "locks_at": iso(repo.locks_at),
        "created_at": iso(repo.created_at),
        "updated_at": iso(repo.updated_at),
    }


def group_json(g: SourceGroup, warnings: Sequence[str] = ()) -> dict:
    """A source group; reads its schedule links (one query). `warnings`: what
    its retention cannot get from its schedules."""
    schedules = [link.schedule_id for link in g.schedule_links]
    return {
        "id": g.id,
        "host": g.host.name,
        "name": g.name,
        "includes": g.includes,
        "excludes": g.excludes,
        "retention": g.retention,
        "pre_hook": g.pre_hook,
        "post_hook": g.post_hook,
        "retries": g.retries,
        "retry_delay": g.retry_delay,
        # seconds (None: the defaults, 30 minutes a hook, no limit a backup)
        "hook_timeout": g.hook_timeout,
        "timeout": g.timeout,
        "schedules": schedules,
        "retention_warnings": list(warnings),
        # None: the host's default repository
        "repository": g.repository.name if g.repository_id is not None else None,
        "copy_to": g.copy_to.name if g.copy_to_id is not None else None,
        # the copy's retention; None: the group's own
        "copy_retention": g.copy_retention,
        # when copies run (cron, UTC); None: after each backup
        "copy_cron": g.copy_cron,
        "next_copy_at": iso(g.next_copy_at),
        # seconds between backups expected without a schedule (None: none)
        "expect_every": g.expect_every,
        # pinged as its backups start and end: scheme and host only (None: none)
        "ping_url": g.ping_url_shown,
        "ping_sent_at": iso(g.ping_sent_at),
        "ping_error": g.ping_error,
        # restore drills: cron (UTC; None: none scheduled), sample, next one
        "drill_cron": g.drill_cron,
        "drill_sample": g.drill_sample or DEFAULT_SAMPLE,
        "next_drill_at": iso(g.next_drill_at),
        "created_at": iso(g.created_at),
        "updated_at": iso(g.updated_at),
        # the template that made it (None: by hand), and what this host overrides of it
        "template": g.template,
        "overrides": g.overrides or [],
    }


def job_json(job: Job) -> dict:
    user = job.actor_user.name if job.actor_user_id else None
    return {
        "id": job.id,
        "uid": job.uid,
        "host": job.host.name,
        "kind": job.kind,
        "group": job.group_name,
        # the repository it works on; a copy's: its destination (from: its source)
        "repository": job.repository.name if job.repository_id is not None else None,
        "from_repository": (
            job.from_repository.name if job.from_repository_id is not None else None
        ),
        "status": job.status,
        "actor": user if job.actor_kind == "user" else job.actor_kind,
        "actor_kind": job.actor_kind,
        "schedule": job.schedule_id,
        "created_at": iso(job.created_at),
        # a retry's: not started before then (None: as soon as it can)
        "due_at": iso(job.not_before),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "exit_code": job.exit_code,
        "summary": job.summary,
        "error": job.error,
        **fire_json(job),
        **restore_json(job),
    }


def restore_json(job: Job) -> dict:
    """A restore's snapshot, whose it is, where to and what of it (nothing
    for other kinds)."""
    if job.kind != "restore":
        return {}
    params = job.params or {}
    return {
        "restore": {
            **{k: params.get(k) for k in ("snapshot", "from_host", "target")},
            "includes": list(params.get("includes") or []),
            "excludes": list(params.get("excludes") or []),
            "verify": bool(params.get("verify")),
            "dry_run": bool(params.get("dry_run")),
        }
    }


def fire_json(job: Job) -> dict:
    """What a scheduled job says of its fire: the cron time it ran for,
    whether it caught up a window missed while its agent was down, the later
    fires folded into it while it waited, and whether the agent ran it on
    its own (fleetd out of reach)."""
    params = job.params or {}
    return {
        "scheduled_at": params.get("scheduled_at"),
        "catch_up": bool(params.get("catch_up")),
        "coalesced": list(params.get("coalesced") or []),
        "run_by_agent": job.agent_job is not None,
    }


def job_view(job: Job, progress: Optional[dict]) -> dict:
    """A job (with host and user joined), and its live progress while it runs."""
    out = job_json(job)
    if progress and job.status == "running":
        out["progress"] = progress
    return out


def snapshot_json(s: Snapshot, repository: Optional[str] = None) -> dict:
    return {
        "repository": repository,  # where it is stored (a copy is a snapshot of its own)
        "id": s.snapshot_id,
        "short_id": s.short_id,
        "taken_at": iso(s.time),  # restic's snapshot time
        "hostname": s.hostname,
        "paths": s.paths,
        "tags": s.tags,
        "size_bytes": s.size_bytes,
        "file_count": s.file_count,
    }


def audit_json(a: AuditLog) -> dict:
    return {
        "id": a.id,
        "created_at": iso(a.at),
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "detail": a.detail,
        "address": a.address,
    }
