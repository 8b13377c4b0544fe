"""fleetd's network face: one websockets server, routed by path.

/healthz   plain HTTP GET, "ok"
/metrics   plain HTTP GET, Prometheus text; off unless --metrics, Bearer API token
/agent.pyz plain HTTP GET, the agent file (--agent-pyz); Bearer agent, enrollment or API token
/agent.pyz.sha256  plain HTTP GET, its SHA-256 as sha256sum prints it
/login     unauthenticated; one auth.login request per frame
/enroll    unauthenticated; one enroll frame, then close
/ctl       operators; Bearer API token checked before the upgrade
/agent     agents; Bearer agent token checked before the upgrade

Bounded everything: the handshake must finish within open_timeout; /login
and /enroll take small frames (64 KiB), a few connections per address
(429 past the cap) and no idle sockets (/enroll: the first frame within
enroll_timeout, /login: a frame every login_idle_timeout); every connection
buffers a few frames at most (max_queue, write_limit); and fleetd refuses
connections (503, or a bare close when too close to its file descriptor
limit) rather than running out of descriptors. At most MAX_DOWNLOADS
agent files are being sent at once (503 past that): each holds a copy of
the file in its socket's buffer until the peer has read it.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Optional

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from ..common import protocol, tlspins
from . import agentfile, metrics
from .agents import enroll
from .agents.rollout import Rollouts
from .agents.session import Agents
from .api import build_registry, templates
from .api.auth import known_token, login, lookup_token
from .api.context import Caller, Context, ServerState
from .api.errors import ApiError, Invalid, UnknownMethod
from .api.tls import started as tls_started
from .api.tls import without_tls as tls_without
from .clock import Clock
from .events import (
    AuthFailed,
    Bus,
    CredentialsChanged,
    HostOffline,
    JobEnded,
    JobQueued,
    MaintenanceChanged,
)
from .notify import Notifications, Pings
from .replicas import Replicas, Upkeep
from .scheduling import copies, drills, maintenance
from .scheduling.alerts import ALERT_EVERY, AlertSource
from .scheduling.due import LostJobs, Retries
from .scheduling.heap import HeapKeeper
from .scheduling.history import FIRST_DELAY, HistoryPruning, Policy
from .scheduling.ticker import RowSource, Ticker
from .security.auth import RateLimiter
from .security.secrets import load_key_file
from .security.tls import ServedTls
from .store.db import Location, Store
from .store.models import Host, utcnow

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
    # the URLs agents dial: this replica's first, then the other replicas'
    # (enrollment strings and welcome carry them all); none: as the operator
    # reached this one (its Host header)
    public_urls: tuple[str, ...] = ()
    heartbeat_interval: int = 30
    lost_after: int = 3600  # a running job of a host offline this long is lost
    history_days: int = 90  # ended jobs older than this are pruned; 0: kept for ever
    history_keep: int = 10  # ended jobs kept per host, group and kind, whatever their age
    history_delay: float = FIRST_DELAY  # seconds from start to the first pruning
    open_timeout: float = 10.0  # TCP accepted -> WebSocket handshake done
    enroll_timeout: float = 10.0  # /enroll: the enroll frame must arrive within this
    login_idle_timeout: float = 30.0  # /login: closed after this long without a frame
    # concurrent /login + /enroll connections per address (an enrollment burst of
    # a hundred hosts behind one NAT address fits)
    unauth_per_address: int = 128
    unauth_max_size: int = protocol.MAX_UNAUTH_FRAME_BYTES
    max_connections: Optional[int] = None  # default: from the file descriptor limit
    metrics: bool = False  # GET /metrics (Prometheus), for a caller with an API token
    alert_interval: float = ALERT_EVERY  # seconds between looks for alerts
    agent_pyz: Optional[Path] = None  # the agent file to serve; None: look in the usual places
    serve_agent: bool = True  # False: serve none, whatever there is
    store: Optional[Location] = None  # None: the SQLite file DATA_DIR/fleet.db


FD_RESERVE = 256  # descriptors kept for the database, logs, argon2 and the loop
MAX_QUEUE = 8  # incoming frames buffered per connection before reading pauses
WRITE_LIMIT = 64 * 1024  # outgoing bytes buffered per connection before send() waits
UNAUTHENTICATED = ("/login", "/enroll")
MAX_DOWNLOADS = 32  # agent files being sent at once
RETRY_AFTER = "5"  # seconds, told to a download refused for being one too many


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit now."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def connection_budget(fd_limit: int) -> int:
    """Connections fleetd serves at most under a descriptor limit."""
    return max(16, fd_limit - FD_RESERVE)


class Throttle:
    """When a warning that repeats may be logged again: at most once every
    `seconds`, saying how many were held back since."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.held = 0
        self.last = -1e9

    def ready(self) -> Optional[int]:
        """The number held back since the last one when it is time, else None."""
        now = time.monotonic()
        if now - self.last < self.seconds:
            self.held += 1
            return None
        held, self.held, self.last = self.held, 0, now
        return held


class ConnectionLimits:
    """Counts open TCP connections (all of them) and unauthenticated ones per
    address; updated from the connections' own callbacks, so nothing leaks
    whichever way a connection ends."""

    def __init__(self, max_connections: int, per_address: int) -> None:
        self.max_connections = max_connections
        # beyond this a new TCP connection is dropped unanswered, before it
        # can cost more than its own descriptor
        self.hard_limit = max_connections + max(8, FD_RESERVE // 2)
        self.per_address = per_address
        self.open = 0
        self.live: set[Any] = set()  # every connection with its TCP socket still open
        self.unauth: collections.Counter[str] = collections.Counter()
        self._refusals = Throttle(10.0)
        # since fleetd started, for /metrics: plain ints, as 10,000 connects
        # a second should not take a lock each
        self.accepted: collections.Counter[str] = collections.Counter()  # by endpoint
        self.refused: collections.Counter[str] = collections.Counter()  # by reason
        self.downloads = 0  # agent files being sent

    def claim_download(self, connection: Any) -> bool:
        """A download slot, given back when the connection closes."""
        if self.downloads >= MAX_DOWNLOADS:
            return False
        self.downloads += 1
        connection.fleet_download = True
        return True

    def claim_unauthenticated(self, connection: Any, address: str) -> bool:
        if self.unauth[address] >= self.per_address:
            return False
        self.unauth[address] += 1
        connection.fleet_unauth = address
        return True

    def opened(self, connection: Any) -> bool:
        self.open += 1
        self.live.add(connection)
        return self.open <= self.hard_limit

    def closed(self, connection: Any) -> None:
        self.open -= 1
        self.live.discard(connection)
        if getattr(connection, "fleet_download", False):
            connection.fleet_download = False
            self.downloads -= 1
        address = getattr(connection, "fleet_unauth", None)
        if address is not None:
            connection.fleet_unauth = None
            self.unauth[address] -= 1
            if self.unauth[address] <= 0:
                del self.unauth[address]

    def note_refusal(self, why: str) -> None:
        """One warning line per 10 s at most, however many are refused."""
        held = self._refusals.ready()
        if held is not None:
            log.warning("refusing connections: %s (%d more since the last report)", why, held)


def connection_class(limits: ConnectionLimits) -> type[ServerConnection]:
    class FleetConnection(ServerConnection):
        fleet_unauth: Optional[str] = None
        fleet_download = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if not limits.opened(self):
                limits.refused["hard_limit"] += 1
                limits.note_refusal(f"over {limits.hard_limit} connections open")
                transport.abort()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            try:
                super().connection_lost(exc)
            finally:
                limits.closed(self)

    return FleetConnection


def limit_unauthenticated(connection: ServerConnection, max_size: int) -> None:
    """Small frames and a short queue for a connection nobody has vouched for
    (set before the upgrade completes: no frame has been read yet)."""
    proto: Any = connection.protocol
    if hasattr(proto, "max_message_size"):
        proto.max_message_size = max_size
    else:  # pragma: no cover - websockets < 14
        proto.max_size = max_size
    messages = getattr(connection, "recv_messages", None)
    if messages is not None and getattr(messages, "high", None) is not None:
        messages.high, messages.low = 2, 0


class FirstFrameWithin:
    """A connection whose recv() gives up after `timeout` seconds (raising
    TimeoutError); the rest is the connection's own."""

    def __init__(self, connection: ServerConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout

    async def recv(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(self._connection.recv(*args, **kwargs), self._timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class QuietAcceptErrors:
    """The loop's exception handler: out of descriptors at accept() is a
    warning line at most every 5 s, not a traceback each time. (asyncio
    retries accepting a second later, but Python's loop keeps calling
    accept() up to `backlog` times per wake-up and schedules one retry per
    failure, so the failures multiply; fleetd's connection budget keeps it
    away from the limit, this is the fallback.)"""

    def __init__(self) -> None:
        self._throttle = Throttle(5.0)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = str(context.get("message", ""))
        if not message.startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        held = self._throttle.ready()
        if held is None:
            return
        exc = context.get("exception")
        log.warning(
            "cannot accept connections: %s (%d more since the last report)",
            getattr(exc, "strerror", None) or exc,
            held,
        )


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


def parse_public_urls(values: Sequence[str]) -> tuple[str, ...]:
    """--public-url, given once or more, each perhaps a comma-separated list
    (FLEETD_PUBLIC_URL): this replica's URL first, then the others'. Each a
    ws:// or wss:// URL, all of one scheme (an agent never changes scheme),
    at most protocol.MAX_URLS. Raises ConfigError."""
    urls = [u.strip() for value in values for u in value.split(",") if u.strip()]
    try:
        checked = protocol.check_server_urls(urls)
    except protocol.ProtocolError as exc:
        raise ConfigError(f"--public-url: {exc}") from None
    if len({protocol.url_scheme(u) for u in checked}) > 1:
        raise ConfigError(
            "--public-url: the replicas' URLs must all be ws:// or all wss:// "
            "(an agent enrolled over TLS never dials without it)"
        )
    return tuple(checked)


def bearer(headers: Headers) -> Optional[str]:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


NO_AGENT_FILE = (
    "fleetd serves no agent file: build one ('make agent') and start fleetd with "
    "--agent-pyz PATH, or put it in its data directory as fleet-agent.pyz"
)


def text_response(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    response = connection.respond(status, text + "\n")
    if status == HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleet"'
    return response


class FleetServer:
    def __init__(
        self,
        state: ServerState,
        token_limiter: RateLimiter | None = None,
        config: Optional[ServeConfig] = None,
        limits: Optional[ConnectionLimits] = None,
    ) -> None:
        self.state = state
        self.token_limiter = token_limiter or RateLimiter(limit=20, window=60)
        self.api = build_registry()
        if state.bus is not None:  # a revocation drops cached token checks at once
            state.bus.subscribe(CredentialsChanged, self.api.forget)
            state.bus.subscribe(AuthFailed, self._failed_elsewhere, local=False)
        self.config = config or ServeConfig(Path("."))
        self.limits = limits or ConnectionLimits(1 << 30, self.config.unauth_per_address)
        self.callers: dict[ServerConnection, Caller] = {}
        self.agents: dict[ServerConnection, tuple[int, str]] = {}  # (host id, name)
        self.process = metrics.Process(
            state.bus,
            self.limits,
            lambda: {"agent": len(self.agents), "ctl": len(self.callers), "all": self.limits.open},
        )

    def _failed_elsewhere(self, event: AuthFailed) -> None:
        """Another replica refused a login or a token: counted here too."""
        if event.user is None:
            self.token_limiter.fail(event.address)
            return
        self.state.pair_limiter.fail(f"{event.user}\x00{event.address}")
        self.state.user_limiter.fail(event.user)
        self.state.addr_limiter.fail(event.address)

    def refuse(
        self, reason: str, connection: ServerConnection, status: HTTPStatus, text: str
    ) -> Response:
        """An HTTP refusal of the handshake, counted by reason for /metrics."""
        self.limits.refused[reason] += 1
        return text_response(connection, status, text)

    def over_limit(self, connection: ServerConnection) -> Optional[Response]:
        """The refusal of a connection past fleetd's limit, or None."""
        if self.limits.open <= self.limits.max_connections:
            return None
        self.limits.note_refusal(f"{self.limits.max_connections} connections open")
        return self.refuse(
            "connection_limit",
            connection,
            HTTPStatus.SERVICE_UNAVAILABLE,
            "fleetd is at its connection limit",
        )

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
        if path == "/metrics":
            return await self.serve_metrics(connection, request)
        if path == "/agent.pyz.sha256":
            return self.serve_agent_sum(connection)
        if path == "/agent.pyz":
            return await self.serve_agent_file(connection, request)
        if path not in ("/ctl", "/agent", *UNAUTHENTICATED):
            return text_response(connection, HTTPStatus.NOT_FOUND, f"no endpoint {path}")
        address = self.address(connection)
        full = self.over_limit(connection)
        if full is not None:
            return full
        if path in UNAUTHENTICATED:
            if not self.limits.claim_unauthenticated(connection, address):
                self.limits.note_refusal(
                    f"{address} holds {self.limits.per_address} unauthenticated connections"
                )
                return self.refuse(
                    "unauthenticated_per_address",
                    connection,
                    HTTPStatus.TOO_MANY_REQUESTS,
                    f"at most {self.limits.per_address} connections to {path} per address",
                )
            limit_unauthenticated(connection, self.config.unauth_max_size)
            return None
        token = bearer(request.headers)
        if token is None:
            return self.refuse(
                "no_token",
                connection,
                HTTPStatus.UNAUTHORIZED,
                "missing 'Authorization: Bearer <token>'",
            )
        # an address that sent many bad tokens (one behind a NAT, say) still
        # gets its good ones through: only its bad ones are answered 429, and
        # checked on the reader, not the writer (a token cannot be guessed;
        # the limit keeps a flood of them off the store's writer)
        blocked = self.token_limiter.blocked(address)
        if path == "/ctl":
            known = not blocked or await self.state.store.read(known_token, token)
            caller = await self.state.store.atomic(lookup_token, token) if known else None
            if caller is not None:
                caller.address = address
                self.callers[connection] = caller
                return None
        else:
            host = await self.state.store.read(enroll.lookup_agent, token)
            if host is not None:
                self.agents[connection] = host
                return None
        return self.bad_token(connection, address, path, blocked)

    def bad_token(
        self, connection: ServerConnection, address: str, path: str, blocked: bool
    ) -> Response:
        self.token_limiter.fail(address)
        if not blocked and self.state.bus is not None:
            # the other replicas count it too (not once blocked: a flood of
            # bad tokens then costs no write)
            self.state.bus.publish([AuthFailed(address)])
        if blocked:
            return self.refuse(
                "rate_limited",
                connection,
                HTTPStatus.TOO_MANY_REQUESTS,
                "too many bad tokens; wait",
            )
        log.warning("refused %s from %s: unknown, revoked or expired token", path, address)
        return self.refuse(
            "bad_token", connection, HTTPStatus.UNAUTHORIZED, "unknown, revoked or expired token"
        )

    async def serve_metrics(self, connection: ServerConnection, request: Request) -> Response:
        """Prometheus' scrape: off unless asked for, and only with an API
        token (any role), checked and rate limited as /ctl's are."""
        if not self.config.metrics:
            return text_response(
                connection, HTTPStatus.NOT_FOUND, "metrics are off (fleetd serve --metrics)"
            )
        address = self.address(connection)
        token = bearer(request.headers)
        if token is None:
            return self.refuse(
                "no_token",
                connection,
                HTTPStatus.UNAUTHORIZED,
                "missing 'Authorization: Bearer <token>'",
            )
        blocked = self.token_limiter.blocked(address)
        known = not blocked or await self.state.store.read(known_token, token)
        if not known or await self.state.store.atomic(lookup_token, token) is None:
            return self.bad_token(connection, address, "/metrics", blocked)
        self.limits.accepted["metrics"] += 1
        found = await self.state.store.scan(metrics.families, utcnow())
        body = metrics.render([*found, *self.process.families()])
        response = connection.respond(HTTPStatus.OK, body.decode())
        replace_header(response, "Content-Type", metrics.CONTENT_TYPE)
        return response

    def serve_agent_sum(self, connection: ServerConnection) -> Response:
        """The SHA-256 of the agent file, to anyone: a line of text."""
        agent = self.state.agent_file
        if agent is None:
            return text_response(connection, HTTPStatus.NOT_FOUND, NO_AGENT_FILE)
        response = connection.respond(HTTPStatus.OK, agentfile.sha256_line(agent))
        response.headers["X-Fleet-Agent-Version"] = agent.version
        return response

    async def serve_agent_file(self, connection: ServerConnection, request: Request) -> Response:
        """GET /agent.pyz, with its SHA-256 and version in headers, to a
        caller with a token: an agent's (upgrades), an enrollment token not
        yet used (the install snippet) or an API token. The file is no
        secret, but it is a megabyte: open to anyone, a few bytes asked
        would have fleetd send megabytes, and take the download slots
        that enrolling and upgrading hosts need."""
        agent = self.state.agent_file
        if agent is None:
            return text_response(connection, HTTPStatus.NOT_FOUND, NO_AGENT_FILE)
        full = self.over_limit(connection)
        if full is not None:
            return full
        address = self.address(connection)
        token = bearer(request.headers)
        if token is None:
            return self.refuse(
                "no_token",
                connection,
                HTTPStatus.UNAUTHORIZED,
                "missing 'Authorization: Bearer <token>' (an agent, enrollment or API token)",
            )
        blocked = self.token_limiter.blocked(address)
        store = self.state.store
        if not await store.read(may_download, token):
            return self.bad_token(connection, address, "/agent.pyz", blocked)
        if not self.limits.claim_download(connection):
            response = self.refuse(
                "downloads",
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{MAX_DOWNLOADS} agent files are being sent; try again in a moment",
            )
            response.headers["Retry-After"] = RETRY_AFTER
            return response
        self.limits.accepted["agent.pyz"] += 1
        response = connection.respond(HTTPStatus.OK, "")
        replace_header(response, "Content-Type", "application/octet-stream")
        replace_header(response, "Content-Length", str(agent.size))
        response.headers["X-Fleet-Agent-Version"] = agent.version
        response.headers["X-Fleet-Agent-SHA256"] = agent.sha256
        response.body = agent.data
        return response

    async def handler(self, connection: ServerConnection) -> None:
        path = connection.request.path.split("?", 1)[0]
        address = self.address(connection)
        self.limits.accepted[path.lstrip("/")] += 1
        try:
            if path == "/ctl":
                await self.serve_ctl(connection, self.callers[connection])
            elif path == "/login":
                await self.serve_login(connection, address)
            elif path == "/enroll":
                timeout = self.config.enroll_timeout
                try:
                    await enroll.serve_enroll(
                        self.state.store,
                        FirstFrameWithin(connection, timeout),  # type: ignore[arg-type]
                        address,
                    )
                except asyncio.TimeoutError:
                    await connection.close(1008, f"no enroll frame within {timeout:g} s")
            elif path == "/agent":
                await self.state.agents.serve(connection, *self.agents[connection])
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
                if slots.locked():  # full: wait for a slot, unless the link goes first
                    acquire = asyncio.ensure_future(slots.acquire())
                    await asyncio.wait({acquire, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if not acquire.done():
                        acquire.cancel()
                        break
                else:
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
        idle = self.config.login_idle_timeout
        while True:
            try:
                raw = await asyncio.wait_for(connection.recv(), idle)
            except asyncio.TimeoutError:
                await connection.close(1008, f"idle for {idle:g} s")
                return
            try:
                req = protocol.decode_request(raw, limit=self.config.unauth_max_size)
            except protocol.ProtocolError as exc:
                await connection.send(Invalid(str(exc)).frame(exc.re))
                continue
            finally:
                del raw  # not held while queued on the login lock
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
        if config.public_urls:
            return config.public_urls[0]
        return f"{scheme}://{host_header or f'{config.host}:{actual_port}'}"

    return public_url


async def run_server(config: ServeConfig, ready: Optional[asyncio.Future] = None) -> None:
    """Serve until SIGTERM or SIGINT; then close the store and send every
    socket its 1001. The caller ends the process next, without running the
    loop again (the kernel closes the sockets)."""
    box = load_key_file(config.data_dir / KEY_NAME)
    # read once, before serving
    agent_file = agentfile.find(config.agent_pyz, config.data_dir) if config.serve_agent else None
    tls = None
    if config.tls_cert and config.tls_key:
        tls = ServedTls(config.tls_cert, config.tls_key)
    ssl_ctx = tls.listening if tls is not None else None
    where = config.store or Location(sqlite=config.data_dir / DB_NAME)
    store = Store(where)
    await store.open()
    bus = Bus()
    # on PostgreSQL this fleetd is one replica of several, perhaps: others
    # hold their own agents' links, so only its own are reset at its start
    replicas = Replicas(store, bus, where) if where.is_postgresql else None
    if replicas is None:
        await store.run(reset_online)
    else:
        await replicas.start(config.public_urls[0] if config.public_urls else None)
    if tls is not None:
        await start_tls(store, tls)
    else:
        await store.atomic(tls_without)
    clock = Clock()
    agents = Agents(
        store, bus, box, clock, config.heartbeat_interval, tls, replicas and replicas.id
    )
    agents.public_urls = config.public_urls  # told to agents in welcome
    notifications = Notifications(store, box, bus)  # alerts, through Apprise
    pings = Pings(store, box, bus)  # groups' Healthchecks-style URLs
    state = ServerState(
        store=store,
        box=box,
        public_url=lambda h: h,
        public_urls=config.public_urls,
        tls=tls,
        agents=agents,
        bus=bus,
        heartbeat_interval=config.heartbeat_interval,
        agent_file=agent_file,
    )
    state.rollouts = Rollouts(store, bus, agents, agent_file)
    if agent_file is not None:
        log.info(
            "serving fleet-agent %s from %s (SHA-256 %s)",
            agent_file.version,
            agent_file.path,
            agent_file.sha256,
        )
    alerts = AlertSource(agents.lifecycle, config.alert_interval)
    # what each replica does for itself: offer its own agents their due
    # retries, keep its own heap
    local_ticker = Ticker(
        clock, [Retries(agents.lifecycle, agents.dispatcher), HeapKeeper(clock.now())]
    )
    # what one replica does for the fleet (the leader; one fleetd alone
    # is its own)
    ticker = Ticker(
        clock,
        [
            LostJobs(agents.lifecycle, config.lost_after, clock.now(), agents.connected),
            HistoryPruning(
                store,
                Policy(config.history_days, config.history_keep),
                clock.now(),
                config.history_delay,
            ),
            RowSource("maintenance", agents.lifecycle, maintenance.next_due, maintenance.run_due),
            RowSource("copies", agents.lifecycle, copies.next_due, copies.run_due),
            RowSource("drills", agents.lifecycle, drills.next_due, drills.run_due),
            # templates left to apply by a request that did not finish
            RowSource("templates", agents.lifecycle, templates.next_due, templates.run_due),
            alerts,
        ]
        # a dead replica's rollout under way is taken up by the leader
        + (
            [Upkeep(replicas, agents.lifecycle.apply, lambda: state.rollouts.resume())]
            if replicas is not None
            else []
        ),
    )
    bus.subscribe(JobQueued, lambda e: e.due or local_ticker.poke())  # a retry's due time
    bus.subscribe(HostOffline, lambda e: ticker.poke())  # a silent host's jobs may be lost

    def look_again(_: Any) -> None:  # what changed may raise or resolve an alert
        alerts.soon(clock.now())
        ticker.poke()

    bus.subscribe(JobEnded, look_again)
    bus.subscribe(HostOffline, look_again)
    bus.subscribe(MaintenanceChanged, lambda e: ticker.poke())  # new cron times
    max_connections = config.max_connections or connection_budget(raise_fd_limit())
    limits = ConnectionLimits(max_connections, config.unauth_per_address)
    app = FleetServer(state, config=config, limits=limits)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(QuietAcceptErrors())
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    server = None
    try:
        server = await serve(
            app.handler,
            config.host,
            config.port,
            process_request=app.process_request,
            ssl=ssl_ctx,
            max_size=4 * protocol.MAX_FRAME_BYTES,  # so decode() can answer an oversized frame
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            open_timeout=config.open_timeout,
            create_connection=connection_class(limits),
            server_header=None,
        )
        port = server.sockets[0].getsockname()[1]
        state.public_url = make_public_url(config, ssl_ctx is not None, port)
        scheme = "wss" if ssl_ctx else "ws"
        print(f"fleetd listening on {scheme}://{config.host}:{port}", flush=True)
        if ready is not None and not ready.done():
            ready.set_result(port)
        ticking = [asyncio.ensure_future(local_ticker.run()), asyncio.ensure_future(watch_loop())]
        if replicas is None:
            ticking.append(asyncio.ensure_future(ticker.run()))
            await state.rollouts.resume()  # one under way when fleetd stopped goes on
        else:
            replicas.on_rejoin = agents.rejoin
            state.rollouts.leading = False  # until this replica leads
            # not taken up while stopping: the lock a stopping leader drops
            # must not start a ticker here that nobody cancels, over a
            # store about to close
            replicas.elect(
                lambda leads: lead(leads and not stop.done(), ticker, ticking, state.rollouts)
            )
        signum = await stop
        for task in ticking:
            task.cancel()
        log.info("received %s, shutting down", signal.Signals(signum).name)
        agents.stopping = True  # one statement marks every host offline, below
        server.server.close()  # no new connections (the finally below is for a failed start)
        for connection in list(limits.live):
            connection.transport.pause_reading()  # and no new requests or reports
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.server.close()
        # the store first, while the connections are still open: what a
        # handler still asks of it is refused as `unavailable` (and what an
        # agent reported but was not acked, it sends again)
        await state.rollouts.stop()  # taken up again at the next start
        await notifications.stop()
        await pings.stop()
        await agents.presence.flush()
        if replicas is None:
            await store.run(reset_online)
        else:
            await replicas.stop()
            await store.run(reset_online, replicas.id)
        await store.close()
    # then 1001 to everyone at once, without a closing handshake to wait for
    # (10,000 of them take seconds, and a peer pipelining requests, whose
    # reads fleetd has paused, cannot even see the close); the handlers are
    # not waited for (2.3 s to unwind 10,000): the caller ends the process
    # without running the loop again, and the kernel closes the sockets
    for connection in list(limits.live):
        going_away(connection)
    log.info("stopped")


HELD = 1.0  # seconds the event loop may be late before it is said


async def watch_loop(every: float = 1.0) -> None:
    """Say when the event loop ran late (a call blocking it, or the process
    starved of CPU): every connection, handshakes too, waited meanwhile."""
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        await asyncio.sleep(every)
        late = loop.time() - began - every
        if late > HELD:
            log.warning("fleetd's event loop ran %.1f s late: every connection waited", late)


# the close frame every connection gets at SIGTERM, built once
GOING_AWAY = Frame(
    Opcode.CLOSE, Close(CloseCode.GOING_AWAY, "fleetd is shutting down").serialize()
).serialize(mask=False)


def going_away(connection: ServerConnection) -> None:
    """Send the close frame (1001), now. Written straight to the transport
    and not closed: the process ends next, and the kernel closes every
    socket after what was written (closing 10,000 transports queued 10,000
    callbacks that the loop still ran before it stopped)."""
    try:
        if connection.protocol.state is State.OPEN:
            connection.transport.write(GOING_AWAY)
    except Exception:  # a transport already gone: nothing to be polite to
        pass


async def start_tls(store: Store, tls: ServedTls) -> None:
    """Record the key fleetd serves; say loudly when it changed without
    being staged first (agents pinning the old key cannot connect)."""
    tls.staged, before, was_staged, lacking = await store.atomic(tls_started, tls.pin)
    if before is None:
        log.info("serving TLS key %s", tls.pin)
    elif was_staged:
        log.info("serving TLS key %s, staged before (was %s)", tls.pin, before)
        if lacking:  # restarted onto the staged key without tls activate's check
            log.warning(
                "%d host(s) may not hold the pin of the key served now and may not connect: "
                "%s ('fleetctl tls status' says why)",
                len(lacking),
                ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else ""),
            )
    else:
        log.warning(
            "serving TLS key %s, which was never staged (fleetd served %s before): the agents "
            "of %d host(s) pinning only the old key cannot connect ('fleetctl tls status' "
            "names them); serve the old key again, or enroll those agents again",
            tlspins.short(tls.pin),
            tlspins.short(before),
            len(lacking),
        )


def replace_header(response: Response, name: str, value: str) -> None:
    """Set a header of a response websockets built (its Headers add, never replace)."""
    del response.headers[name]
    response.headers[name] = value


def may_download(token: str) -> bool:
    """GET /agent.pyz's token check in one store read: an unused enrollment
    token, an agent's or an API token."""
    return enroll.may_download(token) or known_token(token)


def reset_online(replica: Optional[str] = None) -> None:
    """Nobody is connected to a fleetd that is starting or stopping; those
    that were were last seen now. A replica: those connected through it."""
    cond = Host.online == True  # noqa: E712
    if replica is not None:
        cond &= Host.session_replica == replica
    Host.update(online=False, last_seen_at=utcnow(), session_replica=None).where(cond).execute()


async def lead(leads: bool, ticker: Ticker, ticking: list, rollouts: Rollouts) -> None:
    """This replica became the leader (or stopped being it): it runs the
    fleet-wide ticker, and drives the rollouts (one under way is taken up)."""
    for task in ticking[1:]:
        task.cancel()
    del ticking[1:]
    rollouts.leading = leads
    if leads:
        ticking.append(asyncio.ensure_future(ticker.run()))
        await rollouts.resume()
    else:
        await rollouts.stop()  # the new leader takes them up
