"""run, jobs list/show/log/tail/cancel, snapshots."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..common.exitcodes import Exit
from ..common.protocol import JOB_KINDS, JOB_STATUSES
from . import render
from .app import App, json_option, parse_duration, pass_app
from .render import human_bytes

PLAIN_PROGRESS_EVERY = 2.0


def outcome_exit(status: str, strict: bool) -> Exit:
    """0 succeeded; 1 failed, cancelled or lost; warning is 0 unless --strict."""
    if status == "succeeded" or (status == "warning" and not strict):
        return Exit.OK
    return Exit.ERROR


def describe_event(line: dict) -> Optional[str]:
    """A restic JSON event as one readable line; None for status lines (the bar shows them)."""
    try:
        doc = json.loads(line["payload"])
    except ValueError:
        return escape(line["payload"])
    kind = doc.get("message_type")
    if kind == "status":
        return None
    if kind == "summary":
        return (
            f"[green]snapshot {escape(str(doc.get('snapshot_id', '?')))} saved[/]: "
            f"{doc.get('files_new', 0)} new, {doc.get('files_changed', 0)} changed, "
            f"{doc.get('files_unmodified', 0)} unmodified files; "
            f"{human_bytes(doc.get('data_added'))} added in {doc.get('total_duration', 0):.1f} s"
        )
    if kind in ("error", "verbose_status"):
        return escape(json.dumps(doc))
    return escape(line["payload"])


class TailPrinter:
    """Prints a job's log as it streams, with a progress bar while it runs."""

    def __init__(self, out: Console, err: Console, raw: bool) -> None:
        self.out = out
        self.err = err
        self.raw = raw
        self.progress: Optional[Progress] = None
        self.task: Any = None
        self._last_plain = 0.0

    def _bar(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]backup"),
                BarColumn(),
                TaskProgressColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[files]} files"),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.err,
                transient=True,
            )
            self.task = self.progress.add_task("backup", total=None, files="0")
            self.progress.start()
        return self.progress

    def event(self, event: dict) -> None:
        if event["type"] == "log":
            line = event["line"]
            if self.raw:
                self.out.print(json.dumps(line), markup=False, highlight=False, soft_wrap=True)
                return
            text = describe_event(line) if line["stream"] == "event" else escape(line["payload"])
            if text is None:
                return
            if line["stream"] == "stderr":
                text = f"[red]{text}[/]"
            (self.progress.console if self.progress else self.out).print(text, soft_wrap=True)
        elif event["type"] == "progress" and not self.raw:
            p = event["progress"]
            if not (self.err.is_terminal and self.out.is_terminal):
                self._plain_progress(p)
                return
            bar = self._bar()
            bar.update(
                self.task,
                total=p["total_bytes"] or None,
                completed=p["bytes_done"],
                files=f"{p['files_done']}/{p['total_files']}",
            )

    def _plain_progress(self, p: dict) -> None:
        """No terminal (a log file, CI): a progress line every few seconds instead of a bar."""
        now = time.monotonic()
        if now - self._last_plain < PLAIN_PROGRESS_EVERY and p["percent_done"] < 1:
            return
        self._last_plain = now
        eta = f", ETA {p['eta_seconds']} s" if p["eta_seconds"] else ""
        self.err.print(
            f"progress: {p['percent_done'] * 100:.0f}%, {human_bytes(p['bytes_done'])} of "
            f"{human_bytes(p['total_bytes'])}, {p['files_done']}/{p['total_files']} files, "
            f"{human_bytes(p['throughput_bps'])}/s{eta}",
            markup=False,
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def follow_job(app: App, job_id: int, raw: bool, strict: bool) -> None:
    printer = TailPrinter(app.out, app.err, raw)
    try:
        with app.client() as c:
            for kind, payload in c.stream("jobs.tail", id=job_id):
                if kind == "event":
                    printer.event(payload)
                else:
                    job = payload
    except KeyboardInterrupt:
        printer.close()
        interrupted(app, job_id)
    finally:
        printer.close()
    finish(app, job, strict)


def interrupted(app: App, job_id: int) -> None:
    """Ctrl-C while following: the job is fleetd's and goes on."""
    app.err.print(
        f"stopped following; job {job_id} goes on (fleetctl jobs tail {job_id} follows it "
        f"again, fleetctl jobs cancel {job_id} stops it)"
    )
    raise click.exceptions.Exit(int(Exit.INTERRUPTED))


def finish(app: App, job: dict, strict: bool) -> None:
    status = job["status"]
    message = f"job {job['id']} {render.status(status)}"
    if job.get("error") and status != "succeeded":
        message += f": {escape(job['error'].splitlines()[-1])}"
    app.err.print(message)
    code = outcome_exit(status, strict)
    if code:
        raise click.exceptions.Exit(int(code))


strict_option = click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 on a warning too (files restic could not read, an include path missing).",
)


def follow_options(fn: Any) -> Any:
    """--follow, --strict and --json of the commands that start a job."""
    fn = json_option(fn)
    fn = strict_option(fn)
    return click.option(
        "--follow", "-f", is_flag=True, help="Tail the job live and exit with its outcome."
    )(fn)


def start_job(
    app: App,
    what: str,
    follow: bool,
    strict: bool,
    as_json: bool,
    method: str = "jobs.run",
    **params: Any,
) -> None:
    """Queue a job (`method`, jobs.run by default, with params), say so,
    and follow it when asked."""
    if strict and not follow:
        raise click.UsageError("--strict goes with --follow")
    job = app.call(method, **params)
    if as_json and not follow:
        render.emit_json(job)
        return
    try:  # from here the job exists: an interrupt leaves it be, and says so
        ahead = job.get("queued_behind") or 0
        note = f", waiting behind {ahead} job(s)" if ahead else ""
        app.err.print(f"job {job['id']} queued: {escape(what)}{note}")
        if job.get("host_online") is False:
            app.err.print(
                f"[yellow]{escape(job['host'])} is offline:[/] the job waits until its agent "
                "connects"
            )
        if follow:
            follow_job(app, job["id"], raw=as_json, strict=strict)
    except KeyboardInterrupt:
        interrupted(app, job["id"])


@click.command()
@click.argument("target", nargs=-1, metavar="HOST GROUP | --selector SELECTOR GROUP")
@click.option(
    "--selector",
    "-l",
    metavar="SELECTOR",
    help="Run on every host whose labels match, e.g. role=web (then give GROUP alone).",
)
@click.option(
    "--copy",
    is_flag=True,
    help="Instead of a backup, copy the group's snapshots that its second repository lacks.",
)
@click.option(
    "--drill",
    is_flag=True,
    help="Instead of a backup, a restore drill: restore a sample of the group's latest "
    "snapshot into a scratch directory, verify it, and remove it.",
)
@follow_options
@pass_app
def run(
    app: App,
    target: tuple,
    selector: Optional[str],
    copy: bool,
    drill: bool,
    follow: bool,
    strict: bool,
    as_json: bool,
) -> None:
    """Back up GROUP of HOST now, or of every host --selector picks.

    The job waits its turn when HOST is busy or offline. With --follow the
    exit status is the job's: 0 succeeded (or warning), 1 failed, cancelled
    or lost. With --selector: one job a host, a line each, and exit 1 when
    any host was skipped (it lacks the group, say).
    """
    if copy and drill:
        raise click.UsageError("--copy and --drill are two different jobs: give one")
    kind = "copy" if copy else "drill" if drill else "backup"
    if selector is not None:
        if len(target) != 1:
            raise click.UsageError("with --selector give the GROUP alone")
        if follow:
            raise click.UsageError("--follow follows one job: leave it out with --selector")
        run_selected(app, selector, target[0], kind, as_json)
        return
    if len(target) != 2:
        raise click.UsageError("give HOST and GROUP (or --selector SELECTOR GROUP)")
    host, group = target
    what = f"{kind} of {host}/{group}"
    start_job(app, what, follow, strict, as_json, host=host, group=group, kind=kind)


def run_selected(app: App, selector: str, group: str, kind: str, as_json: bool) -> None:
    result = app.call("jobs.run_selected", selector=selector, group=group, kind=kind)
    if as_json:
        render.emit_json(result)
    else:
        for j in result["jobs"]:
            app.err.print(f"job {j['id']} queued: {kind} of {escape(j['host'])}/{escape(group)}")
        for s in result["skipped"]:
            app.err.print(f"[yellow]skipped[/] {escape(s['host'])}: {escape(s['error'])}")
        app.err.print(
            f"{len(result['jobs'])} job(s) queued, {len(result['skipped'])} host(s) skipped"
        )
    if not result["jobs"] and not result["skipped"]:
        raise click.exceptions.Exit(int(Exit.NOT_FOUND))  # no host matched
    if result["skipped"]:
        raise click.exceptions.Exit(int(Exit.ERROR))


@click.group()
def jobs() -> None:
    """Jobs: every restic operation on every host, queued, running or done."""


def repository_cell(j: dict) -> Optional[str]:
    if j.get("from_repository"):
        return f"{j['repository']} (copied from {j['from_repository']})"
    return j.get("repository")


def status_cell(j: dict) -> str:
    """A job's status, and what a queued one waits for."""
    text = render.status(j["status"])
    if j.get("waiting_for"):
        text += f" [dim](waits: {escape(j['waiting_for'])})[/]"
    return text


@jobs.command("list")
@click.option("--host", help="Only this host.")
@click.option("--status", type=click.Choice(JOB_STATUSES), help="Only jobs in this state.")
@click.option("--kind", type=click.Choice(JOB_KINDS), help="Only this kind of job.")
@click.option(
    "--since", metavar="TIME", help="Created at or after this UTC time, YYYY-MM-DDTHH:MM:SSZ."
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_app
def jobs_list(app: App, host, status, kind, since, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    rows = app.call("jobs.list", host=host, status=status, kind=kind, since=since, limit=limit)
    if as_json:
        render.emit_json(rows)
        return
    render.table(
        app.out,
        ("JOB", "HOST", "KIND", "GROUP", "STATUS", "BY", "CREATED", "FINISHED"),
        (
            (
                str(j["id"]),
                render.cell(j["host"]),
                render.cell(j["kind"]),
                render.cell(j["group"]),
                status_cell(j),
                render.cell(j["actor"]),
                render.ago(j["created_at"]),
                render.ago(j["finished_at"]),
            )
            for j in rows
        ),
        empty="no jobs",
    )


@jobs.command("show")
@click.argument("job_id", metavar="JOB", type=int)
@json_option
@pass_app
def jobs_show(app: App, job_id: int, as_json: bool) -> None:
    """Show one job, with restic's summary when it has one."""
    j = app.call("jobs.show", id=job_id)
    if as_json:
        render.emit_json(j)
        return
    c = render.cell
    pairs = [
        ("job", c(j["id"])),
        ("host", c(j["host"])),
        ("kind", c(j["kind"])),
        ("group", c(j["group"])),
        ("repository", c(repository_cell(j))),
        ("status", status_cell(j)),
        ("by", c(j["actor"])),
    ]
    if j.get("scheduled_at"):
        fire = j["scheduled_at"] + (" (catch-up of a missed window)" if j.get("catch_up") else "")
        if j.get("run_by_agent"):
            fire += ", run by the agent on its own (fleetd was out of reach)"
        pairs.append(("scheduled for", c(fire)))
    if j.get("coalesced"):
        pairs.append(("also covers", c(", ".join(j["coalesced"]) + " (fires while it waited)")))
    if j.get("restore"):
        r = j["restore"]
        what = f"snapshot {r['snapshot'][:8]} of {r['from_host']} into {r['target']}"
        if r.get("includes"):
            what += f", only {', '.join(r['includes'])}"
        if r.get("excludes"):
            what += f", not {', '.join(r['excludes'])}"
        pairs.append(("restores", c(what + (" (verified)" if r.get("verify") else ""))))
    pairs += [
        ("created", c(j["created_at"])),
        ("started", c(j["started_at"])),
        ("finished", c(j["finished_at"])),
        ("exit code", c(j["exit_code"])),
        ("log lines", c(j["log_lines"])),
    ]
    s = j.get("summary") or {}
    if s:
        pairs += [
            ("snapshot", c(s.get("snapshot_id"))),
            (
                "files",
                c(
                    f"{s.get('files_new', 0)} new, {s.get('files_changed', 0)} changed, {s.get('files_unmodified', 0)} unmodified"
                ),
            ),
            ("data added", c(human_bytes(s.get("data_added")))),
            (
                "processed",
                c(
                    f"{s.get('total_files_processed', 0)} files, {human_bytes(s.get('total_bytes_processed'))}"
                ),
            ),
        ]
    if j.get("progress"):
        p = j["progress"]
        pairs.append(
            (
                "progress",
                c(
                    f"{p['percent_done'] * 100:.0f}% ({human_bytes(p['bytes_done'])} of {human_bytes(p['total_bytes'])})"
                ),
            )
        )
    if j.get("error"):
        pairs.append(("error", f"[red]{escape(j['error'])}[/]"))
    render.fields(app.out, pairs)


@jobs.command("log")
@click.argument("job_id", metavar="JOB", type=int)
@json_option(help="One JSON object per line (NDJSON).")
@pass_app
def jobs_log(app: App, job_id: int, as_json: bool) -> None:
    """Print a job's stored log."""
    result = app.call("jobs.log", id=job_id)
    printer = TailPrinter(app.out, app.err, raw=as_json)
    for line in result["lines"]:
        printer.event({"type": "log", "line": line})


@jobs.command("tail")
@click.argument("job_id", metavar="JOB", type=int)
@json_option(help="Log lines as NDJSON, no progress bar.")
@strict_option
@pass_app
def jobs_tail(app: App, job_id: int, as_json: bool, strict: bool) -> None:
    """Follow a job live: what came before, then new lines; exit with its outcome."""
    follow_job(app, job_id, raw=as_json, strict=strict)


@jobs.command("cancel")
@click.argument("job_id", metavar="JOB", type=int, required=False)
@click.option(
    "--selector",
    "-l",
    metavar="SELECTOR",
    help="Instead of JOB: every job not ended on the hosts whose labels match.",
)
@pass_app
def jobs_cancel(app: App, job_id: Optional[int], selector: Optional[str]) -> None:
    """Cancel a queued job, or stop a running one (restic gets SIGINT, then
    SIGTERM); with --selector, every job not ended on the picked hosts
    (exit 1 when one could not be, 4 when there was none)."""
    if (job_id is None) == (selector is None):
        raise click.UsageError("give JOB or --selector SELECTOR (one of them)")
    if selector is not None:
        result = app.call("jobs.cancel_selected", selector=selector)
        for j in result["cancelled"]:
            said_cancelled(app, j)
        for f in result["failed"]:
            app.err.print(f"[yellow]job {f['job']}[/]: {escape(f['error'])}")
        if not result["cancelled"] and not result["failed"]:
            app.err.print("no job to cancel on the hosts picked")
            raise click.exceptions.Exit(int(Exit.NOT_FOUND))
        if result["failed"]:
            raise click.exceptions.Exit(int(Exit.ERROR))
        return
    said_cancelled(app, app.call("jobs.cancel", id=job_id))


def said_cancelled(app: App, j: dict) -> None:
    if j.get("cancel") == "requested":
        app.err.print(f"job {j['id']}: cancel sent to {escape(j['host'])}")
    else:
        app.err.print(f"job {j['id']} {render.status(j['status'])}")


@click.command()
@click.argument("host", required=False)
@click.option("--group", "-g", help="Only snapshots of this source group (its tag).")
@click.option("--tag", metavar="TAG", help="Only snapshots with this restic tag.")
@click.option("--repo", "repository", metavar="REPO", help="Only snapshots in this repository.")
@click.option(
    "--since",
    metavar="WHEN",
    help="Only snapshots taken since WHEN: a duration ago (7d, 12h) or a UTC time "
    "(2026-11-30 or 2026-11-30T08:00:00Z).",
)
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="Newest N snapshots.",
)
@json_option
@pass_app
def snapshots(
    app: App,
    host: Optional[str],
    group: Optional[str],
    tag: Optional[str],
    repository: Optional[str],
    since: Optional[str],
    limit: int,
    as_json: bool,
) -> None:
    """List snapshots, newest first: HOST's in every repository it uses
    (copies too), or without HOST the whole fleet's; as last reported by
    the agents."""
    rows = app.call(
        "snapshots.list",
        host=host,
        group=group,
        tag=tag,
        repository=repository,
        since=since_time(since) if since else None,
        limit=limit,
    )
    if as_json:
        render.emit_json(rows)
        return
    columns = ("ID", "REPOSITORY", "TIME", "GROUP", "PATHS", "SIZE")
    render.table(
        app.out,
        columns if host else ("HOST", *columns),
        (
            (
                *(() if host else (render.cell(s["host"]),)),
                render.cell(s["short_id"]),
                render.cell(s["repository"]),
                render.cell(s["taken_at"]),
                render.cell(s["tags"]),
                render.cell(s["paths"]),
                render.cell(human_bytes(s["size_bytes"]) if s["size_bytes"] is not None else None),
            )
            for s in rows
        ),
        empty="no snapshots reported yet",
    )


def since_time(value: str) -> str:
    """--since as the RFC 3339 time fleetd takes: a duration before now, or
    a date or time (UTC)."""
    for layout in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, layout).strftime("%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            pass
    try:
        seconds = parse_duration(value)
    except click.BadParameter:
        raise click.BadParameter(
            f"{value!r} is neither a duration (7d) nor a time (2026-11-30)", param_hint="--since"
        ) from None
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds or 0)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
