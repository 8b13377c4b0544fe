"""Hosts: list, show, remove."""

from __future__ import annotations

import json
from typing import Any, Optional

import peewee as pw

from ...common import selectors
from ...common.protocol import Encoded, Field
from ..events import HostRemoved
from ..jobs import lifecycle
from ..security.auth import Role
from ..store.models import Host, Job, RepoStats, SourceGroup
from ..store.queries import listing
from .common import at_most, audit, get_host, requirements
from .context import Context
from .errors import Invalid
from .registry import Method, collect
from .repos import repositories_of
from .templates import check_label_powers, materialise, origins, picked_by
from .tls import host_tls_json
from .views import host_detail_json, host_row_json, stats_json

METHODS: list[Method] = []
method = collect(METHODS)


MAX_PAGE = 1000


def newest_job_id(host_id: Any, kind: str) -> pw.SelectQuery:
    """A scalar subquery: the id of the host's newest job of `kind`.
    `host_id` may be a column of the outer query (correlated)."""
    newest = Job.alias("newest")
    return (
        newest.select(newest.id)
        .where((newest.host == host_id) & (newest.kind == kind))
        .order_by(newest.created_at.desc(), newest.id.desc())
        .limit(1)
    )


def last_job(host: Host, kind: str) -> Optional[Job]:
    return Job.select().where(Job.id == newest_job_id(host.id, kind)).first()


@method(
    "hosts.list",
    Role.VIEWER,
    (
        Field("limit", "int", False, minimum=1),
        Field("after", "str", False, limit=64),
        Field("selector", "str", False, limit=1024),
    ),
)
async def hosts_list(ctx: Context, p: dict) -> Encoded:
    """Hosts by name: status, labels, versions and the latest backup of
    each. Every host (those the label selector picks), or a page: at most
    `limit` (1..1000) hosts whose names sort after `after` (pass the last
    name of a page to get the next)."""
    wanted = requirements(p["selector"]) if p.get("selector") else None
    limit = p.get("limit")
    if limit is not None and wanted is None:
        at_most("limit", limit, MAX_PAGE)
        count, last, text = await ctx.state.store.read(page_text, p.get("after"), limit)
        return Encoded(f"[{text}]")
    # every host: a page per read, so that other reads go in between, each
    # encoded on the reader thread as it is read (a short hold of the GIL
    # each, not one long one for the whole fleet)
    parts: list[str] = []
    after = None if wanted is not None else p.get("after")  # a selector lists them all
    while True:
        count, last, text = await ctx.state.store.read(page_text, after, MAX_PAGE, wanted)
        if text:
            parts.append(text)
        if count < MAX_PAGE:
            return Encoded("[" + ", ".join(parts) + "]")
        after = last


def checked_labels(labels: dict[str, str]) -> dict[str, str]:
    try:
        return selectors.check_labels(labels)
    except selectors.SelectorError as exc:
        raise Invalid(str(exc)) from None


def selected_hosts(selector: str) -> list[Host]:
    """The hosts (rows) a selector picks, by name; raises Invalid."""
    wanted = requirements(selector)
    return [h for h in Host.select().order_by(Host.name) if selectors.matches(wanted, h.labels)]


@method(
    "hosts.label",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("set", "dict[str,str]", False, limit=selectors.MAX_LABELS),
        Field("remove", "list[str]", False, limit=selectors.MAX_LABELS),
    ),
)
def hosts_label(ctx: Context, p: dict) -> dict:
    """Set labels of a host (key=value; a key given again takes the new
    value) and remove others: what selectors pick hosts by."""
    host = get_host(p["host"])
    labels = dict(host.labels or {})
    for key in checked_labels(dict.fromkeys(p.get("remove") or [], "")):
        labels.pop(key, None)
    labels.update(checked_labels(p.get("set") or {}))
    if len(labels) > selectors.MAX_LABELS:
        raise Invalid(f"a host carries at most {selectors.MAX_LABELS} labels")
    check_label_powers(ctx, host.name, host.labels or {}, labels)
    host.labels = labels
    host.save()
    audit(
        ctx, "host.label", host.name, {"set": p.get("set") or {}, "remove": p.get("remove") or []}
    )
    # the templates its labels pick now: what they define comes, what they no longer do goes
    applied = materialise(ctx, host)
    return {"host": host.name, "labels": labels, "templates": applied.json()}


def page_text(
    after: Optional[str], limit: int, wanted: Optional[tuple[selectors.Requirement, ...]] = None
) -> tuple[int, Optional[str], str]:
    """A page of hosts as JSON list items (the text between the brackets),
    those `wanted` picks if given: (how many were read, the last name read,
    the text)."""
    rows = listing.hosts_page(after, limit)
    page = [host_row_json(r) for r in rows]
    if wanted is not None:
        page = [h for h in page if selectors.matches(wanted, h["labels"])]
    text = json.dumps(page, ensure_ascii=False)[1:-1]
    return len(rows), rows[-1].name if rows else None, text


@method("hosts.show", Role.VIEWER, (Field("host", "str", limit=64),), readonly=True)
def hosts_show(ctx: Context, p: dict) -> dict:
    """One host in detail: the listing's fields, its repository's stats,
    platform, groups, schedule versions, and how its agent trusts fleetd's
    TLS key (`tls.problem`: why it cannot connect, when fleetd can tell)."""
    h = get_host(p["host"])
    repositories = repositories_of(h)
    stats = {s.repository_id: s for s in RepoStats.select().where(RepoStats.host == h)}
    default = repositories[0] if repositories else None
    out = host_detail_json(
        h,
        last_job(h, "backup"),
        default,
        stats.get(default.id) if default is not None else None,
        [g.name for g in h.groups.order_by(SourceGroup.name)],
    )
    out["repositories"] = [
        {"name": r.name, "default": n == 0, "stats": stats_json(stats.get(r.id))}
        for n, r in enumerate(repositories)
    ]
    # where each setting came from: a template (and what the host overrides) or by hand
    out["templates"] = picked_by(h)
    out["template_error"] = h.template_error
    out["settings"] = origins(h)
    out["tls"] = host_tls_json(h.tls_trust, h.tls_pins, h.online, ctx.state.tls)
    out["tls_refused"] = out["tls"].get("problem") is not None
    return out


@method("hosts.remove", Role.OPERATOR, (Field("host", "str", limit=64),))
def hosts_remove(ctx: Context, p: dict) -> dict:
    """Remove a host and everything of it; its agent is disconnected."""
    host = get_host(p["host"])
    lifecycle.freed(ctx.events, host.id)  # its jobs no longer hold its repository
    # cascades: its use of repositories (which stay), groups, schedules, jobs,
    # logs, snapshots
    host.delete_instance()
    audit(ctx, "host.remove", host.name)
    ctx.events.append(HostRemoved(host.id))  # its agent's link closes, its tails end
    return {"removed": host.name}
