"""fleetd's TLS: the certificate it serves, which it can switch while it
runs, and the rules for rotating to a new key without locking agents out.

Agents pin keys (fleet.common.tlspins). A renewal that keeps the key needs
nothing. A new key goes in three steps: staged (its pin is pushed to every
agent, which stores it beside the served one), then activated once every
pinning agent holds it (fleetd loads its --tls-cert/--tls-key files again
and serves them to new connections), then the old pin is dropped.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...common import tlspins


class TlsError(Exception):
    """A certificate or key that cannot be served, or a switch refused."""


@dataclass(frozen=True)
class Certificate:
    """What fleetd serves: the files, the context made of them, its pins."""

    context: ssl.SSLContext
    pin: str  # of its key
    fingerprint: str  # SHA-256 of the certificate (what agents before key pins check)


def read_pin(cert_file: Path) -> tuple[str, str]:
    """(key pin, certificate SHA-256) of the first certificate of a PEM file."""
    try:
        der = tlspins.pem_certificates(cert_file.read_text())[0]
        return tlspins.spki_pin(der), tlspins.cert_pin(der)
    except OSError as exc:
        raise TlsError(f"cannot read {cert_file}: {exc.strerror}") from None
    except (tlspins.PinError, UnicodeDecodeError) as exc:
        raise TlsError(f"{cert_file}: {exc}") from None


def load(cert_file: Path, key_file: Path) -> Certificate:
    """A server context for the pair; raises TlsError (a key that does not
    match the certificate, an unreadable file)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsError(f"cannot load the TLS certificate or key: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsError(f"cannot read the TLS certificate or key: {exc.strerror or exc}") from None
    pin, fingerprint = read_pin(cert_file)
    return Certificate(ctx, pin, fingerprint)


class ServedTls:
    """The certificate fleetd serves now. The listening context only picks,
    per connection (in the SNI callback, which runs for every handshake),
    the context of the current certificate: switching is one assignment,
    and connections already open keep theirs."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.current = load(cert_file, key_file)
        self.staged: Optional[str] = None  # the pin of the key staged next
        # stage, unstage and activate one at a time: each awaits between its
        # check and its switch, and an unstage in an activate's gap would
        # push agents a pin set without the key then served
        self.changing = asyncio.Lock()
        self.listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.listening.minimum_version = ssl.TLSVersion.TLSv1_2
        # the listening context needs a certificate of its own to start a
        # handshake; the callback then hands the connection the current one
        self.listening.load_cert_chain(cert_file, key_file)
        self.listening.sni_callback = self._pick

    def _pick(self, ssl_object: ssl.SSLObject, server_name: Optional[str], _: object) -> None:
        ssl_object.context = self.current.context
        return None

    @property
    def pin(self) -> str:
        return self.current.pin

    @property
    def fingerprint(self) -> str:
        return self.current.fingerprint

    def pins(self) -> list[str]:
        """What agents are to hold: the served key's pin, then the staged one."""
        return wanted_pins(self.pin, self.staged)

    def switch(self, certificate: Certificate) -> None:
        self.current = certificate


def wanted_pins(served: str, staged: Optional[str]) -> list[str]:
    return [served] + ([staged] if staged and staged != served else [])


@dataclass(frozen=True)
class HostTrust:
    """What fleetd knows of how one host's agent trusts it."""

    name: str
    online: bool
    trust: Optional[str]  # pins | certificate | unpinned | None (never said)
    pins: Optional[list[str]]


def lacking(hosts: Iterable[HostTrust], pin: str, force: bool = False) -> list[HostTrust]:
    """The hosts that would be locked out if fleetd served the key `pin` now:
    those that pin keys without it, pin a certificate, or never said how they
    trust fleetd (an agent older than key pins). With `force`, only the
    online ones count (an offline one must then be enrolled again)."""
    out = []
    for h in hosts:
        if h.trust == "unpinned":
            continue  # it pins nothing
        if h.trust == "pins" and pin in (h.pins or ()):
            continue
        if force and not h.online:
            continue
        out.append(h)
    return out


def why_not(h: HostTrust, pin: str) -> str:
    """Why host `h` does not hold the pin, in words."""
    if h.trust == "pins":
        return f"holds {len(h.pins or [])} pin(s), not this key's"
    if h.trust == "certificate":
        return "pins one certificate (enrolled before key pins; it gets them when it connects)"
    return "never said which keys it trusts (never connected, or its agent is older than key pins)"


def cannot_connect(trust: Optional[str], pins: Optional[list[str]], served: str) -> Optional[str]:
    """Why an agent that trusts fleetd this way cannot connect to the key
    `served`, or None when it can (or fleetd cannot tell)."""
    if trust != "pins" or pins is None or served in pins:
        return None
    return (
        f"cannot connect: fleetd's certificate key (sha256 {tlspins.short(served)}) is not among "
        f"the {len(pins)} pin(s) this agent holds ({tlspins.describe(pins)}); enroll it again, "
        "or serve a key it holds (stage a new key before activating it: fleetctl tls stage)"
    )
