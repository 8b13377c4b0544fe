"""Restore: a snapshot's files back, into a directory of its own host, in
place, or onto another host that uses the same repository (a dead
server's data onto its replacement). A restore is a job like a backup:
queued, dispatched, followed live, in the audit log."""

from __future__ import annotations

import posixpath
from typing import Any

from ...common.protocol import Field
from ..jobs import lifecycle
from ..security.auth import Role
from ..store.models import HostRepository
from ..store.queries import hot
from .common import audit, get_host
from .context import Context
from .errors import Conflict, Invalid
from .jobs import job_view
from .registry import Method, collect
from .snapshots import find_snapshot

METHODS: list[Method] = []
method = collect(METHODS)


def check_target(target: str, in_place: bool) -> str:
    """An absolute directory; / (restoring in place, over the live files)
    only when asked for as such."""
    if not target.startswith("/") or "\x00" in target:
        raise Invalid(f"restore target {target!r} is not an absolute path")
    target = posixpath.normpath(target)
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    if target == "/" and not in_place:
        raise Invalid(
            "restoring into / writes over the host's live files: "
            "say so with in_place (fleetctl restore --target / asks first)"
        )
    return target


def check_patterns(kind: str, patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not pattern.strip():
            raise Invalid(f"an {kind} pattern is empty")
    return list(dict.fromkeys(patterns))


@method(
    "restore.run",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("snapshot", "str", limit=64),
        Field("target", "str", limit=4096),
        Field("includes", "list[str]", False, limit=1000),
        Field("excludes", "list[str]", False, limit=1000),
        Field("to_host", "str", False, limit=64),
        Field("group", "str", False, limit=64),
        Field("repository", "str", False, limit=64),
        Field("verify", "bool", False),
        Field("in_place", "bool", False),
        Field("dry_run", "bool", False),
    ),
)
def restore_run(ctx: Context, p: dict) -> dict:
    """Restore one of HOST's snapshots (an id, a prefix of one, or latest)
    into a directory, on HOST or on another host using the repository that
    holds it; only what the include patterns match when given."""
    host = get_host(p["host"])
    onto = get_host(p["to_host"]) if p.get("to_host") else host
    snap = find_snapshot(host, p["snapshot"], p.get("group"), p.get("repository"))
    dry_run = bool(p.get("dry_run"))
    target = check_target(p["target"], bool(p.get("in_place")) or dry_run)
    if p.get("includes") and p.get("excludes"):
        raise Invalid("give --include or --exclude, not both (restic restore takes one kind)")
    if snap.repository_id is None:
        raise Conflict(
            f"fleetd does not know which repository holds snapshot {snap.short_id}; "
            f"refresh the list with 'fleetctl run {host.name} --kind snapshots'"
        )
    repo = snap.repository
    uses = HostRepository.get_or_none(
        (HostRepository.host == onto) & (HostRepository.repository == repo)
    )
    if uses is None:
        raise Conflict(
            f"host {onto.name} does not use repository {repo.name}, which holds snapshot "
            f"{snap.short_id}: attach it first (fleetctl repos attach {repo.name} {onto.name})"
        )
    params: dict[str, Any] = {
        "snapshot": snap.snapshot_id,
        "target": target,
        "includes": check_patterns("include", p.get("includes") or []),
        "excludes": check_patterns("exclude", p.get("excludes") or []),
        "verify": bool(p.get("verify")),
        "from_host": host.name,  # whose snapshot (shown; the agent reads it by id)
    }
    if dry_run:
        params["dry_run"] = True  # nothing written: says what would be
    job = lifecycle.create(
        ctx.events, onto.id, "restore", "user", ctx.caller.user_id, None, params, repository=repo.id
    )
    audit(
        ctx,
        "restore.run",
        onto.name,
        {
            "job": job.id,
            "snapshot": snap.snapshot_id,
            "from_host": host.name,
            "target": target,
            "includes": params["includes"],
            "dry_run": dry_run,
        },
    )
    agents = ctx.state.agents
    if agents is not None:  # a ready host gets it at once, as jobs.run does
        claimed = agents.dispatcher.claim_now(ctx.events, onto.id)
        if claimed is not None and claimed.id == job.id:
            job.status = claimed.status
    queued_behind = hot.active_jobs(onto.id, job.id, lifecycle.ACTIVE)
    job.host = onto
    job.repository = repo
    return {
        **job_view(job, ctx),
        "queued_behind": queued_behind,
        "host_online": agents is not None and (agents.connected(onto.id) or bool(onto.online)),
        "snapshot": snap.snapshot_id,
        "snapshot_taken_at": snap.time.isoformat(timespec="seconds") + "Z",
        "from_host": host.name,
        "target": target,
    }
