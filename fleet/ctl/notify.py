"""notify: where alerts are sent, through Apprise."""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, confirm, json_option, pass_app
from .repo import read_secret_file


@click.group()
def notify() -> None:
    """Notifiers: Apprise URLs (ntfy, email, Slack, Matrix, Telegram,
    webhooks and 100+ more) told of each alert raised and resolved."""


@notify.command("add")
@click.argument("name")
@click.argument("url", required=False)
@click.option(
    "--url-file",
    metavar="FILE",
    help="Read the URL from FILE ('-': standard input); better than URL, which any "
    "local user can read in the process list.",
)
@click.option(
    "--on",
    "kinds",
    metavar="KINDS",
    default="all",
    show_default=True,
    help="Alert kinds, comma-separated: backup_failed, backup_warning, overdue, offline, "
    "check_failed, unchecked, locked, maintenance_failed, drill_failed, agent_behind, "
    "tls_refused, or all.",
)
@click.option("--host", "hosts", multiple=True, help="Only this host's alerts (repeatable).")
@click.option("--group", "groups", multiple=True, help="Only this group's alerts (repeatable).")
@json_option
@pass_app
def notify_add(
    app: App,
    name: str,
    url: Optional[str],
    url_file: Optional[str],
    kinds: str,
    hosts: tuple,
    groups: tuple,
    as_json: bool,
) -> None:
    """Send alerts to the Apprise URL as notifier NAME."""
    if bool(url) == bool(url_file):
        raise CtlError("give the URL or --url-file (one of them)", Exit.USAGE)
    if url_file:
        url = read_secret_file(url_file)
    n = app.call(
        "notify.add",
        name=name,
        url=url,
        on=[k.strip() for k in kinds.split(",") if k.strip()],
        hosts=list(hosts),
        groups=list(groups),
    )
    if as_json:
        render.emit_json(n)
        return
    app.err.print(f"notifier {escape(n['name'])} added: {escape(n['url'])}")


@notify.command("list")
@json_option
@pass_app
def notify_list(app: App, as_json: bool) -> None:
    """List notifiers, URLs redacted, with their last delivery."""
    rows = app.call("notify.list")
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("NOTIFIER", "URL", "ON", "HOSTS", "GROUPS", "LAST SENT", "LAST ERROR"),
        (
            (
                render.cell(n["name"]),
                render.cell(n["url"]),
                render.cell(n["on"]),
                render.cell(n["hosts"]),
                render.cell(n["groups"]),
                render.ago(n["last_sent_at"]),
                render.cell(n["last_error"]),
            )
            for n in rows
        ),
        empty="no notifiers: add one with 'fleetctl notify add'",
    )


@notify.command("remove")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def notify_remove(app: App, name: str, yes: bool) -> None:
    """Remove notifier NAME."""
    confirm(yes, f"Remove notifier {name}?")
    app.call("notify.remove", name=name)
    app.err.print(f"notifier {escape(name)} removed")


@notify.command("test")
@click.argument("name")
@pass_app
def notify_test(app: App, name: str) -> None:
    """Send a test notification through NAME now; exit 1 when it did not get through."""
    r = app.call("notify.test", name=name)
    if r["sent"]:
        app.err.print(f"notifier {escape(name)}: sent")
        return
    raise CtlError(f"notifier {name}: {r['error']}", Exit.ERROR)
