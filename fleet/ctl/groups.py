"""groups: source groups (what to back up, how long to keep it)."""

from __future__ import annotations

from typing import Any, Optional

import click

from ..common import retention
from . import render
from .app import App, Duration, confirm, json_option, pass_app


def retention_options(fn: Any) -> Any:
    for key in reversed(retention.COUNTS):
        flag = "--" + key.replace("_", "-")
        fn = click.option(
            flag, key, type=click.IntRange(min=0), help=f"restic forget {flag} N (0 unsets)."
        )(fn)
    return click.option(
        "--keep-within",
        "keep_within",
        metavar="DURATION",
        help="restic forget --keep-within, e.g. 30d or 1y6m ('' unsets).",
    )(fn)


def group_options(fn: Any) -> Any:
    fn = click.option("--retry-delay", type=Duration(), help="Wait between retries, e.g. 5m.")(fn)
    fn = click.option("--retries", type=click.IntRange(min=0), help="Retries of a failed backup.")(
        fn
    )
    fn = click.option(
        "--post-hook", metavar="CMD", help="Shell command run after the backup ('' removes it)."
    )(fn)
    fn = click.option(
        "--pre-hook",
        metavar="CMD",
        help="Shell command run before the backup; a failure fails the job ('' removes it).",
    )(fn)
    return retention_options(fn)


def retention_from(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in retention.KEYS if kwargs.get(k) is not None}


@click.group()
def groups() -> None:
    """Source groups: include paths, excludes, retention and hooks of a host.

    A group's name is the restic tag of its snapshots.
    """


def render_groups(app: App, rows: list) -> None:
    render.table(
        app.out,
        ("GROUP", "INCLUDES", "EXCLUDES", "RETENTION", "SCHEDULES"),
        (
            (
                render.cell(g["name"]),
                render.cell(g["includes"]),
                render.cell(g["excludes"]),
                render.cell(retention.describe(g["retention"])),
                render.cell(g["schedules"]),
            )
            for g in rows
        ),
        empty="no source groups: add one with 'fleetctl groups create'",
    )
    for g in rows:
        warn(app, g)


def warn(app: App, g: dict) -> None:
    """What the group's retention keeps that its schedules cannot give it, on stderr."""
    for line in g["retention_warnings"]:
        app.err.print(f"warning: group {g['name']}: {line}", markup=False)


@groups.command("list")
@click.argument("host")
@json_option
@pass_app
def groups_list(app: App, host: str, as_json: bool) -> None:
    """List HOST's source groups."""
    rows = app.call("groups.list", host=host)
    if as_json:
        render.emit_json(rows)
    else:
        render_groups(app, rows)


@groups.command("show")
@click.argument("host")
@click.argument("name")
@json_option
@pass_app
def groups_show(app: App, host: str, name: str, as_json: bool) -> None:
    """Show one source group."""
    g = app.call("groups.show", host=host, name=name)
    if as_json:
        render.emit_json(g)
        return
    c = render.cell
    render.fields(
        app.out,
        [
            ("group", c(f"{g['host']}/{g['name']}")),
            ("includes", c(g["includes"])),
            ("excludes", c(g["excludes"])),
            ("retention", c(retention.describe(g["retention"]))),
            ("pre-hook", c(g["pre_hook"])),
            ("post-hook", c(g["post_hook"])),
            ("retries", c(f"{g['retries']} (every {g['retry_delay']} s)")),
            ("schedules", c(g["schedules"])),
            ("updated", c(g["updated_at"])),
        ],
    )
    warn(app, g)


@groups.command("create")
@click.argument("host")
@click.argument("name")
@click.option(
    "--include",
    "includes",
    multiple=True,
    required=True,
    metavar="PATH",
    help="Absolute path to back up (repeatable).",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PATTERN",
    help="restic exclude pattern (repeatable).",
)
@group_options
@json_option
@pass_app
def groups_create(
    app: App, host: str, name: str, includes: tuple, excludes: tuple, as_json: bool, **kwargs: Any
) -> None:
    """Create source group NAME on HOST."""
    policy = retention_from(kwargs)
    g = app.call(
        "groups.create",
        host=host,
        name=name,
        includes=list(includes),
        excludes=list(excludes),
        retention=policy or None,
        **kwargs,
    )
    if as_json:
        render.emit_json(g)
        return
    app.err.print(
        f"created source group {g['host']}/{g['name']} ({retention.describe(g['retention'])})",
        markup=False,
    )


@groups.command("edit")
@click.argument("host")
@click.argument("name")
@click.option("--rename", "new_name", metavar="NEW", help="New name (and so new snapshot tag).")
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATH",
    help="Replace the include paths (repeatable).",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PATTERN",
    help="Replace the exclude patterns (repeatable).",
)
@click.option("--clear-excludes", is_flag=True, help="Remove every exclude pattern.")
@click.option(
    "--clear-retention",
    is_flag=True,
    help="Drop the retention rules before applying any given here.",
)
@group_options
@json_option
@pass_app
def groups_edit(
    app: App,
    host: str,
    name: str,
    new_name: Optional[str],
    includes: tuple,
    excludes: tuple,
    clear_excludes: bool,
    clear_retention: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Change a source group; options not given stay as they are."""
    policy = retention_from(kwargs)
    if clear_excludes and excludes:
        raise click.UsageError("--exclude and --clear-excludes contradict each other")
    params = {k: v for k, v in kwargs.items() if v is not None}
    if includes:
        params["includes"] = list(includes)
    if excludes or clear_excludes:
        params["excludes"] = list(excludes)
    if policy:
        params["retention"] = policy
    if clear_retention:
        params["clear_retention"] = True
    if new_name:
        params["new_name"] = new_name
    if not params:
        raise click.UsageError("nothing to change: give at least one option")
    g = app.call("groups.edit", host=host, name=name, **params)
    if as_json:
        render.emit_json(g)
        return
    app.err.print(f"updated source group {g['host']}/{g['name']}", markup=False)
    warn(app, g)


@groups.command("delete")
@click.argument("host")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def groups_delete(app: App, host: str, name: str, yes: bool) -> None:
    """Delete a source group (refused while a schedule uses it).

    Its snapshots stay in the repository.
    """
    confirm(yes, f"Delete source group {host}/{name}?")
    app.call("groups.delete", host=host, name=name)
    app.err.print(f"deleted source group {host}/{name}", markup=False)
