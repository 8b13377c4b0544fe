"""login, logout, whoami."""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

import click

from ..common.exitcodes import Exit
from . import config, render
from .app import App, CtlError, Duration, ask_secret, json_option, pass_app
from .client import Client, Failure


@click.command()
@click.option(
    "--server",
    help="fleetd URL, e.g. ws://127.0.0.1:8433 or wss://fleet.example:8433; with replicas, "
    "their URLs comma-separated (saved as a list, tried in order).",
)
@click.option("--user", "-u", default="admin", show_default=True, help="User name.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input (for scripts)."
)
@click.option(
    "--cafile",
    type=click.Path(dir_okay=False, exists=True),
    help="CA or self-signed certificate to trust for wss://.",
)
@click.option(
    "--expires",
    type=Duration(allow_never=True),
    default="30d",
    show_default=True,
    help="Lifetime of the token this login creates ('never' for none).",
)
@pass_app
def login(
    app: App,
    server: Optional[str],
    user: str,
    password_stdin: bool,
    cafile: Optional[str],
    expires: Optional[int],
) -> None:
    """Log in and save an API token (mode 0600) under the XDG config dir."""
    settings = app.settings
    if server:
        try:
            settings.server = config.normalize_servers(server)
        except ValueError as exc:
            raise CtlError(str(exc), Exit.USAGE) from None
    if cafile:
        # kept as an absolute path: later commands run from anywhere
        settings.cafile = os.path.abspath(cafile)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = ask_secret(f"Password for {user} at {settings.server}", "--password-stdin")
    if not password:
        raise CtlError("empty password", Exit.USAGE)
    params = {
        "user": user,
        "password": password,
        "token_name": f"fleetctl@{socket.gethostname()}",
        "expires_in": expires or 0,
    }
    with Client(settings.server, None, settings.cafile, path="/login") as c:
        result = c.call("auth.login", **params)
        reached = c.server
    settings.token = result["token"]
    path = app.save_settings()
    expiry = result["expires_at"] or "never"
    app.err.print(
        f"logged in to {reached} as {result['user']} ({result['role']}); token saved in {path}, expires {expiry}"
    )


@click.command()
@pass_app
def logout(app: App) -> None:
    """Revoke the saved token on the server and forget it here."""
    settings = app.settings
    if settings.token:
        try:
            with app.client() as c:
                c.call("auth.logout")
        except Failure as exc:
            if exc.code != "unauthorized":  # an already dead token needs no revoking
                raise
    settings.token = None
    app.save_settings()
    app.err.print("logged out")


@click.command()
@json_option
@pass_app
def whoami(app: App, as_json: bool) -> None:
    """Show the user and token this fleetctl acts as."""
    me = app.call("auth.whoami")
    if as_json:
        render.emit_json({**me, "server": app.settings.server})
        return
    render.fields(
        app.out,
        [
            ("user", render.cell(me["user"])),
            ("role", render.cell(me["role"])),
            ("server", render.cell(app.settings.server)),
            ("token", render.cell(me["token"])),
            ("expires", render.cell(me["token_expires_at"] or "never")),
            ("server version", render.cell(me["server_version"])),
        ],
    )
