"""Running one job at a time (the kinds table says how), and reporting it.

Every log line and the start and end of a job go through `Reporter.emit`
(spooled, numbered, resent until acknowledged); progress goes through
`Reporter.emit_now` (ephemeral: a progress update lost with a link is not
worth resending).

A job's end is reported as soon as restic (and the post-hook) exits. The
snapshot list and repository stats a backup changed are refreshed later by
the `Refresher`, when the runner is idle: several backups in a row make one
refresh, and a job arriving meanwhile kills it (it runs again afterwards),
so a refresh never delays a job or makes one be refused as busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Optional, Protocol

from ..common.protocol import MAX_LINE, SNAPSHOT_PAGE
from ..common.restic import commands, execute, parse
from ..common.timefmt import now_iso
from .kinds import ANYONE, Kind, Outcome, Refused, Where, prepare
from .state import RepoConfig, State, StateError

log = logging.getLogger("fleet-agent.jobs")

PROGRESS_EVERY = 1.0  # seconds between job.progress frames
HOOK_TIMEOUT = 1800  # seconds a hook may run unless its group says otherwise
# after the last job ends, before the snapshot list and stats are refreshed;
# at least a second, so the refresh's report_at is later than the partial
# report of the backup that asked for it (timestamps have whole seconds)
REFRESH_DELAY = 1.0
MAX_SUMMARIES = 100  # backup summaries kept for the next refresh
# how often the repository's sizes are measured by restic stats (which walk
# every snapshot); in between, each backup's summary adds to the last figures
MEASURE_EVERY = 6 * 3600.0


class Sizes:
    """The repository's sizes as reported to fleetd: restore size (what all
    snapshots restore), stored data (after deduplication and compression)
    and the snapshot count. Measured with restic stats when first asked,
    after a forget or prune, and every MEASURE_EVERY seconds; estimated from
    backup summaries in between, so a backup does not cost a walk of the
    whole repository."""

    def __init__(self) -> None:
        self.figures: Optional[dict[str, int]] = None
        self.measured_at: Optional[str] = None
        self._measured = 0.0  # monotonic
        self.stale = True  # a forget or prune changed what the repository holds

    def due(self, now: float) -> bool:
        return self.figures is None or self.stale or now - self._measured >= MEASURE_EVERY

    def measured(self, figures: dict[str, int], now: float) -> None:
        self.figures = dict(figures)
        self.measured_at = now_iso()
        self._measured = now
        self.stale = False

    def grow(self, summaries: list[dict[str, Any]]) -> None:
        if self.figures is None:
            return
        for summary in summaries:
            for key, value in parse.growth(summary).items():
                self.figures[key] = self.figures.get(key, 0) + value

    def report(self, snapshot_count: Optional[int]) -> Optional[dict[str, Any]]:
        """repo.stats' data, or None before a first measure."""
        if self.figures is None:
            return None
        out: dict[str, Any] = {**self.figures, "measured_at": self.measured_at}
        if snapshot_count is not None:
            out["snapshot_count"] = snapshot_count
        return out


def restic_env(
    repo: RepoConfig, source: Optional[RepoConfig] = None
) -> tuple[dict[str, str], execute.Masker]:
    """restic's environment for the repository (and a copy's source), and
    the masker of their secrets. Raises ValueError when the two need one
    backend variable set to different values (restic has one environment)."""
    env = execute.environment(repo.url, repo.password, repo.env)
    secrets = [repo.password, *repo.env.values()]
    if source is not None:
        for key, value in source.env.items():
            if key in repo.env and repo.env[key] != value:
                raise ValueError(
                    f"both repositories set {key} to different values; restic copy "
                    "runs with one environment for both"
                )
            env[key] = value
        env["RESTIC_FROM_REPOSITORY"] = source.url
        env["RESTIC_FROM_PASSWORD"] = source.password
        secrets += [source.password, *source.env.values()]
    return env, execute.Masker(secrets)


def repository_field(repo: RepoConfig) -> dict[str, Any]:
    """What a report about the repository names it by (nothing for the one
    an older fleetd sent)."""
    return {} if repo.id is None else {"repository_id": repo.id}


class Reporter(Protocol):
    async def emit(
        self,
        type_: str,
        data: dict[str, Any],
        supersede: bool = False,
        drop_local: Optional[int] = None,
    ) -> None: ...

    async def emit_now(self, type_: str, data: dict[str, Any]) -> None: ...


class JobLog:
    """Numbers a job's lines from 1 and sends each as job.log.

    restic's status lines (`message_type: status`, about once a second) go
    to job.progress only: the summary says where the job ended.
    """

    def __init__(self, reporter: Reporter, job_id: int) -> None:
        self.reporter = reporter
        self.job_id = job_id
        self.seq = 0
        self.summary: Optional[dict[str, Any]] = None
        self._last_progress = 0.0

    async def line(self, stream: str, text: str) -> None:
        event = parse.json_line(text) if stream == "stdout" else None
        if event is not None:
            kind = event.get("message_type")
            if kind == "status":
                await self._progress(event)
                return
            if kind == "summary":
                self.summary = event
        await self._send("event" if event is not None else stream, text)

    async def note(self, text: str) -> None:
        """A line of the agent's own (hooks, soft successes), on stdout."""
        await self._send("stdout", f"fleet-agent: {text}")

    async def _send(self, stream: str, text: str) -> None:
        self.seq += 1
        line = {
            "job_id": self.job_id,
            "seq": self.seq,
            "ts": now_iso(),
            "stream": stream,
            "payload": text[:MAX_LINE],
        }
        await self.reporter.emit("job.log", line)

    async def _progress(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        final = (status.get("percent_done") or 0) >= 1
        if now - self._last_progress < PROGRESS_EVERY and not final:
            return
        self._last_progress = now
        await self.reporter.emit_now(
            "job.progress", {"job_id": self.job_id, **parse.progress(status)}
        )


class Job:
    """One job as its kind's runner sees it: parameters, the restic command
    built from them, and ways to run restic and hooks into the job's log."""

    def __init__(
        self,
        runner: JobRunner,
        job_id: int,
        kind: Kind,
        params: dict[str, Any],
        command: tuple,
        repo: RepoConfig,
        extra: Optional[dict[str, Any]] = None,
        local: Optional[int] = None,
        source: Optional[RepoConfig] = None,
    ) -> None:
        self.runner = runner
        self.id = job_id
        self.extra = extra or {}  # job.started's fields for a job the agent made itself
        self.local = local  # its id in the spool's queue of local jobs
        self.kind = kind
        self.params = params
        self.command = command
        self.repo = repo
        self.source = source  # a copy's: the repository it reads
        self.reporter = runner.reporter
        self.log = JobLog(runner.reporter, job_id)
        self.cancel = asyncio.Event()
        self.env, self.mask = restic_env(repo, source)
        self.restic_started: Optional[str] = None  # when restic backup began (its snapshot's time)
        self.hook_timed_out = False  # the last hook outlived hook_limit
        self.timed_out = False  # the job outlived its timeout

    @staticmethod
    def now() -> str:
        return now_iso()

    async def restic(
        self,
        argv: tuple,
        log_stdout: bool = True,
        on_stdout: Optional[Callable[[str], Any]] = None,
    ) -> execute.Result:
        """Run restic for the job; its lines go to the job's log (standard
        output too unless `log_stdout` is false; to `on_stdout` when given)."""

        broken = False

        async def stderr_only(stream: str, line: str) -> None:
            nonlocal broken
            if stream != "stdout":
                await self.log.line(stream, line)
            elif on_stdout is not None and not broken:
                try:
                    on_stdout(line)
                except Exception as exc:  # restic's output must still be drained
                    broken = True
                    log.exception("job %s: reading restic's output failed", self.id)
                    await self.log.note(f"reading restic's output failed: {exc}")

        return await execute.run(
            self.runner.argv(argv),
            self.env,
            self.log.line if log_stdout and on_stdout is None else stderr_only,
            self.mask,
            self.cancel,
            self.runner.grace,
        )

    @property
    def hook_limit(self) -> int:
        """Seconds a hook may run: the group's, else HOOK_TIMEOUT."""
        return int(self.params.get("hook_timeout") or HOOK_TIMEOUT)

    async def hook(self, name: str, command: str) -> execute.Result:
        """Run a hook; one that outlives hook_limit is stopped (as a cancel
        stops it) and hook_timed_out says so: a hung hook must not hold the
        host's queue for ever."""
        # hooks get the agent's environment and what the job is, never the
        # repository's credentials
        env = {k: v for k, v in os.environ.items() if k not in execute.REPO_KEYS}
        env["FLEET_JOB_ID"] = str(self.id)
        env["FLEET_GROUP"] = str(self.params.get("group") or self.params.get("tag") or "")
        await self.log.note(f"running {name}: {command}")
        stop = asyncio.Event()
        self.hook_timed_out = False

        def too_long() -> None:
            self.hook_timed_out = True
            stop.set()

        timer = asyncio.get_running_loop().call_later(self.hook_limit, too_long)
        relay = asyncio.ensure_future(self.cancel.wait())
        relay.add_done_callback(lambda _: stop.set())
        try:
            return await execute.run(
                ["/bin/sh", "-c", command],
                env,
                self.log.line,
                self.mask,
                stop,
                self.runner.grace,
            )
        finally:
            timer.cancel()
            relay.cancel()

    @property
    def sizes(self) -> Sizes:
        return self.runner.sizes_of(self.repo)

    def refresh(self, summary: Optional[dict[str, Any]] = None) -> None:
        """Ask for the job's repository's snapshot list and stats to be
        refreshed once the runner is idle."""
        self.runner.refresher.request(summary, self.repo.id)


class Refresher:
    """The snapshot lists and stats, refreshed in the background when idle.

    Requests coalesce: one refresh covers every backup since the last one,
    in each repository asked for.
    `preempt` (a job starts) kills a running refresh; it runs again when the
    runner is idle. The backup summaries asked with are kept until a refresh
    reported the list: restic before 0.17 keeps no size in a snapshot.
    """

    def __init__(self, runner: JobRunner, delay: float = REFRESH_DELAY) -> None:
        self.runner = runner
        self.delay = delay
        self.due = False
        self.wanted: set[Optional[int]] = set()  # repository ids (None: an older fleetd's one)
        self.summaries: list[tuple[Optional[int], dict[str, Any]]] = []
        self.runs = 0  # refreshes started (tests count them)
        self._task: Optional[asyncio.Task] = None

    def request(self, summary: Optional[dict[str, Any]], repository: Optional[int]) -> None:
        self.due = True
        self.wanted.add(repository)
        if summary:
            self.summaries.append((repository, summary))
            del self.summaries[:-MAX_SUMMARIES]
        self.kick()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def kick(self) -> None:
        """Start the refresh if one is due and the runner is idle."""
        if self.due and self.runner.current is None and not self.running:
            self._task = asyncio.ensure_future(self._refresh())

    def preempt(self) -> None:
        if self.running:
            log.debug("a job starts: the snapshot refresh waits for it")
            self._task.cancel()  # type: ignore[union-attr]  # restic is killed with it

    async def idle(self) -> None:
        """Wait until no refresh is due or running (tests)."""
        while self.due or self.running:
            if self.running:
                await asyncio.gather(self._task, return_exceptions=True)  # type: ignore[arg-type]
            elif self.runner.current is None:
                self.kick()
            else:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.running:
            self._task.cancel()  # type: ignore[union-attr]
            await asyncio.wait({self._task}, timeout=10)  # type: ignore[arg-type]

    async def _refresh(self) -> None:
        await asyncio.sleep(self.delay)
        self.runs += 1
        used = list(self.summaries)
        wanted = set(self.wanted)
        try:
            for repo in self.runner.state.load_repos():
                if repo.id in wanted:
                    mine = [s for rid, s in used if rid == repo.id]
                    await self.runner.report_repository(repo, mine)
        except asyncio.CancelledError:
            raise  # pre-empted: still due
        except Exception:  # a failing refresh must not take the agent down, nor loop
            log.exception("refreshing the snapshot list failed")
        self.due = False
        self.wanted -= wanted
        self.summaries = [s for s in self.summaries if s not in used]


class JobRunner:
    """Runs the jobs fleetd dispatches, one at a time."""

    def __init__(
        self,
        state: State,
        reporter: Reporter,
        restic: str = "restic",
        grace: float = 10.0,
        refresh_delay: float = REFRESH_DELAY,
        where: Where = ANYONE,
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.restic = restic
        self.grace = grace
        self.current: Optional[int] = None
        self.job: Optional[Job] = None
        self.refresher = Refresher(self, refresh_delay)
        self.sizes: dict[Optional[int], Sizes] = {}  # by repository id
        self.where = where
        self._task: Optional[asyncio.Task] = None
        self.on_idle: Callable[[], None] = lambda: None  # the scheduler's queue

    def sizes_of(self, repo: RepoConfig) -> Sizes:
        return self.sizes.setdefault(repo.id, Sizes())

    @property
    def current_uid(self) -> Optional[str]:
        return self.job.extra.get("uid") if self.job is not None else None

    def submit(
        self,
        command: dict[str, Any],
        extra: Optional[dict[str, Any]] = None,
        local: Optional[int] = None,
    ) -> None:
        """Start a job. Raises Refused (code unknown_kind, bad_params, no_repo or busy).
        extra, local: a job the agent made itself (see scheduler.py)."""
        kind, params, argv = prepare(command, self.where)
        if self.current is not None:
            raise Refused("busy", f"busy with job {self.current}")
        repo = self.repository(command.get("repository_id"))
        source = None
        if command["kind"] == "copy":
            if command.get("from_repository_id") is None:
                raise Refused("bad_params", "a copy needs the repository it copies from")
            source = self.repository(command["from_repository_id"])
        try:
            job = Job(self, command["job_id"], kind, params, argv, repo, extra, local, source)
        except ValueError as exc:
            raise Refused("bad_params", str(exc)) from None
        self.refresher.preempt()
        self.current = command["job_id"]
        self.job = job
        self._task = asyncio.ensure_future(self._run(command["kind"], self.job))

    def repository(self, repository_id: Optional[int]) -> RepoConfig:
        """The repository a job names (none: the default). Raises Refused."""
        try:
            repo = self.state.load_repo(repository_id)
        except (StateError, KeyError, TypeError) as exc:
            raise Refused("no_repo", f"the repository configuration is unreadable: {exc}") from None
        if repo is None and repository_id is None:
            raise Refused(
                "no_repo", "no repository configured for this host: run 'fleetctl repo set'"
            )
        if repo is None:
            raise Refused(
                "no_repo",
                f"repository {repository_id} is not one this host has been given "
                "(fleetd sends it when the host uses it)",
            )
        return repo

    def cancel(self, job_id: int) -> bool:
        if self.current != job_id or self.job is None:
            return False
        self.job.cancel.set()
        return True

    async def shutdown(self) -> None:
        """Cancel the running job (restic removes its lock) and wait for its report."""
        await self.refresher.stop()
        if self._task is not None and not self._task.done():
            if self.job is not None:
                self.job.cancel.set()
            await self._task

    def argv(self, argv: tuple) -> list[str]:
        return [self.restic, *argv[1:]]

    # -- one job ------------------------------------------------------------

    async def _run(self, name: str, job: Job) -> None:
        try:
            await self._run_job(name, job)
        except Exception:  # the spool failing (disk full): the runner must not stay busy
            log.exception("job %s could not be reported", job.id)
        finally:
            self._release(job)
            self.on_idle()  # a local job waiting goes first
            self.refresher.kick()

    def _release(self, job: Job) -> None:
        """The runner is free, unless a job was submitted since this one ended."""
        if self.job is job:
            self.current = None
            self.job = None

    async def _run_job(self, name: str, job: Job) -> None:
        await self.reporter.emit(
            "job.started",
            {"job_id": job.id, "kind": name, "started_at": now_iso(), **job.extra},
            drop_local=job.local,
        )
        outcome = Outcome("failed", -1)
        limit = job.params.get("timeout")
        timer = None
        if limit:  # past it the job is stopped as a cancel stops it, and fails

            def too_long() -> None:
                job.timed_out = True
                job.cancel.set()

            timer = asyncio.get_running_loop().call_later(limit, too_long)
        try:
            outcome = await job.kind.run(job)
        except Exception as exc:  # a bug must still end the job, not leave it running
            log.exception("job %s crashed", job.id)
            outcome = Outcome("failed", -1, f"agent error: {exc}")
        finally:
            if timer is not None:
                timer.cancel()
        if job.timed_out and outcome.status == "cancelled":
            outcome = Outcome(
                "failed", outcome.exit_code, f"ran longer than its timeout of {limit} s: stopped"
            )
        finished: dict[str, Any] = {
            "job_id": job.id,
            "status": outcome.status,
            "exit_code": outcome.exit_code,
            "finished_at": now_iso(),
        }
        if job.log.summary is not None:
            finished["summary"] = job.log.summary
        if outcome.error and outcome.status != "succeeded":
            finished["error"] = outcome.error[:MAX_LINE]
        # cheap reports before the end, so that whoever sees the job end sees
        # them: the snapshot a backup made (from its summary), and the locks a
        # failed or stopped restic may have left (one quick `restic list locks`)
        try:
            if job.kind.after is not None:
                await job.kind.after(job, outcome)
            if outcome.status != "succeeded" or job.kind.locks_after:
                await self.report_locks(job.repo)
                if job.source is not None:  # a copy that failed may have left one there too
                    await self.report_locks(job.source)
        except Exception:  # a report that fails must not keep the runner busy for ever
            log.exception("reports after job %s failed", job.id)
        finally:
            self._release(job)  # fleetd may dispatch the next job the moment it hears the end
        await self.reporter.emit("job.finished", finished)
        log.info("job %s (%s) %s", job.id, name, outcome.status)

    async def end_local(self, job_id: int, extra: dict[str, Any], status: str, error: str) -> None:
        """A local job that never runs (no repository yet, or cancelled in
        the queue) starts and ends at once, so fleetd shows it instead of a
        backup that silently never happened."""
        await self.reporter.emit(
            "job.started",
            {"job_id": job_id, "kind": "backup", "started_at": now_iso(), **extra},
        )
        await self.reporter.emit(
            "job.finished",
            {
                "job_id": job_id,
                "status": status,
                "exit_code": -1,
                "finished_at": now_iso(),
                "error": error[:MAX_LINE],
            },
        )

    # -- reports ------------------------------------------------------------

    async def report_locks(self, repo: RepoConfig) -> None:
        """Tell fleetd how many restic locks the repository holds (stale ones
        are left by a restic that was killed); `fleetctl repo unlock` clears them."""
        result, out = await self._stdout(commands.list_locks(), repo)
        locks = [line for line in out if line.strip()]
        if result.exit_code == 0:
            if locks:
                log.warning("repository %s holds %d lock(s)", repo.name or "", len(locks))
            await self.reporter.emit("repo.locks", {"count": len(locks), **repository_field(repo)})
        else:
            log.warning("restic list locks failed: %s", result.error)

    async def _stdout(self, argv: tuple, repo: RepoConfig) -> tuple[execute.Result, list[str]]:
        """Run a restic command of the agent's own (not a job's) and keep its
        standard output lines."""
        env, mask = restic_env(repo)
        out: list[str] = []

        async def collect(stream: str, line: str) -> None:
            if stream == "stdout":
                out.append(line)

        return await execute.run(self.argv(argv), env, collect, mask), out

    async def check_locks_when_idle(self) -> None:
        """At start: a restic killed with the agent leaves its lock behind."""
        try:
            repos = self.state.load_repos()
        except (StateError, KeyError, TypeError) as exc:
            log.warning("the repository configuration is unreadable: %s", exc)
            return
        for repo in repos:
            if self.current is None:
                await self.report_locks(repo)

    async def report_snapshots(self, snaps: list[dict[str, Any]], repo: RepoConfig) -> None:
        """The snapshot list in pages; a newer report of the same repository
        supersedes any still unsent."""
        report_at = now_iso()
        field = repository_field(repo)
        pages = [snaps[i : i + SNAPSHOT_PAGE] for i in range(0, len(snaps), SNAPSHOT_PAGE)] or [[]]
        for n, page in enumerate(pages):
            data = {"snapshots": page, "report_at": report_at, "last": n == len(pages) - 1}
            data.update(field)
            supersede = (field or True) if n == 0 else False
            await self.reporter.emit("snapshots.report", data, supersede=supersede)

    async def report_repository(
        self, repo: RepoConfig, summaries: Optional[list[dict[str, Any]]] = None
    ) -> None:
        """The snapshot list and repository sizes for fleetd (read without a
        lock: a job starting meanwhile is never kept waiting by them)."""
        count: Optional[int] = None
        result, out = await self._stdout(
            commands.snapshots(no_lock=True, hosts=self.where.hosts), repo
        )
        if result.exit_code == 0:
            try:
                snaps = parse.snapshots("\n".join(out))
                for summary in summaries or ():
                    parse.add_backup_summary(snaps, summary)
                await self.report_snapshots(snaps, repo)
                count = len(snaps)
            except parse.ParseError as exc:
                log.warning("cannot read restic snapshots output: %s", exc)
        else:
            log.warning("restic snapshots failed: %s", result.error)
        sizes = self.sizes_of(repo)
        if sizes.due(time.monotonic()):
            measured = await self._measure(repo)
            if measured is not None:
                sizes.measured(measured, time.monotonic())
        else:
            sizes.grow(list(summaries or ()))
        report = sizes.report(count)
        if report is not None:
            await self.reporter.emit("repo.stats", {**report, **repository_field(repo)})

    async def _measure(self, repo: RepoConfig) -> Optional[dict[str, int]]:
        """restic stats twice: restore size, then stored (raw) data."""
        figures: dict[str, int] = {}
        for mode, read in (("restore-size", parse.stats), ("raw-data", parse.raw_stats)):
            result, out = await self._stdout(commands.stats(mode, no_lock=True), repo)
            if result.exit_code != 0:
                log.warning("restic stats --mode %s failed: %s", mode, result.error)
                return None
            try:
                figures.update(read("\n".join(out)))
            except parse.ParseError as exc:
                log.warning("cannot read restic stats --mode %s output: %s", mode, exc)
                return None
        return figures
