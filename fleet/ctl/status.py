"""status: the fleet at a glance, and a monitoring check (exit 0 ok, 1
warning, 2 critical, as Nagios reads them)."""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from ..common.exitcodes import Exit
from . import render
from .app import App, Duration, json_option, pass_app

MARK = {"critical": "[red]CRITICAL[/]", "warning": "[yellow]WARNING[/]", "ok": "[green]OK[/]"}


def last_success(g: dict) -> str:
    if not g["last_success_at"]:
        return "never"
    added = g["last_success_bytes_added"]
    extra = f" (+{render.human_bytes(added)})" if added is not None else ""
    return render.ago(g["last_success_at"]) + extra


def state(g: dict) -> str:
    if g["overdue"]:
        return "[red]overdue[/]"
    if g["last_status"] in ("failed", "lost"):
        return render.status(g["last_status"])
    if g["last_status"]:
        return render.status(g["last_status"])
    return "-"


@click.command()
@click.option(
    "--offline-after",
    type=Duration(),
    default="1h",
    show_default=True,
    help="A host offline for this long is critical.",
)
@click.option(
    "--unchecked-after",
    type=Duration(),
    default="14d",
    show_default=True,
    help="A repository with no successful check for this long is a warning.",
)
@json_option
@pass_app
def status(app: App, offline_after: int, unchecked_after: int, as_json: bool) -> None:
    """The fleet at a glance: each host's groups with their last successful
    backup, last outcome and next run; running jobs; and the problems.

    Exits 0 when all is well, 1 with a warning (a stale lock, a repository
    not checked lately, a backup that could not read some files) and 2 with
    anything critical (a failed or overdue backup, a host offline too long,
    a failed check or maintenance): usable as a cron or Nagios check as it is.
    """
    s = app.call("status.show", offline_after=offline_after, unchecked_after=unchecked_after)
    code = {0: Exit.OK, 1: Exit.WARNING, 2: Exit.CRITICAL}[int(s["exit_code"])]
    if as_json:
        render.emit_json(s)
        raise click.exceptions.Exit(code)
    hosts = s["hosts"]
    app.out.print(
        f"{MARK[s['status']]} {s['hosts_online']}/{len(hosts)} hosts online, "
        f"{len(s['running'])} job(s) running, {len(s['problems'])} problem(s), "
        f"{s['alerts_open']} open alert(s)"
    )
    rows = []
    for h in hosts:
        host = escape(h["name"]) + ("" if h["online"] else " [dim](offline)[/]")
        for g in h["groups"] or [None]:
            if g is None:
                rows.append((host, "-", "-", "-", "-"))
                continue
            rows.append(
                (
                    host,
                    render.cell(g["name"]),
                    last_success(g),
                    state(g),
                    render.cell(g["next_run_at"] or ("-" if g["scheduled"] else "unscheduled")),
                )
            )
    render.table(
        app.out,
        ("HOST", "GROUP", "LAST SUCCESS", "LAST", "NEXT RUN (UTC)"),
        rows,
        empty="no hosts: enroll one with 'fleetctl enroll'",
    )
    if s["running"]:
        render.table(
            app.out,
            ("JOB", "HOST", "KIND", "GROUP", "PROGRESS"),
            (
                (
                    str(j["job"]),
                    render.cell(j["host"]),
                    render.cell(j["kind"]),
                    render.cell(j["group"]),
                    progress(j["progress"]),
                )
                for j in s["running"]
            ),
        )
    for p in s["problems"]:
        app.out.print(f"{MARK[p['severity']]} {escape(p['message'])}")
    raise click.exceptions.Exit(code)


def progress(p: Optional[dict]) -> str:
    if not p:
        return "-"
    return f"{p['percent_done'] * 100:.0f}%"
