"""alerts: what fleetd found wrong, from raised to resolved."""

from __future__ import annotations

import click
from rich.markup import escape

from . import render
from .app import App, json_option, pass_app


@click.group()
def alerts() -> None:
    """Alerts fleetd raises (a failed or overdue backup, an offline host, a
    failed check, a stale lock, a repository not checked lately): one per
    condition, resolved by itself when the condition clears."""


@alerts.command("list")
@click.option("--all", "all_", is_flag=True, help="Resolved alerts too (the newest 500).")
@json_option
@pass_app
def alerts_list(app: App, all_: bool, as_json: bool) -> None:
    """List open alerts, newest first."""
    rows = app.call("alerts.list", all=all_)
    if as_json:
        render.emit_json(rows)
        return

    def state(a: dict) -> str:
        if not a["open"]:
            return "[green]resolved[/] " + render.ago(a["resolved_at"])
        if a["acknowledged_at"]:
            return f"acknowledged by {escape(a['acknowledged_by'] or '?')}"
        return "[red]open[/]" if a["severity"] == "critical" else "[yellow]open[/]"

    render.table(
        app.out,
        ("ALERT", "SEVERITY", "KIND", "RAISED", "STATE", "MESSAGE"),
        (
            (
                str(a["id"]),
                render.cell(a["severity"]),
                render.cell(a["kind"]),
                render.ago(a["raised_at"]),
                state(a),
                render.cell(a["message"]),
            )
            for a in rows
        ),
        empty="no open alerts" if not all_ else "no alerts",
    )


@alerts.command("ack")
@click.argument("alert_id", metavar="ID", type=click.IntRange(min=1))
@json_option
@pass_app
def alerts_ack(app: App, alert_id: int, as_json: bool) -> None:
    """Acknowledge alert ID: a person has seen it (it stays open until its
    condition clears)."""
    a = app.call("alerts.ack", id=alert_id)
    if as_json:
        render.emit_json(a)
        return
    app.err.print(f"alert {a['id']} acknowledged: {escape(a['message'])}")
