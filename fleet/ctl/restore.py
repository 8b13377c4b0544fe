"""restore: a snapshot's files back, followed like a backup."""

from __future__ import annotations

from typing import Optional

import click

from .app import App, confirm, pass_app
from .jobs import follow_options, start_job


@click.command()
@click.argument("host")
@click.argument("snapshot")
@click.option(
    "--target",
    "-t",
    required=True,
    metavar="DIR",
    help="Directory to restore into (restic puts each file at DIR/its/original/path); "
    "/ restores in place, over the live files, and asks first.",
)
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATTERN",
    help="Restore only what this restic pattern matches, e.g. /etc/nginx (repeatable).",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PATTERN",
    help="Leave out what this restic pattern matches (repeatable; not with --include).",
)
@click.option(
    "--to-host",
    metavar="OTHER",
    help="Restore onto host OTHER, which uses the same repository (a dead server's "
    "files onto its replacement); asks first.",
)
@click.option("--group", metavar="GROUP", help="With SNAPSHOT latest: the latest of this group.")
@click.option(
    "--repo",
    "repository",
    metavar="REPO",
    help="The snapshot in this repository (one host backing up into two: a copy).",
)
@click.option(
    "--verify", is_flag=True, help="Read each restored file back and check it against the snapshot."
)
@click.option(
    "--dry-run",
    "-n",
    is_flag=True,
    help="Write nothing: the job's log names what would be written (and what it would "
    "overwrite), its summary counts it.",
)
@click.option(
    "--yes", "-y", is_flag=True, help="Do not ask before restoring in place or onto OTHER."
)
@follow_options
@pass_app
def restore(
    app: App,
    host: str,
    snapshot: str,
    target: str,
    includes: tuple,
    excludes: tuple,
    to_host: Optional[str],
    group: Optional[str],
    repository: Optional[str],
    verify: bool,
    dry_run: bool,
    yes: bool,
    follow: bool,
    strict: bool,
    as_json: bool,
) -> None:
    """Restore SNAPSHOT of HOST (an id, a prefix of one, or latest) into
    --target on HOST, or on --to-host.

    The job waits its turn like a backup. With --follow its log and progress
    stream live and the exit status is the job's: 0 succeeded (or warning:
    an --include path that restored nothing), 1 failed, cancelled or lost.
    """
    onto = to_host or host
    in_place = target.rstrip("/") == "" and target.startswith("/")
    if dry_run:
        pass  # nothing is written: nothing to confirm
    elif in_place:
        confirm(yes, f"Restore {snapshot} of {host} over the live files of {onto} (into /)?")
    elif to_host and to_host != host:
        confirm(yes, f"Restore {snapshot} of {host} onto another host, {to_host}, into {target}?")
    start_job(
        app,
        f"{'dry run of a ' if dry_run else ''}restore of {snapshot} of {host} onto {onto}, "
        f"into {target}",
        follow,
        strict,
        as_json,
        method="restore.run",
        host=host,
        snapshot=snapshot,
        target=target,
        includes=list(includes),
        excludes=list(excludes),
        to_host=to_host,
        group=group,
        repository=repository,
        verify=verify or None,
        in_place=in_place or None,
        dry_run=dry_run or None,
    )
