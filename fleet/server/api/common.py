"""Helpers the noun modules share; they run on the store thread."""

from __future__ import annotations

import re

from ...common import selectors
from ..store.models import Host, SourceGroup, User, utcnow
from ..store.queries import hot
from .context import Context
from .errors import Invalid, NotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def audit(ctx: Context, action: str, target: str | None = None, detail: dict | None = None) -> None:
    hot.insert_audit(utcnow(), ctx.caller.name, action, target, detail, ctx.caller.address)


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise Invalid(
            f"{kind} name {name!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' or '-' (at most 63)"
        )
    return name


def requirements(selector: str) -> tuple[selectors.Requirement, ...]:
    """A label selector, parsed; raises Invalid."""
    try:
        return selectors.parse(selector)
    except selectors.SelectorError as exc:
        raise Invalid(str(exc)) from None


def at_most(name: str, value: int, maximum: int) -> int:
    """An upper bound for an int param (protocol.Field bounds them from below only)."""
    if value > maximum:
        raise Invalid(f"{name}: must be at most {maximum}")
    return value


def get_host(name: str) -> Host:
    host = Host.get_or_none(Host.name == name)
    if host is None:
        raise NotFound(f"no host named {name!r}")
    return host


def get_user(name: str) -> User:
    user = User.get_or_none(User.name == name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def get_group(host: Host, name: str) -> SourceGroup:
    group = SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == name))
    if group is None:
        raise NotFound(f"host {host.name} has no source group {name!r}")
    return group
