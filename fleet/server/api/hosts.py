"""Hosts: list, show, remove."""

from __future__ import annotations

from typing import Optional

from ...common.protocol import Field
from ..auth import Role
from ..store.models import Host, Job, Repo, RepoStats, SourceGroup
from .common import audit, get_host
from .context import Context
from .registry import Method, collect
from .views import host_detail_json, host_json

METHODS: list[Method] = []
method = collect(METHODS)


def last_job(host: Host, kind: str) -> Optional[Job]:
    return (
        Job.select()
        .where((Job.host == host) & (Job.kind == kind))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .first()
    )


@method("hosts.list")
def hosts_list(ctx: Context, p: dict) -> list:
    """Every host by name: status, versions and its latest backup."""
    return [host_json(h, last_job(h, "backup")) for h in Host.select().order_by(Host.name)]


@method("hosts.show", Role.VIEWER, (Field("host", "str", limit=64),))
def hosts_show(ctx: Context, p: dict) -> dict:
    """One host in detail: the listing's fields, its repository's stats,
    platform, groups and schedule versions."""
    h = get_host(p["host"])
    return host_detail_json(
        h,
        last_job(h, "backup"),
        Repo.get_or_none(Repo.host == h),
        RepoStats.get_or_none(RepoStats.host == h),
        [g.name for g in h.groups.order_by(SourceGroup.name)],
    )


@method("hosts.remove", Role.OPERATOR, (Field("host", "str", limit=64),))
def hosts_remove(ctx: Context, p: dict) -> dict:
    """Remove a host and everything of it; its agent is disconnected."""
    host = get_host(p["host"])
    host.delete_instance()  # cascades: repo, groups, schedules, jobs, logs, snapshots
    audit(ctx, "host.remove", host.name)
    if ctx.state.hub is not None:
        hub, host_id = ctx.state.hub, host.id
        ctx.after.append(lambda: hub.disconnect(host_id, "host removed from fleetd"))
    return {"removed": host.name}
