"""Snapshots: fleetd's projection of each host's `restic snapshots`, and
browsing them (ls, find, diff), asked of an agent that uses the repository
(the host's own, else any other online); a directory listed is kept
(store.queries.browse) so the next look answers without restic."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import posixpath
import re
from collections.abc import AsyncIterator
from typing import Any, Optional

from ...common.protocol import QUERY_PAGE, Field
from ...common.timefmt import iso, parse_ts
from ..agents.queries import QueryFailed
from ..security.auth import Role
from ..store.models import Host, HostRepository, Repository, Snapshot, utcnow
from ..store.queries import browse
from .common import audit, get_host
from .context import Context
from .errors import Conflict, Invalid, NotFound
from .registry import Method, collect
from .views import snapshot_json

METHODS: list[Method] = []
method = collect(METHODS)


SNAPSHOTS_LIMIT = 10_000  # rows in one answer at most


@method(
    "snapshots.list",
    Role.VIEWER,
    (
        Field("host", "str", False, limit=64),
        Field("group", "str", False, limit=64),
        Field("tag", "str", False, limit=255),
        Field("repository", "str", False, limit=64),
        Field("since", "str", False, limit=32),
        Field("limit", "int", False, minimum=1),
    ),
    readonly=True,
)
def snapshots_list(ctx: Context, p: dict) -> list:
    """Snapshots, newest first: one host's in every repository it uses (a
    copy too), or the whole fleet's; those of one group (its tag), with a
    tag, in one repository, or taken since a time (RFC 3339)."""
    names = dict(Repository.select(Repository.id, Repository.name).tuples())
    query = Snapshot.select(Snapshot, Host.name).join(Host)
    if p.get("host"):
        query = query.where(Snapshot.host == get_host(p["host"]))
    if p.get("repository"):
        wanted = [rid for rid, name in names.items() if name == p["repository"]]
        if not wanted:
            raise NotFound(f"no repository named {p['repository']!r}")
        query = query.where(Snapshot.repository == wanted[0])
    if p.get("since"):
        since = parse_ts(p["since"], dt.datetime.min)
        if since == dt.datetime.min:
            raise Invalid(f"since {p['since']!r} is not a time such as 2026-11-30T00:00:00Z")
        query = query.where(Snapshot.time >= since)
    tags = [t for t in (p.get("group"), p.get("tag")) if t]
    limit = min(p.get("limit") or 1000, SNAPSHOTS_LIMIT)
    rows = []
    for s in query.order_by(Snapshot.time.desc(), Snapshot.host, Snapshot.repository):
        if any(t not in (s.tags or []) for t in tags):
            continue
        rows.append({"host": s.host.name, **snapshot_json(s, names.get(s.repository_id))})
        if len(rows) >= limit:
            break
    return rows


_PREFIX = re.compile(r"^[0-9a-f]{4,64}\Z")


def find_snapshot(
    host: Host, wanted: str, group: Optional[str] = None, repository: Optional[str] = None
) -> Snapshot:
    """One of the host's snapshots as fleetd knows them: by id or a prefix
    of it (4 hex digits or more, one snapshot only), or the newest
    ("latest"), of one group (its tag) or repository when named."""
    query = Snapshot.select().where(Snapshot.host == host)
    if repository:
        repo = Repository.get_or_none(Repository.name == repository)
        if repo is None:
            raise NotFound(f"no repository named {repository!r}")
        query = query.where(Snapshot.repository == repo)
    if wanted != "latest":
        if not _PREFIX.match(wanted):
            raise Invalid(f"{wanted!r} is not a snapshot id (hex digits) or 'latest'")
        query = query.where(Snapshot.snapshot_id.startswith(wanted))
    found = [s for s in query.order_by(Snapshot.time.desc()) if not group or group in s.tags]
    what = f"snapshot {wanted}" if wanted != "latest" else "snapshot"
    if group:
        what += f" of group {group}"
    if not found:
        raise NotFound(
            f"host {host.name} has no {what} that fleetd knows of "
            f"('fleetctl snapshots {host.name}' lists them)"
        )
    if wanted != "latest" and len({s.snapshot_id for s in found}) > 1:
        raise Invalid(
            f"{wanted!r} names {len(found)} snapshots of host {host.name}: give more of the id"
        )
    return found[0]


# -- browsing ------------------------------------------------------------------------

LS_LIMIT = 5000  # entries in one answer at most (a page of a listing)
FIND_LIMIT = 10_000  # matches at most
DIFF_LIMIT = 100_000  # changes at most


def browse_target(ctx: Context, host: Host, repository_id: int, repository: str) -> int:
    """The host whose agent answers: HOST itself when it is online, else
    another online host using the repository (a dead server's snapshots
    stay browsable from its replacement)."""
    agents = ctx.state.agents
    if agents is None:
        raise Conflict("fleetd runs without agents here")
    if agents.reach_now(host.id) is not None:  # through this replica or another
        return host.id
    users = [
        hid
        for (hid,) in HostRepository.select(HostRepository.host)
        .where(HostRepository.repository == repository_id)
        .tuples()
    ]
    for hid in sorted(users):
        if "queries" in (agents.reach_now(hid) or ()):
            return hid
    raise Conflict(
        f"host {host.name} is offline, and no other host using repository {repository} "
        "is online to read it"
    )


def resolve(p: dict) -> tuple[Host, Snapshot, str]:
    host = get_host(p["host"])
    snap = find_snapshot(host, p["snapshot"], p.get("group"), p.get("repository"))
    if snap.repository_id is None:
        raise Conflict(f"fleetd does not know which repository holds snapshot {snap.short_id}")
    return host, snap, snap.repository.name


async def pages_of(
    ctx: Context, host_id: int, kind: str, params: dict[str, Any]
) -> AsyncIterator[list[dict[str, Any]]]:
    """The agent's answer page by page; its failure as a Conflict."""
    try:
        pages = ctx.state.agents.query(host_id, kind, params)
    except QueryFailed as exc:
        raise Conflict(f"cannot {kind}: {exc.message}") from None
    try:
        async for page in pages:
            yield page
    except QueryFailed as exc:
        raise Conflict(f"cannot {kind}: {exc.message}") from None
    finally:
        await pages.aclose()


def entry_json(node: dict) -> dict:
    """A listing entry as fleetctl prints it: sizes in *_bytes and times in
    *_at, as everywhere in its JSON (agents and the cache keep restic's
    size and mtime)."""
    out = {k: v for k, v in node.items() if k not in ("size", "mtime")}
    out["size_bytes"] = node.get("size")
    out["modified_at"] = node.get("mtime")
    return out


def check_path(path: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise Invalid(f"{path!r} is not an absolute path")
    path = posixpath.normpath(path)
    return "/" + path.lstrip("/")


@method(
    "snapshots.ls",
    Role.VIEWER,
    (
        Field("host", "str", limit=64),
        Field("snapshot", "str", limit=64),
        Field("path", "str", False, limit=4096),
        Field("offset", "int", False, minimum=0),
        Field("limit", "int", False, minimum=1),
        Field("group", "str", False, limit=64),
        Field("repository", "str", False, limit=64),
        Field("refresh", "bool", False),
    ),
)
async def snapshots_ls(ctx: Context, p: dict) -> dict:
    """One directory of a snapshot (default /), a page of its entries from
    `offset`; listed by an agent once, then answered from fleetd's cache."""
    store = ctx.state.store
    host, snap, repo_name = await store.read(resolve, p)
    path = check_path(p.get("path") or "/")
    offset, limit = p.get("offset") or 0, min(p.get("limit") or 1000, LS_LIMIT)
    key = (snap.repository_id, snap.snapshot_id, path)
    cached = True
    found = None if p.get("refresh") else await store.read(browse.page, *key, offset, limit)
    if found is None:
        cached = False
        asker = await store.read(browse_target, ctx, host, snap.repository_id, repo_name)
        listing = await store.atomic(browse.start, *key, utcnow())
        if listing is None:
            raise Conflict(f"{path} is being listed for another caller now: ask again shortly")
        buffer: list[dict[str, Any]] = []
        number = total = 0
        node = None
        try:
            async for items in pages_of(
                ctx,
                asker,
                "ls",
                {"repository_id": snap.repository_id, "snapshot": snap.snapshot_id, "path": path},
            ):
                for item in items:
                    if item.pop("self"):
                        node = item
                    else:
                        buffer.append(item)
                while len(buffer) >= QUERY_PAGE:  # stored in whole pages: offsets find them
                    full, buffer = buffer[:QUERY_PAGE], buffer[QUERY_PAGE:]
                    await store.atomic(browse.add_page, listing, number, full)
                    number, total = number + 1, total + len(full)
            if buffer:
                await store.atomic(browse.add_page, listing, number, buffer)
                total += len(buffer)
            await store.atomic(browse.finish, listing, total, node, utcnow())
        except BaseException:
            await store.atomic(browse.drop, listing)
            raise
        found = await store.read(browse.page, *key, offset, limit)
        if found is None:
            raise Conflict("the listing was dropped while it was read: ask again")
    else:
        await store.atomic(browse.touch, found["listing"], utcnow())
    entries, total, node = found["entries"], found["total"], found["node"]
    if node is not None and node.get("type") != "dir" and total == 0:
        entries, total = [node], 1  # a file listed is itself
    return {
        "host": host.name,
        "snapshot": snap.snapshot_id,
        "snapshot_taken_at": iso(snap.time),
        "repository": repo_name,
        "path": path,
        "offset": offset,
        "total": total,
        "entries": [entry_json(e) for e in entries],
        "cached": cached,
    }


@method(
    "snapshots.dump",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("snapshot", "str", limit=64),
        Field("path", "str", limit=4096),
        Field("group", "str", False, limit=64),
        Field("repository", "str", False, limit=64),
    ),
)
async def snapshots_dump(ctx: Context, p: dict) -> dict:
    """Stream one file of a snapshot (a directory: as a tar archive) as
    data events of base64 chunks; the answer gives its size and SHA-256."""
    store = ctx.state.store
    host, snap, repo_name = await store.read(resolve, p)
    path = check_path(p["path"])
    asker = await store.read(browse_target, ctx, host, snap.repository_id, repo_name)
    await store.atomic(
        audit, ctx, "snapshot.dump", host.name, {"snapshot": snap.snapshot_id, "path": path}
    )
    digest = hashlib.sha256()
    size = 0
    params = {"repository_id": snap.repository_id, "snapshot": snap.snapshot_id, "path": path}
    async for items in pages_of(ctx, asker, "dump", params):
        for item in items:
            data = item["data"]
            try:
                chunk = base64.b64decode(data, validate=True)
            except ValueError:
                raise Conflict("cannot dump: the agent sent a malformed chunk") from None
            digest.update(chunk)
            size += len(chunk)
            await ctx.emit({"type": "data", "data": data})
    return {
        "host": host.name,
        "snapshot": snap.snapshot_id,
        "path": path,
        "bytes": size,
        "sha256": digest.hexdigest(),
    }


@method(
    "snapshots.find",
    Role.VIEWER,
    (
        Field("host", "str", limit=64),
        Field("patterns", "list[str]", limit=16),
        Field("group", "str", False, limit=64),
        Field("repository", "str", False, limit=64),
        Field("limit", "int", False, minimum=1),
    ),
)
async def snapshots_find(ctx: Context, p: dict) -> dict:
    """The paths matching any of the patterns in each of the host's
    snapshots (of one group), newest snapshot first."""
    store = ctx.state.store
    patterns = [x for x in p["patterns"] if x.strip()]
    if not patterns:
        raise Invalid("find needs a pattern")
    host, repo_id, repo_name, names, times = await store.read(find_scope, p)
    asker = await store.read(browse_target, ctx, host, repo_id, repo_name)
    limit = min(p.get("limit") or 1000, FIND_LIMIT)
    params: dict[str, Any] = {"repository_id": repo_id, "patterns": patterns, "hosts": names}
    if p.get("group"):
        params["tag"] = p["group"]
    matches: list[dict[str, Any]] = []
    cut = False  # restic prints snapshots by id: all are read before the newest are kept
    pages = pages_of(ctx, asker, "find", params)
    try:
        async for items in pages:
            for m in items:
                short = m["snapshot"][:8]
                matches.append({**m, "snapshot": short, "snapshot_taken_at": times.get(short)})
            if len(matches) >= FIND_LIMIT:
                cut = True
                break
    finally:
        await pages.aclose()  # the agent stops now, not when the generator is collected
    matches.sort(key=lambda m: (m["snapshot_taken_at"] or "", m["snapshot"]), reverse=True)
    truncated = cut or len(matches) > limit
    del matches[limit:]
    return {"host": host.name, "repository": repo_name, "matches": matches, "truncated": truncated}


def find_scope(p: dict) -> tuple[Host, int, str, list[str], dict[str, Optional[str]]]:
    """The host, the repository searched (named, else its snapshots'
    newest one), the names its snapshots are recorded under there, and
    each snapshot's time by short id."""
    host = get_host(p["host"])
    query = Snapshot.select().where(Snapshot.host == host)
    if p.get("repository"):
        repo = Repository.get_or_none(Repository.name == p["repository"])
        if repo is None:
            raise NotFound(f"no repository named {p['repository']!r}")
        query = query.where(Snapshot.repository == repo)
    snaps = [s for s in query.order_by(Snapshot.time.desc()) if s.repository_id is not None]
    if not snaps:
        raise NotFound(f"host {host.name} has no snapshot that fleetd knows of")
    repo_id = snaps[0].repository_id
    snaps = [s for s in snaps if s.repository_id == repo_id]
    names = sorted({s.hostname for s in snaps if s.hostname} | {host.name})
    return host, repo_id, snaps[0].repository.name, names, {s.short_id: iso(s.time) for s in snaps}


@method(
    "snapshots.diff",
    Role.VIEWER,
    (
        Field("host", "str", limit=64),
        Field("snapshot", "str", limit=64),
        Field("snapshot2", "str", limit=64),
        Field("repository", "str", False, limit=64),
    ),
)
async def snapshots_diff(ctx: Context, p: dict) -> dict:
    """What changed from one of the host's snapshots to another: each path
    added, removed or modified, and restic's statistics."""
    store = ctx.state.store
    host, first, second, repo_name = await store.read(diff_scope, p)
    asker = await store.read(browse_target, ctx, host, first.repository_id, repo_name)
    changes: list[dict[str, Any]] = []
    statistics: Optional[dict] = None
    truncated = False
    params = {
        "repository_id": first.repository_id,
        "snapshot": first.snapshot_id,
        "snapshot2": second.snapshot_id,
    }
    async for items in pages_of(ctx, asker, "diff", params):
        for item in items:
            if item.get("statistics") is not None:
                statistics = item["statistics"]
            elif item.get("path") and len(changes) < DIFF_LIMIT:
                changes.append({"path": item["path"], "change": item.get("change")})
            elif item.get("path"):
                truncated = True
    return {
        "host": host.name,
        "repository": repo_name,
        "from_snapshot": first.snapshot_id,
        "to_snapshot": second.snapshot_id,
        "changes": changes,
        "statistics": statistics,
        "truncated": truncated,
    }


def diff_scope(p: dict) -> tuple[Host, Snapshot, Snapshot, str]:
    host = get_host(p["host"])
    first = find_snapshot(host, p["snapshot"], repository=p.get("repository"))
    second = find_snapshot(host, p["snapshot2"], repository=p.get("repository"))
    if first.repository_id is None or first.repository_id != second.repository_id:
        raise Invalid(f"snapshots {first.short_id} and {second.short_id} are not in one repository")
    return host, first, second, first.repository.name
