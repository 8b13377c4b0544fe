"""Public-key pins: what an agent trusts fleetd by.

A pin is the SHA-256 (hex) of a certificate's SubjectPublicKeyInfo, the
key as DER (what HPKP and curl's --pinnedpubkey hash). A renewal that keeps
the key keeps the pin; a new key needs its pin pushed to agents first.

Pure and stdlib only (the agent runs it on CPython 3.9 without the
`cryptography` package): a small DER walker finds the key in the
certificate, and nothing here parses more of it than that.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence

from .protocol import MAX_PINS

PIN_RE = re.compile(r"[0-9a-f]{64}\Z")
_PEM_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)
# what a new key's pin can be read from before its certificate exists
KEY_BLOCKS = ("CERTIFICATE", "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST", "PUBLIC KEY")
_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]*?)\s*-----END \1-----")


class PinError(ValueError):
    """Not a certificate, or not a pin."""


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The DER element at `pos` (not past `end`): (tag, content start, content end)."""
    if pos + 2 > end:
        raise PinError("truncated DER")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # DER lengths are minimal; 4 bytes cover any certificate (and 0x80,
        # the indefinite form, is BER only)
        if count == 0 or count > 4 or pos + count > end:
            raise PinError("bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise PinError("truncated DER")
    return tag, pos, pos + length


SEQUENCE = 0x30
EXPLICIT_VERSION = 0xA0  # tbsCertificate's [0] version


def spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of an X.509 certificate, as DER.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    OPTIONAL, serialNumber, signature, issuer, validity, subject,
    subjectPublicKeyInfo, ... }, ... }. Raises PinError on anything else.
    """
    der = bytes(cert_der)
    tag, start, end = _tlv(der, 0, len(der))
    if tag != SEQUENCE or end != len(der):
        raise PinError("not a DER certificate")
    tag, pos, tbs_end = _tlv(der, start, end)
    if tag != SEQUENCE:
        raise PinError("not a DER certificate (no tbsCertificate)")
    tag, _, after = _tlv(der, pos, tbs_end)
    if tag == EXPLICIT_VERSION:
        pos = after
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _tlv(der, pos, tbs_end)
    tag, _, key_end = _tlv(der, pos, tbs_end)
    if tag != SEQUENCE:
        raise PinError("not a DER certificate (no subjectPublicKeyInfo)")
    return der[pos:key_end]


def csr_spki_der(csr_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a PKCS#10 certificate request:
    CertificationRequest ::= SEQUENCE { SEQUENCE { version, subject,
    subjectPKInfo, attributes }, ... }. Raises PinError."""
    der = bytes(csr_der)
    tag, start, end = _tlv(der, 0, len(der))
    if tag != SEQUENCE or end != len(der):
        raise PinError("not a DER certificate request")
    tag, pos, info_end = _tlv(der, start, end)
    if tag != SEQUENCE:
        raise PinError("not a DER certificate request (no certificationRequestInfo)")
    for _ in range(2):  # version, subject
        _, _, pos = _tlv(der, pos, info_end)
    tag, _, key_end = _tlv(der, pos, info_end)
    if tag != SEQUENCE:
        raise PinError("not a DER certificate request (no subjectPKInfo)")
    return der[pos:key_end]


def public_key_block(text: str) -> tuple[str, bytes]:
    """The first certificate, certificate request or public key of a PEM
    text: (its PEM block, alone, and the SPKI it holds). A private key is
    passed over: only this block need leave the machine. Raises PinError."""
    private = False
    for match in _BLOCK_RE.finditer(text):
        kind, body = match.group(1), match.group(2)
        if "PRIVATE KEY" in kind:
            private = True
            continue
        if kind not in KEY_BLOCKS:
            continue
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except ValueError:
            raise PinError(f"a damaged PEM {kind.lower()}") from None
        if kind == "CERTIFICATE":
            spki = spki_der(der)
        elif kind == "PUBLIC KEY":
            tag, _, end = _tlv(der, 0, len(der))
            if tag != SEQUENCE or end != len(der):
                raise PinError("not a DER public key")
            spki = der
        else:
            spki = csr_spki_der(der)
        return match.group(0) + "\n", spki
    if private:
        raise PinError(
            "only a private key found: give the certificate, its request (CSR) or the "
            "public key (openssl pkey -in KEY -pubout)"
        )
    raise PinError("no PEM certificate, certificate request or public key found")


def spki_pin(cert_der: bytes) -> str:
    """The pin of a certificate's public key (hex SHA-256 of its SPKI)."""
    return hashlib.sha256(spki_der(cert_der)).hexdigest()


def cert_pin(cert_der: bytes) -> str:
    """SHA-256 of the whole certificate: what agents pinned before key pins."""
    return hashlib.sha256(cert_der).hexdigest()


def pem_certificates(text: str) -> list[bytes]:
    """The certificates of a PEM file, as DER, leaf first; raises PinError."""
    found = []
    for body in _PEM_RE.findall(text):
        try:
            found.append(base64.b64decode("".join(body.split()), validate=True))
        except ValueError:
            raise PinError("a damaged PEM certificate") from None
    if not found:
        raise PinError("no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    return found


def check_pins(pins: Sequence[object]) -> list[str]:
    """A pin set as stored and sent: 1..MAX_PINS distinct 64-hex-digit
    pins, in order; raises PinError naming the first that is not one."""
    if not pins:
        raise PinError("an empty pin set would trust nothing")
    if len(pins) > MAX_PINS:
        raise PinError(f"more than {MAX_PINS} pins")
    out: list[str] = []
    for pin in pins:
        if not isinstance(pin, str) or not PIN_RE.match(pin):
            raise PinError(f"{str(pin)[:80]!r} is not a pin (64 lowercase hex digits)")
        if pin not in out:
            out.append(pin)
    return out


def short(pin: str) -> str:
    """A pin as people read it: its first 16 hex digits."""
    return pin[:16] + "…"


def describe(pins: Iterable[str]) -> str:
    return ", ".join(short(p) for p in pins) or "none"
