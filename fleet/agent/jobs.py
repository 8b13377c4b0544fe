"""Running one restic job at a time and reporting everything it does.

Every log line, the start and the end of a job, and the snapshot and stats
reports after a backup go through `Reporter.emit` (spooled, numbered,
resent until acknowledged); progress goes through `Reporter.emit_now`
(ephemeral: a progress update lost with a link is not worth resending).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional, Protocol

from ..common.protocol import MAX_LINE, SNAPSHOT_PAGE, now_iso
from ..common.restic import commands, execute, parse
from .state import RepoConfig, State

log = logging.getLogger("fleet-agent.jobs")

PROGRESS_EVERY = 1.0  # seconds between job.progress frames


def restic_env(repo: RepoConfig) -> tuple[dict[str, str], execute.Masker]:
    """restic's environment for the repository, and the masker of its secrets."""
    env = execute.environment(repo.url, repo.password, repo.env)
    return env, execute.Masker([repo.password, *repo.env.values()])


class Reporter(Protocol):
    async def emit(self, type_: str, data: dict[str, Any], supersede: bool = False) -> None: ...

    async def emit_now(self, type_: str, data: dict[str, Any]) -> None: ...


class JobLog:
    """Numbers a job's lines from 1 and sends each as job.log."""

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
            elif kind == "summary":
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


class JobRunner:
    """Runs the jobs fleetd dispatches, one at a time."""

    def __init__(
        self, state: State, reporter: Reporter, restic: str = "restic", grace: float = 10.0
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.restic = restic
        self.grace = grace
        self.current: Optional[int] = None
        self._task: Optional[asyncio.Task] = None
        self._cancel = asyncio.Event()

    def submit(self, command: dict[str, Any]) -> Optional[str]:
        """Start a job; returns why it was refused, or None."""
        if self.current is not None:
            return f"busy with job {self.current}"
        self.current = command["job_id"]
        self._cancel = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(command))
        return None

    def cancel(self, job_id: int) -> bool:
        if self.current != job_id:
            return False
        self._cancel.set()
        return True

    async def shutdown(self) -> None:
        """Cancel the running job (restic removes its lock) and wait for its report."""
        if self._task is not None and not self._task.done():
            self._cancel.set()
            await self._task

    # -- one job ------------------------------------------------------------

    def _argv(self, argv: tuple) -> list[str]:
        return [self.restic, *argv[1:]]

    async def _run(self, cmd: dict[str, Any]) -> None:
        try:
            await self._run_job(cmd)
        except Exception:  # the spool failing (disk full): the runner must not stay busy
            log.exception("job %s could not be reported", cmd["job_id"])
        finally:
            self.current = None

    async def _run_job(self, cmd: dict[str, Any]) -> None:
        job_id, kind = cmd["job_id"], cmd["kind"]
        joblog = JobLog(self.reporter, job_id)
        await self.reporter.emit(
            "job.started", {"job_id": job_id, "kind": kind, "started_at": now_iso()}
        )
        status, code, error = "failed", -1, None
        try:
            repo = self.state.load_repo()
            if repo is None:
                error = "no repository configured for this host: run 'fleetctl repo set'"
                await joblog.note(error)
            else:
                status, code, error = await self._execute(kind, cmd, repo, joblog)
        except Exception as exc:  # a bug must still end the job, not leave it running
            log.exception("job %s crashed", job_id)
            error = f"agent error: {exc}"
        finished = {
            "job_id": job_id,
            "status": status,
            "exit_code": code,
            "finished_at": now_iso(),
        }
        if joblog.summary is not None:
            finished["summary"] = joblog.summary
        if error and status not in ("succeeded",):
            finished["error"] = error[:MAX_LINE]
        # every report of the job before its end: whoever sees the job end sees
        # its snapshot and the locks it left, and fleetd may dispatch the next
        # job the moment job.finished arrives, so the runner is idle by then
        try:
            if kind == "backup" and status in ("succeeded", "warning"):
                await self.report_repository(repo, joblog.summary)  # type: ignore[arg-type]
            if repo is not None and (status != "succeeded" or kind == "unlock"):
                await self.report_locks(repo)  # a failed or stopped restic may have left one
        except Exception:  # a report that fails must not keep the runner busy for ever
            log.exception("reports after job %s failed", job_id)
        finally:
            self.current = None
        await self.reporter.emit("job.finished", finished)
        log.info("job %s (%s) %s", job_id, kind, status)

    async def _execute(self, kind: str, cmd: dict[str, Any], repo: RepoConfig, joblog: JobLog):
        env, mask = restic_env(repo)

        async def restic(argv: tuple) -> execute.Result:
            return await execute.run(
                self._argv(argv), env, joblog.line, mask, self._cancel, self.grace
            )

        if kind == "init":
            result = await restic(commands.init())
            if result.exit_code != 0 and parse.already_initialized(result.error):
                await joblog.note("repository already initialized")
                return "succeeded", result.exit_code, None
            return result.status, result.exit_code, result.error
        if kind == "backup":
            return await self._backup(cmd, restic, env, mask, joblog)
        if kind == "unlock":
            result = await restic(commands.unlock())
        elif kind == "prune":
            result = await restic(commands.prune())
        elif kind == "check":
            result = await restic(commands.check(*(cmd.get("args") or [])[:1]))
        elif kind == "forget":
            result = await restic(commands.forget(cmd.get("tag") or "", cmd.get("retention") or {}))
        elif kind == "snapshots":
            result = await restic(commands.snapshots())
        elif kind == "stats":
            result = await restic(commands.stats())
        else:
            return "failed", -1, f"this agent cannot run {kind} jobs"
        return result.status, result.exit_code, result.error

    async def _backup(self, cmd, restic, env, mask, joblog: JobLog):
        """pre-hook, restic backup, post-hook.

        A failing pre-hook fails the job before restic runs. The post-hook
        runs whenever the pre-hook succeeded (it often restarts what the
        pre-hook stopped); its failure turns a success into a warning.
        """
        # hooks get the agent's environment and what the job is, never the
        # repository's credentials
        hook_env = {k: v for k, v in os.environ.items() if k not in execute.REPO_KEYS}
        hook_env["FLEET_JOB_ID"] = str(cmd["job_id"])
        hook_env["FLEET_GROUP"] = str(cmd.get("group") or cmd.get("tag") or "")

        async def hook(name: str, command: str) -> execute.Result:
            await joblog.note(f"running {name}: {command}")
            return await execute.run(
                ["/bin/sh", "-c", command], hook_env, joblog.line, mask, self._cancel, self.grace
            )

        if cmd.get("pre_hook"):
            pre = await hook("pre-hook", cmd["pre_hook"])
            if pre.cancelled:
                return "cancelled", pre.exit_code, None
            if pre.exit_code != 0:
                return "failed", pre.exit_code, f"pre-hook exited {pre.exit_code}; backup not run"
        result = await restic(
            commands.backup(
                cmd.get("includes") or [], cmd.get("excludes") or [], cmd.get("tag") or ""
            )
        )
        status, error = result.status, result.error
        if cmd.get("post_hook") and not result.cancelled:
            post = await hook("post-hook", cmd["post_hook"])
            if post.exit_code != 0:
                error = f"{error}\npost-hook exited {post.exit_code}".strip()
                if status == "succeeded":
                    status = "warning"
        return status, result.exit_code, error

    async def report_locks(self, repo: Optional[RepoConfig] = None) -> None:
        """Tell fleetd how many restic locks the repository holds (stale ones
        are left by a restic that was killed); `fleetctl repo unlock` clears them."""
        repo = repo or self.state.load_repo()
        if repo is None:
            return
        env, mask = restic_env(repo)
        locks: list[str] = []

        async def collect(stream: str, line: str) -> None:
            if stream == "stdout" and line.strip():
                locks.append(line)

        result = await execute.run(self._argv(commands.list_locks()), env, collect, mask)
        if result.exit_code == 0:
            if locks:
                log.warning("the repository holds %d lock(s)", len(locks))
            await self.reporter.emit("repo.locks", {"count": len(locks)})
        else:
            log.warning("restic list locks failed: %s", result.error)

    async def check_locks_when_idle(self) -> None:
        """At start: a restic killed with the agent leaves its lock behind."""
        if self.current is None:
            await self.report_locks()

    async def report_snapshots(self, snaps: list[dict[str, Any]]) -> None:
        """The snapshot list in pages; a newer report supersedes any still unsent."""
        report_at = now_iso()
        pages = [snaps[i : i + SNAPSHOT_PAGE] for i in range(0, len(snaps), SNAPSHOT_PAGE)] or [[]]
        for n, page in enumerate(pages):
            data = {"snapshots": page, "report_at": report_at, "last": n == len(pages) - 1}
            await self.reporter.emit("snapshots.report", data, supersede=(n == 0))

    async def report_repository(self, repo: RepoConfig, summary: Optional[dict] = None) -> None:
        """After a backup: the snapshot list and repository stats for fleetd."""
        env, mask = restic_env(repo)
        out: list[str] = []

        async def collect(stream: str, line: str) -> None:
            if stream == "stdout":
                out.append(line)

        result = await execute.run(self._argv(commands.snapshots()), env, collect, mask)
        if result.exit_code == 0:
            try:
                snaps = parse.snapshots("\n".join(out))
                if summary:
                    parse.add_backup_summary(snaps, summary)
                await self.report_snapshots(snaps)
            except parse.ParseError as exc:
                log.warning("cannot read restic snapshots output: %s", exc)
        else:
            log.warning("restic snapshots failed: %s", result.error)
        out.clear()
        result = await execute.run(self._argv(commands.stats()), env, collect, mask)
        if result.exit_code == 0:
            try:
                await self.reporter.emit("repo.stats", parse.stats("\n".join(out)))
            except parse.ParseError as exc:
                log.warning("cannot read restic stats output: %s", exc)
        else:
            log.warning("restic stats failed: %s", result.error)
