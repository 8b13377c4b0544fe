"""Notifiers: Apprise URLs told of alerts raised and resolved (see
fleet.server.notify). A URL holds tokens: it is encrypted, bound to its
row, and shown with everything after the scheme redacted."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import apprise

from ...common.protocol import Field
from ...common.timefmt import iso
from .. import notify
from ..security.auth import Role
from ..store.models import Notifier, utcnow
from .common import audit, check_name
from .context import Context
from .errors import Conflict, Invalid, NotFound
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

KINDS = (
    "backup_failed",
    "backup_warning",
    "overdue",
    "offline",
    "check_failed",
    "unchecked",
    "locked",
    "maintenance_failed",
    "drill_failed",
    "agent_behind",
    "tls_refused",
)
NAME = Field("name", "str", limit=64)


def redacted(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return f"{scheme}://********" if sep else "********"


def notifier_json(n: Notifier, url: str) -> dict[str, Any]:
    return {
        "name": n.name,
        "url": redacted(url),
        "on": list(n.kinds) or ["all"],
        "hosts": list(n.hosts),
        "groups": list(n.groups),
        "created_at": iso(n.created_at),
        "last_sent_at": iso(n.last_sent_at),
        "last_error": n.last_error,
    }


def check_url(url: str) -> str:
    url = url.strip()
    if not url or not apprise.Apprise().add(url):
        raise Invalid("not an Apprise URL (see https://github.com/caronc/apprise/wiki)")
    return url


def check_kinds(kinds: list[str]) -> list[str]:
    out = []
    for kind in kinds:
        if kind == "all":
            return []
        if kind not in KINDS:
            raise Invalid(f"{kind!r} is not an alert kind ({', '.join(KINDS)} or all)")
        out.append(kind)
    return sorted(set(out))


def url_of(ctx: Context, n: Notifier) -> str:
    return ctx.state.box.decrypt(bytes(n.url_enc), notify.aad(n.id))


def get_notifier(name: str) -> Notifier:
    n = Notifier.get_or_none(Notifier.name == name)
    if n is None:
        raise NotFound(f"no notifier named {name!r}")
    return n


@method(
    "notify.add",
    Role.OPERATOR,
    (
        NAME,
        Field("url", "str", limit=4096),
        Field("on", "list[str]", False, limit=32),
        Field("hosts", "list[str]", False, limit=1000),
        Field("groups", "list[str]", False, limit=1000),
    ),
)
def notify_add(ctx: Context, p: dict) -> dict:
    """Tell an Apprise URL of alerts raised and resolved (of these kinds,
    hosts and groups; none given: all)."""
    name = check_name("notifier", p["name"])
    if Notifier.get_or_none(Notifier.name == name) is not None:
        raise Conflict(f"a notifier named {name!r} exists already")
    url = check_url(p["url"])
    n = Notifier.create(
        name=name,
        url_enc=b"",
        kinds=check_kinds(p.get("on") or []),
        hosts=sorted(set(p.get("hosts") or [])),
        groups=sorted(set(p.get("groups") or [])),
        created_at=utcnow(),
    )
    n.url_enc = ctx.state.box.encrypt(url, notify.aad(n.id))  # bound to its row
    n.save()
    audit(ctx, "notify.add", name, {"url": redacted(url), "on": n.kinds})
    return notifier_json(n, url)


@method("notify.list", Role.VIEWER, (), readonly=True)
def notify_list(ctx: Context, p: dict) -> list:
    """Every notifier, its URL redacted, with its filters and last delivery."""
    return [notifier_json(n, url_of(ctx, n)) for n in Notifier.select().order_by(Notifier.name)]


@method("notify.remove", Role.OPERATOR, (NAME,))
def notify_remove(ctx: Context, p: dict) -> dict:
    """Remove a notifier: it is told of nothing more."""
    n = get_notifier(p["name"])
    n.delete_instance()
    audit(ctx, "notify.remove", n.name)
    return {"removed": n.name}


@method("notify.test", Role.OPERATOR, (NAME,))
async def notify_test(ctx: Context, p: dict) -> dict:
    """Send a test notification now; says whether the service took it."""
    name, url = await ctx.state.store.read(target, ctx, p["name"])
    error = await asyncio.to_thread(
        notify.send, url, "Fleet: test notification", f"notifier {name} works", False
    )
    await ctx.state.store.atomic(record, name, error)
    return {"name": name, "sent": error is None, "error": error}


def target(ctx: Context, name: str) -> tuple[str, str]:
    n = get_notifier(name)
    return n.name, url_of(ctx, n)


def record(name: str, error: Optional[str]) -> None:
    Notifier.update(last_sent_at=utcnow(), last_error=error).where(Notifier.name == name).execute()
