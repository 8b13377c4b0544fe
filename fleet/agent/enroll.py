"""Enrollment: exchange the operator's enrollment string for an agent token.

The string names fleetd's URL (with replicas, every replica's) and, with
TLS, the pins of the keys fleetd serves and has staged (and, for agents
from before key pins, the SHA-256 of its certificate). The certificate
fleetd presents is checked against them before the token is sent (see
trust.py); the pins are saved, and from then on they are what the agent
trusts, whichever replica it dials. A replica that cannot be reached (its
connection refused, its handshake failed) is passed over for the next; one
that was sent the token is not: the token is used up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Optional

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake

from ..common import protocol, tlspins
from ..common.timefmt import now_iso
from .servers import accept_urls
from .state import Identity, State, write_private
from .trust import PinMismatch, Trust, pinned_connection

log = logging.getLogger("fleet-agent")


class FatalError(Exception):
    """Retrying cannot help (token refused, protocol unsupported): exit non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def _open(url: str, trust: Trust, seen: dict[str, Any]) -> ClientConnection:
    ssl_ctx = trust.ssl_context() if url.startswith("wss://") else None
    return await connect(
        url + "/enroll",
        ssl=ssl_ctx,
        open_timeout=15,
        compression=None,
        create_connection=pinned_connection(trust, url, seen),
    )


async def enroll(state: State, enrollment: str, hostname: Optional[str] = None) -> Identity:
    """Exchange the enrollment string for an agent token and save the identity."""
    doc = protocol.parse_enrollment(enrollment)
    pin = doc.get("sha256")
    try:
        pins = tlspins.check_pins(doc["pins"]) if doc.get("pins") else None
    except tlspins.PinError as exc:
        raise protocol.ProtocolError(f"the enrollment string's pins: {exc}") from None
    first = doc["url"].rstrip("/")
    urls, dropped = accept_urls(protocol.enrollment_urls(doc), protocol.url_scheme(first))
    for url in dropped:  # the scheme of the first URL is the agent's from now on
        log.warning("not dialling %r: not a %s:// URL", url, protocol.url_scheme(first))
    urls = urls or [first]
    trust = Trust(pins, pin)
    seen: dict[str, Any] = {}
    ws: Optional[ClientConnection] = None
    for i, url in enumerate(urls):
        try:
            ws = await _open(url, trust, seen)
            break
        except PinMismatch as exc:
            raise FatalError(str(exc), 3) from None
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
            if i == len(urls) - 1:
                raise  # the last one: cli says why it cannot be reached
            log.warning("cannot reach %s (%s); trying %s", url, exc, urls[i + 1])
    assert ws is not None
    async with ws:
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
    # it dials first the replica it enrolled with (agent.json; an older agent
    # rolled back to reads that alone), then the others in turn
    identity = Identity(url, data["host_id"], data["host_name"], data["agent_token"], pin, hostname)
    if seen.get("pin"):
        # the pins the string named; from a string of before key pins (a
        # certificate's SHA-256), the key of that certificate
        state.save_pins(pins or [seen["pin"]], now_iso())
        write_private(state.cert_path, ssl.DER_cert_to_PEM_cert(seen["der"]))
    elif state.pins_path.exists():  # enrolled again, now without a pin
        state.pins_path.unlink()
    if len(urls) > 1:
        state.save_servers(urls, now_iso())
    elif state.servers_path.exists():  # enrolled again, with one fleetd
        state.servers_path.unlink()
    state.clear_refusal()
    state.save_identity(identity)
    return identity
