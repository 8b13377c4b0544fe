"""Snapshots: fleetd's projection of each host's `restic snapshots`."""

from __future__ import annotations

from ...common.protocol import Field
from ..security.auth import Role
from ..store.models import Snapshot
from .common import get_host
from .context import Context
from .registry import Method, collect
from .views import snapshot_json

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "snapshots.list",
    Role.VIEWER,
    (Field("host", "str", limit=64), Field("group", "str", False, limit=64)),
    readonly=True,
)
def snapshots_list(ctx: Context, p: dict) -> list:
    """A host's snapshots, newest first; those tagged with one group's name."""
    host = get_host(p["host"])
    query = Snapshot.select().where(Snapshot.host == host).order_by(Snapshot.time.desc())
    rows = []
    for s in query:
        if p.get("group") and p["group"] not in (s.tags or []):
            continue
        rows.append(snapshot_json(s))
    return rows
