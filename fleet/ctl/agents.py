"""agents list, agents upgrade: which agent each host runs, and rolling a
new one out host by host."""

from __future__ import annotations

from typing import Any, Optional

import click
from rich.markup import escape

from ..common.exitcodes import Exit
from . import render
from .app import App, CtlError, Duration, json_option, pass_app
from .hosts import SELECTOR_HELP

STATE_STYLE = {"current": "green", "behind": "yellow", "ahead": "cyan", "unknown": "dim"}
LINE_STYLE = {
    "sent": "cyan",
    "upgraded": "green",
    "current": "green",
    "skipped": "yellow",
    "failed": "red",
    "pending": "dim",
}


@click.group()
def agents() -> None:
    """Agents: the version each host runs, and upgrades rolled out host by host."""


def served_text(served: Optional[dict]) -> str:
    if not served:
        return "fleetd serves no agent file (fleetd serve --agent-pyz FILE)"
    return f"fleetd serves fleet-agent {served['version']} (SHA-256 {served['sha256']})"


@agents.command("list")
@click.option("--selector", "-l", metavar="SELECTOR", help=SELECTOR_HELP)
@json_option
@pass_app
def agents_list(app: App, selector: Optional[str], as_json: bool) -> None:
    """List each enrolled host's agent version against the one fleetd serves."""
    result = app.call("agents.list", selector=selector)
    if as_json:
        render.emit_json(result)
        return
    app.err.print(escape(served_text(result["served"])))
    render.table(
        app.out,
        ("HOST", "STATUS", "AGENT", "STATE"),
        (
            (
                render.cell(a["host"]),
                render.status(a["status"]),
                render.cell(a["agent_version"]),
                f"[{STATE_STYLE[a['state']]}]{a['state']}[/]",
            )
            for a in result["agents"]
        ),
        empty="no host matches" if selector else "no enrolled hosts yet",
    )


def line_text(h: dict[str, Any], version: str) -> str:
    """One host of a rollout, as a line for people."""
    style = LINE_STYLE.get(h["status"], "")
    name = escape(h["host"])
    was = escape(h["from_version"] or "?")
    status = f"[{style}]{h['status']}[/]" if style else escape(h["status"])
    text = {
        "sent": f"{name}: upgrading {was} -> {escape(version)}",
        "upgraded": f"{name}: {status} {was} -> {escape(version)}",
        "current": f"{name}: {status} (at {escape(version)} already)",
        "pending": f"{name}: {status} (not tried)",
    }.get(h["status"], f"{name}: {status}")
    if h.get("batch") and h["status"] != "current":
        text = f"batch {h['batch']} " + text
    if h.get("detail"):
        text += f": {escape(h['detail'])}"
    return text


def summary(r: dict[str, Any]) -> str:
    counts = r.get("counts") or {}
    parts = [
        f"{counts[k]} {k}"
        for k in ("upgraded", "current", "skipped", "failed", "pending", "sent")
        if counts.get(k)
    ]
    head = f"rollout {r['id']} of fleet-agent {escape(r['version'])} {r['status']}"
    if r.get("reason"):
        head += f": {escape(r['reason'])}"
    return head + (f" ({', '.join(parts)})" if parts else " (no host)")


def outcome_exit(r: dict[str, Any]) -> Exit:
    """0 every host upgraded (or at the version already), 4 no host picked,
    1 halted, or some hosts skipped."""
    return {"ok": Exit.OK, "none": Exit.NOT_FOUND, "running": Exit.OK}.get(r["outcome"], Exit.ERROR)


@agents.command("upgrade")
@click.option("--selector", "-l", metavar="SELECTOR", help=SELECTOR_HELP + " Default: every host.")
@click.option(
    "--batch",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Hosts upgraded at once; the next batch goes once each is back with the new version.",
)
@click.option(
    "--timeout",
    type=Duration(),
    default="5m",
    show_default=True,
    help="How long each host has to say hello with the new version before it counts as "
    "failed (its agent rolls itself back after a third of it).",
)
@click.option(
    "--dry-run", is_flag=True, help="Show the plan (batches, hosts skipped); change nothing."
)
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Show the latest rollout (or --rollout ID) instead of starting one; follow it while "
    "it runs.",
)
@click.option(
    "--halt",
    is_flag=True,
    help="Halt the rollout under way (or --rollout ID): no host is sent the upgrade after "
    "this; those sent it go on with theirs.",
)
@click.option(
    "--rollout",
    "rollout_id",
    type=click.IntRange(min=1),
    help="With --status or --halt: this rollout.",
)
@json_option
@pass_app
def agents_upgrade(
    app: App,
    selector: Optional[str],
    batch: int,
    timeout: int,
    dry_run: bool,
    show_status: bool,
    halt: bool,
    rollout_id: Optional[int],
    as_json: bool,
) -> None:
    """Roll the agent fleetd serves out to the hosts, BATCH at a time.

    Each host downloads the new agent from fleetd, checks it, replaces its
    own file and restarts; one whose new agent is not welcomed in time puts
    the old one back. The first failure (a refusal, a failed check, a
    rollback, no hello with the new version within --timeout) halts the
    rollout; offline hosts and agents too old to upgrade themselves are
    skipped. The rollout lives in fleetd: Ctrl-C stops following, not the
    rollout (--halt does). Exit status 0 when every host runs the new
    version, 1 when it halted or hosts were skipped, 4 when no host matched.
    """
    if rollout_id is not None and not (show_status or halt):
        raise click.UsageError("--rollout goes with --status or --halt")
    if show_status and halt:
        raise click.UsageError("--status and --halt are two things: give one")
    if show_status:
        follow(app, rollout_id, as_json)
        return
    if halt:
        result = app.call("agents.halt", id=rollout_id)
        if as_json:
            render.emit_json(result)
        else:
            app.err.print(summary(result))
        return
    result = app.call(
        "agents.upgrade", selector=selector, batch=batch, timeout=timeout, dry_run=dry_run or None
    )
    if dry_run:
        show_plan(app, result, as_json)
        return
    if not as_json:
        app.err.print(
            f"rollout {result['id']}: fleet-agent {escape(result['version'])} to "
            f"{len(result['hosts'])} host(s), {batch} at a time"
        )
    if result["status"] == "running":
        follow(app, result["id"], as_json)
        return
    if not as_json:  # nothing to do (every host at the version): ended at once
        for h in result["hosts"]:
            app.out.print(line_text(h, result["version"]))
    finish(app, result, as_json)


def show_plan(app: App, plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        render.emit_json(plan)
    else:
        for h in plan["hosts"]:
            app.out.print(line_text(h, plan["version"]).replace("(not tried)", "(would go)"))
        app.err.print(
            f"dry run: fleet-agent {escape(plan['version'])} to {len(plan['hosts'])} host(s), "
            f"{plan['batch']} at a time; nothing changed"
        )
    if not plan["hosts"]:
        raise click.exceptions.Exit(int(Exit.NOT_FOUND))


def follow(app: App, rollout_id: Optional[int], as_json: bool) -> None:
    """Print each host's line as it moves on, then the summary; the exit
    status from the outcome."""
    shown: set[tuple[str, str]] = set()
    result: Optional[dict] = None
    try:
        with app.client() as c:
            for kind, payload in c.stream("agents.rollout", id=rollout_id, follow=True):
                if kind == "result":
                    result = payload
                    break
                h = payload["host"]
                if (
                    not as_json
                    and h["status"] != "pending"
                    and (h["host"], h["status"]) not in shown
                ):
                    shown.add((h["host"], h["status"]))
                    app.out.print(line_text(h, payload["version"]))
    except KeyboardInterrupt:
        app.err.print(
            "stopped following; the rollout goes on in fleetd "
            "(fleetctl agents upgrade --status follows it again)"
        )
        raise click.exceptions.Exit(int(Exit.INTERRUPTED)) from None
    if result is None:
        raise CtlError("fleetd ended the stream without the rollout")
    if not as_json:  # the lines not printed yet (a rollout already ended)
        for h in result["hosts"]:
            if (h["host"], h["status"]) not in shown and h["status"] != "sent":
                app.out.print(line_text(h, result["version"]))
    finish(app, result, as_json)


def finish(app: App, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        render.emit_json(result)
    else:
        app.err.print(summary(result))
    code = outcome_exit(result)
    if code:
        raise click.exceptions.Exit(int(code))
