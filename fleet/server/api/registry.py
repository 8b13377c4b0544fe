"""The operator channel: one registry from method name to handler.

Every `/ctl` request is `{"id", "method", "params"}`. A method declares the
role it needs and the fields of its params; `Registry.call` checks both
before the handler runs, and `Registry.dispatch` (the edge) turns every
ApiError into an error reply, so a bad request never costs the connection.
Plain (sync) handlers run on the store thread inside one transaction; async
handlers orchestrate work that must not hold the store thread (password
hashing, pushes to agents).

Noun modules collect their methods explicitly:

    METHODS: list[Method] = []
    method = collect(METHODS)

    @method("hosts.show", Role.VIEWER, (Field("host", "str", limit=64),))
    def hosts_show(ctx, p): ...

and `fleet.server.api.build_registry()` builds one Registry from them.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from websockets.exceptions import ConnectionClosed

from ...common import protocol
from ...common.protocol import Field, ProtocolError
from ...common.timefmt import utcnow
from ..events import CredentialsChanged
from ..security.auth import Role
from ..store.db import StoreClosed
from .context import Caller, Context
from .errors import (
    ApiError,
    Forbidden,
    Internal,
    Invalid,
    Unauthorized,
    Unavailable,
    UnknownMethod,
)

STOPPING = "fleetd is shutting down; try again in a moment"

log = logging.getLogger("fleetd.ctl")

Handler = Callable[[Context, dict], Any]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    role: Role
    fields: tuple[Field, ...]
    is_async: bool
    readonly: bool = False  # a sync handler that only reads: no transaction

    @property
    def help(self) -> str:
        """The handler's docstring: what the method does."""
        return inspect.getdoc(self.handler) or ""


def collect(into: list[Method]):
    """A `@method(name, role, fields)` decorator that appends to `into`."""

    def method(
        name: str, role: Role = Role.VIEWER, fields: tuple[Field, ...] = (), readonly: bool = False
    ):
        def register(fn: Handler) -> Handler:
            is_async = inspect.iscoroutinefunction(fn)
            into.append(Method(name, fn, role, tuple(fields), is_async, readonly))
            return fn

        return register

    return method


CALLER_TTL = 5.0  # seconds a token check is reused; revocations on this fleetd act at once
MAX_CACHED_CALLERS = 10_000


class Registry:
    """Method name -> Method, and the request path through them."""

    def __init__(
        self, methods: Iterable[Method], refresh: Callable[[Caller], Optional[Caller]]
    ) -> None:
        """`refresh` runs on the store thread before every request: the caller
        as of now, or None when its token no longer works."""
        self._methods: dict[str, Method] = {}
        self._refresh = refresh
        # token checks, reused for CALLER_TTL seconds unless their credentials change
        self._callers: dict[int, tuple[float, Caller]] = {}
        for m in methods:
            if m.name in self._methods:
                raise ValueError(f"method {m.name!r} is registered twice")
            self._methods[m.name] = m

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods.values())

    def __len__(self) -> int:
        return len(self._methods)

    def get(self, name: str) -> Optional[Method]:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    async def dispatch(
        self, ctx: Context, raw: str | bytes, send: Callable[[str], Awaitable[None]]
    ) -> str:
        """Answer one request frame with a result or an error frame.

        Streaming methods send `{"id", "event"}` frames through ctx.emit first.
        """
        try:
            req = protocol.decode_request(raw)
        except ProtocolError as exc:
            return Invalid(str(exc)).frame(exc.re)

        async def emit(event: Any) -> None:
            await send(protocol.event_frame(req.id, event))

        ctx.emit = emit
        try:
            result = await self.call(ctx, req.method, req.params)
        except ApiError as exc:
            return exc.frame(req.id)
        except StoreClosed:  # the caller check, as fleetd stops
            return Unavailable(STOPPING).frame(req.id)
        return protocol.result_frame(req.id, result)

    def forget(self, event: CredentialsChanged) -> None:
        """Drop cached checks of a revoked token or a changed user (bus subscriber)."""
        for token_id, (_, caller) in list(self._callers.items()):
            if token_id == event.token_id or caller.user_id == event.user_id:
                del self._callers[token_id]

    async def _check(self, ctx: Context) -> Caller:
        """The caller as of now: a token revoked, expired or whose user is gone
        stops working at once, also on connections already open."""
        token_id = ctx.caller.token_id
        cached = self._callers.get(token_id) if token_id is not None else None
        now = time.monotonic()
        if cached is not None and now - cached[0] < CALLER_TTL:
            caller = cached[1]
            if caller.expires_at is None or caller.expires_at > utcnow():
                return dataclasses.replace(caller, address=ctx.caller.address)
        caller = await ctx.state.store.read(self._refresh, ctx.caller)
        if caller is None:
            self._callers.pop(token_id, None)
            raise Unauthorized("this token has been revoked or has expired; run 'fleetctl login'")
        if token_id is not None:
            if len(self._callers) >= MAX_CACHED_CALLERS:
                self._callers.clear()  # crude, and rare: many tokens in a few seconds
            self._callers[token_id] = (now, caller)
        return caller

    async def call(self, ctx: Context, name: str, params: dict) -> Any:
        """Run method `name` for ctx's caller; raises ApiError."""
        m = self._methods.get(name)
        if m is None:
            raise UnknownMethod(f"unknown method {name!r}")
        ctx.caller = await self._check(ctx)
        # messages for people: what is wrong, not which internal method said it
        if not ctx.caller.role.allows(m.role):
            raise Forbidden(
                f"this needs the {m.role.value} role; {ctx.caller.name} is "
                f"{_a(ctx.caller.role.value)}"
            )
        unknown = sorted(set(params) - {f.name for f in m.fields})
        if unknown:
            raise Invalid(f"unknown parameter {unknown[0]!r}")
        try:
            checked = protocol.check_fields(params, m.fields)
        except ProtocolError as exc:
            raise Invalid(f"bad parameter {exc}") from None
        ctx.after = []
        ctx.events = []
        try:
            if m.is_async:
                result = await m.handler(ctx, checked)
            else:
                store = ctx.state.store
                if m.readonly:
                    result = await store.read(m.handler, ctx, checked)
                else:
                    result = await store.publishing(ctx.events, m.handler, ctx, checked)
            if ctx.events and ctx.state.bus is not None:
                # an async method's events were made across transactions: passed on now
                ctx.state.bus.publish(ctx.events, recorded=not m.is_async)
            for hook in ctx.after:  # pushes to agents, once the change is committed
                await hook()
            return result
        except (ApiError, ConnectionClosed):
            raise
        except StoreClosed:  # a request read as fleetd stops: not a failure of fleetd's
            raise Unavailable(STOPPING) from None
        except Exception:
            log.exception("%s failed", name)
            raise Internal(f"{name} failed inside fleetd; see its log") from None


def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role
