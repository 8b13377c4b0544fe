"""fleetd's network face: one websockets server, routed by path.

/healthz   plain HTTP GET, "ok"
/login     unauthenticated; one auth.login request per frame
/enroll    unauthenticated; one enroll frame, then close
/ctl       operators; Bearer API token checked before the upgrade
/agent     agents; Bearer agent token checked before the upgrade
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import signal
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Optional

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..common import protocol
from .agents import enroll
from .agents.session import Agents
from .api import build_registry
from .api.auth import login, lookup_token
from .api.context import Caller, Context, ServerState
from .api.errors import ApiError, Invalid, UnknownMethod
from .clock import Clock
from .events import Bus, CredentialsChanged, JobQueued
from .scheduling.due import LostJobs, Retries
from .scheduling.ticker import Ticker
from .security.auth import RateLimiter
from .security.secrets import load_key_file
from .store.db import Store
from .store.models import Host

log = logging.getLogger("fleetd")

CTL_CONCURRENCY = 64  # requests of one /ctl connection in flight at once
DB_NAME = "fleet.db"
KEY_NAME = "secret.key"


@dataclass
class ServeConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8433
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    public_url: Optional[str] = None
    heartbeat_interval: int = 30
    lost_after: int = 3600  # a running job of a host offline this long is lost


class ConfigError(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8433")
    if int(port) > 65535:
        raise ConfigError(f"--listen {value!r}: port out of range")
    return host.strip("[]"), int(port)


def cert_fingerprint(cert_file: Path) -> str:
    """SHA-256 of the server certificate (DER), which agents pin."""
    pem = cert_file.read_text()
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem[start:end])).hexdigest()


def bearer(headers: Headers) -> Optional[str]:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def text_response(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    response = connection.respond(status, text + "\n")
    if status == HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleet"'
    return response


class FleetServer:
    def __init__(self, state: ServerState, token_limiter: RateLimiter | None = None) -> None:
        self.state = state
        self.token_limiter = token_limiter or RateLimiter(limit=20, window=60)
        self.api = build_registry()
        if state.bus is not None:  # a revocation drops cached token checks at once
            state.bus.subscribe(CredentialsChanged, self.api.forget)
        self.callers: dict[ServerConnection, Caller] = {}
        self.agents: dict[ServerConnection, object] = {}

    @staticmethod
    def address(connection: ServerConnection) -> str:
        peer = connection.remote_address
        return str(peer[0]) if peer else "?"

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Optional[Response]:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return text_response(connection, HTTPStatus.OK, "ok")
        if path in ("/login", "/enroll"):
            return None
        if path not in ("/ctl", "/agent"):
            return text_response(connection, HTTPStatus.NOT_FOUND, f"no endpoint {path}")
        address = self.address(connection)
        if self.token_limiter.blocked(address):
            return text_response(
                connection, HTTPStatus.TOO_MANY_REQUESTS, "too many bad tokens; wait"
            )
        token = bearer(request.headers)
        if token is None:
            return text_response(
                connection, HTTPStatus.UNAUTHORIZED, "missing 'Authorization: Bearer <token>'"
            )
        if path == "/ctl":
            caller = await self.state.store.atomic(lookup_token, token)
            if caller is not None:
                caller.address = address
                self.callers[connection] = caller
                return None
        else:
            host = await self.state.store.run(enroll.lookup_agent, token)
            if host is not None:
                self.agents[connection] = host
                return None
        self.token_limiter.fail(address)
        log.warning("refused %s from %s: unknown, revoked or expired token", path, address)
        return text_response(
            connection, HTTPStatus.UNAUTHORIZED, "unknown, revoked or expired token"
        )

    async def handler(self, connection: ServerConnection) -> None:
        path = connection.request.path.split("?", 1)[0]
        address = self.address(connection)
        try:
            if path == "/ctl":
                await self.serve_ctl(connection, self.callers[connection])
            elif path == "/login":
                await self.serve_login(connection, address)
            elif path == "/enroll":
                await enroll.serve_enroll(self.state.store, connection, address)
            elif path == "/agent":
                await self.state.agents.serve(connection, self.agents[connection])
        except ConnectionClosed:
            pass
        finally:
            self.callers.pop(connection, None)
            self.agents.pop(connection, None)

    async def serve_ctl(self, connection: ServerConnection, caller: Caller) -> None:
        """Requests on one connection run side by side (a tail does not hold
        up the rest), at most CTL_CONCURRENCY at a time: past that the
        socket is not read until one finishes."""
        host_header = connection.request.headers.get("Host", "")
        closed = asyncio.ensure_future(connection.wait_closed())
        slots = asyncio.Semaphore(CTL_CONCURRENCY)
        running: set[asyncio.Task] = set()

        async def answer(raw: str | bytes) -> None:
            try:
                ctx = Context(caller, self.state, host_header, closed=closed)
                await connection.send(await self.api.dispatch(ctx, raw, connection.send))
            except ConnectionClosed:
                pass
            finally:
                slots.release()

        try:
            async for raw in connection:
                await slots.acquire()
                task = asyncio.ensure_future(answer(raw))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            closed.cancel()

    async def serve_login(self, connection: ServerConnection, address: str) -> None:
        async for raw in connection:
            try:
                req = protocol.decode_request(raw)
            except protocol.ProtocolError as exc:
                await connection.send(Invalid(str(exc)).frame(exc.re))
                continue
            try:
                if req.method != "auth.login":
                    raise UnknownMethod("/login answers auth.login only")
                result = await login(self.state, req.params, address)
            except protocol.ProtocolError as exc:
                await connection.send(Invalid(str(exc)).frame(req.id))
            except ApiError as exc:
                await connection.send(exc.frame(req.id))
            else:
                await connection.send(protocol.result_frame(req.id, result))


def make_public_url(config: ServeConfig, tls: bool, actual_port: int):
    scheme = "wss" if tls else "ws"

    def public_url(host_header: str) -> str:
        if config.public_url:
            return config.public_url.rstrip("/")
        return f"{scheme}://{host_header or f'{config.host}:{actual_port}'}"

    return public_url


async def run_server(config: ServeConfig, ready: Optional[asyncio.Future] = None) -> None:
    """Serve until SIGTERM or SIGINT; then close every socket and the store."""
    box = load_key_file(config.data_dir / KEY_NAME)
    ssl_ctx = None
    fingerprint = None
    if config.tls_cert:
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_ctx.load_cert_chain(config.tls_cert, config.tls_key)
        fingerprint = cert_fingerprint(config.tls_cert)
    store = Store(config.data_dir / DB_NAME)
    await store.open()
    await store.run(reset_online)
    clock = Clock()
    bus = Bus()
    agents = Agents(store, bus, box, clock, config.heartbeat_interval)
    state = ServerState(
        store=store,
        box=box,
        public_url=lambda h: h,
        tls_fingerprint=fingerprint,
        agents=agents,
        bus=bus,
        heartbeat_interval=config.heartbeat_interval,
    )
    ticker = Ticker(
        clock,
        [
            Retries(agents.lifecycle, agents.dispatcher),
            LostJobs(agents.lifecycle, config.lost_after, clock.now(), agents.connected),
        ],
    )
    bus.subscribe(JobQueued, lambda e: e.due or ticker.poke())  # a retry's due time
    agents.on_offline.append(lambda host_id: ticker.poke())  # a silent host's jobs may be lost
    app = FleetServer(state)

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    try:
        async with serve(
            app.handler,
            config.host,
            config.port,
            process_request=app.process_request,
            ssl=ssl_ctx,
            max_size=4 * protocol.MAX_FRAME_BYTES,  # so decode() can answer an oversized frame
            server_header=None,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            state.public_url = make_public_url(config, ssl_ctx is not None, port)
            scheme = "wss" if ssl_ctx else "ws"
            print(f"fleetd listening on {scheme}://{config.host}:{port}", flush=True)
            if ready is not None and not ready.done():
                ready.set_result(port)
            ticking = asyncio.ensure_future(ticker.run())
            signum = await stop
            ticking.cancel()
            log.info("received %s, shutting down", signal.Signals(signum).name)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await agents.presence.flush()
        await store.run(reset_online)
        await store.close()
    log.info("stopped")


def reset_online() -> None:
    """Nobody is connected to a fleetd that is starting or stopping."""
    Host.update(online=False).where(Host.online == True).execute()  # noqa: E712
