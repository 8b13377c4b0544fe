"""The one place restic (and hook commands) run: environment, streaming,
secret masking, cancellation and exit-code mapping.

Used by the agent, so stdlib only and Python 3.9+.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LINE_LIMIT = 1 << 20
DRAIN_SECONDS = 2.0  # after the command exits, how long its output may stay open  # restic's longest lines are status lines listing current files
MASK = "********"

# restic's exit codes: 0 ok, 1 fatal, 3 some source files could not be read
# (the snapshot exists, incomplete); later releases add 10-12 (no repository,
# locked, wrong password), all failures for us.
EXIT_WARNING = 3

OnLine = Callable[[str, str], Awaitable[None]]  # (stream, line)


def status_for(exit_code: int, cancelled: bool = False) -> str:
    if cancelled:
        return "cancelled"
    if exit_code == 0:
        return "succeeded"
    if exit_code == EXIT_WARNING:
        return "warning"
    return "failed"


REPO_KEYS = (
    "RESTIC_REPOSITORY",
    "RESTIC_REPOSITORY_FILE",
    "RESTIC_PASSWORD",
    "RESTIC_PASSWORD_FILE",
    "RESTIC_PASSWORD_COMMAND",
    # a copy's source: fleetd's too, never the agent's environment's
    "RESTIC_FROM_REPOSITORY",
    "RESTIC_FROM_REPOSITORY_FILE",
    "RESTIC_FROM_PASSWORD",
    "RESTIC_FROM_PASSWORD_FILE",
    "RESTIC_FROM_PASSWORD_COMMAND",
    "RESTIC_FROM_KEY_HINT",
)


def environment(
    repo_url: str,
    password: str,
    extra: Mapping[str, str],
    base: Optional[Mapping[str, str]] = None,
) -> dict[str, str]:
    """restic's environment: repository and password travel here, never in argv."""
    env = dict(os.environ if base is None else base)
    for key in REPO_KEYS:
        env.pop(key, None)  # the host's repository is fleetd's, never the agent's environment's
    env.update(extra)
    env["RESTIC_REPOSITORY"] = repo_url
    env["RESTIC_PASSWORD"] = password
    env["RESTIC_PROGRESS_FPS"] = "1"  # status lines at most once a second
    return env


class Masker:
    """Replaces every known secret in a line before it is logged or sent."""

    def __init__(self, secrets: Sequence[str]) -> None:
        # longest first, so a secret containing another is masked whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, line: str) -> str:
        for secret in self.secrets:
            if secret in line:
                line = line.replace(secret, MASK)
        return line


@dataclass
class Result:
    exit_code: int
    cancelled: bool = False
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return status_for(self.exit_code, self.cancelled)

    @property
    def error(self) -> str:
        """restic's own words for a failure: its last non-empty stderr lines."""
        return "\n".join(self.stderr_tail[-5:])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, SIGKILL it if the agent dies, so a
    killed agent leaves no restic running unseen (its lock then is stale and
    `restic unlock` clears it). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol, plus a future set the moment the child exits:
    Process.wait() returns only once its pipes close too, and a daemon a
    hook started may hold them for ever."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def exit_code(protocol: _Protocol, proc: asyncio.subprocess.Process) -> int:
    await protocol.exited
    return proc.returncode if proc.returncode is not None else -1


async def _pump(
    stream: asyncio.StreamReader,
    name: str,
    on_line: OnLine,
    mask: Masker,
    tail: Optional[list[str]],
) -> None:
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line over LINE_LIMIT: take what is buffered
            raw = await stream.read(LINE_LIMIT)
        if not raw:
            return
        # terminal escapes (restic clears its status line with ESC[2K) are noise in a log
        line = mask(_ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\r\n")))
        if tail is not None and line.strip():
            tail.append(line)
            del tail[:-20]
        await on_line(name, line)


async def _pump_bytes(
    stream: asyncio.StreamReader, on_bytes: Callable[[bytes], Awaitable[None]], size: int
) -> None:
    """Standard output as it is (a file `restic dump` writes), in chunks."""
    while True:
        chunk = await stream.read(size)
        if not chunk:
            return
        await on_bytes(chunk)


async def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    on_line: OnLine,
    mask: Masker,
    cancel: Optional[asyncio.Event] = None,
    grace: float = 10.0,
    cwd: Optional[str] = None,
    on_bytes: Optional[Callable[[bytes], Awaitable[None]]] = None,
    chunk: int = 1 << 16,
) -> Result:
    """Run argv, streaming each output line (masked) to on_line as it comes;
    with `on_bytes`, standard output goes there raw, in chunks of at most
    `chunk` bytes (standard error still to on_line).

    When `cancel` is set: SIGINT (restic removes its lock and exits), then
    SIGTERM after `grace` seconds, then SIGKILL. A missing binary is exit 127.
    """
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(LINE_LIMIT, loop),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # the agent's own signals do not hit restic
            preexec_fn=_die_with_parent,
        )
    except FileNotFoundError:
        message = f"{argv[0]}: command not found"
        await on_line("stderr", message)
        return Result(127, stderr_tail=[message])
    except OSError as exc:  # not executable, wrong architecture, ...
        message = f"{argv[0]}: cannot run: {exc.strerror or exc}"
        await on_line("stderr", message)
        return Result(126, stderr_tail=[message])
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    tail: list[str] = []
    pumps = asyncio.gather(
        _pump(proc.stdout, "stdout", on_line, mask, None)  # type: ignore[arg-type]
        if on_bytes is None
        else _pump_bytes(proc.stdout, on_bytes, chunk),  # type: ignore[arg-type]
        _pump(proc.stderr, "stderr", on_line, mask, tail),  # type: ignore[arg-type]
    )
    cancelled = False
    waiter = asyncio.ensure_future(exit_code(protocol, proc))
    try:
        if cancel is not None:
            cancel_wait = asyncio.ensure_future(cancel.wait())
            done, _ = await asyncio.wait({waiter, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            cancel_wait.cancel()
            if waiter not in done:
                cancelled = True
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                    if proc.returncode is not None:
                        break
                    try:  # the whole process group: a hook's children stop too
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        await asyncio.wait_for(asyncio.shield(waiter), grace)
                    except asyncio.TimeoutError:
                        continue
        code = await waiter
        try:
            await asyncio.wait_for(asyncio.shield(pumps), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            # something the command started (a daemon a hook launched) still
            # holds its output: stop reading rather than wait on it; after a
            # cancel, it goes too
            if cancelled:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            pumps.cancel()
            await asyncio.gather(pumps, return_exceptions=True)
            await on_line(
                "stderr",
                "fleet-agent: the command ended but a process it started keeps its output open; no longer read",
            )
    except asyncio.CancelledError:
        # the agent is going away mid-command: take the child and its readers along
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(protocol.exited), 5)
        pumps.cancel()
        waiter.cancel()
        await asyncio.gather(pumps, waiter, return_exceptions=True)
        raise
    finally:
        transport.close()  # its pipes, even those a lingering process held
    return Result(code, cancelled, tail)
