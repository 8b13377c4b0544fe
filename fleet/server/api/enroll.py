"""Enrollment tokens: the one-line string an agent enrolls with."""

from __future__ import annotations

from datetime import timedelta

from ...common import protocol
from ...common.protocol import Field
from ...common.timefmt import iso
from ..security import auth
from ..security.auth import Role
from ..store.models import EnrollmentToken, Host, utcnow
from .auth import lifetime
from .common import audit, check_name
from .context import Context
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

ENROLL_TTL = timedelta(hours=1)


@method(
    "enroll.create",
    Role.OPERATOR,
    (Field("host", "str", limit=64), Field("expires_in", "int", False, minimum=60)),
)
def enroll_create(ctx: Context, p: dict) -> dict:
    """A single-use enrollment token for a host (created if new), as the
    string and the `fleet-agent enroll` command to paste."""
    name = check_name("host", p["host"])
    host = Host.get_or_none(Host.name == name)
    if host is None:
        host = Host.create(name=name)
    token = auth.new_token("enroll")
    ttl = lifetime(p.get("expires_in")) or ENROLL_TTL
    row = EnrollmentToken.create(
        host=host,
        token_hash=auth.token_hash(token),
        created_by=ctx.caller.user_id,
        expires_at=utcnow() + ttl,
    )
    url = ctx.state.public_url(ctx.host_header)
    string = protocol.format_enrollment(url, token, ctx.state.tls_fingerprint)
    audit(ctx, "host.enroll_token", name, {"expires_at": iso(row.expires_at)})
    return {
        "host": name,
        "enrollment": string,
        "command": f"fleet-agent enroll {string}",
        "server_url": url,
        "expires_at": iso(row.expires_at),
    }
