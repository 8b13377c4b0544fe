"""repos: named restic repositories that hosts use and share. Secrets come
from files or standard input, never from the command line (any local user
can read a process's arguments), and are never printed."""

from __future__ import annotations

from typing import Any, Optional

import click

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, ask_secret, confirm, json_option, pass_app
from .repo import read_env_file, read_secret_file


@click.group()
def repos() -> None:
    """Named restic repositories. Several hosts may share one (restic
    deduplicates across them; snapshots stay attributed to their host and
    group). A host backs up into the repository it uses: 'repos use NAME
    HOST'."""


def password_from(path: Optional[str], prompt: bool) -> Optional[str]:
    """The password from a file ('-': standard input), or asked for."""
    if path:
        password = read_secret_file(path)
    elif prompt:
        password = ask_secret(
            "Repository password", "--password-file FILE (- for standard input)", twice=True
        )
    else:
        return None
    if not password:
        raise CtlError("the repository password is empty", Exit.USAGE)
    return password


def locks(r: dict) -> Optional[str]:
    """restic's locks in it, as a host last counted them."""
    if r.get("locks") is None:
        return None
    return f"{r['locks']} (as of {r['locks_at']})"


def render_repository(app: App, r: dict) -> None:
    env = ", ".join(f"{k}={v}" for k, v in r["env"].items())
    render.fields(
        app.out,
        [
            ("repository", render.cell(r["name"])),
            ("url", render.cell(r["url"])),
            ("password", render.cell(r["password"])),
            ("environment", render.cell(env)),
            ("hosts", render.cell(r["hosts"])),
            ("locks", render.cell(locks(r))),
            ("created", render.cell(r["created_at"])),
            ("updated", render.cell(r["updated_at"])),
        ],
    )


PASSWORD_FILE = click.option(
    "--password-file",
    metavar="FILE",
    help="File holding the password ('-' for standard input). Asked for when absent.",
)
ENV_FILE = click.option(
    "--env-file",
    metavar="FILE",
    help="Backend environment as KEY=VALUE lines (S3 keys, REST credentials...).",
)


@repos.command("create")
@click.argument("name")
@click.option(
    "--url", required=True, help="restic repository: /path, sftp:..., rest:..., s3:..., b2:..."
)
@PASSWORD_FILE
@ENV_FILE
@json_option
@pass_app
def repos_create(
    app: App,
    name: str,
    url: str,
    password_file: Optional[str],
    env_file: Optional[str],
    as_json: bool,
) -> None:
    """Create repository NAME; fleetd keeps its password and environment encrypted."""
    env = read_env_file(env_file) if env_file else {}
    password = password_from(password_file, prompt=True)
    r = app.call("repos.create", name=name, url=url, password=password, env=env or None)
    if as_json:
        render.emit_json(r)
        return
    app.err.print(
        f"created repository {r['name']} at {r['url']}; "
        f"let hosts use it with 'fleetctl repos use {r['name']} HOST'",
        markup=False,
    )


@repos.command("list")
@json_option
@pass_app
def repos_list(app: App, as_json: bool) -> None:
    """List repositories: URL (credentials redacted) and the hosts using each."""
    rows = app.call("repos.list")
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("REPOSITORY", "URL", "HOSTS", "UPDATED"),
        (
            (
                render.cell(r["name"]),
                render.cell(r["url"]),
                render.cell(r["hosts"]),
                render.ago(r["updated_at"]),
            )
            for r in rows
        ),
        empty="no repositories: add one with 'fleetctl repos create'",
    )


@repos.command("show")
@click.argument("name")
@json_option
@pass_app
def repos_show(app: App, name: str, as_json: bool) -> None:
    """Show repository NAME (password and environment values redacted)."""
    r = app.call("repos.show", name=name)
    if as_json:
        render.emit_json(r)
    else:
        render_repository(app, r)


@repos.command("edit")
@click.argument("name")
@click.option("--rename", "new_name", metavar="NEW", help="New name.")
@click.option("--url", help="New URL.")
@PASSWORD_FILE
@click.option("--password", "ask", is_flag=True, help="Ask for a new password.")
@ENV_FILE
@click.option("--clear-env", is_flag=True, help="Drop the environment (before --env-file).")
@json_option
@pass_app
def repos_edit(
    app: App,
    name: str,
    new_name: Optional[str],
    url: Optional[str],
    password_file: Optional[str],
    ask: bool,
    env_file: Optional[str],
    clear_env: bool,
    as_json: bool,
) -> None:
    """Change repository NAME; the agents of the hosts using it get the new
    settings and check them with an init."""
    params: dict[str, Any] = {"name": name}
    if new_name:
        params["new_name"] = new_name
    if url:
        params["url"] = url
    password = password_from(password_file, prompt=ask)
    if password is not None:
        params["password"] = password
    if env_file:
        params["env"] = read_env_file(env_file)
    if clear_env:
        params["clear_env"] = True
    if len(params) == 1:
        raise click.UsageError("nothing to change: give --rename, --url, --password-file ...")
    r = app.call("repos.edit", **params)
    if as_json:
        render.emit_json(r)
        return
    app.err.print(f"updated repository {r['name']}", markup=False)


@repos.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def repos_delete(app: App, name: str, yes: bool) -> None:
    """Forget repository NAME in fleetd (restic's data is not touched);
    refused while a host uses it."""
    confirm(yes, f"Forget repository {name}?")
    r = app.call("repos.delete", name=name)
    app.err.print(f"forgot repository {r['removed']}", markup=False)


@repos.command("use")
@click.argument("name")
@click.argument("hosts", nargs=-1, required=True)
@json_option
@pass_app
def repos_use(app: App, name: str, hosts: tuple, as_json: bool) -> None:
    """Repository NAME becomes HOSTS' default: their groups that name no
    repository back up into it from now on; their agents get it and check
    it with an init. The old default stays theirs only while a group names
    it."""
    r = app.call("repos.use", name=name, hosts=list(hosts))
    if as_json:
        render.emit_json(r)
        return
    moved = ", ".join(r["changed"]) or "no host (they used it already)"
    app.err.print(f"repository {r['name']} now used by {moved}", markup=False)


def _changed(app: App, r: dict, as_json: bool, done: str, none: str) -> None:
    if as_json:
        render.emit_json(r)
        return
    hosts = ", ".join(r["changed"]) or none
    app.err.print(f"repository {r['name']} {done} {hosts}", markup=False)


@repos.command("attach")
@click.argument("name")
@click.argument("hosts", nargs=-1, required=True)
@json_option
@pass_app
def repos_attach(app: App, name: str, hosts: tuple, as_json: bool) -> None:
    """HOSTS use repository NAME too, beside their default: a group then
    backs up or copies into it (groups edit --repo/--copy-to, which attach
    it themselves). Their agents get it and init it."""
    r = app.call("repos.attach", name=name, hosts=list(hosts))
    _changed(app, r, as_json, "now used by", "no host (they used it already)")


@repos.command("detach")
@click.argument("name")
@click.argument("hosts", nargs=-1, required=True)
@json_option
@pass_app
def repos_detach(app: App, name: str, hosts: tuple, as_json: bool) -> None:
    """HOSTS stop using repository NAME (restic's data is not touched).
    Refused while one of their groups names it, or when it is a host's only
    repository."""
    r = app.call("repos.detach", name=name, hosts=list(hosts))
    _changed(app, r, as_json, "no longer used by", "no host (none used it)")
