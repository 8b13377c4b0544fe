"""Snapshots: fleetd's projection of each host's `restic snapshots`."""

from __future__ import annotations

from ...common.protocol import Field
from ..security.auth import Role
from ..store.models import Repository, Snapshot
from .common import get_host
from .context import Context
from .errors import NotFound
from .registry import Method, collect
from .views import snapshot_json

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "snapshots.list",
    Role.VIEWER,
    (
        Field("host", "str", limit=64),
        Field("group", "str", False, limit=64),
        Field("repository", "str", False, limit=64),
    ),
    readonly=True,
)
def snapshots_list(ctx: Context, p: dict) -> list:
    """A host's snapshots in every repository it uses (a copy too), newest
    first; those tagged with one group's name, or in one repository."""
    host = get_host(p["host"])
    names = dict(Repository.select(Repository.id, Repository.name).tuples())
    query = Snapshot.select().where(Snapshot.host == host)
    if p.get("repository"):
        wanted = [rid for rid, name in names.items() if name == p["repository"]]
        if not wanted:
            raise NotFound(f"no repository named {p['repository']!r}")
        query = query.where(Snapshot.repository == wanted[0])
    rows = []
    for s in query.order_by(Snapshot.time.desc(), Snapshot.repository):
        if p.get("group") and p["group"] not in (s.tags or []):
            continue
        rows.append(snapshot_json(s, names.get(s.repository_id)))
    return rows
