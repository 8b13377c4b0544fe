"""A lean websocket client for the simulated agents of fleet_scale.py.

Why not websockets' own client: the benchmark runs fleetd, the bare server and
thousands of simulated agents on the same two cores, so whatever the load
generator burns per connect is taken from the server being measured. The
websockets client costs about 1 ms of CPU per connect (handshake objects,
header parsing, a keepalive task, a proxy lookup), as much as the server it
talks to: with it, neither the bare server nor fleetd can be driven at the
rates the targets name. Real agents are separate processes, one connection
each, so their cost never lands on fleetd's cores like this.

This client speaks RFC 6455 as a client must (a real upgrade request checked
against Sec-WebSocket-Accept, masked frames, ping -> pong, close -> close,
fragments, 16- and 64-bit lengths) and no more: no extensions, no keepalive
of its own (fleetd pings; heartbeats are the simulator's), text frames only.
Masking uses websockets' C `apply_mask`, so it stays cheap at log-ingest rates.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import os
import random
import struct
from typing import Optional
from urllib.parse import urlsplit

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback websockets ships
    from websockets.utils import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class ConnectionClosed(Exception):
    pass


class HandshakeError(ConnectionClosed):
    pass


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame: masked, as RFC 6455 5.3 requires of clients."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = random.getrandbits(32).to_bytes(4, "big")
    return head + mask + apply_mask(payload, mask)


class SimLink(asyncio.Protocol):
    """One client connection; `send`, `recv` and `async for` as websockets has them."""

    def __init__(self, host: str, path: str, headers: dict[str, str], max_size: int) -> None:
        self.key = base64.b64encode(os.urandom(16))
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.max_size = max_size
        self.transport: Optional[asyncio.Transport] = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.buf = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.inbox: collections.deque = collections.deque()
        self.waiter: Optional[asyncio.Future] = None
        self.writable: Optional[asyncio.Future] = None
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 16384:
                    self._fail(HandshakeError("response headers too long"))
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[: end + 4]
            err = self._check_upgrade(head)
            if err:
                self._fail(HandshakeError(err))
                return
            self.upgraded = True
            if not self.opened.done():
                self.opened.set_result(None)
        self._parse()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionClosed(f"closed during the handshake: {exc!r}"))
        self._wake()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # -- the API the simulator uses --------------------------------------------------

    async def send(self, message: str) -> None:
        if self.writable is not None and not self.writable.done():
            await self.writable
        if self.closed or self.transport.is_closing():
            raise ConnectionClosed("send on a closed link")
        self.transport.write(encode_frame(OP_TEXT, message.encode()))

    async def recv(self) -> str:
        while not self.inbox:
            if self.closed:
                raise ConnectionClosed("link closed")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.inbox.popleft()

    def __aiter__(self) -> SimLink:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # -- internals -------------------------------------------------------------------

    def _check_upgrade(self, head: str) -> Optional[str]:
        status, _, rest = head.partition("\r\n")
        parts = status.split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            return f"server refused the upgrade: {status}"
        fields = {}
        for line in rest.split("\r\n"):
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        want = base64.b64encode(hashlib.sha1(self.key + GUID).digest()).decode()
        if fields.get("sec-websocket-accept") != want:
            return "bad Sec-WebSocket-Accept"
        return None

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                (n,) = struct.unpack_from("!H", buf, 2)
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                (n,) = struct.unpack_from("!Q", buf, 2)
                pos = 10
            mask = None
            if b1 & 0x80:  # servers must not mask; tolerated, not expected
                if len(buf) < pos + 4:
                    return
                mask = bytes(buf[pos : pos + 4])
                pos += 4
            if n > self.max_size:
                self._fail(ConnectionClosed(f"frame of {n} bytes"))
                return
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            if mask is not None:
                payload = apply_mask(payload, mask)
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
            if self.closed:
                return

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            # echo the code, then let the server close the TCP connection
            self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
            self.closed = True
            self.transport.close()
            self._wake()
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            self.fragments.append(payload)
            if fin:
                data = b"".join(self.fragments)
                self.fragments = []
                self.inbox.append(data.decode() if opcode != OP_BINARY else data)
                self._wake()
        else:
            self._fail(ConnectionClosed(f"unknown opcode {opcode}"))

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        self._wake()


async def connect(
    url: str,
    headers: Optional[dict[str, str]] = None,
    open_timeout: float = 30,
    max_size: int = 1 << 22,
) -> SimLink:
    """Dial ws://host:port/path and complete the upgrade; raises ConnectionClosed or OSError."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError("the simulator speaks ws:// only")
    loop = asyncio.get_running_loop()
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    netloc = parts.netloc
    link = SimLink(netloc, parts.path or "/", headers or {}, max_size)
    await asyncio.wait_for(loop.create_connection(lambda: link, host, port), open_timeout)
    try:
        await asyncio.wait_for(asyncio.shield(link.opened), open_timeout)
    except BaseException:
        link.transport.abort()
        raise
    return link
