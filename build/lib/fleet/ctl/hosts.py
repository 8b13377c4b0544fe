"""hosts list/show/remove, and enroll."""

from __future__ import annotations

from typing import Optional

import click

from . import render
from .app import App, Duration, confirm, json_option, pass_app


@click.group()
def hosts() -> None:
    """Servers with an agent (or an enrollment pending)."""


def last_backup(host: dict) -> str:
    b = host.get("last_backup")
    if not b:
        return "-"
    return f"{render.status(b['status'])} {render.ago(b['at'])} (job {b['job']})"


@hosts.command("list")
@json_option
@pass_app
def hosts_list(app: App, as_json: bool) -> None:
    """List hosts with their state and last backup."""
    rows = app.call("hosts.list")
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("HOST", "STATUS", "LAST SEEN", "AGENT", "LAST BACKUP"),
        (
            (
                render.cell(h["name"]),
                render.status(h["status"]),
                render.ago(h["last_seen_at"]),
                render.cell(h["agent_version"]),
                last_backup(h),
            )
            for h in rows
        ),
        empty="no hosts yet: add one with 'fleetctl enroll HOST'",
    )


@hosts.command("show")
@click.argument("host")
@json_option
@pass_app
def hosts_show(app: App, host: str, as_json: bool) -> None:
    """Show one host."""
    h = app.call("hosts.show", host=host)
    if as_json:
        render.emit_json(h)
        return
    c = render.cell
    render.fields(
        app.out,
        [
            ("host", c(h["name"])),
            ("status", render.status(h["status"])),
            ("last seen", render.ago(h["last_seen_at"])),
            ("hostname", c(h["hostname"])),
            ("os/arch", c(f"{h['os']}/{h['arch']}" if h["os"] else None)),
            ("time zone", c(h["timezone"])),
            ("agent", c(h["agent_version"])),
            ("restic", c(h["restic_version"])),
            ("enrolled", c(h["enrolled_at"])),
            ("repository", c(h["repo"])),
            ("source groups", c(h["groups"])),
            (
                "schedule version",
                c(f"{h['applied_schedule_version']} applied of {h['schedule_version']}"),
            ),
            ("last backup", last_backup(h)),
        ],
    )


@hosts.command("remove")
@click.argument("host")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def hosts_remove(app: App, host: str, yes: bool) -> None:
    """Forget a host: its repository settings, groups, schedules and job history.

    The restic repository itself and its snapshots are not touched.
    """
    confirm(yes, f"Remove host {host} and its whole history from fleetd?")
    app.call("hosts.remove", host=host)
    app.err.print(f"removed host {host}")


@click.command()
@click.argument("host")
@click.option(
    "--expires",
    type=Duration(),
    default="1h",
    show_default=True,
    help="How long the token may be used.",
)
@json_option
@pass_app
def enroll(app: App, host: str, expires: Optional[int], as_json: bool) -> None:
    """Print the one-line command that enrolls HOST's agent.

    The token inside is single use and expires; HOST is created here if it
    is new, so its repository and groups can be set up before the agent runs.
    """
    result = app.call("enroll.create", host=host, expires_in=expires)
    if as_json:
        render.emit_json(result)
        return
    app.out.print(result["command"], markup=False, soft_wrap=True)
    app.err.print(f"run this on {result['host']} before {result['expires_at']} (single use)")
