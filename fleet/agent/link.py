"""The agent's link to fleetd: dial /agent for ever.

One session: connect with the agent token, hello -> welcome, then three
tasks until the link drops: heartbeats, the receiver (each frame goes to
its handler, see handlers.py) and the sender, which drains the spool in seq
order with at most a window of frames sent and not yet acknowledged (so a
slow fleetd pushes back instead of buffering without bound). After a drop
the agent redials with exponential backoff and jitter (1 s to 60 s) and the
sender starts again from the last acknowledged seq. A server whose
certificate key the agent does not pin (see trust.py) is a definite
refusal: one clear line, and redials an hour apart at most (1 min, 2, 4 ...).

With fleetd replicas (servers.py) each failure moves on to the next URL: a
round of the list counts as one redial of a lone fleetd, and the first dial
of the next replica after a drop is prompt. A switch of replica is a
reconnect like any other: hello says what the spool holds, the sender
resends what is unacknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import platform
import random
import socket
import subprocess
import time
from typing import Any, Optional, Union

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .. import __version__
from ..common import protocol
from ..common.exitcodes import Exit
from ..common.protocol import ProtocolError
from ..common.restic import commands, parse
from ..common.timefmt import now_iso
from .enroll import FatalError
from .handlers import dispatch
from .kinds import Where
from .queries import Queries
from .runner import REFRESH_DELAY, JobRunner
from .scheduler import AUTONOMY_AFTER, Clock, Scheduler
from .servers import Servers, accept_urls
from .spool import DEFAULT_MAX_BYTES, Spool, SpoolDamaged
from .state import Identity, State, StateError
from .trust import PinMismatch, Trust, pinned_connection
from .upgrade import clear_marker

log = logging.getLogger("fleet-agent")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
SEND_BATCH = 500  # frames read from the spool at once
WINDOW_FRAMES = 1000  # frames sent and not yet acknowledged, at most
WINDOW_BYTES = 1 << 20  # ... and their size (one larger frame still goes alone)
REFUSED_MIN = 60.0  # after fleetd's certificate was refused: its key will not change soon
REFUSED_MAX = 3600.0


def backoff(attempt: int, rng: Optional[random.Random] = None) -> float:
    """Delay before redial number `attempt` (0-based): anywhere from 1 s up to
    a ceiling that doubles each attempt (2, 4, 8 ... 60 s), so a fleet
    coming back after a fleetd restart does not arrive at once, even on its
    first redial."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (attempt + 1))
    return (rng or random).uniform(BACKOFF_MIN, ceiling)


def refused_backoff(refusals: int, rng: Optional[random.Random] = None) -> float:
    """Delay after refusal number `refusals` (0-based) of fleetd's
    certificate: a ceiling doubling from 1 min to an hour, the last half of
    it at random (no hot loop on a key that will not change by itself)."""
    ceiling = min(REFUSED_MAX, REFUSED_MIN * 2**refusals)
    return (rng or random).uniform(ceiling / 2, ceiling)


ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def local_timezone() -> str:
    try:
        link = os.readlink("/etc/localtime")
        if "zoneinfo/" in link:
            return link.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    return time.tzname[0]


def restic_version(restic: str) -> str:
    try:
        out = subprocess.run(
            [restic, *commands.version()[1:]], capture_output=True, text=True, timeout=30
        )
        return parse.version(out.stdout)
    except (OSError, subprocess.SubprocessError, parse.ParseError):
        return "missing"


Frame = tuple[int, str, dict]  # (seq, type, data), as the spool gives them


def pack_logs(
    frames: list[Frame], lines: int = protocol.LOG_PACK, size: int = protocol.LOG_PACK_BYTES
) -> list[Frame]:
    """Runs of job.log frames of one job with consecutive seqs become one
    job.logs frame each (at most `lines` lines and about `size` bytes),
    under the run's last seq: fleetd then pays one frame for a burst of
    restic's output, not one per line. Everything else, and a lone line,
    goes as it was spooled."""
    out: list[Frame] = []
    run: list[Frame] = []
    run_bytes = 0

    def close_run() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            first_seq, _, first = run[0]
            packed = [{k: v for k, v in data.items() if k != "job_id"} for _, _, data in run]
            out.append(
                (
                    run[-1][0],
                    "job.logs",
                    {"job_id": first["job_id"], "first": first_seq, "lines": packed},
                )
            )
        run.clear()

    for frame in frames:
        seq, type_, data = frame
        cost = len(data.get("payload", "")) + 100
        joins = (
            type_ == "job.log"
            and run
            and seq == run[-1][0] + 1
            and data["job_id"] == run[-1][2]["job_id"]
            and len(run) < lines
            and run_bytes + cost <= size
        )
        if not joins:
            close_run()
            run_bytes = 0
        if type_ == "job.log":
            run.append(frame)
            run_bytes += cost
        else:
            out.append(frame)
    close_run()
    return out


class Window:
    """The frames sent on one session and not yet acknowledged."""

    def __init__(self, frames: int = WINDOW_FRAMES, size: int = WINDOW_BYTES) -> None:
        self.max_frames = frames
        self.max_bytes = size
        self._sent: collections.deque = collections.deque()  # (seq, size)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._sent)

    def add(self, seq: int, size: int) -> None:
        self._sent.append((seq, size))
        self.bytes += size

    def acked(self, seq: int) -> None:
        while self._sent and self._sent[0][0] <= seq:
            self.bytes -= self._sent.popleft()[1]

    def full(self, size: int) -> bool:
        """Would sending a frame of `size` overfill it? Never when it is empty."""
        if not self._sent:
            return False
        return len(self._sent) >= self.max_frames or self.bytes + size > self.max_bytes


class Agent:
    def __init__(
        self,
        state: State,
        identity: Identity,
        restic: str = "restic",
        cancel_grace: float = 10.0,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
        window_frames: int = WINDOW_FRAMES,
        window_bytes: int = WINDOW_BYTES,
        refresh_delay: float = REFRESH_DELAY,
        clock: Optional[Clock] = None,
        autonomy_after: float = AUTONOMY_AFTER,
    ) -> None:
        self.state = state
        self.identity = identity
        self.restic = restic
        self.spool = Spool(state.spool_path, spool_max_bytes)
        # snapshots are recorded under the host's name in Fleet (a shared
        # repository keeps hosts apart); older ones under this machine's name
        machine = socket.gethostname()
        also = () if machine == identity.host_name else (machine,)
        self.runner = JobRunner(
            state, self, restic, cancel_grace, refresh_delay, Where(identity.host_name, also)
        )
        self.queries = Queries(self.runner, self.emit_now)  # browsing, beside the jobs
        self.ws: Optional[ClientConnection] = None
        self.window_frames = window_frames
        self.window_bytes = window_bytes
        self.wake = asyncio.Event()  # something was spooled
        self.acked = 0
        self.acked_event = asyncio.Event()  # an ack arrived (shutdown's drain)
        self._ack_wake = asyncio.Event()  # an ack arrived (the sender's window)
        self._locks_checked = False  # once per start, after the first connection
        self.restic_version = "unknown"
        self.connected = asyncio.Event()  # set while a session is up (tests wait on it)
        self.disconnected = asyncio.Event()  # set while it is not
        self.disconnected.set()
        self.dialled = asyncio.Event()  # the first dial connected or failed
        self.tls_pin: Optional[str] = None  # the key pin of this session's fleetd, checked
        self.servers = self.load_servers()  # the replicas' URLs, and which is dialled
        self.server_url = self.servers.current  # the fleetd of this session (or the next)
        self._established = False  # this dial got as far as welcome
        self.scheduler = Scheduler(self, clock, autonomy_after)
        self.runner.on_idle = self.scheduler.kick
        self.scheduler.load()
        # upgrades (see upgrade.py): on trial until fleetd welcomes this
        # version; an upgrade rolled back, told in hello until welcomed
        self.trial = False
        self.upgrade_report: Optional[tuple[str, str]] = None  # (version, why)
        self.upgrading = False  # an agent.upgrade is being prepared
        self.upgrade_task: Optional[asyncio.Future] = None
        # what cli does once the agent has stopped: ("upgrade", program, new
        # file, version, deadline) or ("rollback", why)
        self.after_stop: Optional[tuple] = None
        self.request_stop: Any = None  # set by cli.run_agent: stop, saying why

    # -- Reporter: how jobs talk to fleetd -------------------------------

    async def emit(
        self,
        type_: str,
        data: dict,
        supersede: Union[bool, dict[str, Any]] = False,
        drop_local: Optional[int] = None,
    ) -> None:
        self.spool.append(type_, data, supersede, drop_local)
        self.wake.set()

    async def emit_now(self, type_: str, data: dict) -> None:
        ws = self.ws
        if ws is None:
            return
        try:
            await ws.send(protocol.encode(type_, data))
        except ConnectionClosed:
            pass

    def acknowledge(self, seq: int) -> None:
        """fleetd stored everything up to seq (acks are cumulative)."""
        if seq > self.acked:
            self.acked = seq
            self.spool.ack(seq)
            self.scheduler.acked(seq)
            self.acked_event.set()
            self._ack_wake.set()

    # -- the link ---------------------------------------------------------

    async def run_forever(self) -> None:
        """The scheduler (which fires with or without fleetd), the local jobs
        left queued by a previous run, and the link, redialled for ever."""
        self.restic_version = await asyncio.get_running_loop().run_in_executor(
            None, restic_version, self.restic
        )
        scheduler = asyncio.ensure_future(self.scheduler.run(self.dialled))
        self.scheduler.kick()
        self.scheduler.link_down()
        try:
            await self._dial_forever()
        finally:
            scheduler.cancel()

    def trust(self) -> Trust:
        """How fleetd is trusted, read anew for each dial (fleetd may have
        sent new pins); a damaged pins.json ends the agent, clearly."""
        try:
            return Trust(self.state.load_pins(), self.identity.tls_sha256)
        except StateError as exc:
            raise FatalError(str(exc), Exit.AUTH) from None  # damaged: the unit does not restart

    def load_servers(self) -> Servers:
        """The URLs servers.json holds (those of the scheme enrolled with),
        else agent.json's alone; dialled from agent.json's."""
        enrolled = self.identity.server_url.rstrip("/")
        urls = [enrolled]
        try:
            held = self.state.load_servers()
        except StateError as exc:
            log.warning("%s; dialling %s until fleetd names its replicas again", exc, enrolled)
            held = None
        if held:
            kept, dropped = accept_urls(held, protocol.url_scheme(enrolled))
            self._warn_dropped(dropped)
            urls = kept or urls
        return Servers(urls, enrolled, time.monotonic)

    def _warn_dropped(self, dropped: list) -> None:
        scheme = protocol.url_scheme(self.identity.server_url)
        for url in dropped:
            log.warning(
                "not dialling %r: this agent enrolled over %s:// and dials %s:// URLs only",
                protocol.printable(str(url))[:200],
                scheme,
                scheme,
            )

    def learn_servers(self, offered: Optional[list], connected: str) -> None:
        """fleetd's welcome named its replicas: keep those of this agent's
        scheme (and the one connected to), saved when they differ, so that
        a replica added later reaches agents enrolled before it."""
        if offered is None:
            return  # a fleetd not told its URLs: the list stays
        kept, dropped = accept_urls(
            offered, protocol.url_scheme(self.identity.server_url), connected
        )
        self._warn_dropped(dropped)
        if not self.servers.replace(kept, connected):
            return
        try:
            self.state.save_servers(kept, now_iso())
        except StateError as exc:  # dialled all the same; saved at the next welcome
            log.warning("%s", exc)
        log.info("fleetd replicas: %s", ", ".join(kept))  # once saved

    def refused(self, exc: PinMismatch) -> float:
        """Say once, clearly, why fleetd was refused (and keep it for `fleet-agent
        status`); the delay before trying again (the next replica's)."""
        delay = self.servers.refused(refused_backoff, backoff)
        log.error(
            "%s; redialling in %.0f s (fleetd's key must be staged before it is served: "
            "serve the old key again, or enroll this agent again)",
            exc,
            delay,
        )
        try:
            self.state.save_refusal(
                {
                    "at": now_iso(),
                    "server": exc.url,
                    "presented_key": exc.presented,
                    "presented_certificate": exc.cert_sha256,
                    "pins": exc.pins,
                    "message": str(exc),
                }
            )
        except OSError as err:
            log.warning("cannot record the refusal in %s: %s", self.state.root, err)
        return delay

    async def _dial_forever(self) -> None:
        servers = self.servers
        while True:
            url = self.server_url = servers.current
            started = time.monotonic()
            self._established = False
            try:
                await self.session(url)
                reason = "connection closed"
            except (FatalError, SpoolDamaged):
                raise
            except PinMismatch as exc:
                self.dialled.set()
                await asyncio.sleep(self.refused(exc))
                continue
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status == 401:
                    raise FatalError(
                        "fleetd refused this agent's token (host removed or re-enrolled elsewhere); "
                        "enroll again with a new 'fleetctl enroll' token",
                        3,
                    ) from None
                reason = f"HTTP {status}"
            except (
                OSError,
                asyncio.TimeoutError,
                ConnectionClosed,
                ProtocolError,
                InvalidHandshake,
            ) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # whatever else: the agent must keep redialling
                log.exception("session failed")
                reason = f"{type(exc).__name__}: {exc}"
            self.dialled.set()  # connected or not: the scheduler stops waiting
            # the next URL (the same with one); prompt after a drop, else backing off
            delay = servers.failed(self._established, time.monotonic() - started, backoff)
            log.warning(
                "link to %s down (%s); redialling in %.1f s%s",
                url,
                reason,
                delay,
                f", at {servers.current}" if len(servers) > 1 else "",
            )
            await asyncio.sleep(delay)

    def hello(self) -> dict:
        data: dict[str, Any] = {
            "protocol_version": protocol.PROTOCOL_VERSION,
            "agent_version": __version__,
            "restic_version": self.restic_version,
            "hostname": self.identity.hostname or socket.gethostname(),
            "os": platform.system().lower(),
            "arch": ARCH.get(platform.machine(), platform.machine()),
            "timezone": local_timezone(),
            "spool_seq": self.spool.last_seq(),
            "spool_pending": self.spool.first_pending(),
            "schedule_version": self.scheduler.version,
            # tls.pins: it takes key pins from fleetd (and says in tls_pins which it holds)
            "features": ["repositories", "queries", "restore", "drills", "upgrade", "tls.pins"],
        }
        if self.runner.current is not None:
            data["running_job"] = self.runner.current
        if self.upgrade_report is not None:
            data["upgrade_failed"], data["upgrade_error"] = self.upgrade_report
        return data

    def welcomed(self) -> None:
        """fleetd accepted this hello: a new agent on trial has made it, and
        a rollback has been told."""
        if self.trial:
            self.trial = False
            clear_marker(self.state)
            log.info("upgrade to fleet-agent %s confirmed: fleetd welcomed it", __version__)
        if self.upgrade_report is not None:
            self.upgrade_report = None
            clear_marker(self.state)

    def stop_for(self, after: tuple, why: str) -> None:
        """Stop as SIGTERM would, then do `after` (an upgrade, a rollback)."""
        self.after_stop = after
        if self.request_stop is not None:
            self.request_stop(why)

    def hello_with(self, trust: Trust) -> dict:
        data = self.hello()
        if trust.pinned:  # fleetd then sends the pins it wants held
            data["tls_pins"] = trust.held()
        return data

    async def session(self, server_url: Optional[str] = None) -> None:
        server_url = server_url or self.servers.current
        url = server_url + "/agent"
        secure = url.startswith("wss://")
        trust = self.trust() if secure else Trust()
        seen: dict[str, Any] = {}
        headers = {"Authorization": f"Bearer {self.identity.agent_token}"}
        async with connect(
            url,
            additional_headers=headers,
            ssl=trust.ssl_context() if secure else None,
            open_timeout=15,
            compression=None,
            max_size=4 * protocol.MAX_FRAME_BYTES,
            user_agent_header=f"fleet-agent/{__version__}",
            # checks fleetd's key before the upgrade request (the token) goes out
            create_connection=pinned_connection(trust, server_url, seen),
        ) as ws:
            self.tls_pin = seen.get("pin")
            await ws.send(protocol.encode("hello", self.hello_with(trust), id="hello"))
            reply = protocol.decode(await asyncio.wait_for(ws.recv(), 30), expect="server")
            if reply.type == "error":
                if reply.data["code"] == "unsupported_version":
                    raise FatalError(f"fleetd: {reply.data['message']}", 1)
                raise ProtocolError(f"fleetd refused hello: {reply.data['message']}")
            if reply.type != "welcome":
                raise ProtocolError(f"expected welcome, got {reply.type}")
            interval = reply.data["heartbeat_interval"]
            log.info("connected to %s as %s", server_url, reply.data["host_name"])
            self._established = True
            self.welcomed()
            self.learn_servers(reply.data.get("urls"), server_url)
            self.state.clear_refusal()
            self.ws = ws
            self.disconnected.clear()
            self.connected.set()
            self.dialled.set()
            self.scheduler.link_up()
            if not self._locks_checked:
                self._locks_checked = True
                asyncio.ensure_future(self.runner.check_locks_when_idle())
            tasks = [
                asyncio.ensure_future(self._receiver(ws)),
                asyncio.ensure_future(
                    self._sender(ws, "job.logs" in reply.data.get("features", ()))
                ),
                asyncio.ensure_future(self._heartbeat(ws, interval)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise what ended the session
            finally:
                self.ws = None
                self.connected.clear()
                self.disconnected.set()
                self.scheduler.link_down()
                self.queries.cancel_all()  # their answers have nowhere to go
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeat(self, ws: ClientConnection, interval: int) -> None:
        while True:
            await asyncio.sleep(interval)
            await ws.send(protocol.encode("heartbeat", {"sent_at": now_iso()}))

    async def _sender(self, ws: Any, packs: bool = False) -> None:
        """Send the spool in seq order, resending after the last ack; wait for
        acks whenever the window of unacknowledged frames is full. `packs`:
        this fleetd takes job log lines packed (job.logs)."""
        sent = self.acked  # everything after the last ack is resent
        window = Window(self.window_frames, self.window_bytes)
        while True:
            frames = self.spool.pending(after=sent, limit=SEND_BATCH)
            if not frames:
                self.wake.clear()
                await self.wake.wait()
                continue
            if packs:
                frames = pack_logs(frames)
            for seq, type_, data in frames:
                text = protocol.Envelope(type_, data, seq=seq).to_json()
                window.acked(self.acked)
                if window.full(len(text)):
                    self._ack_wake.clear()
                    await self._ack_wake.wait()
                    break  # read the spool again: it may have changed meanwhile
                await ws.send(text)
                window.add(seq, len(text))
                sent = seq

    async def _receiver(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                frame = protocol.decode(raw, expect="server")
            except ProtocolError as exc:
                log.warning("bad frame from fleetd: %s", exc)
                continue
            await dispatch(self, frame)

    async def shutdown(self) -> None:
        """Stop: nothing more fires or starts; cancel a running job, try to
        deliver its end, close the spool."""
        self.scheduler.stop()
        await self.runner.shutdown()
        if self.ws is not None and self.spool.count():
            try:
                await asyncio.wait_for(self._drain(), 5)
            except asyncio.TimeoutError:
                pass  # the spool keeps it for the next start
        self.spool.close()

    async def _drain(self) -> None:
        while self.spool.count() and self.ws is not None:
            self.acked_event.clear()
            self.wake.set()
            await self.acked_event.wait()
