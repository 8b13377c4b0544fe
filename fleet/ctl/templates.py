"""templates: settings defined once, for every host a label selector picks."""

from __future__ import annotations

import json
from typing import Any, Optional

import click
from rich.markup import escape

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, json_option, pass_app

MAX_SPEC_BYTES = 1 << 20

SPEC_EXAMPLE = """{
  "repositories": ["main"],
  "maintenance": {"main": {"forget": "30 3 * * *", "prune": "0 5 * * 0", "check": "0 6 * * 0"}},
  "groups": {"www": {"includes": ["/etc", "/var/www"], "excludes": ["*.tmp"],
                      "retention": {"keep_daily": 7, "keep_weekly": 4}}},
  "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["www"]}}
}"""


@click.group()
def templates() -> None:
    """Settings defined once for many hosts: repositories, source groups,
    schedules and maintenance, applied to every host a label selector
    picks, now and whenever a host gains the label. A change made on one
    host to what a template gave it is that host's own from then on."""


def read_spec(path: str) -> dict[str, Any]:
    """The spec file ("-": standard input) as a JSON object."""
    try:
        with click.open_file(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise CtlError(f"{path}: a spec is at most {MAX_SPEC_BYTES} bytes", Exit.USAGE)
    try:
        spec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CtlError(f"{path} is not JSON: {exc}", Exit.USAGE) from None
    if not isinstance(spec, dict):
        raise CtlError(f"{path}: a spec is a JSON object", Exit.USAGE)
    return spec


def report(app: App, result: dict[str, Any], as_json: bool, verb: str) -> None:
    """Per host what applying did, then a summary; exits 1 when a host failed."""
    if as_json:
        render.emit_json(result)
    else:
        dry = " (dry run: nothing changed)" if result.get("dry_run") else ""
        for h in result["hosts"]:
            name = escape(h["host"])
            if h["error"]:
                app.out.print(f"{name}: [red]failed[/]: {escape(h['error'])}")
                continue
            parts = [
                f"{word} {', '.join(h[key])}"
                for key, word in (("created", "+"), ("updated", "~"), ("removed", "-"))
                if h[key]
            ]
            app.out.print(f"{name}: {escape('; '.join(parts)) if parts else 'unchanged'}")
            for note in h["notes"]:
                app.out.print(f"  note: {escape(note)}")
        if result.get("maintenance"):
            app.out.print(f"maintenance set: {escape(', '.join(result['maintenance']))}")
        app.err.print(
            f"{verb}{dry}: {result['picked']} host(s), {result['changed']} changed, "
            f"{result['failed']} failed"
        )
    if result["failed"]:
        raise click.exceptions.Exit(int(Exit.ERROR))


@templates.command("set")
@click.argument("name")
@click.option("--selector", required=True, help="The hosts it applies to, e.g. role=web,env=prod.")
@click.option(
    "--file",
    "-f",
    "path",
    required=True,
    metavar="PATH",
    help="The spec: a JSON file ('-': standard input); see 'fleetctl templates example'.",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 1_000_000),
    help="Of two templates defining one group or schedule, the lower wins "
    "(default: as it was; 100 for a new template).",
)
@click.option(
    "--dry-run", is_flag=True, help="Say what it would change on each host; change nothing."
)
@json_option
@pass_app
def templates_set(
    app: App,
    name: str,
    selector: str,
    path: str,
    priority: Optional[int],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Create or replace template NAME and apply it to every host the
    selector picks (and to those it picked before). Exit 1 when it could
    not be applied on some host; the others have it."""
    result = app.call(
        "templates.set",
        name=name,
        selector=selector,
        spec=read_spec(path),
        priority=priority,
        dry_run=dry_run,
    )
    report(app, result, as_json, f"template {name} {'created' if result['new'] else 'set'}")


@templates.command("example")
def templates_example() -> None:
    """Print an example spec to start from."""
    click.echo(SPEC_EXAMPLE)


@templates.command("list")
@json_option
@pass_app
def templates_list(app: App, as_json: bool) -> None:
    """List templates, with the hosts each one picks."""
    rows = app.call("templates.list")
    if as_json:
        render.emit_json(rows)
        return
    c = render.cell
    render.table(
        app.out,
        ("TEMPLATE", "SELECTOR", "PRIORITY", "HOSTS", "DEFINES", "UPDATED"),
        (
            (
                c(t["name"]),
                c(t["selector"]),
                str(t["priority"]),
                str(t["picked"]),
                c(defines(t["spec"])),
                render.ago(t["updated_at"]),
            )
            for t in rows
        ),
        empty="no templates yet: see 'fleetctl templates set --help'",
    )


def defines(spec: dict[str, Any]) -> str:
    parts = []
    for key in ("repositories", "groups", "schedules", "maintenance"):
        names = list(spec.get(key) or [])
        if names:
            parts.append(f"{key}: {', '.join(names)}")
    return "; ".join(parts)


@templates.command("show")
@click.argument("name")
@json_option
@pass_app
def templates_show(app: App, name: str, as_json: bool) -> None:
    """Show template NAME: its selector, its spec (as 'templates set
    --file' takes it), and each host it picks with what it holds of it."""
    t = app.call("templates.show", name=name)
    if as_json:
        render.emit_json(t)
        return
    c = render.cell
    render.fields(
        app.out,
        [
            ("template", c(t["name"])),
            ("selector", c(t["selector"])),
            ("priority", str(t["priority"])),
            ("updated", c(t["updated_at"])),
        ],
    )
    app.out.print(escape(json.dumps(t["spec"], indent=2)), soft_wrap=True)
    render.table(
        app.out,
        ("HOST", "HOLDS", "PROBLEM"),
        ((c(h["host"]), c(", ".join(h["holds"])), c(h["template_error"])) for h in t["hosts"]),
        empty="it picks no host",
    )


@templates.command("delete")
@click.argument("name")
@click.option(
    "--keep",
    is_flag=True,
    help="What it made on hosts stays, as each host's own (default: it goes).",
)
@click.option("--dry-run", is_flag=True, help="Say what it would change; change nothing.")
@json_option
@pass_app
def templates_delete(app: App, name: str, keep: bool, dry_run: bool, as_json: bool) -> None:
    """Delete template NAME. The groups and schedules it made go from every
    host, but those changed on a host (they stay, as its own); the
    repositories it attached stay attached."""
    result = app.call("templates.delete", name=name, keep=keep, dry_run=dry_run)
    report(app, result, as_json, f"template {name} deleted")


@templates.command("apply")
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="Say what it would change; change nothing.")
@json_option
@pass_app
def templates_apply(app: App, name: Optional[str], dry_run: bool, as_json: bool) -> None:
    """Apply template NAME (default: every template) again to the hosts it
    picks, e.g. once what kept it from one host is fixed."""
    result = app.call("templates.apply", name=name, dry_run=dry_run)
    report(app, result, as_json, f"template {name} applied" if name else "templates applied")
