"""fleetctl's command tree and its one exit path."""

from __future__ import annotations

import sys
from typing import Any, Optional

import click

from .. import __version__
from ..common.exitcodes import Exit
from . import (
    agents,
    alerts,
    audit,
    browse,
    completion,
    groups,
    hosts,
    jobs,
    maintenance,
    notify,
    repo,
    repos,
    restore,
    schedules,
    session,
    status,
    templates,
    tls,
    tokens,
    users,
)
from .app import App, CtlError
from .client import Failure


class FleetGroup(click.Group):
    """Turns client Failures into one-line errors with their exit status
    (and, under --json, the error object)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Failure as exc:
            raise as_json(ctx, CtlError(exc.message, exc.exit)) from None
        except CtlError as exc:
            raise as_json(ctx, exc) from None


def as_json(ctx: click.Context, exc: CtlError) -> CtlError:
    app = ctx.find_object(App)
    exc.as_json = app is not None and app.json
    return exc


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetctl")
@click.option(
    "--server",
    envvar="FLEET_SERVER",
    help="fleetd URL (env FLEET_SERVER; default: the one saved by login).",
)
@click.pass_context
def cli(ctx: click.Context, server: Optional[str]) -> None:
    """Manage restic backups across a fleet of servers.

    Exit status: 0 ok, 1 a job failed or an error, 2 usage, 3 not
    authenticated or not allowed, 4 not found, 5 server unreachable,
    130 interrupted.
    """
    app = ctx.ensure_object(App)
    if server:
        app.server = server


cli.add_command(session.login)
cli.add_command(session.logout)
cli.add_command(session.whoami)
cli.add_command(hosts.enroll)
cli.add_command(hosts.hosts)
cli.add_command(agents.agents)
cli.add_command(repo.repo)
cli.add_command(repos.repos)
cli.add_command(maintenance.maintenance)
cli.add_command(jobs.run)
cli.add_command(jobs.jobs)
cli.add_command(jobs.snapshots)
cli.add_command(restore.restore)
cli.add_command(browse.ls)
cli.add_command(browse.find)
cli.add_command(browse.diff)
cli.add_command(browse.dump)
cli.add_command(groups.groups)
cli.add_command(schedules.schedules)
cli.add_command(templates.templates)
cli.add_command(users.users)
cli.add_command(tokens.tokens)
cli.add_command(audit.audit)
cli.add_command(status.status)
cli.add_command(alerts.alerts)
cli.add_command(notify.notify)
cli.add_command(tls.tls)
cli.add_command(completion.completion)
completion.attach(cli)  # host, group, repository, job names from fleetd


def main(argv: Optional[list[str]] = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="fleetctl", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("fleetctl: interrupted", err=True)
        sys.exit(Exit.INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else Exit.OK)


if __name__ == "__main__":
    main()
