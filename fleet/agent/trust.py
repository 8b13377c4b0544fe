"""How the agent knows it talks to its fleetd: public-key pins.

An agent enrolled with a pinned fleetd trusts exactly the keys in its pin
set (pins.json), whatever certificate carries them: a renewal that keeps
the key changes nothing, and a new key works once fleetd has pushed its pin
(staged before it is served). An agent enrolled before key pins holds the
SHA-256 of one certificate instead (agent.json's tls_sha256) until fleetd
sends it the key pins on its first connection. An agent enrolled without a
pin trusts the system's CAs.

Python's ssl cannot check a key pin during the handshake, so a pinning
agent handshakes without verification and checks the certificate itself,
right after the TLS handshake and BEFORE the HTTP upgrade request, which
carries its token: a server without the key never sees the token.
"""

from __future__ import annotations

import ssl
from typing import Any, Optional

from websockets.asyncio.client import ClientConnection

from ..common import tlspins

# what a certificate the agent cannot read (or none) counts as: never a pin,
# so no pin set can match it
UNREADABLE = "unreadable"


class PinMismatch(Exception):
    """fleetd presented a certificate whose key this agent does not pin: a
    definite refusal (the agent backs off long, and says why)."""

    def __init__(
        self, url: str, presented: str, pins: list[str], cert_sha256: str, pinned_cert: str = ""
    ) -> None:
        self.url = url
        self.presented = presented  # the key pin of the certificate presented
        self.pins = pins  # the key pins held ([]: a certificate pin, from an older enrollment)
        self.cert_sha256 = cert_sha256  # of the certificate presented
        if pins:
            held = (
                f"is not among the {len(pins)} pin(s) this agent holds ({tlspins.describe(pins)})"
            )
        else:
            held = (
                f"is in a certificate (sha256 {tlspins.short(cert_sha256)}) other than the one "
                f"this agent pinned at enrollment (sha256 {tlspins.short(pinned_cert)})"
            )
        super().__init__(
            f"{url} presented a certificate whose key (sha256 {tlspins.short(presented)}) "
            f"{held}: refusing to send it anything"
        )


class Trust:
    """What the agent accepts of fleetd's certificate: key pins, or (enrolled
    before them) one certificate's SHA-256, or neither (the system's CAs)."""

    def __init__(self, pins: Optional[list[str]] = None, cert_sha256: Optional[str] = None) -> None:
        self.pins = list(pins) if pins else None
        self.cert_sha256 = cert_sha256.lower() if cert_sha256 and not pins else None

    @property
    def pinned(self) -> bool:
        return bool(self.pins or self.cert_sha256)

    def held(self) -> list[str]:
        """The pins as the agent reports them (hello): [] for a certificate pin."""
        return list(self.pins or [])

    def ssl_context(self) -> ssl.SSLContext:
        """No verification when pinning (check() is the verification, done
        before anything is sent); the system's CAs otherwise."""
        if not self.pinned:
            return ssl.create_default_context()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def check(self, url: str, cert_der: Optional[bytes]) -> Optional[str]:
        """The presented certificate's key pin when it is trusted; raises
        PinMismatch when not. None: not pinning (the CAs verified it)."""
        if not self.pinned:
            return None
        if not cert_der:
            raise PinMismatch(url, UNREADABLE, self.held(), "", self.cert_sha256 or "")
        try:
            presented = tlspins.spki_pin(cert_der)
        except tlspins.PinError:
            presented = UNREADABLE  # a certificate we cannot read holds no key we pin
        whole = tlspins.cert_pin(cert_der)
        if self.pins is not None:
            if presented in self.pins:
                return presented
        elif whole == self.cert_sha256:
            return presented
        raise PinMismatch(url, presented, self.pins or [], whole, self.cert_sha256 or "")


def pinned_connection(trust: Trust, url: str, seen: Optional[dict[str, Any]] = None) -> type:
    """A websockets ClientConnection class that checks fleetd's certificate
    against `trust` after the TLS handshake and before its opening handshake
    (which carries the token) is sent. `seen` gets the presented pin and
    certificate (DER) once checked."""

    class PinnedConnection(ClientConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            ssl_object = self.transport.get_extra_info("ssl_object")
            if ssl_object is None and trust.pinned:  # no TLS at all: nothing to check
                raise PinMismatch(url, UNREADABLE, trust.held(), "", trust.cert_sha256 or "")
            if ssl_object is not None:
                der = ssl_object.getpeercert(binary_form=True)
                pin = trust.check(url, der)
                if seen is not None:
                    seen.update(pin=pin, der=der)
            await super().handshake(*args, **kwargs)

    return PinnedConnection
