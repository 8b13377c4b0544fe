"""Enrollment tokens: the one-line string an agent enrolls with."""

from __future__ import annotations

from datetime import timedelta

from ...common import protocol, selectors
from ...common.protocol import Field
from ...common.timefmt import iso
from ..security import auth
from ..security.auth import Role
from ..store.models import EnrollmentToken, Host, utcnow
from .auth import lifetime
from .common import audit, check_name
from .context import Context
from .errors import Conflict, Forbidden
from .hosts import checked_labels
from .registry import Method, collect
from .templates import check_label_powers, materialise

METHODS: list[Method] = []
method = collect(METHODS)

ENROLL_TTL = timedelta(hours=1)


@method(
    "enroll.create",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("expires_in", "int", False, minimum=60),
        Field("force", "bool", False),
        Field("labels", "dict[str,str]", False, limit=selectors.MAX_LABELS),
    ),
)
def enroll_create(ctx: Context, p: dict) -> dict:
    """A single-use enrollment token for a host (created if new), as the
    string and the `fleet-agent enroll` command to paste. Re-enrolling an
    enrolled host (whoever redeems the token becomes that host, and gets
    its repositories' secrets) takes an admin and `force`. A new token
    voids the host's older ones."""
    name = check_name("host", p["host"])
    host = Host.get_or_none(Host.name == name)
    new = host is None
    if host is None:
        host = Host.create(name=name)
    elif host.agent_token_hash is not None:
        if not p.get("force"):
            raise Conflict(
                f"host {name} is enrolled already: a new token would let whoever redeems it "
                "replace its agent (an admin may, with --force)"
            )
        if not ctx.caller.role.allows(Role.ADMIN):
            raise Forbidden(f"re-enrolling host {name} needs the admin role")
    applied = None
    if p.get("labels"):
        labels = {**(host.labels or {}), **checked_labels(p["labels"])}
        check_label_powers(ctx, name, host.labels or {}, labels)
        host.labels = labels
        host.save()
    if new or p.get("labels"):
        # its settings are ready before its agent first says hello (a
        # selector such as !role picks a host without labels too)
        applied = materialise(ctx, host).json()
    now = utcnow()
    voided = (
        EnrollmentToken.update(expires_at=now)
        .where(
            (EnrollmentToken.host == host)
            & EnrollmentToken.used_at.is_null()
            & (EnrollmentToken.expires_at > now)
        )
        .execute()
    )
    token = auth.new_token("enroll")
    ttl = lifetime(p.get("expires_in")) or ENROLL_TTL
    row = EnrollmentToken.create(
        host=host,
        token_hash=auth.token_hash(token),
        created_by=ctx.caller.user_id,
        expires_at=utcnow() + ttl,
    )
    url = ctx.state.public_url(ctx.host_header)
    urls = list(ctx.state.public_urls) or [url]  # every replica's, this one's first
    served = ctx.state.tls
    string = protocol.format_enrollment(
        url,
        token,
        served.fingerprint if served is not None else None,
        served.pins() if served is not None else None,  # a staged key too: it may come next
        urls,
    )
    detail = {"expires_at": iso(row.expires_at), "voided": voided}
    if p.get("force"):
        detail["reenroll"] = True
    audit(ctx, "host.enroll_token", name, detail)
    return {
        "host": name,
        "enrollment": string,
        "command": f"fleet-agent enroll {string}",
        "server_url": url,
        "server_urls": urls,
        "expires_at": iso(row.expires_at),
        "templates": applied,
    }
