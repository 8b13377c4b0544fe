"""The audit log: who did what, newest first."""

from __future__ import annotations

from ...common.protocol import Field
from ..security.auth import Role
from ..store.models import AuditLog
from .context import Context
from .registry import Method, collect
from .views import audit_json

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "audit.list",
    Role.ADMIN,
    (
        Field("limit", "int", False, minimum=1),
        Field("actor", "str", False),
        Field("action", "str", False),
    ),
    readonly=True,
)
def audit_list(ctx: Context, p: dict) -> list:
    """Audit entries, newest first; by actor, or by action prefix."""
    query = AuditLog.select().order_by(AuditLog.id.desc()).limit(min(p.get("limit") or 100, 10_000))
    if p.get("actor"):
        query = query.where(AuditLog.actor == p["actor"])
    if p.get("action"):
        query = query.where(AuditLog.action.startswith(p["action"]))
    return [audit_json(a) for a in query]
