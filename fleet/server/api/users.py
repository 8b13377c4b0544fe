"""Users: list, add, set a password, change a role, remove."""

from __future__ import annotations

import asyncio

from ...common.protocol import Field
from ..events import CredentialsChanged
from ..security import auth
from ..security.auth import Role
from ..store.models import User
from .common import audit, check_name, get_user
from .context import Context
from .errors import Conflict, Forbidden, Invalid
from .registry import Method, collect
from .views import user_json

METHODS: list[Method] = []
method = collect(METHODS)


def check_password(password: str) -> str:
    if len(password) < auth.MIN_PASSWORD:
        raise Invalid(f"a password needs at least {auth.MIN_PASSWORD} characters")
    return password


def check_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise Invalid(f"role must be viewer, operator or admin, not {value!r}") from None


def admins_left_without(user: User) -> int:
    return User.select().where((User.role == "admin") & (User.id != user.id)).count()


@method("users.list", Role.ADMIN, readonly=True)
def users_list(ctx: Context, p: dict) -> list:
    """Every user, by name."""
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
    """Add a user with a password and a role."""
    check_name("user", p["name"])
    role = check_role(p["role"])
    hashed = await _hash(check_password(p["password"]))

    def add() -> dict:
        if User.get_or_none(User.name == p["name"]):
            raise Conflict(f"user {p['name']!r} already exists")
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
    """Set a user's password: one's own, or anyone's as an admin."""
    if p["name"] != ctx.caller.name and not ctx.caller.role.allows(Role.ADMIN):
        raise Forbidden("only an admin may set another user's password")
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
    """Change a user's role; the last admin stays an admin."""
    user = get_user(p["name"])
    role = check_role(p["role"])
    if user.role == "admin" and role != Role.ADMIN and admins_left_without(user) == 0:
        raise Conflict(f"{user.name} is the last admin; make another admin first")
    user.role = role.value
    user.save()
    ctx.events.append(CredentialsChanged(user_id=user.id))
    audit(ctx, "user.role", user.name, {"role": role.value})
    return user_json(user)


@method("users.remove", Role.ADMIN, (Field("name", "str", limit=64),))
def users_remove(ctx: Context, p: dict) -> dict:
    """Remove a user and its tokens; not oneself, not the last admin."""
    user = get_user(p["name"])
    if user.id == ctx.caller.user_id:
        raise Conflict("you cannot remove yourself")
    if user.role == "admin" and admins_left_without(user) == 0:
        raise Conflict(f"{user.name} is the last admin")
    user.delete_instance()  # cascades to the user's tokens
    ctx.events.append(CredentialsChanged(user_id=user.id))
    audit(ctx, "user.remove", user.name)
    return {"removed": user.name}
