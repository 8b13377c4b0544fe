"""API tokens: create, list, revoke."""

from __future__ import annotations

from ...common.protocol import Field
from ..events import CredentialsChanged
from ..security.auth import Role
from ..store.models import ApiToken, User, utcnow
from .auth import issue_token, lifetime
from .common import audit
from .context import Context
from .errors import Forbidden, NotFound
from .registry import Method, collect
from .views import token_json

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "tokens.create",
    Role.VIEWER,
    (Field("name", "str", limit=128), Field("expires_in", "int", False, minimum=0)),
)
def tokens_create(ctx: Context, p: dict) -> dict:
    """A new API token for the caller, shown once."""
    user = User.get_by_id(ctx.caller.user_id)
    expires = p.get("expires_in")
    issued = issue_token(user, p["name"], lifetime(expires))
    audit(ctx, "token.create", p["name"], {"id": issued["id"]})
    return {**issued, "user": user.name, "role": user.role}


@method("tokens.list", Role.VIEWER, (Field("all", "bool", False),), readonly=True)
def tokens_list(ctx: Context, p: dict) -> list:
    """The caller's tokens; every user's with `all` (admin)."""
    query = ApiToken.select(ApiToken, User).join(User).order_by(ApiToken.id)
    if p.get("all"):
        if not ctx.caller.role.allows(Role.ADMIN):
            raise Forbidden("listing every user's tokens needs the admin role")
    else:
        query = query.where(ApiToken.user == ctx.caller.user_id)
    return [token_json(t) for t in query]


@method("tokens.revoke", Role.VIEWER, (Field("id", "int"),))
def tokens_revoke(ctx: Context, p: dict) -> dict:
    """Revoke a token: one's own, or anyone's as an admin."""
    token = ApiToken.get_or_none(ApiToken.id == p["id"])
    if token is None or (
        token.user_id != ctx.caller.user_id and not ctx.caller.role.allows(Role.ADMIN)
    ):
        raise NotFound(f"no token with id {p['id']}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        token.save()
        ctx.events.append(CredentialsChanged(token_id=token.id))
        audit(ctx, "token.revoke", token.name, {"id": token.id})
    return token_json(token)
