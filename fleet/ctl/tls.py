"""tls: fleetd's certificate key, and rotating it without locking agents out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.markup import escape

from ..common import tlspins
from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, json_option, pass_app


@click.group()
def tls() -> None:
    """fleetd's TLS key: what agents pin, and rotating it.

    Agents trust fleetd by the pins of its keys. A renewed certificate with
    the same key needs nothing ('tls activate' loads it without a restart).
    A new key: 'tls stage NEW.pem' sends its pin to every agent; once 'tls
    status' shows every host holding it, install the new certificate and key
    where fleetd reads them (--tls-cert, --tls-key) and run 'tls activate'.
    """


def trust_text(t: dict) -> str:
    """How a host's agent trusts fleetd, in words (hosts show, tls status)."""
    if t.get("problem"):
        return f"[red]{escape(t['problem'])}[/]"
    trust = t.get("trust")
    if trust == "unpinned":
        return "pins no key (trusts the system's CAs, or plain ws://)"
    if trust == "certificate":
        return "pins one certificate (enrolled before key pins; gets key pins when it connects)"
    if trust is None:
        return "[dim]unknown (never connected, or an agent older than key pins)[/]"
    pins = t.get("pins") or []
    text = f"{len(pins)} key pin(s): {escape(tlspins.describe(pins))}"
    if "holds_served" in t:
        text += "; holds the served key" if t["holds_served"] else "; [red]lacks the served key[/]"
    if "holds_staged" in t:
        text += (
            ", holds the staged key" if t["holds_staged"] else ", [yellow]lacks the staged key[/]"
        )
    return text


def yes_no(value: Optional[bool], bad: str = "red") -> str:
    if value is None:
        return "-"
    return "yes" if value else f"[{bad}]no[/]"


@tls.command("status")
@json_option
@pass_app
def tls_status(app: App, as_json: bool) -> None:
    """The key fleetd serves, the key staged next, and per host which it holds."""
    s = app.call("tls.status")
    if as_json:
        render.emit_json(s)
        return
    staged = s["staged"]
    if staged is None:
        staged_text = "none"
    elif s["ready"]:
        staged_text = f"{staged}\n[green]every pinning host holds it: ready to activate[/]"
    else:
        staged_text = (
            f"{staged}\n[yellow]not held yet by {len(s['lacking'])} host(s): "
            f"{escape(', '.join(s['lacking']))}[/]"
        )
    render.fields(
        app.out,
        [
            ("served key", f"{s['served']['pin']}\n(certificate sha256 {s['served']['sha256']})"),
            ("staged key", staged_text),
            ("files", render.cell(f"{s['certificate']}, {s['key']}")),
        ],
    )
    app.out.print()
    render.table(
        app.out,
        ("HOST", "STATUS", "TRUST", "SERVED KEY", "STAGED KEY"),
        (
            (
                render.cell(h["host"]),
                render.status(h["status"]),
                trust_text(h),
                yes_no(h.get("holds_served")),
                yes_no(h.get("holds_staged"), "yellow") if staged else "-",
            )
            for h in s["hosts"]
        ),
        empty="no enrolled hosts",
    )


@tls.command("stage")
@click.argument("file", metavar="PEM", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_app
def tls_stage(app: App, file: Path, as_json: bool) -> None:
    """Send the pin of a new key to every agent.

    PEM is a file holding the new certificate, or (before it is issued) its
    certificate request or the public key (openssl pkey -in KEY -pubout).
    Only that block is sent to fleetd, never a private key in the same
    file. Agents store the pin beside the served key's; agents enrolled
    from now on get both.
    """
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(
            f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}", Exit.USAGE
        ) from None
    try:
        block, _ = tlspins.public_key_block(text)
    except tlspins.PinError as exc:
        raise CtlError(f"{file}: {exc}", Exit.USAGE) from None
    result = app.call("tls.stage", pem=block)
    if as_json:
        render.emit_json(result)
        return
    app.err.print(
        f"staged key {result['staged']}; its pin went to {result['pushed']} connected agent(s). "
        "Watch 'fleetctl tls status'; once every host holds it, install the new certificate "
        "and key where fleetd reads them and run 'fleetctl tls activate'",
        markup=False,
    )


@tls.command("unstage")
@json_option
@pass_app
def tls_unstage(app: App, as_json: bool) -> None:
    """Forget the staged key; agents drop its pin."""
    result = app.call("tls.unstage")
    if as_json:
        render.emit_json(result)
        return
    app.err.print(f"unstaged key {result['unstaged']}", markup=False)


@tls.command("activate")
@click.option(
    "--force",
    is_flag=True,
    help="Switch when every online host holds the new key's pin; offline ones "
    "lacking it must then be enrolled again.",
)
@json_option
@pass_app
def tls_activate(app: App, force: bool, as_json: bool) -> None:
    """Serve the certificate and key files fleetd was started with, read again.

    The same key (a renewal): served at once. A new key: only the staged
    one, and only when every host that pins keys holds its pin (exit 1
    naming those that do not). Agents connected with the old key redial.
    """
    result = app.call("tls.activate", force=force or None)
    if as_json:
        render.emit_json(result)
        return
    if result["renewed"]:
        app.err.print(
            f"serving the renewed certificate; its key is unchanged ({result['activated']})",
            markup=False,
        )
        return
    app.err.print(
        f"serving key {result['activated']}; {result['redialled']} agent(s) told to redial",
        markup=False,
    )
    if result["lacking"]:
        app.err.print(
            "these offline hosts lack its pin and must be enrolled again: "
            + ", ".join(result["lacking"]),
            markup=False,
        )
