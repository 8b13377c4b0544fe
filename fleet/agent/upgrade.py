"""The agent replacing its own file with the one fleetd serves, and rolling back.

On agent.upgrade the running (old) agent:

1. refuses when it cannot: a job is running (busy), or it does not run from
   a .pyz it may replace (a checkout, a read-only directory);
2. downloads GET /agent.pyz over its own link's TLS (the pinned
   certificate) with its agent token, into a temp file beside its program,
   and checks the size and SHA-256 fleetd announced;
3. runs the new file's self-check (`python3 NEW --version` must name the
   announced version: the new file imports and starts);
4. stops (cancelling nothing: it is idle), keeps its program as PROGRAM.prev,
   writes the marker upgrade.json in the state dir, renames the new file
   over PROGRAM, starts the guard and execs PROGRAM (same pid, same argv).

The new agent clears the marker once fleetd welcomes its hello. If it does
not within the deadline, the old file goes back and the old agent starts
again, with `upgrade_failed` in its hello until fleetd has welcomed that.
Three things see to the rollback, whichever is still there: the new agent
itself (a timer, and a check of the marker at every start: a crash loop
under systemd ends after MAX_STARTS), and the guard, a process of the old
code (run from PROGRAM.prev) that wakes after the deadline and, finding the
marker still pending, puts the old file back, kills the new agent and (when
no systemd is there to restart it) execs the old one itself.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from ..common.protocol import agent_file_url
from .state import State, sync_dir, write_private
from .trust import PinMismatch, Trust

log = logging.getLogger("fleet-agent")

MARKER = "upgrade.json"
BACKUP_SUFFIX = ".prev"
MAX_STARTS = 3  # starts of a new agent that never got welcomed before it rolls itself back
SELF_CHECK_TIMEOUT = 60.0
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before the download gives up
CHUNK = 64 * 1024


class UpgradeError(Exception):
    """An upgrade that cannot go ahead; `code` is one of protocol.UPGRADE_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Marker:
    """upgrade.json: an upgrade under way (pending) or undone (rolled_back)."""

    to: str  # the version upgraded to
    previous: str  # the version it replaced
    program: str  # the agent's file
    deadline: float  # wall-clock time by which the new agent must be welcomed
    argv: list[str] = field(default_factory=list)  # the agent's arguments, for a restart
    state: str = "pending"  # pending | rolled_back
    pid: int = 0  # the agent process (the new one writes its own at start)
    starts: int = 0  # starts of the new agent so far
    error: str = ""  # why it was rolled back

    @property
    def backup(self) -> Path:
        return backup_of(Path(self.program))


def backup_of(program: Path) -> Path:
    return program.with_name(program.name + BACKUP_SUFFIX)


def marker_path(state: State) -> Path:
    return state.root / MARKER


def load_marker(state: State) -> Optional[Marker]:
    """The marker, or None (none, or one that cannot be read: it is dropped,
    as an upgrade nobody can follow any more)."""
    path = marker_path(state)
    try:
        doc = json.loads(path.read_text())
        # the old and the new agent share this file: a field one of them
        # does not know is left out, not taken for damage
        known = {f.name for f in fields(Marker)}
        return Marker(**{k: v for k, v in doc.items() if k in known})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring a damaged %s: %s", path, exc)
        clear_marker(state)
        return None


def save_marker(state: State, marker: Marker) -> None:
    write_private(marker_path(state), json.dumps(asdict(marker)) + "\n")


def clear_marker(state: State) -> None:
    try:
        marker_path(state).unlink()
    except FileNotFoundError:
        pass


# -- what start and hello make of the marker (pure) -----------------------------


def on_start(marker: Optional[Marker], version: str, now: float) -> tuple[str, str]:
    """What an agent of `version` starting at `now` does about the marker:
    ("none", ""), ("trial", "") (it is the new agent, on trial),
    ("rollback", why) (it is the new agent and must give way), or
    ("report", why) (it is the old agent back: tell fleetd)."""
    if marker is None:
        return "none", ""
    if marker.state != "pending":
        return "report", marker.error or "rolled back"
    if marker.to != version:  # the swap did not happen, or was undone
        return "report", marker.error or f"the agent started as {version}, not {marker.to}"
    if marker.starts >= MAX_STARTS:
        return (
            "rollback",
            f"the new agent {version} started {marker.starts} times without a hello accepted",
        )
    if now >= marker.deadline:
        return "rollback", f"the new agent {version} got no hello accepted by its deadline"
    return "trial", ""


def refusal(program: Optional[Path], busy: Optional[int]) -> Optional[UpgradeError]:
    """Why this agent cannot upgrade now, or None."""
    if busy is not None:
        return UpgradeError("busy", f"job {busy} is running; try again when it has ended")
    if program is None:
        return UpgradeError(
            "unsupported",
            "this agent does not run from a fleet-agent .pyz file (a checkout?): upgrade it by hand",
        )
    if not os.access(program.parent, os.W_OK) or not os.access(program, os.R_OK):
        return UpgradeError(
            "unsupported",
            f"this agent cannot replace {program}: {program.parent} is not writable by it "
            "(see fleet-agent(8), UPGRADES)",
        )
    return None


def running_program(argv0: Optional[str] = None) -> Optional[Path]:
    """The .pyz this agent runs from (shiv puts its path in argv[0]), or None."""
    path = Path(argv0 if argv0 is not None else sys.argv[0])
    if path.suffix != ".pyz" or not path.is_file() or not zipfile.is_zipfile(path):
        return None
    return path.absolute()


# -- download and checks --------------------------------------------------------


def pyz_url(server_url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of GET /agent.pyz on the fleetd the agent dials."""
    parts = urlsplit(agent_file_url(server_url))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname or "", port, parts.path


def download(
    server_url: str,
    token: str,
    trust: Optional[Trust],
    directory: Path,
    size: int,
    sha256: str,
) -> Path:
    """The agent fleetd serves, in a temp file in `directory` (mode 0755),
    checked against the size and SHA-256 announced. Over https, fleetd's
    certificate is checked against `trust` (the link's key pins) right after
    the TLS handshake, before the request carries the token. Raises
    UpgradeError."""
    scheme, host, port, path = pyz_url(server_url)
    if scheme == "https":
        ctx = (trust or Trust()).ssl_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, context=ctx, timeout=DOWNLOAD_TIMEOUT
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=DOWNLOAD_TIMEOUT)
    fd, name = tempfile.mkstemp(prefix=".fleet-agent-", suffix=".pyz.new", dir=str(directory))
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                conn.connect()
                if scheme == "https" and trust is not None:
                    sock: Any = conn.sock
                    try:
                        trust.check(server_url, sock.getpeercert(binary_form=True))
                    except PinMismatch as exc:
                        raise UpgradeError("download", str(exc)) from None
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                response = conn.getresponse()
                if response.status != 200:
                    text = response.read(512).decode("utf-8", "replace").strip()
                    raise UpgradeError(
                        "download", f"GET {path}: HTTP {response.status} {text}".rstrip()
                    )
                digest = hashlib.sha256()
                got = 0
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise UpgradeError(
                            "checksum", f"fleetd sent more than the {size} bytes announced"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            except (OSError, http.client.HTTPException) as exc:
                raise UpgradeError("download", f"GET {path}: {exc}") from None
            finally:
                conn.close()
        check_download(got, digest.hexdigest(), size, sha256)
        os.chmod(tmp, 0o755)
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_download(got: int, digest: str, size: int, sha256: str) -> None:
    if got != size:
        raise UpgradeError("checksum", f"downloaded {got} bytes, fleetd announced {size}")
    if digest != sha256.lower():
        raise UpgradeError(
            "checksum", f"the download has SHA-256 {digest}, fleetd announced {sha256}"
        )


def self_check(python: str, path: Path, version: str) -> None:
    """The new file must start and name `version` (`--version`, which imports
    the whole agent first). Raises UpgradeError."""
    try:
        proc = subprocess.run(
            [python, str(path), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SELF_CHECK_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UpgradeError("self_check", f"the new agent did not run: {exc}") from None
    said = proc.stdout.strip()
    if proc.returncode != 0 or not said.startswith(f"fleet-agent {version} "):
        detail = (proc.stderr.strip().splitlines() or [said or f"exit {proc.returncode}"])[-1]
        raise UpgradeError(
            "self_check", f"the new agent failed its self-check ({version}): {detail[:300]}"
        )


# -- the swap and its undoing -----------------------------------------------------


def copy_atomically(source: Path, dest: Path) -> None:
    """dest becomes a copy of source (mode 0755), all at once. The temp file
    is this call's own: the guard and a new agent rolling back at once must
    not write into one file."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    tmp = Path(name)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(dest.parent)


def install(state: State, program: Path, new: Path, marker: Marker) -> None:
    """Keep the old program as PROGRAM.prev, write the marker, rename the
    new file over the program: a crash between any two steps leaves a
    program that starts, and a marker that says what happened."""
    copy_atomically(program, backup_of(program))
    save_marker(state, marker)
    os.replace(new, program)
    sync_dir(program.parent)


def roll_back(state: State, marker: Marker, why: str) -> None:
    """Put the old program back and record why."""
    copy_atomically(marker.backup, Path(marker.program))
    marker.state, marker.error = "rolled_back", why
    save_marker(state, marker)
    log.error("upgrade to %s rolled back: %s", marker.to, why)


def give_back(state: State, marker: Marker, why: str) -> None:
    """Put the old agent back and exec it; returns only when its file
    cannot be put back (said in the log)."""
    try:
        roll_back(state, marker, why)
    except OSError as exc:
        log.error("cannot put the old agent back: %s", exc)
        return
    restart(marker.program, marker.argv)


def restart(program: str, argv: list[str]) -> None:
    """Become `program` with the same interpreter and arguments (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, program, *argv])


def start_guard(state: State, marker: Marker) -> None:
    """The guard runs the old code (PROGRAM.prev) and outlives the exec; it
    forks once more and its first process exits at once, so the agent has
    no child left to reap."""
    proc = subprocess.Popen(
        [sys.executable, str(marker.backup), "upgrade-guard", "--state-dir", str(state.root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        close_fds=True,
    )
    proc.wait(30)


def guard_wake(marker: Marker) -> float:
    """When the guard looks: after the deadline, leaving the new agent's own
    timer the first go (half the trial again, at most 30 s)."""
    return marker.deadline + min(30.0, max(1.0, (marker.deadline - time.time()) / 2))


def guard(state: State) -> int:
    """`fleet-agent upgrade-guard`: wait past the deadline; a marker still
    pending then means the new agent never got welcomed: roll back, stop it
    and make sure the old one runs."""
    if os.fork():
        return 0  # the agent waits for this one; the grandchild carries on
    os.setsid()  # not in the agent's process group: a signal to it spares the guard
    marker = load_marker(state)
    if marker is None or marker.state != "pending":
        return 0
    to, wake = marker.to, guard_wake(marker)
    time.sleep(max(0.0, wake - time.time()))  # a timer, not a wait for another process
    marker = load_marker(state)
    if marker is None or marker.state != "pending" or marker.to != to:
        return 0  # welcomed, or rolled back by the new agent itself
    if is_agent(marker.pid, marker.program):
        why = f"the new agent {to} got no hello accepted by its deadline"
    else:  # a crash at start (under systemd, perhaps between two restarts)
        why = f"the new agent {to} exited before fleetd welcomed it (see the agent's log)"
    roll_back(state, marker, why)
    stop_process(marker.pid, marker.program)
    if os.environ.get("INVOCATION_ID"):
        return 0  # systemd restarts the unit (SIGKILL is a failure): the old file now
    restart(marker.program, marker.argv)
    return 0  # not reached


def is_agent(pid: int, program: str) -> bool:
    """Whether `pid` is still the agent running `program` (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone
    return program.encode() in cmdline.split(b"\0")


def stop_process(pid: int, program: str, timeout: float = 10.0) -> None:
    """SIGKILL the agent `pid`, if it is still the agent."""
    if not is_agent(pid, program):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        # the parent may be gone and the zombie's reaper slow: a zombie holds no lock
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return
        except (OSError, IndexError):
            return
        time.sleep(0.05)
