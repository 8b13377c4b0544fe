"""users: add, list, passwd, role, remove (admin, except passwd on yourself)."""

from __future__ import annotations

import sys

import click

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, ask_secret, confirm, json_option, pass_app

ROLES = click.Choice(["viewer", "operator", "admin"])


def read_password(from_stdin: bool, who: str) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = ask_secret(f"New password for {who}", "--password-stdin", twice=True)
    if not password:
        raise CtlError("empty password", Exit.USAGE)
    return password


@click.group()
def users() -> None:
    """Manage users and their roles (viewer, operator, admin)."""


@users.command("list")
@json_option
@pass_app
def users_list(app: App, as_json: bool) -> None:
    """List users."""
    rows = app.call("users.list")
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("USER", "ROLE", "CREATED"),
        (
            (render.cell(u["name"]), render.cell(u["role"]), render.ago(u["created_at"]))
            for u in rows
        ),
    )


@users.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=ROLES,
    default="viewer",
    show_default=True,
    help="viewer: read; operator: also run and configure; admin: also users and tokens.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_app
def users_add(app: App, name: str, role: str, password_stdin: bool) -> None:
    """Add a user."""
    user = app.call("users.add", name=name, role=role, password=read_password(password_stdin, name))
    app.err.print(f"added user {user['name']} ({user['role']})")


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_app
def users_passwd(app: App, name: str, password_stdin: bool) -> None:
    """Set a user's password (your own, or anyone's as admin)."""
    app.call("users.passwd", name=name, password=read_password(password_stdin, name))
    app.err.print(f"password of {name} changed")


@users.command("role")
@click.argument("name")
@click.argument("role", type=ROLES)
@pass_app
def users_role(app: App, name: str, role: str) -> None:
    """Change a user's role."""
    user = app.call("users.role", name=name, role=role)
    app.err.print(f"{user['name']} is now {user['role']}")


@users.command("remove")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def users_remove(app: App, name: str, yes: bool) -> None:
    """Remove a user and revoke all of their tokens."""
    confirm(yes, f"Remove user {name} and revoke their tokens?")
    app.call("users.remove", name=name)
    app.err.print(f"removed user {name}")
