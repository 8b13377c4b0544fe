"""The agent's trust in fleetd: its pin set on disk (atomic, a damaged file a
clear error), Trust.check, the long backoff after a refusal, tls.pins, and,
against a real TLS server, that a key it does not pin never sees its token."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from fleet.agent import handlers
from fleet.agent.link import REFUSED_MAX, REFUSED_MIN, Agent, refused_backoff
from fleet.agent.state import Identity, State, StateError
from fleet.agent.trust import PinMismatch, Trust
from fleet.common import protocol, tlspins

A, B, C = "a" * 64, "b" * 64, "c" * 64
TOKEN = "agent_" + "S3cretT0ken" * 4


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> dict:
    base: Path = tmp_path_factory.mktemp("trust")
    pem, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-subj", "/CN=fleetd", "-days", "1", "-keyout", str(key), "-out", str(pem),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    der = tlspins.pem_certificates(pem.read_text())[0]
    return {"pem": pem, "key": key, "der": der, "pin": tlspins.spki_pin(der)}


# -- pins.json -------------------------------------------------------------------


def test_pins_round_trip_atomically_and_privately(tmp_path):
    state = State(tmp_path / "state")
    assert state.load_pins() is None  # none yet: not pinning keys
    state.save_pins([A, B, A], "2026-01-01T00:00:00Z")
    assert state.load_pins() == [A, B]
    assert stat.S_IMODE(state.pins_path.stat().st_mode) == 0o600
    assert [p.name for p in state.root.iterdir()] == ["pins.json"]  # no temporary left
    state.save_pins([B], "2026-01-02T00:00:00Z")
    assert state.load_pins() == [B]


@pytest.mark.parametrize(
    "text",
    ['{"pins": []}', '{"pins": ["nothex"]}', "[1, 2]", '{"pins": ["' + A + '"', ""],
)
def test_a_damaged_pins_file_is_a_clear_error(tmp_path, text):
    state = State(tmp_path)
    state.pins_path.write_text(text)
    with pytest.raises(StateError, match="pins.json"):
        state.load_pins()


def test_a_bad_pin_set_is_never_written(tmp_path):
    state = State(tmp_path)
    state.save_pins([A], "t")
    with pytest.raises(tlspins.PinError):
        state.save_pins([], "t")
    assert state.load_pins() == [A]


# -- Trust ------------------------------------------------------------------------


def test_trust_by_key_pins(cert):
    assert Trust([A, cert["pin"]]).check("wss://f", cert["der"]) == cert["pin"]
    with pytest.raises(PinMismatch) as refused:
        Trust([A, B]).check("wss://f", cert["der"])
    message = str(refused.value)
    assert tlspins.short(cert["pin"]) in message and "2 pin(s)" in message
    assert tlspins.short(A) in message and tlspins.short(B) in message
    assert refused.value.presented == cert["pin"]


def test_trust_by_the_certificate_pin_of_an_older_enrollment(cert):
    whole = tlspins.cert_pin(cert["der"])
    trust = Trust(None, whole.upper())
    assert trust.pinned and trust.held() == []
    assert trust.check("wss://f", cert["der"]) == cert["pin"]  # its key pin, learnt
    with pytest.raises(PinMismatch) as refused:
        Trust(None, C).check("wss://f", cert["der"])
    assert "other than the one this agent pinned at enrollment" in str(refused.value)
    assert tlspins.short(C) in str(refused.value) and tlspins.short(whole) in str(refused.value)
    # key pins, once held, decide alone
    with pytest.raises(PinMismatch):
        Trust([A], whole).check("wss://f", cert["der"])


def test_no_pin_trusts_the_system_cas():
    trust = Trust()
    assert not trust.pinned and trust.check("wss://f", b"whatever") is None
    assert trust.ssl_context().verify_mode == ssl.CERT_REQUIRED
    assert Trust([A]).ssl_context().verify_mode == ssl.CERT_NONE  # check() verifies


def test_refused_backoff_grows_from_a_minute_to_an_hour():
    for n in range(12):
        ceiling = min(REFUSED_MAX, REFUSED_MIN * 2**n)
        for _ in range(20):
            assert ceiling / 2 <= refused_backoff(n) <= ceiling
    assert refused_backoff(30) <= REFUSED_MAX


# -- tls.pins -----------------------------------------------------------------------


class FakeWS:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


@pytest.fixture
def agent(tmp_path):
    a = Agent(State(tmp_path), Identity("wss://127.0.0.1:1", 1, "h1", TOKEN))
    a.ws = FakeWS()
    yield a
    a.spool.close()


def deliver_pins(agent: Agent, pins: list) -> dict:
    raw = json.dumps({"v": 1, "type": "tls.pins", "data": {"pins": pins}})
    asyncio.run(handlers.dispatch(agent, protocol.decode(raw, expect="server")))
    (ack,) = agent.ws.sent
    agent.ws.sent.clear()
    assert ack["type"] == "tls.ack"
    protocol.check_fields(ack["data"], protocol.MESSAGES["tls.ack"].fields)
    return ack["data"]


def test_tls_pins_are_stored_and_acknowledged(agent):
    agent.tls_pin = A
    assert deliver_pins(agent, [A, B])["pins"] == [A, B]
    assert agent.state.load_pins() == [A, B]
    assert deliver_pins(agent, [A])["pins"] == [A]  # the staged key dropped


def test_a_pin_set_without_the_key_of_this_link_is_refused(agent, caplog):
    caplog.set_level(logging.WARNING, logger="fleet-agent")
    agent.tls_pin = A
    agent.state.save_pins([A], "t")
    ack = deliver_pins(agent, [B, C])
    assert ack["pins"] == [A] and "lacks the key" in ack["error"]
    assert agent.state.load_pins() == [A]
    agent.tls_pin = None  # an agent that trusts the system's CAs starts pinning nothing
    assert "system's CAs" in deliver_pins(agent, [A])["error"]
    ack = deliver_pins(agent, ["not-a-pin"])
    assert ack["pins"] == [A] and "not a pin" in ack["error"]


# -- a key it does not pin never sees the token -------------------------------------


def serve_recording(cert: dict, received: list[bytes]):
    """A TLS server with `cert` that records what a client sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert["pem"], cert["key"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await asyncio.wait_for(reader.read(65536), 10))
        except (ConnectionError, ssl.SSLError):
            received.append(b"")
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


@pytest.mark.parametrize("pinned", [False, True])
def test_the_token_goes_only_to_a_pinned_key(tmp_path, cert, pinned):
    async def main() -> list[bytes]:
        received: list[bytes] = []
        server = await serve_recording(cert, received)
        port = server.sockets[0].getsockname()[1]
        state = State(tmp_path)
        state.save_pins([cert["pin"] if pinned else A, B], "t")
        agent = Agent(state, Identity(f"wss://127.0.0.1:{port}", 1, "h1", TOKEN))
        try:
            with pytest.raises(PinMismatch if not pinned else Exception) as ended:
                await agent.session()
            if not pinned:
                assert ended.value.presented == cert["pin"]
            async with asyncio.timeout(10):
                while not received:
                    await asyncio.sleep(0.01)  # the handler records once the client is gone
        finally:
            agent.spool.close()
            server.close()
        return received

    (got,) = asyncio.run(main())
    if pinned:  # the check lets the upgrade go: the token is in it
        assert got.startswith(b"GET /agent ") and TOKEN.encode() in got
    else:
        assert got == b""
