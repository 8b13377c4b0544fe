"""The job kinds this agent runs: ONE table, kind -> (parameter schema,
restic command builder, runner coroutine).

A command.run is checked against its kind's schema and its restic command
built before the job starts, so a bad one is refused (code `bad_params`)
instead of failing half-way. A kind missing from the table is refused with
code `unknown_kind`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from ..common.drills import parse_sample
from ..common.protocol import (
    MAX_COALESCED,
    MAX_COPY_SNAPSHOTS,
    MAX_STR,
    MAX_TIMEOUT,
    Field,
    ProtocolError,
    check_fields,
)
from ..common.restic import commands, parse, patterns
from ..common.restic.commands import read_data_subset
from . import drill

if TYPE_CHECKING:  # pragma: no cover
    from .runner import Job


class Outcome(NamedTuple):
    status: str  # one of protocol.FINAL_STATUSES
    exit_code: int
    error: Optional[str] = None


class Where(NamedTuple):
    """Whose snapshots a job makes and reads in the repository: the host's
    name in Fleet (what backups record), and the names older backups of this
    machine were recorded under (its hostname, restic's default)."""

    host: str = ""
    also: tuple[str, ...] = ()

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.host, *self.also) if self.host else ()


class Kind(NamedTuple):
    params: tuple  # of protocol.Field: what command.run may carry for this kind
    # checked params, whose snapshots -> restic command (raises ValueError)
    command: Callable[[dict, Where], tuple]
    run: Callable[[Job], Awaitable[Outcome]]  # runs the job on the agent
    # after the job, before job.finished: cheap reports only (no restic run)
    after: Optional[Callable[[Job, Outcome], Awaitable[None]]] = None
    locks_after: bool = False  # report the repository's locks after a success too


class Refused(Exception):
    """A command.run the agent will not start; `code` goes into command.result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _req(name: str, kind: str, **kw: Any) -> Field:
    return Field(name, kind, True, **kw)


def _opt(name: str, kind: str, **kw: Any) -> Field:
    return Field(name, kind, False, **kw)


# -- parameters ----------------------------------------------------------------


def _check_command(params: dict, _: Where) -> tuple:
    subset = params.get("read_data_subset")
    if subset is None and params.get("args"):
        subset = params["args"][0]  # an older fleetd passes it positionally
    return commands.check(read_data_subset(subset) if subset else "")


def _restore_command(p: dict, _: Where) -> tuple:
    argv = commands.restore(
        p["snapshot"],
        p["target"],
        p.get("includes") or (),
        p.get("excludes") or (),
        bool(p.get("verify")),
    )  # checked even for a dry run, which lists the snapshot instead
    return commands.ls_all(p["snapshot"]) if p.get("dry_run") else argv


def _drill_command(params: dict, _: Where) -> tuple:
    parse_sample(params["sample"])  # raises ValueError: refused before it starts
    return commands.ls_all(params["snapshot"])


def check_params(kind: Kind, command: dict) -> dict:
    """command.run's data, checked against the kind's schema (unknown keys
    dropped). Raises Refused(bad_params)."""
    try:
        return check_fields(command, kind.params)
    except ProtocolError as exc:
        raise Refused("bad_params", f"bad parameters: {exc}") from None


ANYONE = Where()  # no host named: restic's defaults


def prepare(command: dict, where: Where = ANYONE) -> tuple[Kind, dict, tuple]:
    """The kind, checked parameters and restic command of a command.run.

    Raises Refused with code unknown_kind or bad_params."""
    name = command.get("kind")
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise Refused("unknown_kind", f"this agent cannot run {name} jobs")
    params = check_params(kind, command)
    try:
        argv = kind.command(params, where)
    except ValueError as exc:
        raise Refused("bad_params", f"bad parameters: {exc}") from None
    return kind, params, argv


# -- runners -------------------------------------------------------------------


async def run_restic(job: Job) -> Outcome:
    result = await job.restic(job.command)
    return Outcome(result.status, result.exit_code, result.error)


async def run_init(job: Job) -> Outcome:
    """restic init; a repository that exists already counts as initialised
    only once the password is shown to open it (a wrong one would otherwise
    pass here and fail every backup after)."""
    result = await job.restic(job.command)
    if result.exit_code == 0 or not parse.already_initialized(result.error):
        return Outcome(result.status, result.exit_code, result.error)
    await job.log.note("repository already initialized; checking that the password opens it")
    opened = await job.restic(commands.cat_config(), log_stdout=False)
    if opened.exit_code == 0:
        await job.log.note("the password opens the repository")
        return Outcome("succeeded", 0)
    if opened.cancelled:
        return Outcome("cancelled", opened.exit_code)
    if parse.wrong_password(opened.error):
        return Outcome(
            "failed",
            opened.exit_code,
            "a repository exists at this URL but the password does not open it "
            "(wrong password, or another repository): fix it with 'fleetctl repo set'",
        )
    return Outcome("failed", opened.exit_code, f"cannot open the repository: {opened.error}")


async def note_fire(job: Job) -> None:
    """A scheduled backup says in its log what it runs for."""
    p = job.params
    if p.get("scheduled_at"):
        text = f"scheduled backup for {p['scheduled_at']}"
        if p.get("catch_up"):
            text += " (catch-up: that time was missed while the host or its agent was down)"
        if job.id < 0:
            text += "; run by the agent on its own, fleetd being out of reach"
        await job.log.note(text)
    if p.get("coalesced"):
        await job.log.note(
            "this backup also covers the schedule's fire(s) at "
            + ", ".join(p["coalesced"])
            + ", which came while it waited to run (coalesced, not queued twice)"
        )


async def run_backup(job: Job) -> Outcome:
    """pre-hook, restic backup, post-hook.

    A failing pre-hook fails the job before restic runs. The post-hook runs
    whenever the pre-hook succeeded (it often restarts what the pre-hook
    stopped); its failure turns a success into a warning.
    """
    p = job.params
    await note_fire(job)
    if p.get("pre_hook"):
        pre = await job.hook("pre-hook", p["pre_hook"])
        if pre.cancelled and job.hook_timed_out:
            return Outcome(
                "failed",
                pre.exit_code,
                f"pre-hook ran longer than {job.hook_limit} s and was stopped; backup not run",
            )
        if pre.cancelled:
            return Outcome("cancelled", pre.exit_code)
        if pre.exit_code != 0:
            return Outcome(
                "failed", pre.exit_code, f"pre-hook exited {pre.exit_code}; backup not run"
            )
    # restic skips an include path that is not there and still succeeds:
    # a backup that silently lost a directory must say so
    missing = [path for path in p["includes"] if not os.path.lexists(path)]
    job.restic_started = job.now()
    result = await job.restic(job.command)
    status, error = result.status, result.error
    if missing and status == "succeeded":
        status = "warning"
        error = "include path(s) missing on the host, not backed up: " + ", ".join(missing)
        await job.log.note(error)
    if p.get("post_hook") and not result.cancelled:
        post = await job.hook("post-hook", p["post_hook"])
        if job.hook_timed_out:
            error = f"{error}\npost-hook ran longer than {job.hook_limit} s and was stopped"
            error = error.strip()
            if status == "succeeded":
                status = "warning"
        elif post.exit_code != 0:
            error = f"{error}\npost-hook exited {post.exit_code}".strip()
            if status == "succeeded":
                status = "warning"
    return Outcome(status, result.exit_code, error)


def _count(doc: dict, key: str) -> int:
    value = doc.get(key)
    return int(value) if isinstance(value, (int, float)) and value >= 0 else 0


def new_snapshot(job: Job) -> Optional[dict[str, Any]]:
    """The snapshot a backup just made, as far as restic's summary and the
    job tell it (restic 0.14 names it by its short id; the full refresh that
    follows replaces it)."""
    summary = job.log.summary or {}
    snapshot_id = summary.get("snapshot_id")
    if not isinstance(snapshot_id, str) or not snapshot_id or job.restic_started is None:
        return None
    p = job.params
    return {
        "id": snapshot_id,
        "short_id": snapshot_id[:8],
        "time": job.restic_started,
        "hostname": job.runner.where.host or socket.gethostname(),  # what the backup recorded
        "paths": sorted(os.path.abspath(path) for path in p["includes"]),
        "tags": [p["tag"]] if p.get("tag") else [],
        "size_bytes": _count(summary, "total_bytes_processed"),
        "file_count": _count(summary, "total_files_processed"),
    }


async def after_backup(job: Job, outcome: Outcome) -> None:
    """The new snapshot as a partial report (an upsert, `last: false`) right
    away; the full snapshot list and stats later, off the job's path."""
    if outcome.status not in ("succeeded", "warning"):
        return
    snap = new_snapshot(job)
    if snap is not None:
        data = {"snapshots": [snap], "report_at": job.restic_started, "last": False}
        if job.repo.id is not None:
            data["repository_id"] = job.repo.id
        await job.reporter.emit("snapshots.report", data)
    job.refresh(job.log.summary)


async def after_repository_change(job: Job, outcome: Outcome) -> None:
    """forget, prune and copy change what the repository holds: the
    snapshot list is refreshed and the sizes measured again."""
    if outcome.status in ("succeeded", "warning"):
        job.sizes.stale = True
        job.refresh()


def unwritable(target: str) -> Optional[str]:
    """Why this agent cannot write into `target` (None: it can): checked
    first, so a confined agent says how to restore instead of a pile of
    restic errors. The shipped systemd unit lets it write only its own
    directories (ProtectSystem=strict) and as its own user."""
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.access(probe, os.W_OK):
        return None
    return (
        f"fleet-agent (user {_user()}) cannot write into {target}: restore under its own "
        "directory, e.g. --target /var/lib/fleet-agent/restore, or let it write there "
        "(systemctl edit fleet-agent: [Service] ReadWritePaths=/srv; in place needs User=root)"
    )


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


DRY_RUN_SHOWN = 1000  # files a dry run names in the job's log (then it counts)


async def dry_run_restore(job: Job) -> Outcome:
    """What a restore would write, without writing: the snapshot listed and
    matched against the includes and excludes as restic would (restic 0.14
    has no restore --dry-run); the files named in the log, counted in the
    summary, with those that exist at the target already (overwritten)."""
    p = job.params
    includes, excludes = p.get("includes") or (), p.get("excludes") or ()
    counts = {"files": 0, "dirs": 0, "bytes": 0, "overwrites": 0}
    shown: list[str] = []

    def listed(line: str) -> None:
        doc = parse.json_line(line)
        path = (doc or {}).get("path")
        if not doc or doc.get("struct_type", "node") != "node" or not isinstance(path, str):
            return
        if not patterns.selected(path, includes, excludes):
            return
        if doc.get("type") == "dir":
            counts["dirs"] += 1
            return
        size = _count(doc, "size")
        dest = os.path.join(p["target"], path.lstrip("/"))
        exists = os.path.lexists(dest)
        counts["files"] += 1
        counts["bytes"] += size
        counts["overwrites"] += exists
        if len(shown) < DRY_RUN_SHOWN:
            shown.append(
                f"would write {dest} ({size} bytes){' over a file there' if exists else ''}"
            )

    await job.log.note(f"dry run: what restoring snapshot {p['snapshot'][:8]} would write")
    result = await job.restic(job.command, on_stdout=listed)
    if result.status != "succeeded":
        return Outcome(result.status, result.exit_code, f"cannot list the snapshot: {result.error}")
    for line in shown:
        await job.log.note(line)
    if counts["files"] > len(shown):
        await job.log.note(f"... and {counts['files'] - len(shown)} more files")
    job.log.summary = {"dry_run": counts}
    await job.log.note(
        f"dry run: {counts['files']} files ({counts['bytes']} bytes) in {counts['dirs']} "
        f"directories would be written into {p['target']}, {counts['overwrites']} of them over "
        "files there; nothing was written"
    )
    if not counts["files"] and (includes or excludes):
        return Outcome("warning", 0, "nothing in the snapshot matches: nothing would be restored")
    return Outcome("succeeded", 0)


async def run_restore(job: Job) -> Outcome:
    """restic restore; an include path that restored nothing (a typo, or a
    file the snapshot lacks) turns a success into a warning that names it:
    restic itself says nothing of it."""
    p = job.params
    if p.get("dry_run"):
        return await dry_run_restore(job)
    why = unwritable(p["target"])
    if why is not None:
        return Outcome("failed", 0, why)
    where = "in place" if p["target"] == "/" else f"into {p['target']}"
    await job.log.note(f"restoring snapshot {p['snapshot'][:8]} {where}")
    result = await job.restic(job.command)
    if result.status != "succeeded":
        return Outcome(result.status, result.exit_code, result.error)
    missing = [
        path
        for path in p.get("includes") or ()
        if path.startswith("/")
        and not any(c in path for c in "*?[")
        and not os.path.lexists(os.path.join(p["target"], path.lstrip("/")))
    ]
    if missing:
        error = "nothing restored for: " + ", ".join(missing)
        await job.log.note(error)
        return Outcome("warning", result.exit_code, error)
    return Outcome("succeeded", result.exit_code)


async def run_drill(job: Job) -> Outcome:
    """A restore drill (see drill.py): list, sample, restore with --verify
    into a scratch directory, check, clean up; the verdict is the summary."""
    p = job.params
    began = time.monotonic()
    files = drill.Reservoir()

    def listed(line: str) -> None:
        doc = parse.json_line(line)
        if doc and doc.get("type") == "file" and isinstance(doc.get("path"), str):
            files.add(drill.FileNode(doc["path"], _count(doc, "size"), doc.get("mtime")))

    await job.log.note(f"drill of snapshot {p['snapshot'][:8]}: listing its files")
    listing = await job.restic(commands.ls_all(p["snapshot"]), on_stdout=listed)
    if listing.status != "succeeded":
        return Outcome(
            listing.status, listing.exit_code, f"cannot list the snapshot: {listing.error}"
        )
    sample = files.choose(p["sample"])
    if not sample:
        return Outcome("failed", 0, "the snapshot holds no file to restore")
    await job.log.note(
        f"restoring {len(sample)} of {files.seen} files with --verify into a scratch directory"
    )
    scratch = tempfile.mkdtemp(prefix="fleet-drill-")
    try:
        restored = await job.restic(
            commands.restore(
                p["snapshot"], scratch, [drill.include_pattern(n.path) for n in sample], verify=True
            )
        )
        verdict = await asyncio.get_running_loop().run_in_executor(
            None, drill.check, scratch, sample
        )
    finally:
        await asyncio.get_running_loop().run_in_executor(None, drill.remove, scratch)
    verdict.update(
        snapshot=p["snapshot"], listed=files.seen, seconds=round(time.monotonic() - began, 3)
    )
    job.log.summary = {"drill": verdict}
    if restored.cancelled:
        return Outcome("cancelled", restored.exit_code)
    if restored.exit_code != 0:
        return Outcome(
            "failed",
            restored.exit_code,
            f"the sample did not restore intact: {restored.error or 'restic failed'}",
        )
    for problem in verdict["problems"]:
        await job.log.note(problem)
    if verdict["mismatches"]:
        return Outcome(
            "failed",
            1,
            f"{verdict['mismatches']} of {len(sample)} restored files do not match: "
            + "; ".join(verdict["problems"][:3]),
        )
    await job.log.note(
        f"proven: {len(sample)} files ({verdict['bytes']} bytes) restored and verified, "
        f"{verdict['live_checked']} compared with the live file"
    )
    return Outcome("succeeded", 0)


# -- the table -------------------------------------------------------------------

_HOOK = MAX_STR

KINDS: dict[str, Kind] = {
    "init": Kind((), lambda p, w: commands.init(), run_init),
    "backup": Kind(
        (
            _req("includes", "list[str]", limit=1000),
            _opt("excludes", "list[str]", limit=1000),
            _opt("tag", "str", limit=64),
            _opt("group", "str", limit=64),
            _opt("pre_hook", "str", limit=_HOOK),
            _opt("post_hook", "str", limit=_HOOK),
            _opt("scheduled_at", "str", limit=32),
            _opt("catch_up", "bool"),
            _opt("coalesced", "list[str]", limit=MAX_COALESCED),
            _opt("hook_timeout", "int", minimum=1, maximum=MAX_TIMEOUT),
            _opt("timeout", "int", minimum=1, maximum=MAX_TIMEOUT),
        ),
        lambda p, w: commands.backup(
            p["includes"], p.get("excludes") or (), p.get("tag") or "", w.host
        ),
        run_backup,
        after=after_backup,
    ),
    "forget": Kind(
        (
            _req("tag", "str", limit=64),
            _req("retention", "dict"),
            _opt("group", "str", limit=64),
            _opt("hosts", "list[str]", limit=100),
        ),
        # another host's snapshots when fleetd names it (maintenance), else its own
        lambda p, w: commands.forget(p["tag"], p["retention"], p.get("hosts") or w.hosts),
        run_restic,
        after=after_repository_change,
    ),
    "prune": Kind((), lambda p, w: commands.prune(), run_restic, after=after_repository_change),
    # into the job's repository from the one it names (a group's second copy)
    "copy": Kind(
        (
            _opt("snapshots", "list[str]", limit=MAX_COPY_SNAPSHOTS),
            _opt("tag", "str", limit=64),
            _opt("group", "str", limit=64),
        ),
        lambda p, w: commands.copy(p.get("snapshots") or (), p.get("tag") or "", w.hosts),
        run_restic,
        after=after_repository_change,
    ),
    "check": Kind(
        (_opt("read_data_subset", "str", limit=32), _opt("args", "list[str]", limit=100)),
        _check_command,
        run_restic,
    ),
    "unlock": Kind((), lambda p, w: commands.unlock(), run_restic, locks_after=True),
    "snapshots": Kind((), lambda p, w: commands.snapshots(hosts=w.hosts), run_restic),
    # a sample of a snapshot restored, verified and compared, then removed
    "drill": Kind(
        (
            _req("snapshot", "str", limit=64),
            _req("sample", "str", limit=16),
            _opt("tag", "str", limit=64),
            _opt("group", "str", limit=64),
        ),
        _drill_command,
        run_drill,
    ),
    # one snapshot by id, of this host or another using the repository
    "restore": Kind(
        (
            _req("snapshot", "str", limit=64),
            _req("target", "str", limit=4096),
            _opt("includes", "list[str]", limit=1000),
            _opt("excludes", "list[str]", limit=1000),
            _opt("verify", "bool"),
            _opt("dry_run", "bool"),
        ),
        _restore_command,
        run_restore,
    ),
    "stats": Kind((), lambda p, w: commands.stats(), run_restic),
}
