"""Enrollment: exchange the operator's enrollment string for an agent token.

The string names fleetd's URL and, with TLS, the SHA-256 of its certificate;
the certificate is read without trusting it, checked against the pin and
saved, and from then on it is the only one the agent trusts.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from typing import Optional

from websockets.asyncio.client import connect

from ..common import protocol
from .state import Identity, State, write_private


class FatalError(Exception):
    """Retrying cannot help (token refused, protocol unsupported): exit non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
