"""fleetd's side of key rotation: who would be locked out by a key, why a
host cannot connect, what fleetd records of its keys at start, and the
served certificate switched for new connections only."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from fleet.common import tlspins
from fleet.server.api import tls as api_tls
from fleet.server.security import tls
from fleet.server.security.tls import HostTrust
from fleet.server.store import models as m
from fleet.server.store.db import open_database

A, B, C = "a" * 64, "b" * 64, "c" * 64


def host(name, online=True, trust="pins", pins=(A,)):
    return HostTrust(name, online, trust, list(pins) if pins is not None else None)


def test_who_would_be_locked_out_by_a_key():
    hosts = [
        host("both", pins=(A, B)),
        host("old-only"),
        host("old-only-offline", online=False),
        host("ca", trust="unpinned", pins=None),
        host("cert", trust="certificate", pins=()),
        host("never", trust=None, pins=None),
        host("never-offline", online=False, trust=None, pins=None),
    ]
    names = [h.name for h in tls.lacking(hosts, B)]
    assert names == ["old-only", "old-only-offline", "cert", "never", "never-offline"]
    # --force: the offline ones do not hold up the switch
    assert [h.name for h in tls.lacking(hosts, B, force=True)] == ["old-only", "cert", "never"]
    assert tls.lacking(hosts[:1], B) == []
    assert "not this key's" in tls.why_not(hosts[1], B)
    assert "before key pins" in tls.why_not(hosts[4], B)
    assert "never said" in tls.why_not(hosts[5], B)


def test_why_a_host_cannot_connect():
    problem = tls.cannot_connect("pins", [A, C], B)
    assert problem is not None and problem.startswith("cannot connect: ")
    assert tlspins.short(B) in problem and "2 pin(s)" in problem and tlspins.short(C) in problem
    assert "enroll it again" in problem
    assert tls.cannot_connect("pins", [A, B], B) is None
    for trust in ("unpinned", "certificate", None):  # fleetd cannot tell: says nothing
        assert tls.cannot_connect(trust, None, B) is None
    assert tls.wanted_pins(A, None) == [A] == tls.wanted_pins(A, A)
    assert tls.wanted_pins(A, B) == [A, B]


def test_host_json_says_what_a_host_holds():
    class Served:
        pin, staged = A, B

    shown = api_tls.host_tls_json("pins", [A], True, Served())  # type: ignore[arg-type]
    assert shown == {
        "trust": "pins",
        "pins": [A],
        "holds_served": True,
        "holds_staged": False,
        "problem": None,
    }
    offline = api_tls.host_tls_json("pins", [C], False, Served())  # type: ignore[arg-type]
    assert offline["holds_served"] is False and offline["problem"].startswith("cannot connect")
    assert api_tls.host_tls_json("pins", [A], True, None) == {"trust": "pins", "pins": [A]}


# -- what fleetd records at start -------------------------------------------------


@pytest.fixture
def database(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    yield database
    database.close()


def keys() -> dict[str, str]:
    return {k.state: k.pin for k in m.TlsKey.select()}


def test_start_records_the_served_key_and_tells_an_unstaged_change(database):
    m.Host.create(name="both", agent_token_hash="h1", tls_trust="pins", tls_pins=[A, B])
    m.Host.create(name="old", agent_token_hash="h2", tls_trust="pins", tls_pins=[A])
    m.Host.create(name="pending")  # never enrolled: not counted
    assert api_tls.started(A) == (None, None, False, [])  # first start: nothing to compare
    assert keys() == {"served": A}
    assert api_tls.started(A) == (None, None, False, [])  # the same key again
    m.TlsKey.create(pin=B, state="staged")
    assert api_tls.started(A) == (B, None, False, [])  # still staged, not yet served
    # restarted with the staged key installed: "old" may not connect
    assert api_tls.started(B) == (None, A, True, ["old"])
    assert keys() == {"served": B}
    assert api_tls.started(C) == (None, B, False, ["both", "old"])  # never staged: warned
    assert keys() == {"served": C}


# -- the served certificate, switched ----------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[Path, Path]]:
    base: Path = tmp_path_factory.mktemp("served")
    out = []
    for n in range(2):
        cert, key = base / f"c{n}.pem", base / f"k{n}.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN=k{n}", "-days", "1",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        out.append((cert, key))
    return out


def test_a_switch_serves_new_connections_the_new_certificate(pairs):
    (cert0, key0), (cert1, key1) = pairs

    async def presented(port: int) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return tlspins.spki_pin(der)

    async def main() -> None:
        served = tls.ServedTls(cert0, key0)
        server = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", 0, ssl=served.listening
        )
        port = server.sockets[0].getsockname()[1]
        try:
            first = served.pin
            assert await presented(port) == first
            served.switch(tls.load(cert1, key1))
            assert served.pin != first
            assert await presented(port) == served.pin
        finally:
            server.close()

    asyncio.run(main())


def test_a_key_that_does_not_match_its_certificate_is_refused(pairs):
    (cert0, _), (_, key1) = pairs
    with pytest.raises(tls.TlsError, match="cannot load"):
        tls.load(cert0, key1)
