"""Hostile clients against a real fleetd: every one gets an error reply or a
clean close (never 1011, never a traceback in fleetd's log), and fleetd keeps
answering everybody else.

The cases: JSON nested 1,000 deep, lone surrogates, integers beyond 64 bits,
idle and too many unauthenticated connections, oversized unauthenticated
frames (and fleetd's memory meanwhile), and a SIGTERM while the store is
flooded with calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleet.common import protocol
from fleet.common.timefmt import now_iso

DEEP = "[" * 1000 + "]" * 1000


def hello(**extra):
    data = {
        "protocol_version": protocol.PROTOCOL_VERSION,
        "agent_version": "9.9.9-test",
        "restic_version": "0.17.3",
        "hostname": "hostile-box",
        "os": "linux",
        "arch": "x86_64",
        **extra,
    }
    return json.dumps({"v": 1, "type": "hello", "id": "h1", "data": data})


PUSHES = ("config.update", "schedule.set", "command.run", "command.cancel", "ack")


def recv_reply(ws, timeout=10):
    """The next frame that answers us, skipping fleetd's own pushes to agents."""
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        if frame.get("type") not in PUSHES:
            return frame


def closed_code(ws, timeout=10):
    """Wait (with a deadline) for fleetd to close; the close code it sent."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as info:  # noqa: PT012 - drain until the close
        while True:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    rcvd = info.value.rcvd
    return rcvd.code if rcvd is not None else None


def agent_token(fleet, fx):
    host = fx.uniq("hostile")
    token = protocol.parse_enrollment(fleet.ctl_json("enroll", host)["enrollment"])["token"]
    frame = {"v": 1, "type": "enroll", "id": "e1", "data": {"token": token, "hostname": "h"}}
    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send(json.dumps(frame))
        reply = recv_reply(ws)
    assert reply["type"] == "enrolled", reply
    return reply["data"]["agent_token"]


def ctl_raw(fleet, fx, raw):
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
        ws.send(raw)
        reply = json.loads(ws.recv(timeout=10))
        fx.rpc_on(ws, "hosts.list")  # the connection still serves
    return reply


def login_raw(fleet, fx, raw):
    with fx.ws_connect(fleet.url, "/login") as ws:
        ws.send(raw)
        return json.loads(ws.recv(timeout=10))


def enroll_raw(fleet, fx, raw):
    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send(raw)
        reply = recv_reply(ws)
        assert closed_code(ws) == 1000
    return reply


def assert_healthy(fleet):
    started = time.monotonic()
    assert isinstance(fleet.rpc("hosts.list"), list)
    assert time.monotonic() - started < 2.0
    assert "Traceback" not in fleet.fleetd.log()


# -- 1. nesting ------------------------------------------------------------------


def test_deep_json_on_every_endpoint(fleet, fx):
    deep_request = '{"id": 5, "method": "hosts.list", "params": {"a": ' + DEEP + "}}"
    reply = ctl_raw(fleet, fx, deep_request)
    assert reply["error"]["code"] == "bad_request" and "nested deeper" in reply["error"]["message"]
    reply = ctl_raw(fleet, fx, DEEP)
    assert reply["error"]["code"] == "bad_request"

    reply = login_raw(fleet, fx, deep_request.replace("hosts.list", "auth.login"))
    assert reply["error"]["code"] == "bad_request" and "nested deeper" in reply["error"]["message"]

    reply = enroll_raw(fleet, fx, '{"v":1,"type":"enroll","data":' + DEEP + "}")
    assert reply["type"] == "error" and "nested deeper" in reply["data"]["message"]

    token = agent_token(fleet, fx)
    with fx.ws_connect(fleet.url, "/agent", token) as ws:  # instead of hello
        ws.send(DEEP)
        assert recv_reply(ws)["data"]["code"] == "bad_frame"
        assert closed_code(ws) == 1008
    with fx.ws_connect(fleet.url, "/agent", token) as ws:  # within a session
        ws.send(hello())
        assert recv_reply(ws)["type"] == "welcome"
        ws.send('{"v":1,"type":"job.log","seq":1,"data":{"payload":' + DEEP + "}}")
        reply = recv_reply(ws)
        assert reply["type"] == "error" and "nested deeper" in reply["data"]["message"]
        ws.send(json.dumps({"v": 1, "type": "heartbeat", "data": {"sent_at": now_iso()}}))
    assert_healthy(fleet)


# -- 2. lone surrogates -------------------------------------------------------------


def test_lone_surrogates_on_every_endpoint(fleet, fx):
    reply = ctl_raw(fleet, fx, '{"id": "\\ud800", "method": "hosts.list"}')
    assert reply["id"] is None and reply["error"]["code"] == "bad_request"
    reply = ctl_raw(fleet, fx, '{"id": 3, "method": "hosts.show", "params": {"host": "a\\udfff"}}')
    assert reply["id"] == 3 and "surrogate" in reply["error"]["message"]
    reply = ctl_raw(fleet, fx, '{"id": 4, "method": "hosts.list", "params": {"\\udc00": 1}}')
    assert reply["id"] == 4 and reply["error"]["code"] == "bad_request"

    reply = login_raw(
        fleet,
        fx,
        '{"id": 1, "method": "auth.login", "params": {"user": "x", "password": "\\ud800"}}',
    )
    assert reply["error"]["code"] == "bad_request" and "surrogate" in reply["error"]["message"]

    reply = enroll_raw(
        fleet, fx, '{"v":1,"type":"enroll","id":"e","data":{"token":"t","hostname":"\\ud800"}}'
    )
    assert reply["type"] == "error" and reply["data"]["re"] == "e"

    token = agent_token(fleet, fx)
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello(hostname="\\ud800").replace("\\\\ud800", "\\ud800"))
        assert recv_reply(ws)["type"] == "error"
        assert closed_code(ws) == 1008
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello())
        assert recv_reply(ws)["type"] == "welcome"
        line = '{"job_id":1,"seq":1,"ts":"t","stream":"stdout","payload":"bad \\udcff line"}'
        ws.send('{"v":1,"type":"job.log","id":"l1","seq":1,"data":' + line + "}")
        reply = recv_reply(ws)
        assert reply["type"] == "error" and reply["data"]["re"] == "l1"
        assert "surrogate" in reply["data"]["message"]
    assert_healthy(fleet)


def test_a_refused_report_does_not_wedge_the_agents_stream(fleet, fx):
    """A reliable frame fleetd cannot decode (a lone surrogate in a log line)
    gets an error reply and is passed in seq order: the frames after it are
    applied and acked, instead of the agent resending the bad one for ever."""
    token = agent_token(fleet, fx)
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello())
        assert recv_reply(ws)["type"] == "welcome"
        line = '{"job_id":1,"seq":1,"ts":"t","stream":"stdout","payload":"bad \\udcff line"}'
        ws.send('{"v":1,"type":"job.log","id":"l1","seq":1,"data":' + line + "}")
        ws.send(json.dumps({"v": 1, "type": "repo.locks", "seq": 2, "data": {"count": 3}}))
        acked, error = 0, None
        deadline = time.monotonic() + 10
        while acked < 2 and time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=10))
            if frame["type"] == "ack":
                acked = frame["data"]["seq"]
            elif frame["type"] == "error":
                error = frame
        assert error is not None and error["data"]["re"] == "l1", error
        assert acked == 2
    # the frame after the refused one was applied
    hosts = fleet.ctl_json("hosts", "list")
    assert any(h["repo_locks"] == 3 for h in hosts)
    assert "refused and skipped" in fleet.fleetd.log()
    assert_healthy(fleet)


# -- 3 and 4. integers ---------------------------------------------------------------


def test_integers_beyond_64_bits(fleet, fx):
    for req_id in (2**63, 2**64, -1, -(2**63)):
        reply = ctl_raw(fleet, fx, json.dumps({"id": req_id, "method": "hosts.list"}))
        assert reply["id"] is None and reply["error"]["code"] == "bad_request", reply
    reply = ctl_raw(
        fleet, fx, json.dumps({"id": 1, "method": "jobs.show", "params": {"id": 2**63}})
    )
    assert reply["error"]["code"] == "bad_request"
    reply = ctl_raw(
        fleet, fx, '{"id": 1, "method": "jobs.show", "params": {"id": 1' + "0" * 5000 + "}}"
    )
    assert reply["error"]["code"] == "bad_request"

    token = agent_token(fleet, fx)
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello(spool_seq=2**63))
        assert recv_reply(ws)["type"] == "error"
        assert closed_code(ws) == 1008
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello(spool_pending=protocol.MAX_SEQ + 1))
        assert "spool_pending" in recv_reply(ws)["data"]["message"]
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        ws.send(hello())
        assert recv_reply(ws)["type"] == "welcome"
        for seq in (2**63, 2**64 + 5, protocol.MAX_SEQ + 1):
            frame = {
                "v": 1,
                "type": "repo.locks",
                "id": "s",
                "seq": seq,
                "data": {"count": 0},
            }
            ws.send(json.dumps(frame))
            reply = recv_reply(ws)
            assert reply["type"] == "error" and reply["data"]["re"] == "s", reply
    assert_healthy(fleet)


def test_huge_retry_delay_is_a_bad_request(fleet, fx):
    host = fx.uniq("rd")
    fleet.ctl_json("enroll", host)
    with pytest.raises(fx.RpcError) as info:
        fleet.rpc("groups.create", host=host, name="g", includes=["/etc"], retry_delay=10**12)
    assert info.value.code == "bad_request"
    assert_healthy(fleet)


# -- 5. idle connections, per-address cap ----------------------------------------------


def test_idle_unauthenticated_connections_are_capped_and_closed(fleetd_factory, fx):
    fleet = fleetd_factory("--idle-timeout", "3", "--per-address-limit", "64")
    opened, refused = [], []
    try:
        for _ in range(80):
            try:
                opened.append(fx.ws_connect(fleet.url, "/login").__enter__())
            except InvalidStatus as exc:
                refused.append(exc.response.status_code)
        assert len(opened) == 64 and refused == [429] * 16
        enroll_refused = pytest.raises(InvalidStatus)
        with enroll_refused as info:  # the cap covers /enroll too
            fx.ws_connect(fleet.url, "/enroll")
        assert info.value.response.status_code == 429
        started = time.monotonic()
        assert isinstance(fleet.rpc("hosts.list"), list)  # /ctl is not capped, and prompt
        assert time.monotonic() - started < 2.0
        # the idle ones are closed by fleetd (1008) once the timeout passes
        codes = {closed_code(ws, timeout=15) for ws in opened}
        assert codes == {1008}
    finally:
        for ws in opened:
            ws.close()
    # the cap counts open connections: once closed, /login serves again
    assert fx.api_login(fleet.url, "admin", fx.ADMIN_PASSWORD)["token"]
    with fx.ws_connect(fleet.url, "/enroll") as ws:
        assert closed_code(ws, timeout=15) == 1008  # no enroll frame in time
    # a socket that never finishes the opening handshake is dropped too
    import socket

    with socket.create_connection(("127.0.0.1", fleet.fleetd.port), timeout=15) as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by fleetd
        assert time.monotonic() - started < 10
    assert "Traceback" not in fleet.fleetd.log()


def test_connections_past_the_budget_get_503(fleetd_factory, fx):
    fleet = fleetd_factory("--max-connections", "20")
    opened, refused = [], []
    try:
        for _ in range(30):
            try:
                opened.append(fx.ws_connect(fleet.url, "/ctl", fleet.admin_token).__enter__())
            except InvalidStatus as exc:
                refused.append(exc.response.status_code)
        assert refused and set(refused) == {503}
        assert 18 <= len(opened) <= 21
        assert isinstance(fx.rpc_on(opened[0], "hosts.list"), list)  # the open ones still serve
    finally:
        for ws in opened:
            ws.close()
    fx.wait_until(lambda: _rpc_ok(fleet), timeout=10, what="fleetd serving again")
    assert "Traceback" not in fleet.fleetd.log()


def _rpc_ok(fleet):
    try:
        return isinstance(fleet.rpc("hosts.list"), list)
    except InvalidStatus:
        return False


# -- 6. oversized unauthenticated frames; memory ------------------------------------------


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_big_frames_to_unauthenticated_endpoints_close_1009_and_cost_no_memory(fleetd_factory, fx):
    fleet = fleetd_factory()
    pid = fleet.fleetd.proc.pid
    before = vm_rss_kib(pid)
    big = json.dumps(
        {"id": 1, "method": "auth.login", "params": {"user": "x", "password": "p" * (4 << 20)}}
    )

    async def one(path: str) -> int:
        async with websockets.connect(fleet.url + path, open_timeout=10, max_size=None) as ws:
            try:
                await ws.send(big)
            except ConnectionClosed:
                pass
            try:
                await asyncio.wait_for(ws.recv(), 15)
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else -1
            return 0

    async def main() -> list[int]:
        paths = ["/login"] * 15 + ["/enroll"] * 5
        return await asyncio.gather(*(one(p) for p in paths))

    codes = asyncio.run(main())
    after = vm_rss_kib(pid)
    print(f"fleetd VmRSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB")
    assert codes == [1009] * 20
    assert after - before < 100 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MiB"
    # a normal-sized login still works
    assert fx.api_login(fleet.url, "admin", fx.ADMIN_PASSWORD)["token"]
    assert "Traceback" not in fleet.fleetd.log()


def test_an_agent_pipelining_big_frames_is_read_at_the_ingests_pace(fleetd_factory, fx):
    """600 frames of ~1 MiB (job.logs of 15 lines of 64 KiB) sent without
    waiting for acks: fleetd stops reading the socket once its inbox holds
    2 MiB, so its memory stays bounded (+107 to +132 MiB in three runs,
    what websockets' read buffers and the allocator keep; +549 MiB with an
    inbox bounded in frames only), and every frame is still applied and
    acked, in order."""
    fleet = fleetd_factory()
    token = agent_token(fleet, fx)
    pid = fleet.fleetd.proc.pid
    before = vm_rss_kib(pid)
    count, per = 600, 15
    payload = "x" * 65_000

    def frame(k: int) -> str:
        first = (k - 1) * per + 1
        lines = [
            {"seq": first + i, "ts": now_iso(), "stream": "stdout", "payload": payload}
            for i in range(per)
        ]
        data = {"job_id": 999_999, "first": first, "lines": lines}
        return json.dumps({"v": 1, "type": "job.logs", "seq": first + per - 1, "data": data})

    async def main() -> tuple[int, int]:
        peak = 0
        async with websockets.connect(
            fleet.url + "/agent",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
            max_size=None,
        ) as ws:
            await ws.send(hello())
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "welcome":
                pass
            acked = 0

            async def read_acks() -> None:
                nonlocal acked
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "ack":
                        assert msg["data"]["seq"] >= acked  # in order
                        acked = msg["data"]["seq"]
                        if acked == count * per:
                            return

            reading = asyncio.ensure_future(read_acks())
            sending = asyncio.ensure_future(
                asyncio.gather(*[ws.send(frame(k)) for k in range(1, count + 1)])
            )
            deadline = time.monotonic() + 120
            while not reading.done() and time.monotonic() < deadline:
                peak = max(peak, vm_rss_kib(pid))
                await asyncio.wait({reading}, timeout=0.05)  # sampling fleetd's memory meanwhile
            await sending
            await asyncio.wait_for(reading, 1)
        return acked, peak

    acked, peak = asyncio.run(main())
    print(f"fleetd VmRSS {before / 1024:.1f} MiB, at most {peak / 1024:.1f} MiB")
    assert acked == count * per
    assert peak - before < 250 * 1024, f"RSS grew by {(peak - before) / 1024:.1f} MiB"
    assert_healthy(fleet)


# -- 8. SIGTERM while the store is flooded ------------------------------------------------


def test_sigterm_during_a_store_flood_exits_within_2_s(fleetd_factory, fx):
    fleet = fleetd_factory()
    proc = fleet.fleetd.proc

    async def flood() -> float:
        conns = [
            await websockets.connect(
                fleet.url + "/ctl",
                additional_headers={"Authorization": f"Bearer {fleet.admin_token}"},
                open_timeout=10,
            )
            for _ in range(4)
        ]
        answered = 0
        started = asyncio.Event()

        async def reader(ws):
            nonlocal answered
            try:
                async for _ in ws:
                    answered += 1
                    if answered >= 200:
                        started.set()
            except ConnectionClosed:
                pass

        async def writer(ws, base):
            try:
                for i in range(1500):  # each request is two store calls
                    await ws.send(json.dumps({"id": base + i, "method": "hosts.list"}))
            except ConnectionClosed:
                pass

        tasks = [asyncio.ensure_future(reader(ws)) for ws in conns]
        tasks += [asyncio.ensure_future(writer(ws, n * 10_000)) for n, ws in enumerate(conns)]
        await asyncio.wait_for(started.wait(), 30)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, proc.wait, 10)
        took = time.monotonic() - sent
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in conns:
            ws.transport.abort()
        print(f"SIGTERM after {answered} answers; fleetd exited {took:.2f} s later")
        return took

    took = asyncio.run(flood())
    assert proc.returncode == 0, fleet.fleetd.log()
    assert took < 2.0, f"fleetd took {took:.2f} s to stop; log:\n{fleet.fleetd.log()}"
    assert "Traceback" not in fleet.fleetd.log()


def test_out_of_descriptors_is_a_warning_not_a_traceback(fleetd_factory, fx):
    """Even past the budget (the fd limit lowered under a running fleetd),
    accept() failing is one warning line, and fleetd recovers once sockets close."""
    import resource
    import socket

    fleet = fleetd_factory()
    pid = fleet.fleetd.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    limit = in_use + 40
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    socks = []
    try:
        for _ in range(120):
            sock = socket.socket()
            sock.settimeout(2)
            try:
                sock.connect(("127.0.0.1", fleet.fleetd.port))
            except OSError:
                sock.close()
                break
            socks.append(sock)
        fx.wait_until(
            lambda: "cannot accept connections" in fleet.fleetd.log(),
            timeout=10,
            what="fleetd to report it is out of descriptors",
        )
    finally:
        for sock in socks:
            sock.close()
    fx.wait_until(lambda: _rpc_ok(fleet), timeout=20, what="fleetd serving again")
    log = fleet.fleetd.log()
    assert "Traceback" not in log, log
    assert log.count("cannot accept connections") <= 10
