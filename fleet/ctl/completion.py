"""Shell completion (bash, zsh, fish, through click), with host, group,
repository, job and snapshot names asked of fleetd as the user types:
`fleetctl completion bash` prints the script to source."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import click
from click.shell_completion import CompletionItem, get_completion_class

from .app import App

PROG = "fleetctl"
VAR = "_FLEETCTL_COMPLETE"


def ask(ctx: click.Context, method: str, **params: Any) -> list:
    """fleetd's answer, or nothing: completing must never print an error."""
    app = App()
    root = ctx.find_root()
    if root.params.get("server"):
        app.server = root.params["server"]
    try:
        answer = app.call(method, **params)
    except Exception:  # unreachable, not logged in, not allowed: no candidates
        return []
    return answer if isinstance(answer, list) else []


def items(values: Iterable[Any], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(str(v)) for v in values if str(v).startswith(incomplete)]


def hosts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return items((h["name"] for h in ask(ctx, "hosts.list")), incomplete)


def groups(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    host = ctx.params.get("host")
    if not host:
        return []
    return items((g["name"] for g in ask(ctx, "groups.list", host=host)), incomplete)


def repositories(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    return items((r["name"] for r in ask(ctx, "repos.list")), incomplete)


def templates(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return items((t["name"] for t in ask(ctx, "templates.list")), incomplete)


def jobs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return items((j["id"] for j in ask(ctx, "jobs.list", limit=50)), incomplete)


def snapshots(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    host = ctx.params.get("host")
    if not host:
        return []
    found = ask(ctx, "snapshots.list", host=host, limit=100)
    return items(["latest", *(s["short_id"] for s in found)], incomplete)


def host_then_group(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """run's HOST GROUP: a host first, then that host's groups."""
    given = ctx.params.get("target") or ()
    if not given:
        return hosts(ctx, param, incomplete)
    if len(given) == 1:
        return items((g["name"] for g in ask(ctx, "groups.list", host=given[0])), incomplete)
    return []


Completer = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]
# parameter name -> where its candidates come from
BY_NAME: dict[str, Completer] = {
    "host": hosts,
    "to_host": hosts,
    "hosts": hosts,
    "group": groups,
    "groups": groups,
    "repository": repositories,
    "repo": repositories,
    "job_id": jobs,
    "snapshot": snapshots,
    "snapshot2": snapshots,
    "target": host_then_group,
}
# commands whose NAME argument is a group of HOST, a repository or a template
NAMED = {
    "groups": groups,
    "repos": repositories,
    "templates": templates,
}


def attach(command: click.Command, path: tuple[str, ...] = ()) -> None:
    """Give every parameter the completion its name calls for (once, at
    import: one table instead of a callback on each of 27 HOST arguments)."""
    for param in command.params:
        completer = BY_NAME.get(param.name or "")
        if param.name == "name" and path[:1] and path[0] in NAMED:
            completer = NAMED[path[0]]
        if completer is not None:
            param._custom_shell_complete = completer  # what shell_complete= would set
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            attach(sub, (*path, name))


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL, e.g. in ~/.bashrc:
    eval "$(fleetctl completion bash)". Host, group, repository, template,
    job and snapshot names are completed from fleetd (with the saved login)."""
    cls = get_completion_class(shell)
    assert cls is not None  # the choice above is what click knows
    click.echo(cls(ctx.find_root().command, {}, PROG, VAR).source())
