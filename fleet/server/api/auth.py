"""Who a bearer token stands for, logging in and out."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Optional

from ... import __version__
from ...common import protocol
from ...common.protocol import Field
from ...common.timefmt import iso
from ..events import AuthFailed, CredentialsChanged
from ..security import auth
from ..security.auth import Role
from ..store.models import ApiToken, AuditLog, User, utcnow
from .common import audit
from .context import Caller, Context, ServerState
from .errors import Invalid, RateLimited, Unauthorized
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

LOGIN_TTL = timedelta(days=30)
MAX_LIFETIME = timedelta(days=3660)


def _tokens() -> Any:
    return ApiToken.select(ApiToken, User).join(User)


def _caller(row: Optional[ApiToken], address: str) -> Optional[Caller]:
    """The caller a token row stands for, or None (unknown, revoked, expired)."""
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
        return None
    user = row.user
    return Caller(user.id, user.name, Role(user.role), row.id, address, row.expires_at, row.name)


def lookup_token(token: str) -> Optional[Caller]:
    """The caller a bearer token stands for, or None (unknown, revoked, expired)."""
    caller = _caller(_tokens().where(ApiToken.token_hash == auth.token_hash(token)).first(), "")
    if caller is not None:
        ApiToken.update(last_used_at=utcnow()).where(ApiToken.id == caller.token_id).execute()
    return caller


def known_token(token: str) -> bool:
    """Whether a bearer token is good, read only (an address over its
    limit of bad ones is checked so, off the store's writer)."""
    row = _tokens().where(ApiToken.token_hash == auth.token_hash(token)).first()
    return _caller(row, "") is not None


def lifetime(seconds: Optional[int]) -> Optional[timedelta]:
    """A token lifetime from seconds; None or 0 for none. Bounded to ten years."""
    if not seconds:
        return None
    if seconds > MAX_LIFETIME.total_seconds():
        raise Invalid(f"a lifetime of {seconds} s is more than ten years; use no expiry instead")
    return timedelta(seconds=seconds)


def refresh_caller(caller: Caller) -> Optional[Caller]:
    """The caller as of now: a token revoked, expired or whose user is gone
    stops working on connections already open, and a role change applies."""
    return _caller(_tokens().where(ApiToken.id == caller.token_id).first(), caller.address)


def issue_token(user: User, name: str, ttl: Optional[timedelta]) -> dict:
    token = auth.new_token("fleet")
    now = utcnow()
    row = ApiToken.create(
        user=user,
        name=name,
        token_hash=auth.token_hash(token),
        created_at=now,
        expires_at=now + ttl if ttl else None,
    )
    return {"id": row.id, "name": name, "token": token, "expires_at": iso(row.expires_at)}


async def login(state: ServerState, params: dict, address: str) -> dict:
    """`auth.login` on /login: user and password in, a new API token out.

    Raises ApiError, and ProtocolError for params of the wrong shape."""
    checked = protocol.check_fields(
        params,
        (
            Field("user", "str", limit=64),
            Field("password", "str", limit=1024),
            Field("token_name", "str", False, limit=128),
            Field("expires_in", "int", False, minimum=0),
        ),
    )
    name, password = checked["user"], checked["password"]
    limits = (
        (state.pair_limiter, f"{name}\x00{address}"),
        (state.user_limiter, name),
        (state.addr_limiter, address),
    )
    # one password check at a time: parallel attempts cannot slip past the
    # limits between the check and the count, nor stack 64 MiB argon2 runs
    async with state.login_lock:
        blocked = [(limiter, key) for limiter, key in limits if limiter.blocked(key)]
        # past a limit, one try every PROBE_EVERY s still goes ahead: the
        # right password is never shut out, guessing is slowed to a crawl
        let_through = [limiter.probe(key, PROBE_EVERY) for limiter, key in blocked]
        if not all(let_through):
            raise RateLimited(f"too many failed logins; try again in {int(PROBE_EVERY)} s")
        user = await state.store.read(User.get_or_none, User.name == name)
        loop = asyncio.get_running_loop()
        if user is None:
            await loop.run_in_executor(None, auth.burn_password_check, password)
            ok = False
        else:
            ok = await loop.run_in_executor(
                None, auth.verify_password, user.password_hash, password
            )
        if not ok:
            for limiter, key in limits:
                limiter.fail(key)
            if state.bus is not None:  # the other replicas count it too
                state.bus.publish([AuthFailed(address, name)])
            await state.store.run(
                AuditLog.create, actor=name, action="auth.login_failed", address=address
            )
            if blocked:
                raise RateLimited(
                    f"wrong user name or password, and too many failed logins: "
                    f"the next try in {int(PROBE_EVERY)} s"
                )
            raise Unauthorized("wrong user name or password")
        state.pair_limiter.reset(f"{name}\x00{address}")
    expires = checked.get("expires_in")
    ttl = LOGIN_TTL if expires is None else lifetime(expires)

    def record() -> dict:
        issued = issue_token(user, checked.get("token_name") or "login", ttl)
        AuditLog.create(actor=name, action="auth.login", target=issued["name"], address=address)
        return issued

    issued = await state.store.atomic(record)
    return {**issued, "user": user.name, "role": user.role}


PROBE_EVERY = 10.0  # seconds between the tries a blocked login still gets


@method("auth.whoami")
async def whoami(ctx: Context, p: dict) -> dict:
    """The caller: user, role, the token in use and fleetd's version (as
    checked for this very request: no further store work)."""
    caller = ctx.caller
    return {
        "user": caller.name,
        "role": caller.role.value,
        "token": caller.token_name,
        "token_expires_at": iso(caller.expires_at),
        "server_version": __version__,
    }


@method("auth.logout")
def logout(ctx: Context, p: dict) -> dict:
    """Revoke the token this request came with."""
    ApiToken.update(revoked_at=utcnow()).where(ApiToken.id == ctx.caller.token_id).execute()
    ctx.events.append(CredentialsChanged(token_id=ctx.caller.token_id))
    audit(ctx, "auth.logout")
    return {"revoked": True}
