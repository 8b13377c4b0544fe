"""fleet.common.tlspins: the key pin of a certificate, as openssl computes it,
from certificates the openssl binary makes (RSA, EC, Ed25519, with and
without extensions); hostile DER only ever raises PinError."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from fleet.common import tlspins
from fleet.common.tlspins import PinError


def openssl(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["openssl", *args], input=input, check=True, capture_output=True, timeout=60
    ).stdout


KEYS = {
    "rsa": ("-newkey", "rsa:2048"),
    "ec": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "ed25519": ("-newkey", "ed25519"),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, dict]:
    """A self-signed certificate per key type, its DER, and the pin openssl
    gives its public key (x509 -pubkey | pkey -pubin -outform DER | sha256)."""
    base: Path = tmp_path_factory.mktemp("pins")
    out = {}
    for name, newkey in KEYS.items():
        cert, key = base / f"{name}.pem", base / f"{name}.key"
        openssl(
            "req", "-x509", *newkey, "-nodes", "-subj", f"/CN={name}", "-days", "1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        )  # fmt: skip
        pub = openssl("x509", "-in", str(cert), "-pubkey", "-noout")
        spki = openssl("pkey", "-pubin", "-outform", "DER", input=pub)
        der = openssl("x509", "-in", str(cert), "-outform", "DER")
        out[name] = {
            "pem": cert.read_text(),
            "der": der,
            "key": key,
            "pin": hashlib.sha256(spki).hexdigest(),
        }
    return out


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_the_pin_is_the_sha256_of_the_key_openssl_extracts(certs, kind):
    c = certs[kind]
    assert tlspins.spki_pin(c["der"]) == c["pin"]
    assert tlspins.cert_pin(c["der"]) == hashlib.sha256(c["der"]).hexdigest()
    assert tlspins.pem_certificates(c["pem"]) == [c["der"]]


def test_a_renewal_with_the_same_key_keeps_the_pin(certs, tmp_path):
    # a new certificate (another serial, subject and validity) for the same key
    renewed = tmp_path / "renewed.pem"
    openssl(
        "req", "-x509", "-new", "-key", str(certs["ec"]["key"]), "-subj", "/CN=renewed",
        "-days", "90", "-out", str(renewed),
    )  # fmt: skip
    der = tlspins.pem_certificates(renewed.read_text())[0]
    assert der != certs["ec"]["der"]
    assert tlspins.spki_pin(der) == certs["ec"]["pin"]
    assert tlspins.cert_pin(der) != tlspins.cert_pin(certs["ec"]["der"])


def test_a_chain_is_read_leaf_first(certs):
    chain = certs["ec"]["pem"] + "\n" + certs["rsa"]["pem"]
    ders = tlspins.pem_certificates("junk before\n" + chain)
    assert ders == [certs["ec"]["der"], certs["rsa"]["der"]]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
    ],
)
def test_text_without_a_certificate_is_refused(text):
    with pytest.raises(PinError):
        tlspins.pem_certificates(text)


def test_every_truncation_and_many_corruptions_raise_pin_error_only(certs):
    der = certs["ec"]["der"]
    for cut in range(len(der)):
        with pytest.raises(PinError):
            tlspins.spki_der(der[:cut])
    rng = random.Random(12)
    for _ in range(2000):
        mutated = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            spki = tlspins.spki_der(bytes(mutated))
        except PinError:
            continue
        assert spki[0] == 0x30 and len(spki) < len(der)  # some element, within the input


@pytest.mark.parametrize(
    "der",
    [
        b"\x30\x84\xff\xff\xff\xff",  # a length far past the end
        b"\x30\x80\x00\x00",  # BER's indefinite length
        b"\x30\x89" + b"\x01" * 9,  # a length of 9 bytes
        b"\x02\x01\x00",  # not a SEQUENCE
        b"\x30\x03\x02\x01\x00",  # a SEQUENCE without tbsCertificate
        b"\x30\x00" + b"\x00",  # bytes after the certificate
    ],
)
def test_hostile_der_is_refused(der):
    with pytest.raises(PinError):
        tlspins.spki_der(der)


def test_check_pins():
    a, b = "a" * 64, "b" * 64
    assert tlspins.check_pins([a, b, a]) == [a, b]
    for bad in ([], ["A" * 64], ["a" * 63], [a, 5], ["x" * 64]):
        with pytest.raises(PinError):
            tlspins.check_pins(bad)
    with pytest.raises(PinError, match="more than 8"):
        tlspins.check_pins([f"{i:064x}" for i in range(9)])
    assert tlspins.short(a) == "a" * 16 + "…"
    assert tlspins.describe([]) == "none"


def test_a_new_keys_pin_from_its_certificate_request_or_public_key(certs, tmp_path):
    key = certs["rsa"]["key"]
    csr = openssl("req", "-new", "-key", str(key), "-subj", "/CN=next").decode()
    public = openssl("pkey", "-in", str(key), "-pubout").decode()
    private = key.read_text()
    cert = certs["rsa"]["pem"]
    for text in (cert, csr, public, private + cert, "junk\n" + private + public):
        block, spki = tlspins.public_key_block(text)
        assert hashlib.sha256(spki).hexdigest() == certs["rsa"]["pin"]
        assert "PRIVATE" not in block and block.count("-----BEGIN") == 1
        assert tlspins.public_key_block(block)[1] == spki  # what fleetctl sends reads alike
    with pytest.raises(PinError, match="only a private key"):
        tlspins.public_key_block(private)
    with pytest.raises(PinError, match="no PEM certificate"):
        tlspins.public_key_block("nothing here")
    with pytest.raises(PinError):
        tlspins.public_key_block("-----BEGIN PUBLIC KEY-----\nAgEA\n-----END PUBLIC KEY-----\n")
