"""audit: who changed what, and when."""

from __future__ import annotations

from typing import Optional

import click

from . import render
from .app import App, json_option, pass_app


@click.command()
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Newest N entries.",
)
@click.option("--actor", help="Only this user (or agent:HOST).")
@click.option("--action", help="Only actions starting with this, e.g. 'repo' or 'user.add'.")
@json_option
@pass_app
def audit(app: App, limit: int, actor: Optional[str], action: Optional[str], as_json: bool) -> None:
    """List the audit log, newest first (admin)."""
    rows = app.call("audit.list", limit=limit, actor=actor, action=action)
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("TIME", "ACTOR", "ACTION", "TARGET", "FROM"),
        (
            (
                render.cell(a["created_at"]),
                render.cell(a["actor"]),
                render.cell(a["action"]),
                render.cell(a["target"]),
                render.cell(a["address"]),
            )
            for a in rows
        ),
        empty="the audit log is empty",
    )
