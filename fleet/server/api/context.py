"""Who is calling, what of the running server a handler may use, and the
per-request context that dispatch hands every handler."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from websockets.exceptions import ConnectionClosedOK

from ..security import auth
from ..security.auth import Role
from ..security.secrets import SecretBox
from ..store.db import Store


@dataclass
class Caller:
    user_id: int
    name: str
    role: Role
    token_id: Optional[int]
    address: str
    expires_at: Optional[dt.datetime] = None  # the token's
    token_name: Optional[str] = None


@dataclass
class ServerState:
    """What handlers need of the running server."""

    store: Store
    box: SecretBox
    public_url: Callable[[str], str]  # Host header -> the URL agents dial
    public_urls: tuple[str, ...] = ()  # every replica's (this one's first); none: not told
    tls: Any = None  # security.tls.ServedTls; None: fleetd serves no TLS itself
    agents: Any = None  # agents.session.Agents: sessions, dispatch, lifecycle
    bus: Any = None  # events.Bus: domain events, live tails
    heartbeat_interval: int = 30  # seconds; an agent silent for 3 intervals is offline
    agent_file: Any = None  # agentfile.AgentFile served at GET /agent.pyz; None: none
    rollouts: Any = None  # agents.rollout.Rollouts: agent upgrades under way
    # failed logins in 5 minutes: 5 per user from one address, 50 per user
    # from anywhere, 20 per address (many users may share one NAT); past a
    # limit a login is still tried once every PROBE_EVERY seconds, so the
    # right password gets in while guessing slows to a crawl
    pair_limiter: auth.RateLimiter = field(default_factory=lambda: auth.RateLimiter(5, 300))
    user_limiter: auth.RateLimiter = field(default_factory=lambda: auth.RateLimiter(50, 300))
    addr_limiter: auth.RateLimiter = field(default_factory=lambda: auth.RateLimiter(20, 300))
    login_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def next_or_gone(queue: asyncio.Queue, ctx: Context) -> Any:
    """The next item of a stream's queue, unless the operator following it
    has gone away (then ConnectionClosedOK: nobody left to stream to)."""
    getter = asyncio.ensure_future(queue.get())
    waits = {getter} if ctx.closed is None else {getter, ctx.closed}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        raise ConnectionClosedOK(None, None)
    return getter.result()


@dataclass
class Context:
    caller: Caller
    state: ServerState
    host_header: str = ""
    # set per request by dispatch:
    emit: Callable[[Any], Awaitable[None]] = field(default=None)  # type: ignore[assignment]
    closed: Optional[asyncio.Future] = None  # done when the operator's connection is gone
    after: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run after commit
    events: list[Any] = field(default_factory=list)  # domain events, published after commit
