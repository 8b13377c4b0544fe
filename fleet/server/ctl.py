"""The operator channel: one registry from method name to handler.

Every `/ctl` request is `{"id", "method", "params"}`. A method declares the
role it needs and the fields of its params; `dispatch` checks both before
the handler runs and turns every failure into an error reply, so a bad
request never costs the connection. Plain (sync) handlers run on the store
thread inside one transaction; async handlers orchestrate work that must
not hold the store thread (password hashing, pushes to agents).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

from websockets.exceptions import ConnectionClosed

from .. import __version__
from ..common import protocol, retention
from ..common.protocol import Field, ProtocolError
from ..common.timefmt import iso
from .events import HostRemoved, RepoChanged
from .security import auth
from .security.auth import Role
from .security.secrets import SecretBox, repo_aad
from .store.db import Store
from .store.models import (
    ApiToken,
    AuditLog,
    EnrollmentToken,
    Host,
    Job,
    Repo,
    RepoStats,
    Schedule,
    ScheduleGroup,
    SourceGroup,
    User,
    utcnow,
)

log = logging.getLogger("fleetd.ctl")

ENROLL_TTL = timedelta(hours=1)
LOGIN_TTL = timedelta(days=30)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# restic backends: a local path, or one of these prefixes
REPO_SCHEMES = ("sftp:", "rest:", "s3:", "b2:", "azure:", "gs:", "swift:", "rclone:")
REDACTED = "********"


class CtlError(Exception):
    """An error reply: a code from the table below and a one-line message.

    Codes: bad_request, unauthorized, forbidden, not_found, conflict,
    rate_limited, unknown_method, internal.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad_request(message: str) -> CtlError:
    return CtlError("bad_request", message)


@dataclass
class Caller:
    user_id: int
    name: str
    role: Role
    token_id: Optional[int]
    address: str


@dataclass
class ServerState:
    """What handlers need of the running server."""

    store: Store
    box: SecretBox
    public_url: Callable[[str], str]  # Host header -> the URL agents dial
    tls_fingerprint: Optional[str] = None
    agents: Any = None  # agents.session.Agents: sessions, dispatch, lifecycle
    bus: Any = None  # events.Bus: domain events, live tails
    heartbeat_interval: int = 30  # seconds; an agent silent for 3 intervals is offline
    # failed logins: 5 per user, 20 per address (many users may share one NAT)
    user_limiter: auth.RateLimiter = field(default_factory=lambda: auth.RateLimiter(5, 300))
    addr_limiter: auth.RateLimiter = field(default_factory=lambda: auth.RateLimiter(20, 300))
    login_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Context:
    caller: Caller
    state: ServerState
    host_header: str = ""
    # set per request by dispatch:
    emit: Callable[[Any], Awaitable[None]] = field(default=None)  # type: ignore[assignment]
    closed: Optional[asyncio.Future] = None  # done when the operator's connection is gone
    after: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run after commit
    events: list[Any] = field(default_factory=list)  # domain events, published after commit


Handler = Callable[[Context, dict], Any]


@dataclass
class Method:
    name: str
    handler: Handler
    role: Role
    fields: tuple[Field, ...]
    is_async: bool


REGISTRY: dict[str, Method] = {}


def method(name: str, role: Role = Role.VIEWER, fields: tuple[Field, ...] = ()):
    def register(fn: Handler) -> Handler:
        REGISTRY[name] = Method(name, fn, role, fields, inspect.iscoroutinefunction(fn))
        return fn

    return register


async def dispatch(ctx: Context, raw: str | bytes, send: Callable[[str], Awaitable[None]]) -> str:
    """Answer one request frame with a result or an error frame.

    Streaming methods send `{"id", "event"}` frames through ctx.emit first.
    """
    try:
        req = protocol.decode_request(raw)
    except ProtocolError as exc:
        return protocol.request_error_frame(exc.re, "bad_request", str(exc))

    async def emit(event: Any) -> None:
        await send(protocol.event_frame(req.id, event))

    ctx.emit = emit
    try:
        result = await call(ctx, req.method, req.params)
    except CtlError as exc:
        return protocol.request_error_frame(req.id, exc.code, exc.message)
    return protocol.result_frame(req.id, result)


async def call(ctx: Context, name: str, params: dict) -> Any:
    m = REGISTRY.get(name)
    if m is None:
        raise CtlError("unknown_method", f"unknown method {name!r}")
    caller = await ctx.state.store.run(refresh_caller, ctx.caller)
    if caller is None:
        raise CtlError(
            "unauthorized", "this token has been revoked or has expired; run 'fleetctl login'"
        )
    ctx.caller = caller
    if not ctx.caller.role.allows(m.role):
        raise CtlError(
            "forbidden",
            f"{name} needs the {m.role.value} role; {ctx.caller.name} is {ctx.caller.role.value}",
        )
    unknown = sorted(set(params) - {f.name for f in m.fields})
    if unknown:
        raise bad_request(f"{name}: unknown parameter {unknown[0]!r}")
    try:
        checked = protocol.check_fields(params, m.fields)
    except ProtocolError as exc:
        raise bad_request(f"{name}: {exc}") from None
    ctx.after = []
    ctx.events = []
    try:
        if m.is_async:
            result = await m.handler(ctx, checked)
        else:
            result = await ctx.state.store.atomic(m.handler, ctx, checked)
        if ctx.events and ctx.state.bus is not None:
            ctx.state.bus.publish(ctx.events)
        for hook in ctx.after:  # pushes to agents, once the change is committed
            await hook()
        return result
    except (CtlError, ConnectionClosed):
        raise
    except Exception:
        log.exception("%s failed", name)
        raise CtlError("internal", f"{name} failed inside fleetd; see its log") from None


# -- helpers that run on the store thread -----------------------------------


def audit(ctx: Context, action: str, target: str | None = None, detail: dict | None = None) -> None:
    AuditLog.create(
        actor=ctx.caller.name,
        action=action,
        target=target,
        detail=detail,
        address=ctx.caller.address,
    )


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise bad_request(
            f"{kind} name {name!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' or '-' (at most 63)"
        )
    return name


def get_host(name: str) -> Host:
    host = Host.get_or_none(Host.name == name)
    if host is None:
        raise CtlError("not_found", f"no host named {name!r}")
    return host


def get_user(name: str) -> User:
    user = User.get_or_none(User.name == name)
    if user is None:
        raise CtlError("not_found", f"no user named {name!r}")
    return user


def get_group(host: Host, name: str) -> SourceGroup:
    group = SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == name))
    if group is None:
        raise CtlError("not_found", f"host {host.name} has no source group {name!r}")
    return group


def host_status(host: Host) -> str:
    if host.agent_token_hash is None:
        return "pending"  # enrollment token issued, agent never enrolled
    return "online" if host.online else "offline"


# -- auth -------------------------------------------------------------------


def lookup_token(token: str) -> Optional[Caller]:
    """The caller a bearer token stands for, or None (unknown, revoked, expired)."""
    row = (
        ApiToken.select(ApiToken, User)
        .join(User)
        .where(ApiToken.token_hash == auth.token_hash(token))
        .first()
    )
    now = utcnow()
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
        return None
    ApiToken.update(last_used_at=now).where(ApiToken.id == row.id).execute()
    return Caller(row.user.id, row.user.name, Role(row.user.role), row.id, "")


MAX_LIFETIME = timedelta(days=3660)


def lifetime(seconds: Optional[int]) -> Optional[timedelta]:
    """A token lifetime from seconds; None or 0 for none. Bounded to ten years."""
    if not seconds:
        return None
    if seconds > MAX_LIFETIME.total_seconds():
        raise bad_request(
            f"a lifetime of {seconds} s is more than ten years; use no expiry instead"
        )
    return timedelta(seconds=seconds)


def refresh_caller(caller: Caller) -> Optional[Caller]:
    """The caller as of now: a token revoked, expired or whose user is gone
    stops working on connections already open, and a role change applies."""
    row = ApiToken.select(ApiToken, User).join(User).where(ApiToken.id == caller.token_id).first()
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
        return None
    return Caller(row.user.id, row.user.name, Role(row.user.role), row.id, caller.address)


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
    """`auth.login` on /login: user and password in, a new API token out."""
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
    limits = ((state.user_limiter, name), (state.addr_limiter, address))
    # one password check at a time: parallel attempts cannot slip past the
    # limits between the check and the count, nor stack 64 MiB argon2 runs
    async with state.login_lock:
        for limiter, key in limits:
            if limiter.blocked(key):
                raise CtlError(
                    "rate_limited",
                    f"too many failed logins; try again in {limiter.retry_after(key)} s",
                )
        user = await state.store.run(User.get_or_none, User.name == name)
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
            await state.store.run(
                AuditLog.create, actor=name, action="auth.login_failed", address=address
            )
            raise CtlError("unauthorized", "wrong user name or password")
        state.user_limiter.reset(name)
    expires = checked.get("expires_in")
    ttl = LOGIN_TTL if expires is None else lifetime(expires)

    def record() -> dict:
        issued = issue_token(user, checked.get("token_name") or "login", ttl)
        AuditLog.create(actor=name, action="auth.login", target=issued["name"], address=address)
        return issued

    issued = await state.store.atomic(record)
    return {**issued, "user": user.name, "role": user.role}


@method("auth.whoami")
def whoami(ctx: Context, p: dict) -> dict:
    user = User.get_by_id(ctx.caller.user_id)
    token = ApiToken.get_or_none(ApiToken.id == ctx.caller.token_id)
    return {
        "user": user.name,
        "role": user.role,
        "token": token.name if token else None,
        "token_expires_at": iso(token.expires_at) if token else None,
        "server_version": __version__,
    }


@method("auth.logout")
def logout(ctx: Context, p: dict) -> dict:
    ApiToken.update(revoked_at=utcnow()).where(ApiToken.id == ctx.caller.token_id).execute()
    audit(ctx, "auth.logout")
    return {"revoked": True}


# -- users ------------------------------------------------------------------


def user_json(u: User) -> dict:
    return {"id": u.id, "name": u.name, "role": u.role, "created_at": iso(u.created_at)}


def check_password(password: str) -> str:
    if len(password) < auth.MIN_PASSWORD:
        raise bad_request(f"a password needs at least {auth.MIN_PASSWORD} characters")
    return password


def check_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise bad_request(f"role must be viewer, operator or admin, not {value!r}") from None


def admins_left_without(user: User) -> int:
    return User.select().where((User.role == "admin") & (User.id != user.id)).count()


@method("users.list", Role.ADMIN)
def users_list(ctx: Context, p: dict) -> list:
    return [user_json(u) for u in User.select().order_by(User.name)]


async def _hash(password: str) -> str:
    # argon2 is deliberately slow; keep it off the store thread and the loop
    return await asyncio.get_running_loop().run_in_executor(None, auth.hash_password, password)


@method(
    "users.add",
    Role.ADMIN,
    (Field("name", "str", limit=64), Field("password", "str", limit=1024), Field("role", "str")),
)
async def users_add(ctx: Context, p: dict) -> dict:
    check_name("user", p["name"])
    role = check_role(p["role"])
    hashed = await _hash(check_password(p["password"]))

    def add() -> dict:
        if User.get_or_none(User.name == p["name"]):
            raise CtlError("conflict", f"user {p['name']!r} already exists")
        user = User.create(name=p["name"], password_hash=hashed, role=role.value)
        audit(ctx, "user.add", user.name, {"role": role.value})
        return user_json(user)

    return await ctx.state.store.atomic(add)


@method(
    "users.passwd",
    Role.VIEWER,
    (Field("name", "str", limit=64), Field("password", "str", limit=1024)),
)
async def users_passwd(ctx: Context, p: dict) -> dict:
    if p["name"] != ctx.caller.name and not ctx.caller.role.allows(Role.ADMIN):
        raise CtlError("forbidden", "only an admin may set another user's password")
    hashed = await _hash(check_password(p["password"]))

    def store() -> dict:
        user = get_user(p["name"])
        user.password_hash = hashed
        user.save()
        audit(ctx, "user.passwd", user.name)
        return user_json(user)

    return await ctx.state.store.atomic(store)


@method("users.role", Role.ADMIN, (Field("name", "str", limit=64), Field("role", "str")))
def users_role(ctx: Context, p: dict) -> dict:
    user = get_user(p["name"])
    role = check_role(p["role"])
    if user.role == "admin" and role != Role.ADMIN and admins_left_without(user) == 0:
        raise CtlError("conflict", f"{user.name} is the last admin; make another admin first")
    user.role = role.value
    user.save()
    audit(ctx, "user.role", user.name, {"role": role.value})
    return user_json(user)


@method("users.remove", Role.ADMIN, (Field("name", "str", limit=64),))
def users_remove(ctx: Context, p: dict) -> dict:
    user = get_user(p["name"])
    if user.id == ctx.caller.user_id:
        raise CtlError("conflict", "you cannot remove yourself")
    if user.role == "admin" and admins_left_without(user) == 0:
        raise CtlError("conflict", f"{user.name} is the last admin")
    user.delete_instance()  # cascades to the user's tokens
    audit(ctx, "user.remove", user.name)
    return {"removed": user.name}


# -- API tokens -------------------------------------------------------------


def token_json(t: ApiToken) -> dict:
    now = utcnow()
    if t.revoked_at:
        state = "revoked"
    elif t.expires_at and t.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "id": t.id,
        "name": t.name,
        "user": t.user.name,
        "state": state,
        "created_at": iso(t.created_at),
        "expires_at": iso(t.expires_at),
        "last_used_at": iso(t.last_used_at),
    }


@method(
    "tokens.create",
    Role.VIEWER,
    (Field("name", "str", limit=128), Field("expires_in", "int", False, minimum=0)),
)
def tokens_create(ctx: Context, p: dict) -> dict:
    user = User.get_by_id(ctx.caller.user_id)
    expires = p.get("expires_in")
    issued = issue_token(user, p["name"], lifetime(expires))
    audit(ctx, "token.create", p["name"], {"id": issued["id"]})
    return {**issued, "user": user.name, "role": user.role}


@method("tokens.list", Role.VIEWER, (Field("all", "bool", False),))
def tokens_list(ctx: Context, p: dict) -> list:
    query = ApiToken.select(ApiToken, User).join(User).order_by(ApiToken.id)
    if p.get("all"):
        if not ctx.caller.role.allows(Role.ADMIN):
            raise CtlError("forbidden", "listing every user's tokens needs the admin role")
    else:
        query = query.where(ApiToken.user == ctx.caller.user_id)
    return [token_json(t) for t in query]


@method("tokens.revoke", Role.VIEWER, (Field("id", "int"),))
def tokens_revoke(ctx: Context, p: dict) -> dict:
    token = ApiToken.get_or_none(ApiToken.id == p["id"])
    if token is None or (
        token.user_id != ctx.caller.user_id and not ctx.caller.role.allows(Role.ADMIN)
    ):
        raise CtlError("not_found", f"no token with id {p['id']}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        token.save()
        audit(ctx, "token.revoke", token.name, {"id": token.id})
    return token_json(token)


# -- enrollment and hosts ---------------------------------------------------


@method(
    "enroll.create",
    Role.OPERATOR,
    (Field("host", "str", limit=64), Field("expires_in", "int", False, minimum=60)),
)
def enroll_create(ctx: Context, p: dict) -> dict:
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


def last_job(host: Host, kind: str) -> Optional[Job]:
    return (
        Job.select()
        .where((Job.host == host) & (Job.kind == kind))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .first()
    )


def host_json(h: Host, detail: bool = False) -> dict:
    backup = last_job(h, "backup")
    out = {
        "name": h.name,
        "status": host_status(h),
        "last_seen_at": iso(h.last_seen_at),
        "agent_version": h.agent_version,
        "restic_version": h.restic_version,
        "repo_locks": h.repo_locks,
        "last_backup": None
        if backup is None
        else {
            "job": backup.id,
            "status": backup.status,
            "at": iso(backup.finished_at or backup.created_at),
        },
    }
    if detail:
        repo = Repo.get_or_none(Repo.host == h)
        stats = RepoStats.get_or_none(RepoStats.host == h)
        out["repo_stats"] = (
            None
            if stats is None
            else {
                "size_bytes": stats.size_bytes,
                "snapshot_count": stats.snapshot_count,
                "file_count": stats.file_count,
                "updated_at": iso(stats.updated_at),
            }
        )
        out.update(
            {
                "id": h.id,
                "created_at": iso(h.created_at),
                "enrolled_at": iso(h.enrolled_at),
                "hostname": h.hostname,
                "os": h.os,
                "arch": h.arch,
                "timezone": h.timezone,
                "repo": repo is not None,
                "groups": [g.name for g in h.groups.order_by(SourceGroup.name)],
                "schedule_version": h.schedule_version,
                "applied_schedule_version": h.applied_schedule_version,
            }
        )
    return out


@method("hosts.list")
def hosts_list(ctx: Context, p: dict) -> list:
    return [host_json(h) for h in Host.select().order_by(Host.name)]


@method("hosts.show", Role.VIEWER, (Field("host", "str", limit=64),))
def hosts_show(ctx: Context, p: dict) -> dict:
    return host_json(get_host(p["host"]), detail=True)


@method("hosts.remove", Role.OPERATOR, (Field("host", "str", limit=64),))
def hosts_remove(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    host.delete_instance()  # cascades: repo, groups, schedules, jobs, logs, snapshots
    audit(ctx, "host.remove", host.name)
    ctx.events.append(HostRemoved(host.id))  # its agent's link closes, its tails end
    return {"removed": host.name}


# -- repositories -----------------------------------------------------------


def redact_url(url: str) -> str:
    """Hide a password embedded in a URL (rest:https://user:pw@host/)."""
    # greedy to the last "@" before the path, as restic's URL parser splits
    return re.sub(r"(://[^/:@]+:)[^/]*@", r"\1" + REDACTED + "@", url)


def check_repo_url(url: str) -> str:
    url = url.strip()
    if not url:
        raise bad_request("the repository URL is empty")
    if not (url.startswith("/") or url.startswith(REPO_SCHEMES)):
        raise bad_request(
            f"repository {redact_url(url)!r} is neither an absolute path nor a restic backend "
            f"URL ({', '.join(s + '...' for s in REPO_SCHEMES)})"
        )
    return url


@method(
    "repo.set",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("url", "str", limit=2048),
        Field("password", "str", limit=4096),
        Field("env", "dict[str,str]", False, limit=100),
    ),
)
def repo_set(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    url = check_repo_url(p["url"])
    if not p["password"]:
        raise bad_request("the repository password is empty")
    env = p.get("env") or {}
    for key in env:
        if not ENV_NAME_RE.match(key):
            raise bad_request(f"{key!r} is not an environment variable name")
    box = ctx.state.box
    Repo.insert(
        host=host,
        url_enc=box.encrypt(url, repo_aad(host.id, "url")),
        password_enc=box.encrypt(p["password"], repo_aad(host.id, "password")),
        env_names=sorted(env),
        env_enc=box.encrypt(json.dumps(env), repo_aad(host.id, "env")) if env else None,
        updated_at=utcnow(),
    ).on_conflict(
        conflict_target=[Repo.host],
        preserve=[Repo.url_enc, Repo.password_enc, Repo.env_names, Repo.env_enc, Repo.updated_at],
    ).execute()
    audit(ctx, "repo.set", host.name, {"url": redact_url(url), "env": sorted(env)})
    ctx.events.append(RepoChanged(host.id))  # pushed to its agent; auto-init
    return repo_json(host, Repo.get_by_id(host.id), box)


def repo_json(host: Host, repo: Repo, box: SecretBox) -> dict:
    return {
        "host": host.name,
        "url": redact_url(box.decrypt(repo.url_enc, repo_aad(host.id, "url"))),
        "password": REDACTED,
        "env": {name: REDACTED for name in repo.env_names},
        "updated_at": iso(repo.updated_at),
    }


@method("repo.show", Role.VIEWER, (Field("host", "str", limit=64),))
def repo_show(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    repo = Repo.get_or_none(Repo.host == host)
    if repo is None:
        raise CtlError(
            "not_found", f"host {host.name} has no repository; set one with 'fleetctl repo set'"
        )
    return repo_json(host, repo, ctx.state.box)


# -- source groups ----------------------------------------------------------

GROUP_FIELDS = (
    Field("includes", "list[str]", False, limit=1000),
    Field("excludes", "list[str]", False, limit=1000),
    Field("retention", "dict", False),
    Field("pre_hook", "str", False),
    Field("post_hook", "str", False),
    Field("retries", "int", False, minimum=0),
    Field("retry_delay", "int", False, minimum=0),
)


def group_json(g: SourceGroup) -> dict:
    schedules = [link.schedule_id for link in g.schedule_links]
    return {
        "id": g.id,
        "host": g.host.name,
        "name": g.name,
        "includes": g.includes,
        "excludes": g.excludes,
        "retention": g.retention,
        "pre_hook": g.pre_hook,
        "post_hook": g.post_hook,
        "retries": g.retries,
        "retry_delay": g.retry_delay,
        "schedules": schedules,
        "created_at": iso(g.created_at),
        "updated_at": iso(g.updated_at),
    }


def check_includes(paths: list[str]) -> list[str]:
    if not paths:
        raise bad_request("a source group needs at least one --include path")
    for path in paths:
        if not path.startswith("/"):
            raise bad_request(f"include path {path!r} is not absolute")
    return list(dict.fromkeys(paths))


def check_excludes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not pattern.strip():
            raise bad_request("an exclude pattern is empty")
    return list(dict.fromkeys(patterns))


def check_retention(policy: Any) -> dict:
    try:
        return retention.normalize(policy)
    except retention.RetentionError as exc:
        raise bad_request(str(exc)) from None


def apply_group_fields(g: SourceGroup, p: dict) -> None:
    if "includes" in p:
        g.includes = check_includes(p["includes"])
    if "excludes" in p:
        g.excludes = check_excludes(p["excludes"])
    for hook in ("pre_hook", "post_hook"):
        if hook in p:
            setattr(g, hook, p[hook].strip() or None)
    for number in ("retries", "retry_delay"):
        if number in p:
            setattr(g, number, p[number])


@method("groups.list", Role.VIEWER, (Field("host", "str", limit=64),))
def groups_list(ctx: Context, p: dict) -> list:
    host = get_host(p["host"])
    return [group_json(g) for g in host.groups.order_by(SourceGroup.name)]


@method(
    "groups.show", Role.VIEWER, (Field("host", "str", limit=64), Field("name", "str", limit=64))
)
def groups_show(ctx: Context, p: dict) -> dict:
    return group_json(get_group(get_host(p["host"]), p["name"]))


@method(
    "groups.create",
    Role.OPERATOR,
    (Field("host", "str", limit=64), Field("name", "str", limit=64), *GROUP_FIELDS),
)
def groups_create(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    name = check_name("group", p["name"])
    if SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == name)):
        raise CtlError("conflict", f"host {host.name} already has a source group {name!r}")
    group = SourceGroup(host=host, name=name, includes=[], excludes=[])
    apply_group_fields(group, p)
    group.includes = check_includes(group.includes)
    group.retention = check_retention(p.get("retention"))
    group.save()
    audit(ctx, "group.create", f"{host.name}/{name}")
    return group_json(group)


@method(
    "groups.edit",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("name", "str", limit=64),
        Field("new_name", "str", False, limit=64),
        Field("clear_retention", "bool", False),
        *GROUP_FIELDS,
    ),
)
def groups_edit(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    group = get_group(host, p["name"])
    if p.get("new_name") and p["new_name"] != group.name:
        new = check_name("group", p["new_name"])
        if SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == new)):
            raise CtlError("conflict", f"host {host.name} already has a source group {new!r}")
        group.name = new
    apply_group_fields(group, p)
    if p.get("clear_retention") or "retention" in p:
        merged = {} if p.get("clear_retention") else dict(group.retention)
        merged.update(p.get("retention") or {})
        group.retention = check_retention(merged)
    group.updated_at = utcnow()
    group.save()
    changed = sorted(k for k in p if k not in ("host", "name"))
    audit(ctx, "group.edit", f"{host.name}/{p['name']}", {"changed": changed})
    return group_json(group)


@method(
    "groups.delete", Role.OPERATOR, (Field("host", "str", limit=64), Field("name", "str", limit=64))
)
def groups_delete(ctx: Context, p: dict) -> dict:
    host = get_host(p["host"])
    group = get_group(host, p["name"])
    used = [
        link.schedule_id
        for link in ScheduleGroup.select().join(Schedule).where(ScheduleGroup.group == group)
    ]
    if used:
        raise CtlError(
            "conflict",
            f"source group {group.name} is used by schedule(s) {', '.join(map(str, used))}; "
            "remove it from them first",
        )
    group.delete_instance()
    audit(ctx, "group.delete", f"{host.name}/{group.name}")
    return {"removed": group.name, "host": host.name}


# -- audit ------------------------------------------------------------------


@method(
    "audit.list",
    Role.ADMIN,
    (
        Field("limit", "int", False, minimum=1),
        Field("actor", "str", False),
        Field("action", "str", False),
    ),
)
def audit_list(ctx: Context, p: dict) -> list:
    query = AuditLog.select().order_by(AuditLog.id.desc()).limit(min(p.get("limit") or 100, 10_000))
    if p.get("actor"):
        query = query.where(AuditLog.actor == p["actor"])
    if p.get("action"):
        query = query.where(AuditLog.action.startswith(p["action"]))
    return [
        {
            "id": a.id,
            "at": iso(a.at),
            "actor": a.actor,
            "action": a.action,
            "target": a.target,
            "detail": a.detail,
            "address": a.address,
        }
        for a in query
    ]
