"""status: the fleet at a glance (see fleet.server.health)."""

from __future__ import annotations

from ...common.protocol import Field
from .. import health
from ..security.auth import Role
from ..store.models import Alert, utcnow
from .context import Context
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "status.show",
    Role.VIEWER,
    (
        Field("offline_after", "int", False, minimum=0),
        Field("unchecked_after", "int", False, minimum=0),
    ),
    readonly=True,
)
def status_show(ctx: Context, p: dict) -> dict:
    """The fleet at a glance, with its problems and their worst severity
    (0 ok, 1 warning, 2 critical)."""
    offline_after = min(p.get("offline_after", health.DEFAULT_OFFLINE_AFTER), health.MAX_THRESHOLD)
    unchecked_after = min(
        p.get("unchecked_after", health.DEFAULT_UNCHECKED_AFTER), health.MAX_THRESHOLD
    )
    progress = dict(ctx.state.bus.progress) if ctx.state.bus else {}
    view = health.build(utcnow(), offline_after, unchecked_after, progress)
    view["alerts_open"] = Alert.select().where(Alert.resolved_at.is_null()).count()
    return view
