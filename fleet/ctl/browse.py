"""ls, find, diff, dump: a snapshot's files from the operator's shell."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sys
from typing import Any, Optional

import click
from rich.markup import escape

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, json_option, pass_app

PAGE = 5000  # entries asked for at a time


@click.command("ls")
@click.argument("host")
@click.argument("snapshot")
@click.argument("path", required=False, default="/")
@click.option("--group", metavar="GROUP", help="With SNAPSHOT latest: the latest of this group.")
@click.option("--repo", "repository", metavar="REPO", help="The snapshot in this repository.")
@click.option(
    "--refresh", is_flag=True, help="List it again with restic instead of from fleetd's cache."
)
@json_option
@pass_app
def ls(
    app: App,
    host: str,
    snapshot: str,
    path: str,
    group: Optional[str],
    repository: Optional[str],
    refresh: bool,
    as_json: bool,
) -> None:
    """List directory PATH (default /) of SNAPSHOT of HOST (an id, a prefix,
    or latest).

    An agent using the repository lists it (HOST's own, else another online
    one); fleetd keeps the listing, so the next look answers at once.
    """
    params: dict[str, Any] = {
        "host": host,
        "snapshot": snapshot,
        "path": path,
        "group": group,
        "repository": repository,
        "refresh": refresh or None,
    }
    first = app.call("snapshots.ls", offset=0, limit=PAGE, **params)
    entries = list(first["entries"])
    while len(entries) < first["total"]:  # the rest, a page at a time (from the cache)
        more = app.call(
            "snapshots.ls", offset=len(entries), limit=PAGE, **{**params, "refresh": None}
        )
        if not more["entries"]:
            break
        entries += more["entries"]
    if as_json:
        render.emit_json({**first, "entries": entries, "offset": 0})
        return
    render.table(
        app.out,
        ("MODE", "UID", "GID", "SIZE", "MODIFIED (UTC)", "NAME"),
        (
            (
                escape(e.get("mode") or "-"),
                str(e.get("uid", "-")),
                str(e.get("gid", "-")),
                render.human_bytes(e.get("size_bytes")) if e["type"] == "file" else "-",
                render.cell(e.get("modified_at")),
                escape(e["name"]) + ("/" if e["type"] == "dir" else ""),
            )
            for e in entries
        ),
        empty=f"{path}: empty, or not in the snapshot",
    )
    source = "fleetd's cache" if first["cached"] else "restic"
    app.err.print(
        f"{len(entries)} entries of {escape(first['path'])} in snapshot "
        f"{first['snapshot'][:8]} of {escape(first['host'])} ({first['snapshot_taken_at']}), "
        f"from {source}",
        highlight=False,
    )


@click.command("find")
@click.argument("host")
@click.argument("patterns", nargs=-1, required=True)
@click.option("--group", metavar="GROUP", help="Only the snapshots of this source group.")
@click.option("--repo", "repository", metavar="REPO", help="Search this repository.")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="Matches at most.",
)
@json_option
@pass_app
def find(
    app: App,
    host: str,
    patterns: tuple,
    group: Optional[str],
    repository: Optional[str],
    limit: int,
    as_json: bool,
) -> None:
    """Find files matching PATTERNS (restic find: * and ? match within a
    name) in every snapshot of HOST, newest snapshot first."""
    found = app.call(
        "snapshots.find",
        host=host,
        patterns=list(patterns),
        group=group,
        repository=repository,
        limit=limit,
    )
    if as_json:
        render.emit_json(found)
        return
    render.table(
        app.out,
        ("SNAPSHOT", "TIME (UTC)", "PATH"),
        (
            (m["snapshot"], render.cell(m.get("snapshot_taken_at")), escape(m["path"]))
            for m in found["matches"]
        ),
        empty="no match",
    )
    if found["truncated"]:
        app.err.print(f"more than {limit} matches: the first {limit} shown (--limit)")


MARK = {"added": "+", "removed": "-", "modified": "M", "type": "T", "metadata": "U"}


@click.command("diff")
@click.argument("host")
@click.argument("snapshot")
@click.argument("snapshot2")
@click.option("--repo", "repository", metavar="REPO", help="The snapshots in this repository.")
@json_option
@pass_app
def diff(
    app: App, host: str, snapshot: str, snapshot2: str, repository: Optional[str], as_json: bool
) -> None:
    """What changed from SNAPSHOT to SNAPSHOT2 of HOST: + added, - removed,
    M modified, T type changed, U metadata only."""
    d = app.call(
        "snapshots.diff", host=host, snapshot=snapshot, snapshot2=snapshot2, repository=repository
    )
    if as_json:
        render.emit_json(d)
        return
    for c in d["changes"]:
        app.out.print(
            f"{MARK.get(c['change'], '?')}  {c['path']}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line a path, however long (scripts read it)
        )
    s = d.get("statistics")
    if s:
        app.err.print(
            f"{d['from_snapshot'][:8]} -> {d['to_snapshot'][:8]}: {s['added']['files']} files added, "
            f"{s['removed']['files']} removed, {s['changed_files']} changed; "
            f"{render.human_bytes(s['added']['bytes'])} added, "
            f"{render.human_bytes(s['removed']['bytes'])} removed",
            highlight=False,
        )
    if d["truncated"]:
        app.err.print("more than 100,000 changes: the first ones shown")


@click.command("dump")
@click.argument("host")
@click.argument("snapshot")
@click.argument("path")
@click.option("--group", metavar="GROUP", help="With SNAPSHOT latest: the latest of this group.")
@click.option("--repo", "repository", metavar="REPO", help="The snapshot in this repository.")
@click.option(
    "--output",
    "-o",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to FILE instead of standard output.",
)
@pass_app
def dump(
    app: App,
    host: str,
    snapshot: str,
    path: str,
    group: Optional[str],
    repository: Optional[str],
    output: Optional[str],
) -> None:
    """Write file PATH of SNAPSHOT of HOST to standard output (or --output):
    `fleetctl dump web-01 latest /etc/hosts > hosts`. A directory comes as
    a tar archive. The bytes are checked against fleetd's SHA-256 of them."""
    if output is None and sys.stdout.isatty():
        raise CtlError(
            "standard output is a terminal: redirect it (> FILE) or give --output FILE", Exit.USAGE
        )
    digest = hashlib.sha256()
    size = 0
    # into a file beside FILE, renamed over it only once whole: a failure
    # leaves an existing FILE as it was
    partial = f"{output}.fleetctl-partial" if output else None
    sink = open(partial, "wb") if partial else sys.stdout.buffer  # noqa: SIM115 - closed below
    result: dict[str, Any] = {}
    try:
        with app.client() as c:
            for kind, payload in c.stream(
                "snapshots.dump",
                host=host,
                snapshot=snapshot,
                path=path,
                group=group,
                repository=repository,
            ):
                if kind == "event" and payload.get("type") == "data":
                    chunk = base64.b64decode(payload["data"])
                    sink.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                elif kind == "result":
                    result = payload
        sink.flush()
        if (size, digest.hexdigest()) != (result.get("bytes"), result.get("sha256")):
            raise CtlError(
                f"the file arrived damaged: {size} bytes, fleetd sent {result.get('bytes')}",
                Exit.ERROR,
            )
    except BaseException:
        if partial:  # no half file left behind to be taken for the whole
            sink.close()
            with contextlib.suppress(OSError):
                os.unlink(partial)
        raise
    if partial and output:
        sink.close()
        os.replace(partial, output)
    app.err.print(
        f"{escape(result['path'])} of snapshot {result['snapshot'][:8]} of {escape(host)}: "
        f"{render.human_bytes(size)}, sha256 {result['sha256']}",
        highlight=False,
    )
