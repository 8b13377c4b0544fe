"""repo set/show: the restic repository of a host. Secrets are never printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, ask_secret, json_option, pass_app
from .jobs import follow_options, start_job


@click.group()
def repo() -> None:
    """The restic repository each host backs up to."""


def read_secret_file(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    except UnicodeDecodeError:
        raise CtlError(f"{path} is not UTF-8 text; is it the password file?", Exit.USAGE) from None
    # a password file conventionally ends in one newline that is not part of it
    return text[:-1] if text.endswith("\n") else text


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped): a backend's
    environment, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    except UnicodeDecodeError:
        raise CtlError(f"{path} is not UTF-8 text", Exit.USAGE) from None
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise CtlError(f"{path}:{number}: expected KEY=VALUE", Exit.USAGE)
        env[key.strip()] = value.strip()
    return env


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{pair.split('=')[0]!r}: expected KEY=VALUE", param_hint="--env"
            )
        env[key] = value
    return env


@repo.command("set")
@click.argument("host")
@click.option(
    "--url", required=True, help="restic repository: /path, sftp:..., rest:..., s3:..., b2:..."
)
@click.option(
    "--password-file",
    type=str,
    help="File holding the repository password ('-' for stdin). Prompted for when absent.",
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Backend environment, e.g. AWS_REGION=... (repeatable; visible to local users "
    "in the process list: put secrets in --env-file).",
)
@click.option(
    "--env-file",
    metavar="FILE",
    help="Backend environment as KEY=VALUE lines (S3 keys, REST credentials...).",
)
@json_option
@pass_app
def repo_set(
    app: App,
    host: str,
    url: str,
    password_file: Optional[str],
    env_pairs: tuple[str, ...],
    env_file: Optional[str],
    as_json: bool,
) -> None:
    """Set HOST's repository; fleetd keeps the password encrypted."""
    env = {**(read_env_file(env_file) if env_file else {}), **parse_env(env_pairs)}
    if password_file:
        password = read_secret_file(password_file)
    else:
        password = ask_secret(
            "Repository password", "--password-file FILE (- for standard input)", twice=True
        )
    if not password:
        raise CtlError("the repository password is empty", Exit.USAGE)
    result = app.call("repo.set", host=host, url=url, password=password, env=env or None)
    if as_json:
        render.emit_json(result)
        return
    app.err.print(
        f"repository of {result['host']} set to {result['url']} (repository {result['name']})",
        markup=False,
    )


@repo.command("show")
@click.argument("host")
@json_option
@pass_app
def repo_show(app: App, host: str, as_json: bool) -> None:
    """Show HOST's repository (password and environment values redacted)."""
    r = app.call("repo.show", host=host)
    if as_json:
        render.emit_json(r)
        return
    env = ", ".join(f"{k}={v}" for k, v in r["env"].items())
    render.fields(
        app.out,
        [
            ("host", render.cell(r["host"])),
            ("repository", render.cell(r["name"])),
            ("url", render.cell(r["url"])),
            ("password", render.cell(r["password"])),
            ("environment", render.cell(env)),
            ("updated", render.cell(r["updated_at"])),
        ],
    )


REPO_OPTION = click.option(
    "--repo",
    "repository",
    metavar="REPO",
    help="Which of HOST's repositories (default: its first).",
)


def which(host: str, repository: Optional[str]) -> str:
    return f"repository {repository} on {host}" if repository else f"{host}'s repository"


@repo.command("init")
@click.argument("host")
@REPO_OPTION
@follow_options
@pass_app
def repo_init(
    app: App, host: str, repository: Optional[str], follow: bool, strict: bool, as_json: bool
) -> None:
    """Run restic init on HOST's repository (again).

    fleetd does this by itself once after each 'repo set' and for each
    repository a host is given; an existing repository counts as success
    once its password opens it.
    """
    what = f"init of {which(host, repository)}"
    start_job(app, what, follow, strict, as_json, host=host, kind="init", repository=repository)


@repo.command("unlock")
@click.argument("host")
@REPO_OPTION
@follow_options
@pass_app
def repo_unlock(
    app: App, host: str, repository: Optional[str], follow: bool, strict: bool, as_json: bool
) -> None:
    """Run restic unlock on HOST's repository: remove stale locks left by a
    killed restic."""
    what = f"unlock of {which(host, repository)}"
    start_job(app, what, follow, strict, as_json, host=host, kind="unlock", repository=repository)
