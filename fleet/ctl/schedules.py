"""schedules: when a host backs up which of its source groups."""

from __future__ import annotations

from typing import Any, Optional

import click

from . import render
from .app import App, confirm, inherit_option, json_option, pass_app
from .groups import origin

CRON_HELP = (
    "Five fields (minute hour day-of-month month day-of-week), or @hourly, "
    "@daily, @weekly, @monthly."
)


@click.group()
def schedules() -> None:
    """Schedules: a cron expression and the source groups it backs up.

    Times are in the schedule's --timezone, or the host's own zone as its
    agent reports it (UTC until it has). A time a DST change skips fires
    when the clock jumps; a time it repeats fires once.

    The agent keeps its host's schedules and fires them, with fleetd up or
    not: each fire backs up every group of the schedule (by 'schedule' in
    'jobs list'). A time missed while the host was down fires once when it
    is back, as a catch-up; a fire while the host is busy queues behind the
    running job; a group's backup never queues twice.
    """


def fires_text(fires: list) -> str:
    """Fire times one a line: local, then UTC."""
    return "\n".join(f"{f['local']}  ({f['fires_at']})" for f in fires)


def fires_cell(s: dict) -> str:
    return fires_text(s["next_fires"][:2]) if s["enabled"] else "disabled"


@schedules.command("list")
@click.argument("host")
@json_option
@pass_app
def schedules_list(app: App, host: str, as_json: bool) -> None:
    """List HOST's schedules with their next fire times, local and UTC."""
    rows = app.call("schedules.list", host=host)
    if as_json:
        render.emit_json(rows)
        return
    c = render.cell
    render.table(
        app.out,
        ("SCHEDULE", "CRON", "TIMEZONE", "GROUPS", "NEXT (UTC)"),
        (
            (c(s["name"]), c(s["cron"]), c(s["timezone"]), c(s["groups"]), c(fires_cell(s)))
            for s in rows
        ),
        empty="no schedules: add one with 'fleetctl schedules create'",
    )
    warn_retention(app, {g: w for s in rows for g, w in s["retention_warnings"].items()})


def warn_retention(app: App, warnings: dict[str, list[str]]) -> None:
    """What a group's retention keeps that its schedules cannot give it, on stderr."""
    for group, lines in sorted(warnings.items()):
        for line in lines:
            app.err.print(f"warning: group {group}: {line}", markup=False)


@schedules.command("show")
@click.argument("host")
@click.argument("name")
@json_option
@pass_app
def schedules_show(app: App, host: str, name: str, as_json: bool) -> None:
    """Show one schedule and its next three fire times."""
    s = app.call("schedules.show", host=host, name=name)
    if as_json:
        render.emit_json(s)
        return
    c = render.cell
    zone = s["timezone"] + ("" if s["timezone_from"] == "schedule" else f" ({s['timezone_from']})")
    render.fields(
        app.out,
        [
            ("schedule", c(f"{s['host']}/{s['name']}")),
            ("cron", c(s["cron"])),
            ("timezone", c(zone)),
            ("groups", c(s["groups"])),
            ("enabled", c("yes" if s["enabled"] else "no")),
            ("next fires", c(fires_text(s["next_fires"]) or "-")),
            ("from", c(origin(s))),
            ("updated", c(s["updated_at"])),
        ],
    )


@schedules.command("create")
@click.argument("host")
@click.option("--cron", "cron_expr", required=True, metavar="EXPR", help=CRON_HELP)
@click.option(
    "--group",
    "groups",
    multiple=True,
    required=True,
    metavar="GROUP",
    help="Source group of HOST to back up (repeatable).",
)
@click.option("--name", metavar="NAME", help="Name of the schedule (default: schedule-N).")
@click.option(
    "--timezone", metavar="ZONE", help="IANA zone, e.g. Europe/Paris (default: the host's)."
)
@click.option("--disabled", is_flag=True, help="Create it disabled.")
@json_option
@pass_app
def schedules_create(
    app: App,
    host: str,
    cron_expr: str,
    groups: tuple,
    name: Optional[str],
    timezone: Optional[str],
    disabled: bool,
    as_json: bool,
) -> None:
    """Create a schedule on HOST: back up each --group when --cron fires."""
    params: dict[str, Any] = {"host": host, "cron": cron_expr, "groups": list(groups)}
    if name:
        params["name"] = name
    if timezone:
        params["timezone"] = timezone
    if disabled:
        params["enabled"] = False
    s = app.call("schedules.create", **params)
    if as_json:
        render.emit_json(s)
        return
    first = s["next_fires"][0] if s["next_fires"] else None
    when = f", first at {first['local']} ({first['fires_at']})" if first else " (disabled)"
    app.err.print(f"created schedule {s['host']}/{s['name']}{when}", markup=False)
    warn_retention(app, s["retention_warnings"])


@schedules.command("edit")
@click.argument("host")
@click.argument("name")
@click.option("--cron", "cron_expr", metavar="EXPR", help=CRON_HELP)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="GROUP",
    help="Replace the source groups (repeatable).",
)
@click.option("--rename", "new_name", metavar="NEW", help="New name.")
@click.option("--timezone", metavar="ZONE", help="IANA zone; '' goes back to the host's own zone.")
@inherit_option
@json_option
@pass_app
def schedules_edit(
    app: App,
    host: str,
    name: str,
    cron_expr: Optional[str],
    groups: tuple,
    new_name: Optional[str],
    timezone: Optional[str],
    inherit: tuple,
    as_json: bool,
) -> None:
    """Change a schedule; options not given stay as they are. On a schedule
    a template made, what is changed here (enabling or disabling too)
    overrides the template on this host, until --inherit gives it back."""
    params: dict[str, Any] = {}
    if cron_expr is not None:
        params["cron"] = cron_expr
    if groups:
        params["groups"] = list(groups)
    if new_name:
        params["new_name"] = new_name
    if timezone is not None:
        params["timezone"] = timezone
    if inherit:
        params["inherit"] = list(inherit)
    if not params:
        raise click.UsageError("nothing to change: give at least one option")
    s = app.call("schedules.edit", host=host, name=name, **params)
    if as_json:
        render.emit_json(s)
        return
    app.err.print(f"updated schedule {s['host']}/{s['name']}", markup=False)


def toggle(app: App, method: str, host: str, name: str, as_json: bool, word: str) -> None:
    s = app.call(method, host=host, name=name)
    if as_json:
        render.emit_json(s)
        return
    app.err.print(f"{word} schedule {s['host']}/{s['name']}", markup=False)


@schedules.command("enable")
@click.argument("host")
@click.argument("name")
@json_option
@pass_app
def schedules_enable(app: App, host: str, name: str, as_json: bool) -> None:
    """Let a disabled schedule fire again."""
    toggle(app, "schedules.enable", host, name, as_json, "enabled")


@schedules.command("disable")
@click.argument("host")
@click.argument("name")
@json_option
@pass_app
def schedules_disable(app: App, host: str, name: str, as_json: bool) -> None:
    """Stop a schedule from firing; it is kept, with its groups."""
    toggle(app, "schedules.disable", host, name, as_json, "disabled")


@schedules.command("delete")
@click.argument("host")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def schedules_delete(app: App, host: str, name: str, yes: bool) -> None:
    """Delete a schedule; the jobs it made stay in the history."""
    confirm(yes, f"Delete schedule {host}/{name}?")
    app.call("schedules.delete", host=host, name=name)
    app.err.print(f"deleted schedule {host}/{name}", markup=False)
