"""status: the fleet at a glance, and a monitoring check (exit 0 ok, 1
warning, 2 critical, as Nagios reads them)."""

from __future__ import annotations

import json
from typing import Optional

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..common.exitcodes import Exit
from . import render
from .app import App, Duration, json_option, pass_app

MARK = {"critical": "[red]CRITICAL[/]", "warning": "[yellow]WARNING[/]", "ok": "[green]OK[/]"}


def last_success(g: dict) -> str:
    if not g["last_success_at"]:
        return "never"
    added = g["last_success_added_bytes"]
    extra = f" (+{render.human_bytes(added)})" if added is not None else ""
    return render.ago(g["last_success_at"]) + extra


def proven(g: dict) -> str:
    """When a restore drill last proved the group restorable."""
    if g.get("last_drill_status") in ("failed", "lost"):
        return "[red]drill failed[/]"
    return render.ago(g["last_proven_at"]) if g.get("last_proven_at") else "-"


def state(g: dict) -> str:
    if g["overdue"]:
        return "[red]overdue[/]"
    if g["last_status"] in ("failed", "lost"):
        return render.status(g["last_status"])
    if g["last_status"]:
        return render.status(g["last_status"])
    return "-"


@click.command()
@click.option(
    "--offline-after",
    type=Duration(),
    default="1h",
    show_default=True,
    help="A host offline for this long is critical.",
)
@click.option(
    "--unchecked-after",
    type=Duration(),
    default="14d",
    show_default=True,
    help="A repository with no successful check for this long is a warning.",
)
@click.option(
    "--watch",
    "-w",
    is_flag=True,
    help="A live view of the fleet's running jobs with their progress, and the jobs "
    "that end, updated from fleetd's events until Ctrl-C (with --json: one JSON "
    "object a line).",
)
@json_option
@pass_app
def status(app: App, offline_after: int, unchecked_after: int, watch: bool, as_json: bool) -> None:
    """The fleet at a glance: each host's groups with their last successful
    backup, last outcome and next run; running jobs; and the problems.

    Exits 0 when all is well, 1 with a warning (a stale lock, a repository
    not checked lately, a backup with a warning: files it could not read, an
    include path missing) and 2 with
    anything critical (a failed or overdue backup, a host offline too long,
    a failed check or maintenance): usable as a cron or Nagios check as it is.
    """
    if watch:
        watch_fleet(app, as_json)
        return
    s = app.call("status.show", offline_after=offline_after, unchecked_after=unchecked_after)
    code = {0: Exit.OK, 1: Exit.WARNING, 2: Exit.CRITICAL}[int(s["exit_code"])]
    if as_json:
        render.emit_json(s)
        raise click.exceptions.Exit(code)
    hosts = s["hosts"]
    app.out.print(
        f"{MARK[s['status']]} {s['hosts_online']}/{len(hosts)} hosts online, "
        f"{len(s['running'])} job(s) running, {len(s['problems'])} problem(s), "
        f"{s['alerts_open']} open alert(s)"
    )
    rows = []
    for h in hosts:
        host = escape(h["name"]) + ("" if h["online"] else " [dim](offline)[/]")
        for g in h["groups"] or [None]:
            if g is None:
                rows.append((host, "-", "-", "-", "-", "-"))
                continue
            rows.append(
                (
                    host,
                    render.cell(g["name"]),
                    last_success(g),
                    state(g),
                    proven(g),
                    render.cell(g["next_run_at"] or ("-" if g["scheduled"] else "unscheduled")),
                )
            )
    render.table(
        app.out,
        ("HOST", "GROUP", "LAST SUCCESS", "LAST", "PROVEN", "NEXT RUN (UTC)"),
        rows,
        empty="no hosts: enroll one with 'fleetctl enroll'",
    )
    if s["running"]:
        render.table(
            app.out,
            ("JOB", "HOST", "KIND", "GROUP", "PROGRESS"),
            (
                (
                    str(j["id"]),
                    render.cell(j["host"]),
                    render.cell(j["kind"]),
                    render.cell(j["group"]),
                    progress(j["progress"]),
                )
                for j in s["running"]
            ),
        )
    for p in s["problems"]:
        app.out.print(f"{MARK[p['severity']]} {escape(p['message'])}")
    raise click.exceptions.Exit(code)


def progress(p: Optional[dict]) -> str:
    if not p:
        return "-"
    return f"{p['percent_done'] * 100:.0f}%"


# -- status --watch --------------------------------------------------------------

RECENT = 10  # jobs that ended, shown under the running ones


def describe(j: dict) -> str:
    """'backup of web-01/etc' (job rows from status.watch: running or ended)."""
    where = j["host"] + (f"/{j['group']}" if j.get("group") else "")
    return f"{j['kind']} of {where}"


class WatchView:
    """The fleet's running jobs as status.watch frames tell them: a
    snapshot, then what started, progressed and ended."""

    def __init__(self) -> None:
        self.running: dict[int, dict] = {}
        self.ended: list[dict] = []
        self.counts: dict[str, int] = {}
        self.at = ""

    def apply(self, frame: dict) -> list[str]:
        """Take one frame; lines saying what started and ended (plain text)."""
        lines = []
        if frame["type"] == "snapshot":
            self.running = {r["id"]: r for r in frame["running"]}
            self.ended = frame["ended"][:RECENT]
        else:
            for r in frame["started"]:
                if r["id"] not in self.running:
                    lines.append(f"job {r['id']} {describe(r)} started")
                self.running[r["id"]] = r
            for job_id, progress in frame["progress"].items():
                if int(job_id) in self.running:
                    self.running[int(job_id)]["progress"] = progress
            for j in reversed(frame["ended"]):  # oldest first
                self.running.pop(j["id"], None)
                self.ended.insert(0, j)
                error = j.get("error") if j["status"] != "succeeded" else None
                lines.append(
                    f"job {j['id']} {describe(j)} {j['status']}"
                    + (f": {error.splitlines()[-1]}" if error else "")
                )
            del self.ended[RECENT:]
        self.counts = {k: frame[k] for k in ("hosts", "hosts_online", "queued")}
        self.at = frame["checked_at"]
        return lines

    def header(self) -> str:
        c = self.counts
        return (
            f"{c['hosts_online']}/{c['hosts']} hosts online, {len(self.running)} job(s) running, "
            f"{c['queued']} queued (at {self.at})"
        )

    def renderable(self) -> RenderableType:
        running = Table(show_edge=False, box=None, pad_edge=False, header_style="bold")
        for name in ("JOB", "HOST", "KIND", "GROUP", "STATUS", "STARTED", "PROGRESS"):
            running.add_column(name, overflow="fold")
        for r in sorted(self.running.values(), key=lambda r: r["id"]):
            running.add_row(
                str(r["id"]),
                escape(r["host"]),
                r["kind"],
                render.cell(r["group"]),
                render.status(r["status"]),
                render.ago(r["started_at"]) if r["started_at"] else "-",
                progress_line(r["progress"]),
            )
        ended = Table(show_edge=False, box=None, pad_edge=False, header_style="bold")
        for name in ("JOB", "HOST", "KIND", "GROUP", "ENDED", "OUTCOME"):
            ended.add_column(name, overflow="fold")
        for j in self.ended:
            ended.add_row(
                str(j["id"]),
                escape(j["host"]),
                j["kind"],
                render.cell(j["group"]),
                render.ago(j["finished_at"]) if j["finished_at"] else "-",
                render.status(j["status"]),
            )
        parts: list[RenderableType] = [Text(self.header(), style="bold")]
        parts.append(running if self.running else Text("no jobs running", style="dim"))
        if self.ended:
            parts += [Text(""), Text("recently ended", style="bold"), ended]
        return Group(*parts)


def progress_line(p: Optional[dict]) -> str:
    if not p:
        return "-"
    eta = f", ETA {p['eta_seconds']} s" if p.get("eta_seconds") else ""
    return (
        f"{p['percent_done'] * 100:.0f}% {render.human_bytes(p['bytes_done'])}"
        f"/{render.human_bytes(p['total_bytes'])}, {p['files_done']}/{p['total_files']} files{eta}"
    )


def watch_fleet(app: App, as_json: bool) -> None:
    """Follow status.watch until Ctrl-C (exit 0) or until fleetd goes away."""
    view = WatchView()
    live: Optional[Live] = None
    try:
        with app.client() as c:
            for kind, frame in c.stream("status.watch"):
                if kind != "event":
                    continue
                if as_json:
                    app.out.print(json.dumps(frame), markup=False, highlight=False, soft_wrap=True)
                    continue
                lines = view.apply(frame)
                if app.out.is_terminal:
                    if live is None:
                        live = Live(view.renderable(), console=app.out, auto_refresh=False)
                        live.start()
                    live.update(view.renderable(), refresh=True)
                elif frame["type"] == "snapshot":
                    app.out.print(view.header(), markup=False, soft_wrap=True)
                    for r in sorted(view.running.values(), key=lambda r: r["id"]):
                        app.out.print(
                            f"job {r['id']} {describe(r)} {r['status']}",
                            markup=False,
                            soft_wrap=True,
                        )
                else:
                    for line in lines:
                        app.out.print(line, markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass  # the way out of a live view: not an error
    finally:
        if live is not None:
            live.stop()
