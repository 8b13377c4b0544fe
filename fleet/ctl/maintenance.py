"""maintenance: when a repository is forgotten, pruned and checked."""

from __future__ import annotations

from typing import Any, Optional

import click

from . import render
from .app import App, inherit_option, json_option, pass_app
from .jobs import follow_job, follow_options


@click.group()
def maintenance() -> None:
    """Repository maintenance: forget (each group's retention), prune and
    check, run by fleetd on a schedule (cron, UTC) on one online host that
    uses the repository, never beside a backup into it."""


def last_cell(last: Optional[dict]) -> str:
    if not last:
        return "-"
    return f"job {last['job']} on {last['host']}: {render.status(last['status'])} {last['finished_at']}"


@maintenance.command("show")
@click.argument("repo", metavar="REPO")
@json_option
@pass_app
def maintenance_show(app: App, repo: str, as_json: bool) -> None:
    """Show when REPO's forget, prune and check run next, and how each last ended."""
    m = app.call("maintenance.show", name=repo)
    if as_json:
        render.emit_json(m)
        return
    rows = []
    for action in ("forget", "prune", "check"):
        plan = m[action]
        when = f"{plan['cron']} (next {plan['next_at']} UTC)" if plan["cron"] else "off"
        if action == "check" and plan["cron"]:
            when += f", reading {m['check_subset'] or 'no data'}"
        rows.append((action, render.cell(when)))
        rows.append((f"  last {action}", last_cell(m["last"][action])))
    render.fields(app.out, [("repository", render.cell(m["repository"])), *rows])
    if m["check_failed"]:
        app.err.print(
            f"warning: the last check of {m['repository']} failed: "
            f"{m['last']['check']['error'] or 'see its job log'}",
            markup=False,
        )


@maintenance.command("set")
@click.argument("repo", metavar="REPO")
@click.option("--forget", metavar="CRON", help="When to apply retention (UTC cron, or 'off').")
@click.option("--prune", metavar="CRON", help="When to prune (UTC cron, or 'off').")
@click.option("--check", metavar="CRON", help="When to check (UTC cron, or 'off').")
@click.option(
    "--check-subset", metavar="SUBSET", help="Data a check reads: 5%, 1/10 or 500M ('' none)."
)
@inherit_option
@json_option
@pass_app
def maintenance_set(
    app: App,
    repo: str,
    forget: Optional[str],
    prune: Optional[str],
    check: Optional[str],
    check_subset: Optional[str],
    inherit: tuple,
    as_json: bool,
) -> None:
    """Change when REPO's maintenance runs. What a template set, set here,
    is the repository's own until --inherit hands it back."""
    params: dict[str, Any] = {"name": repo}
    if inherit:
        params["inherit"] = list(inherit)
    for key, value in (
        ("forget", forget),
        ("prune", prune),
        ("check", check),
        ("check_subset", check_subset),
    ):
        if value is not None:
            params[key] = value
    if len(params) == 1:
        raise click.UsageError(
            "nothing to change: give --forget, --prune, --check, --check-subset or --inherit"
        )
    m = app.call("maintenance.set", **params)
    if as_json:
        render.emit_json(m)
        return
    app.err.print(f"maintenance of {m['repository']} updated", markup=False)


@maintenance.command("run")
@click.argument("repo", metavar="REPO")
@click.argument("action", type=click.Choice(["forget", "prune", "check", "unlock"]))
@follow_options
@pass_app
def maintenance_run(
    app: App, repo: str, action: str, follow: bool, strict: bool, as_json: bool
) -> None:
    """Run ACTION on REPO now, on an online host that uses it (a forget on
    each group's own host)."""
    if strict and not follow:
        raise click.UsageError("--strict goes with --follow")
    r = app.call("maintenance.run", name=repo, action=action)
    if as_json and not follow:
        render.emit_json(r)
        return
    jobs = ", ".join(map(str, r["jobs"])) or "none (no group keeps less than everything)"
    app.err.print(f"{action} of {r['repository']} on {r['host']}: job(s) {jobs}", markup=False)
    if follow:  # each job in turn; the exit status is the worst outcome
        worst = 0
        for job_id in r["jobs"]:
            try:
                follow_job(app, job_id, raw=as_json, strict=strict)
            except click.exceptions.Exit as exc:
                worst = max(worst, exc.exit_code)
        if worst:
            raise click.exceptions.Exit(worst)
