"""The agent's link to fleetd: enroll once, then dial /agent for ever.

One session: connect with the agent token, hello -> welcome, then three
tasks until the link drops: heartbeats, the receiver (acks, config,
commands) and the sender, which drains the spool in seq order. After a
drop the agent redials with exponential backoff and jitter (1 s to 60 s)
and the sender starts again from the last acknowledged seq.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import random
import socket
import ssl
import subprocess
import time
from typing import Any, Optional

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .. import __version__
from ..common import protocol
from ..common.protocol import ProtocolError, now_iso
from ..common.restic import commands, parse
from .jobs import JobRunner
from .spool import DEFAULT_MAX_BYTES, Spool
from .state import Identity, RepoConfig, State, write_private

log = logging.getLogger("fleet-agent")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
SEND_BATCH = 500


class FatalError(Exception):
    """Retrying cannot help (token refused, protocol unsupported): exit non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def backoff(attempt: int, rng: Optional[random.Random] = None) -> float:
    """Delay before redial number `attempt` (0-based): anywhere from 1 s up to
    a ceiling that doubles each attempt (2, 4, 8 ... 60 s), so a fleet
    coming back after a fleetd restart does not arrive at once, even on its
    first redial."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (attempt + 1))
    return (rng or random).uniform(BACKOFF_MIN, ceiling)


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


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def tls_context(state: State, identity_pin: Optional[str]) -> ssl.SSLContext:
    """Trust exactly the certificate pinned at enrollment, or the system CAs."""
    if identity_pin and state.cert_path.exists():
        ctx = ssl.create_default_context(cafile=str(state.cert_path))
        ctx.check_hostname = False  # the pin, not the name, identifies fleetd
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
        return ctx
    return ssl.create_default_context()


async def fetch_certificate(url: str) -> bytes:
    """The server's certificate (DER), read without trusting it, to check a pin."""
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, "443"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host.strip("[]"), int(port), ssl=ctx), 15
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def enroll(state: State, enrollment: str, hostname: Optional[str] = None) -> Identity:
    """Exchange the enrollment string for an agent token and save the identity."""
    doc = protocol.parse_enrollment(enrollment)
    url, pin = doc["url"].rstrip("/"), doc.get("sha256")
    ssl_ctx = None
    if url.startswith("wss://"):
        if pin:
            der = await fetch_certificate(url)
            if fingerprint(der) != pin.lower():
                raise FatalError(
                    f"{url} presented a certificate with SHA-256 {fingerprint(der)}, not the pinned {pin}: refusing",
                    3,
                )
            write_private(state.cert_path, ssl.DER_cert_to_PEM_cert(der))
        ssl_ctx = tls_context(state, pin)
    async with connect(url + "/enroll", ssl=ssl_ctx, open_timeout=15, compression=None) as ws:
        await ws.send(
            protocol.encode(
                "enroll",
                {"token": doc["token"], "hostname": hostname or socket.gethostname()},
                id="1",
            )
        )
        reply = protocol.decode(await asyncio.wait_for(ws.recv(), 30), expect="server")
    if reply.type == "error":
        raise FatalError(f"enrollment refused: {reply.data['message']}", 3)
    if reply.type != "enrolled":
        raise FatalError(f"unexpected answer to enroll: {reply.type}")
    data = reply.data
    identity = Identity(url, data["host_id"], data["host_name"], data["agent_token"], pin, hostname)
    state.save_identity(identity)
    return identity


class Agent:
    def __init__(
        self,
        state: State,
        identity: Identity,
        restic: str = "restic",
        cancel_grace: float = 10.0,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.state = state
        self.identity = identity
        self.restic = restic
        self.spool = Spool(state.spool_path, spool_max_bytes)
        self.runner = JobRunner(state, self, restic, cancel_grace)
        self.ws: Optional[ClientConnection] = None
        self.wake = asyncio.Event()
        self.acked = 0
        self.acked_event = asyncio.Event()
        self._locks_checked = False  # once per start, after the first connection
        self.restic_version = "unknown"
        self.connected = asyncio.Event()  # set while a session is up (tests wait on it)
        self.disconnected = asyncio.Event()  # set while it is not
        self.disconnected.set()

    # -- Reporter: how jobs talk to fleetd -------------------------------

    async def emit(self, type_: str, data: dict, supersede: bool = False) -> None:
        self.spool.append(type_, data, supersede)
        self.wake.set()

    async def emit_now(self, type_: str, data: dict) -> None:
        ws = self.ws
        if ws is None:
            return
        try:
            await ws.send(protocol.encode(type_, data))
        except ConnectionClosed:
            pass

    # -- the link ---------------------------------------------------------

    async def run_forever(self) -> None:
        self.restic_version = await asyncio.get_running_loop().run_in_executor(
            None, restic_version, self.restic
        )
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self.session()
                reason = "connection closed"
            except FatalError:
                raise
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
            if time.monotonic() - started > BACKOFF_MAX:
                attempt = 0  # the link had been up a while: start over quickly
            delay = backoff(attempt)
            attempt += 1
            log.warning(
                "link to %s down (%s); redialling in %.1f s",
                self.identity.server_url,
                reason,
                delay,
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
        }
        if self.runner.current is not None:
            data["running_job"] = self.runner.current
        return data

    async def session(self) -> None:
        url = self.identity.server_url + "/agent"
        ssl_ctx = (
            tls_context(self.state, self.identity.tls_sha256) if url.startswith("wss://") else None
        )
        headers = {"Authorization": f"Bearer {self.identity.agent_token}"}
        async with connect(
            url,
            additional_headers=headers,
            ssl=ssl_ctx,
            open_timeout=15,
            compression=None,
            max_size=4 * protocol.MAX_FRAME_BYTES,
            user_agent_header=f"fleet-agent/{__version__}",
        ) as ws:
            await ws.send(protocol.encode("hello", self.hello(), id="hello"))
            reply = protocol.decode(await asyncio.wait_for(ws.recv(), 30), expect="server")
            if reply.type == "error":
                if reply.data["code"] == "unsupported_version":
                    raise FatalError(f"fleetd: {reply.data['message']}", 1)
                raise ProtocolError(f"fleetd refused hello: {reply.data['message']}")
            if reply.type != "welcome":
                raise ProtocolError(f"expected welcome, got {reply.type}")
            interval = reply.data["heartbeat_interval"]
            log.info("connected to %s as %s", self.identity.server_url, reply.data["host_name"])
            self.ws = ws
            self.disconnected.clear()
            self.connected.set()
            if not self._locks_checked:
                self._locks_checked = True
                asyncio.ensure_future(self.runner.check_locks_when_idle())
            tasks = [
                asyncio.ensure_future(self._receiver(ws)),
                asyncio.ensure_future(self._sender(ws)),
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
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeat(self, ws: ClientConnection, interval: int) -> None:
        while True:
            await asyncio.sleep(interval)
            await ws.send(protocol.encode("heartbeat", {"sent_at": now_iso()}))

    async def _sender(self, ws: ClientConnection) -> None:
        sent = self.acked  # everything after the last ack is resent
        while True:
            frames = self.spool.pending(after=sent, limit=SEND_BATCH)
            if not frames:
                self.wake.clear()
                await self.wake.wait()
                continue
            for seq, type_, data in frames:
                await ws.send(protocol.Envelope(type_, data, seq=seq).to_json())
                sent = seq

    async def _receiver(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                frame = protocol.decode(raw, expect="server")
            except ProtocolError as exc:
                log.warning("bad frame from fleetd: %s", exc)
                continue
            await self.handle(ws, frame)

    async def handle(self, ws: ClientConnection, frame: protocol.Envelope) -> None:
        data = frame.data
        if frame.type == "ack":
            if data["seq"] > self.acked:
                self.acked = data["seq"]
                self.spool.ack(self.acked)
                self.acked_event.set()
        elif frame.type == "config.update":
            repo = RepoConfig(
                data["repo_url"], data["repo_password"], dict(data.get("repo_env") or {})
            )
            self.state.save_repo(repo)
            log.info("repository configuration updated")
        elif frame.type == "command.run":
            refused = self.runner.submit(data)
            result = {"job_id": data["job_id"], "accepted": refused is None}
            if refused:
                result["error"] = refused
            await ws.send(protocol.encode("command.result", result))
        elif frame.type == "command.cancel":
            self.runner.cancel(data["job_id"])
        elif frame.type == "error":
            log.warning("fleetd: %s (%s)", data["message"], data["code"])
        else:
            log.debug("ignoring %s", frame.type)

    async def shutdown(self) -> None:
        """Stop: cancel a running job, try to deliver its end, close the spool."""
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
