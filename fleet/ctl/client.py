"""fleetctl's connection to fleetd: one request/response socket per command.

Every failure leaves here as a Failure carrying the exit status a script
sees, so no command needs to know about sockets.

The server may be a comma-separated list of fleetd replicas' URLs: they are
tried in order until one completes the opening handshake (a refused
connection, a TLS or handshake failure or an HTTP error other than 401 or
429 moves on to the next). Nothing is ever sent twice: once a request has
gone out on a connection, a failure is the command's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import ssl
from collections.abc import Iterator
from typing import Any, Optional

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from ..common.exitcodes import Exit

# fleetd's error codes, and what a script sees for each
EXIT_FOR_CODE = {
    "unauthorized": Exit.AUTH,
    "forbidden": Exit.AUTH,
    "rate_limited": Exit.AUTH,
    "not_found": Exit.NOT_FOUND,
    "bad_request": Exit.USAGE,
    "unavailable": Exit.UNREACHABLE,  # fleetd is stopping
}


class Failure(Exception):
    """What fleetctl prints as its one error line, and the exit status.
    `next_server`: the connection failed before anything was sent, so
    another replica may be tried."""

    def __init__(
        self, message: str, exit: Exit = Exit.ERROR, code: str = "", next_server: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit = exit
        self.code = code
        self.next_server = next_server


def server_list(server: str) -> list[str]:
    """The URLs of a (comma-separated) server setting, in order."""
    return [u.strip() for u in server.split(",") if u.strip()] or [server]


def open_any(
    servers: list[str], path: str, token: Optional[str], cafile: Optional[str], timeout: float
) -> tuple[str, ClientConnection]:
    """The first of `servers` that opens; (its URL, the connection). When
    none does: one server's failure as it is, several joined ("cannot reach
    A: ...; cannot reach B: ..."), with the exit status they share."""
    failures: list[Failure] = []
    for server in servers:
        try:
            return server, open_socket(server, path, token, cafile, timeout)
        except Failure as exc:
            if not exc.next_server:
                raise
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    exits = {f.exit for f in failures}
    raise Failure(
        "; ".join(f.message for f in failures),
        exits.pop() if len(exits) == 1 else Exit.UNREACHABLE,
    )


def ssl_context(url: str, cafile: Optional[str]) -> Optional[ssl.SSLContext]:
    if not url.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


def open_socket(
    server: str, path: str, token: Optional[str], cafile: Optional[str], timeout: float
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = server + path
    try:
        return connect(
            url,
            additional_headers=headers,
            ssl=ssl_context(server, cafile),
            open_timeout=timeout,
            max_size=None,
            compression=None,
            user_agent_header="fleetctl",
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            raise Failure(
                f"{server} refused the token (missing, revoked or expired); run 'fleetctl login'",
                Exit.AUTH,
                "unauthorized",
            ) from None
        if status == 429:
            raise Failure(
                f"{server} is refusing this address for now: too many bad tokens", Exit.AUTH
            ) from None
        raise Failure(
            f"{server}{path} answered HTTP {status}; is this a fleetd?",
            Exit.UNREACHABLE,
            next_server=True,  # a load balancer's 502 or 503: another replica may answer
        ) from None
    except ssl.SSLError as exc:  # before ValueError: certificate errors are both
        raise Failure(
            f"TLS with {server} failed: {exc.reason or exc}", Exit.UNREACHABLE, next_server=True
        ) from None
    except (InvalidURI, ValueError):
        raise Failure(
            f"{server!r} is not a server URL (expected ws://HOST:PORT or wss://...)", Exit.USAGE
        ) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Failure(
            f"cannot reach {server}: {reason}", Exit.UNREACHABLE, next_server=True
        ) from None


class Client:
    """`with Client(...) as c: c.call("hosts.list")`."""

    def __init__(
        self,
        server: str,
        token: Optional[str],
        cafile: Optional[str] = None,
        timeout: float = 10.0,
        path: str = "/ctl",
    ) -> None:
        self.server = server
        self.token = token
        self.cafile = cafile
        self.timeout = timeout
        self.path = path
        self._ids = itertools.count(1)
        self._ws: Optional[ClientConnection] = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Client:
        if self.path == "/ctl" and not self.token:
            raise Failure(
                "not logged in: run 'fleetctl login' (or set FLEET_TOKEN)",
                Exit.AUTH,
                "unauthorized",
            )
        # the first replica that opens; self.server names it from then on
        self.server, ws = open_any(
            server_list(self.server), self.path, self.token, self.cafile, self.timeout
        )
        # entered as a context manager: websockets >= 17.1 warns on a bare connect()
        self._ws = self._stack.enter_context(ws)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ws = None
        self._stack.close()

    def _send(self, method: str, params: dict) -> int:
        assert self._ws is not None, "use Client as a context manager"
        req_id = next(self._ids)
        try:
            self._ws.send(json.dumps({"id": req_id, "method": method, "params": params}))
        except ConnectionClosed:
            raise Failure(f"{self.server} closed the connection", Exit.UNREACHABLE) from None
        return req_id

    def _recv(self, timeout: Optional[float]) -> dict:
        assert self._ws is not None
        try:
            return json.loads(self._ws.recv(timeout=timeout))
        except TimeoutError:
            raise Failure(
                f"{self.server} did not answer within {timeout:.0f} s", Exit.UNREACHABLE
            ) from None
        except ConnectionClosed:
            raise Failure(f"{self.server} closed the connection", Exit.UNREACHABLE) from None

    @staticmethod
    def _raise(error: dict) -> None:
        code = error.get("code", "")
        raise Failure(
            error.get("message", "unknown error"), EXIT_FOR_CODE.get(code, Exit.ERROR), code
        )

    def call(self, method: str, **params: Any) -> Any:
        req_id = self._send(method, {k: v for k, v in params.items() if v is not None})
        while True:
            frame = self._recv(self.timeout * 6)
            if frame.get("id") not in (req_id, None):
                continue
            if "error" in frame:
                self._raise(frame["error"])
            if "result" in frame:
                return frame["result"]

    def stream(self, method: str, **params: Any) -> Iterator[tuple[str, Any]]:
        """Yield ("event", e) for each event frame, then ("result", r)."""
        req_id = self._send(method, {k: v for k, v in params.items() if v is not None})
        while True:
            frame = self._recv(None)
            if frame.get("id") not in (req_id, None):
                continue
            if "error" in frame:
                self._raise(frame["error"])
            if "event" in frame:
                yield "event", frame["event"]
            elif "result" in frame:
                yield "result", frame["result"]
                return
