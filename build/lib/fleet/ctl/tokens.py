"""tokens: API tokens for scripts and monitoring."""

from __future__ import annotations

from typing import Optional

import click

from . import render
from .app import App, Duration, json_option, pass_app


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens (they act with their user's role)."""


@tokens.command("create")
@click.argument("name")
@click.option(
    "--expires",
    type=Duration(allow_never=True),
    default="never",
    show_default=True,
    help="Lifetime, e.g. 90d.",
)
@json_option
@pass_app
def tokens_create(app: App, name: str, expires: Optional[int], as_json: bool) -> None:
    """Create a token; it is printed once and cannot be shown again."""
    result = app.call("tokens.create", name=name, expires_in=expires)
    if as_json:
        render.emit_json(result)
        return
    app.out.print(result["token"], markup=False)
    app.err.print(
        f"token {result['id']} ({result['name']}) for {result['user']}, expires {result['expires_at'] or 'never'}; store it now, it is not shown again"
    )


@tokens.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's tokens (admin).")
@json_option
@pass_app
def tokens_list(app: App, all_users: bool, as_json: bool) -> None:
    """List tokens (yours, or everyone's with --all)."""
    rows = app.call("tokens.list", all=all_users or None)
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("ID", "NAME", "USER", "STATE", "EXPIRES", "LAST USED"),
        (
            (
                str(t["id"]),
                render.cell(t["name"]),
                render.cell(t["user"]),
                render.status(t["state"]),
                render.cell(t["expires_at"] or "never"),
                render.ago(t["last_used_at"]),
            )
            for t in rows
        ),
        empty="no tokens",
    )


@tokens.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
@pass_app
def tokens_revoke(app: App, token_id: int) -> None:
    """Revoke a token by its id (see 'tokens list')."""
    t = app.call("tokens.revoke", id=token_id)
    app.err.print(f"token {t['id']} ({t['name']}) revoked")
