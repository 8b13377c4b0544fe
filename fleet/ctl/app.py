"""What every fleetctl command shares: settings, consoles, the client, errors."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import click
from rich.console import Console

from ..common.exitcodes import Exit
from . import config, render
from .client import Client


class CtlError(click.ClickException):
    """One line on stderr, and the exit status from Exit; under --json also
    the error object on stdout, where the script reads the result."""

    def __init__(self, message: str, exit: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.exit_code = int(exit)
        self.as_json = False

    def show(self, file: Any = None) -> None:
        click.echo(f"fleetctl: error: {self.message}", err=True)
        if self.as_json:  # one line: it may end an NDJSON stream (jobs tail, status --watch)
            render.emit_json_line(error_json(self.message, Exit(self.exit_code)))


def error_json(message: str, exit: Exit) -> dict[str, Any]:
    """The object a failed --json command prints: its code is the name of
    the exit status (not_found for 4), stable as the statuses are."""
    return {"error": {"code": exit.name.lower(), "exit": int(exit), "message": message}}


@dataclass
class App:
    """Injected into every command as ctx.obj; tests may pass their own."""

    out: Console = field(default_factory=lambda: render.make_consoles()[0])
    err: Console = field(default_factory=lambda: render.make_consoles()[1])
    server: Optional[str] = None  # --server, above the config file and FLEET_SERVER
    json: bool = False  # the command was given --json: an error is printed as JSON too
    _settings: Optional[config.Settings] = None

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            try:
                self._settings = config.load()
                if self.server:
                    self._settings.server = config.normalize_servers(self.server)
            except ValueError as exc:
                raise CtlError(str(exc), Exit.USAGE) from None
        return self._settings

    def save_settings(self) -> str:
        try:
            return str(config.save(self.settings))
        except OSError as exc:
            raise CtlError(f"cannot write {config.config_path()}: {exc.strerror}") from None

    def client(self, path: str = "/ctl") -> Client:
        s = self.settings
        return Client(s.server, s.token, s.cafile, path=path)

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, **params)


pass_app = click.make_pass_decorator(App, ensure=True)


def ask_secret(question: str, instead: str, twice: bool = False) -> str:
    """A password typed at the terminal (hidden; twice to confirm). Without
    a terminal there is nobody to ask: say what to give instead, exit 2."""
    if not sys.stdin.isatty():
        raise CtlError(f"no terminal to ask for the password: use {instead}", Exit.USAGE)
    return click.prompt(question, hide_input=True, confirmation_prompt=twice, err=True)


def confirm(yes: bool, question: str) -> None:
    """Ask before destroying; a 'no' (or no terminal to ask on) changes nothing, exit 1."""
    if yes:
        return
    try:
        answer = click.confirm(question, err=True)
    except click.Abort:
        answer = False
    if not answer:
        raise CtlError(
            "not confirmed, nothing changed (give --yes to skip the question)", Exit.ERROR
        )


def json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """--json's callback: remember it, so that an error is JSON too."""
    if value:
        ctx.ensure_object(App).json = True
    return value


def json_option(fn: Any = None, *, help: str = "Print JSON instead of a table.") -> Any:
    option = click.option("--json", "as_json", is_flag=True, callback=json_flag, help=help)
    return option if fn is None else option(fn)


# on a group or schedule a template made (see fleetctl templates)
inherit_option = click.option(
    "--inherit",
    "inherit",
    multiple=True,
    metavar="SETTING",
    help="Hand SETTING back to the template it came from (repeatable; 'all': every one).",
)

_DURATION = re.compile(r"^(\d+)([smhdw])\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str, allow_never: bool = False) -> Optional[int]:
    """'90s', '15m', '12h', '30d', '2w' -> seconds; 'never' -> None."""
    text = value.strip().lower()
    if allow_never and text in ("never", "0"):
        return None
    if text.isdigit():
        return int(text)
    match = _DURATION.match(text)
    if not match:
        hint = " or 'never'" if allow_never else ""
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 15m, 12h, 30d, 2w{hint}")
    return int(match.group(1)) * _UNIT[match.group(2)]


class Duration(click.ParamType):
    name = "DURATION"

    def __init__(self, allow_never: bool = False) -> None:
        self.allow_never = allow_never

    def convert(self, value: Any, param: Any, ctx: Any) -> Optional[int]:
        if value is None or isinstance(value, int):
            return value
        return parse_duration(str(value), self.allow_never)
