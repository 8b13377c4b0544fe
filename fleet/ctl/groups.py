"""groups: source groups (what to back up, how long to keep it)."""

from __future__ import annotations

from typing import Any, Optional

import click

from ..common import retention
from . import render
from .app import App, Duration, confirm, inherit_option, json_option, pass_app
from .repo import read_secret_file


def retention_options(fn: Any, prefix: str = "") -> Any:
    """--keep-* (or, prefix "copy": --copy-keep-*, the copy's retention)."""
    where = " in the copy" if prefix else ""
    for key in reversed(retention.COUNTS):
        flag = "--" + key.replace("_", "-")
        fn = click.option(
            _flag(prefix, flag),
            _key(prefix, key),
            type=click.IntRange(min=0),
            help=f"restic forget {flag} N{where} (0 unsets).",
        )(fn)
    return click.option(
        _flag(prefix, "--keep-within"),
        _key(prefix, "keep_within"),
        metavar="DURATION",
        help=f"restic forget --keep-within{where}, e.g. 30d or 1y6m ('' unsets).",
    )(fn)


def _flag(prefix: str, flag: str) -> str:
    return f"--{prefix}-{flag[2:]}" if prefix else flag


def _key(prefix: str, key: str) -> str:
    return f"{prefix}_{key}" if prefix else key


def repository_options(fn: Any) -> Any:
    fn = retention_options(fn, "copy")
    fn = click.option(
        "--copy-cron",
        metavar="CRON",
        help="Copy on this cron (UTC) instead of after each backup ('' or off: after each).",
    )(fn)
    fn = click.option(
        "--copy-to",
        metavar="REPO",
        help="Copy each new snapshot into this second repository (3-2-1; '' stops copying).",
    )(fn)
    return click.option(
        "--repo",
        "repository",
        metavar="REPO",
        help="Back up into this repository (default: the host's first; '' goes back to it).",
    )(fn)


def group_options(fn: Any) -> Any:
    fn = click.option(
        "--drill-sample",
        metavar="N|P%",
        help="How much of the latest snapshot a drill restores: N files or P% of them "
        "(default 20; '' resets).",
    )(fn)
    fn = click.option(
        "--drill-cron",
        metavar="CRON",
        help="Run a restore drill on this cron (UTC): a sample of the latest snapshot "
        "restored, verified and removed ('' or off: none).",
    )(fn)
    fn = click.option(
        "--ping-url-file",
        metavar="FILE",
        help="Read the ping URL from FILE ('-': standard input); better than --ping-url, "
        "which any local user can read in the process list.",
    )(fn)
    fn = click.option(
        "--ping-url",
        metavar="URL",
        help="Healthchecks-style URL pinged as each backup starts (URL/start), succeeds "
        "(URL) and fails (URL/fail) ('' removes it).",
    )(fn)
    fn = click.option(
        "--expect-every",
        type=Duration(),
        help="Without a schedule: a backup is expected this often, e.g. 1d; "
        "overdue past 1.5 times that (0 unsets).",
    )(fn)
    fn = click.option(
        "--timeout",
        type=Duration(),
        help="Stop a backup that runs longer, e.g. 6h, and fail it (0: no limit, the default).",
    )(fn)
    fn = click.option(
        "--hook-timeout",
        type=Duration(),
        help="Stop a hook that runs longer, e.g. 10m (0: the default, 30m).",
    )(fn)
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
    return repository_options(retention_options(fn))


def ping_from(kwargs: dict) -> None:
    """--ping-url-file read into ping_url (a secret: never echoed)."""
    path = kwargs.pop("ping_url_file", None)
    if path is None:
        return
    if kwargs.get("ping_url") is not None:
        raise click.UsageError("give --ping-url or --ping-url-file, not both")
    kwargs["ping_url"] = read_secret_file(path)


def retention_from(kwargs: dict, prefix: str = "") -> dict:
    """The retention options given (and out of kwargs)."""
    out = {}
    for k in retention.KEYS:
        value = kwargs.pop(_key(prefix, k), None)
        if value is not None:
            out[k] = value
    return out


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


def copy_retention(g: dict) -> Optional[str]:
    if not g["copy_to"]:
        return None
    if g["copy_retention"] is None:
        return "as the group's"
    return retention.describe(g["copy_retention"])


def limits(g: dict) -> str:
    hooks = f"{g['hook_timeout']} s" if g.get("hook_timeout") else "30 min (default)"
    backup = f"{g['timeout']} s" if g.get("timeout") else "none"
    return f"hooks {hooks}, backup {backup}"


def drills(g: dict) -> Optional[str]:
    if not g["drill_cron"]:
        return None
    return (
        f"{g['drill_cron']} (UTC), sample {g['drill_sample']}, "
        f"next {g['next_drill_at'] or 'computed at the next look'}"
    )


def pinged(g: dict) -> Optional[str]:
    if not g["ping_url"]:
        return None
    if g["ping_error"]:
        return f"{g['ping_url']} (last ping {g['ping_sent_at']} failed: {g['ping_error']})"
    if g["ping_sent_at"]:
        return f"{g['ping_url']} (last ping {g['ping_sent_at']})"
    return f"{g['ping_url']} (not pinged yet)"


def copies_run(g: dict) -> Optional[str]:
    if not g["copy_to"]:
        return None
    if not g["copy_cron"]:
        return "after each backup"
    return f"{g['copy_cron']} (UTC), next {g['next_copy_at'] or 'computed at the next look'}"


def attached(app: App, g: dict) -> None:
    for name in g.get("attached") or ():
        app.err.print(f"{g['host']} now uses repository {name} too", markup=False)


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
            ("time limits", c(limits(g))),
            ("repository", c(g["repository"] or "the host's default")),
            ("copy to", c(g["copy_to"])),
            ("copy retention", c(copy_retention(g))),
            ("copies run", c(copies_run(g))),
            ("expected every", c(f"{g['expect_every']} s" if g["expect_every"] else None)),
            ("ping URL", c(pinged(g))),
            ("drills", c(drills(g))),
            ("schedules", c(g["schedules"])),
            ("from", c(origin(g))),
            ("updated", c(g["updated_at"])),
        ],
    )
    warn(app, g)


def origin(row: dict[str, Any]) -> str:
    """Where a group's or schedule's settings came from."""
    if not row.get("template"):
        return "set on this host"
    overridden = row.get("overrides") or []
    mine = f"; this host overrides {', '.join(overridden)}" if overridden else ""
    return f"template {row['template']}{mine}"


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
    ping_from(kwargs)
    policy = retention_from(kwargs)
    copy_policy = retention_from(kwargs, "copy")
    if copy_policy:
        kwargs["copy_retention"] = copy_policy
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
    attached(app, g)


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
@click.option(
    "--clear-copy-retention",
    is_flag=True,
    help="The copy keeps what the group keeps (before applying any --copy-keep-*).",
)
@inherit_option
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
    clear_copy_retention: bool,
    inherit: tuple,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Change a source group; options not given stay as they are. On a
    group a template made, what is changed here overrides the template on
    this host (until --inherit gives it back)."""
    ping_from(kwargs)
    policy = retention_from(kwargs)
    copy_policy = retention_from(kwargs, "copy")
    if copy_policy:
        kwargs["copy_retention"] = copy_policy
    if clear_copy_retention:
        kwargs["clear_copy_retention"] = True
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
    if inherit:
        params["inherit"] = list(inherit)
    if not params:
        raise click.UsageError("nothing to change: give at least one option")
    g = app.call("groups.edit", host=host, name=name, **params)
    if as_json:
        render.emit_json(g)
        return
    app.err.print(f"updated source group {g['host']}/{g['name']}", markup=False)
    attached(app, g)
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
