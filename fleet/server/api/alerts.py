"""Alerts: list them, acknowledge one (see fleet.server.scheduling.alerts)."""

from __future__ import annotations

from ...common.protocol import Field
from ...common.timefmt import iso
from ..security.auth import Role
from ..store.models import Alert, utcnow
from .common import audit
from .context import Context
from .errors import NotFound
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

LISTED = 500  # the newest alerts one list returns


def alert_json(a: Alert) -> dict:
    return {
        "id": a.id,
        "kind": a.kind,
        "severity": a.severity,
        "host": a.host,
        "group": a.group_name,
        "repository": a.repository,
        "message": a.message,
        "raised_at": iso(a.raised_at),
        "updated_at": iso(a.updated_at),
        "acknowledged_at": iso(a.acknowledged_at),
        "acknowledged_by": a.acknowledged_by,
        "resolved_at": iso(a.resolved_at),
        "open": a.resolved_at is None,
    }


@method("alerts.list", Role.VIEWER, (Field("all", "bool", False),), readonly=True)
def alerts_list(ctx: Context, p: dict) -> list:
    """Open alerts, newest first; with all, resolved ones too (the newest 500)."""
    query = Alert.select()
    if not p.get("all"):
        query = query.where(Alert.resolved_at.is_null())
    return [alert_json(a) for a in query.order_by(Alert.id.desc()).limit(LISTED)]


@method("alerts.ack", Role.OPERATOR, (Field("id", "int", minimum=1),))
def alerts_ack(ctx: Context, p: dict) -> dict:
    """Say a person has seen an alert; it stays open until its condition clears."""
    alert = Alert.get_or_none(Alert.id == p["id"])
    if alert is None:
        raise NotFound(f"no alert {p['id']}")
    if alert.acknowledged_at is None:
        alert.acknowledged_at, alert.acknowledged_by = utcnow(), ctx.caller.name
        alert.save()
        audit(ctx, "alert.ack", str(alert.id), {"kind": alert.kind})
    return alert_json(alert)
