"""/enroll and /agent with a raw WebSocket client standing in for fleet-agent."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleet import __version__
from fleet.common import protocol


def _hello(hostname="agent-box", version=protocol.PROTOCOL_VERSION, **extra):
    data = {
        "protocol_version": version,
        "agent_version": "9.9.9-test",
        "restic_version": "0.17.3",
        "hostname": hostname,
        "os": "linux",
        "arch": "x86_64",
        "timezone": "Europe/Paris",
        **extra,
    }
    return json.dumps({"v": 1, "type": "hello", "id": "h1", "data": data})


# what fleetd may push to an agent on its own after welcome
PUSHES = ("config.update", "schedule.set", "command.run", "command.cancel", "ack")


def _recv(ws):
    """The next frame that answers the agent, skipping fleetd's own pushes."""
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame.get("type") not in PUSHES:
            return frame


def _assert_closed_by_server(ws):
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    return closed.value


def _redeem(fx, url, token, hostname="agent-box", frame_id="e1"):
    frame = {
        "v": 1,
        "type": "enroll",
        "id": frame_id,
        "data": {"token": token, "hostname": hostname},
    }
    with fx.ws_connect(url, "/enroll") as ws:
        ws.send(json.dumps(frame))
        reply = _recv(ws)
        _assert_closed_by_server(ws)  # one frame in, one out, then close
    return reply


def _status(fleet, host):
    return fleet.ctl_json("hosts", "show", host)["status"]


@pytest.fixture
def enrolled(fleet, fx):
    """A host whose agent token was obtained through /enroll."""
    host = fx.uniq("agent")
    enrollment = fleet.ctl_json("enroll", host)["enrollment"]
    token = protocol.parse_enrollment(enrollment)["token"]
    reply = _redeem(fx, fleet.url, token)
    assert reply["type"] == "enrolled", reply
    return {"host": host, "enroll_token": token, "agent_token": reply["data"]["agent_token"]}


def test_an_enrollment_token_is_redeemed_once(fleet, fx):
    host = fx.uniq("enr")
    result = fleet.ctl_json("enroll", host)
    token = protocol.parse_enrollment(result["enrollment"])["token"]

    reply = _redeem(fx, fleet.url, token, hostname="x")
    assert reply["type"] == "enrolled"
    assert reply["id"] == "e1"
    assert reply["data"]["host_name"] == host
    assert reply["data"]["agent_token"].startswith("agent_")
    shown = fleet.ctl_json("hosts", "show", host)
    assert reply["data"]["host_id"] == shown["id"]
    assert shown["status"] == "offline"  # enrolled, not connected yet
    assert shown["hostname"] == "x" and shown["enrolled_at"] is not None

    again = _redeem(fx, fleet.url, token, hostname="x", frame_id="e2")
    assert again["type"] == "error"
    assert again["data"]["code"] == "enroll_refused"
    assert "already used" in again["data"]["message"]
    assert again["data"]["re"] == "e2"

    entries = fleet.ctl_json("audit", "--action", "host.enroll")
    assert any(a["actor"] == f"agent:{host}" and a["action"] == "host.enroll" for a in entries)


def test_enroll_refuses_unknown_tokens_and_bad_frames(fleet, fx):
    unknown = _redeem(fx, fleet.url, "enroll_made-up")
    assert unknown["type"] == "error" and unknown["data"]["code"] == "enroll_refused"

    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send("not json")
        reply = _recv(ws)
        _assert_closed_by_server(ws)
    assert reply["type"] == "error" and reply["data"]["code"] == "bad_frame"

    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send(_hello())  # a valid frame, but not an enroll frame
        reply = _recv(ws)
    assert reply["data"]["code"] == "bad_frame" and "enroll" in reply["data"]["message"]

    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send(json.dumps({"v": 1, "type": "enroll", "data": {"token": "t"}}))
        reply = _recv(ws)
    assert reply["data"]["code"] == "bad_frame" and "hostname" in reply["data"]["message"]


def test_agent_hello_welcome_online_then_offline(fleet, fx, enrolled):
    host = enrolled["host"]
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello(hostname="box-1"))
        welcome = _recv(ws)
        assert welcome["type"] == "welcome", welcome
        assert welcome["id"] == "h1"
        assert welcome["data"]["host_name"] == host
        assert welcome["data"]["server_version"] == __version__
        assert welcome["data"]["heartbeat_interval"] == 30
        assert "urls" not in welcome["data"]  # no --public-url: none told

        shown = fleet.ctl_json("hosts", "show", host)
        assert shown["status"] == "online"
        assert shown["hostname"] == "box-1"
        assert (shown["agent_version"], shown["restic_version"]) == ("9.9.9-test", "0.17.3")
        assert (shown["os"], shown["arch"], shown["timezone"]) == (
            "linux",
            "x86_64",
            "Europe/Paris",
        )
        assert shown["last_seen_at"] is not None
        listing = fleet.ctl("hosts", "list").stdout
        assert any(host in line and "online" in line for line in listing.splitlines())
        assert "9.9.9-test" in listing

        # a bad frame mid-session is answered, and the session goes on
        ws.send("garbage")
        assert _recv(ws)["data"]["code"] == "bad_frame"
        ws.send(json.dumps({"v": 1, "type": "welcome", "id": "w", "data": {}}))
        err = _recv(ws)
        assert err["data"]["code"] == "bad_frame" and err["data"]["re"] == "w"
        ws.send(
            json.dumps({"v": 1, "type": "heartbeat", "data": {"sent_at": "2030-01-01T00:00:00Z"}})
        )
        ws.send(json.dumps({"v": 1, "type": "no.such.type", "id": "probe", "data": {}}))
        # the first reply is the probe's: the heartbeat was taken silently
        probe = _recv(ws)
        assert probe["type"] == "error" and probe["data"]["re"] == "probe"
        assert _status(fleet, host) == "online"

    fx.wait_until(lambda: _status(fleet, host) == "offline", timeout=10, what="host offline")


def test_agent_first_frame_must_be_hello(fleet, fx, enrolled):
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(json.dumps({"v": 1, "type": "heartbeat", "data": {"sent_at": "x"}}))
        reply = _recv(ws)
        closed = _assert_closed_by_server(ws)
    assert reply["type"] == "error" and "hello" in reply["data"]["message"]
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert _status(fleet, enrolled["host"]) == "offline"


def test_agent_with_an_unsupported_protocol_version_is_refused(fleet, fx, enrolled):
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello(version=99))
        reply = _recv(ws)
        closed = _assert_closed_by_server(ws)
    assert reply["type"] == "error"
    assert reply["data"]["code"] == "unsupported_version"
    assert reply["data"]["re"] == "h1"
    assert "99" in reply["data"]["message"]
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert _status(fleet, enrolled["host"]) == "offline"

    # an envelope of another version is refused the same way
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello().replace('"v": 1', '"v": 2'))
        reply = _recv(ws)
    assert reply["data"]["code"] == "unsupported_version"


def test_agent_tokens_that_are_unknown_replaced_or_of_another_kind_get_401(fleet, fx, enrolled):
    def status(path, token):
        with pytest.raises(InvalidStatus) as exc, fx.ws_connect(fleet.url, path, token):
            pass
        return exc.value.response.status_code

    assert status("/agent", "agent_unknown-token") == 401
    assert status("/agent", enrolled["enroll_token"]) == 401  # the enrollment token
    assert status("/ctl", enrolled["agent_token"]) == 401  # agent tokens do not work on /ctl

    # enrolling again replaces the agent token: the old one stops working
    old = enrolled["agent_token"]
    enrollment = fleet.ctl_json("enroll", enrolled["host"], "--force")["enrollment"]
    new = _redeem(fx, fleet.url, protocol.parse_enrollment(enrollment)["token"])
    assert new["type"] == "enrolled" and new["data"]["agent_token"] != old
    assert status("/agent", old) == 401
    with fx.ws_connect(fleet.url, "/agent", new["data"]["agent_token"]) as ws:
        ws.send(_hello())
        assert _recv(ws)["type"] == "welcome"

    # removing the host revokes its agent, and its pending enrollment tokens
    pending = fleet.ctl_json("enroll", enrolled["host"], "--force")["enrollment"]
    fleet.ctl("hosts", "remove", enrolled["host"], "--yes")
    assert status("/agent", new["data"]["agent_token"]) == 401
    refused = _redeem(fx, fleet.url, protocol.parse_enrollment(pending)["token"])
    assert refused["data"]["code"] == "enroll_refused"


def test_sigterm_with_an_agent_connected_exits_0_and_leaves_the_host_offline(
    fleetd_factory, fx, tmp_path
):
    env = fleetd_factory()
    host = fx.uniq("agent")
    token = protocol.parse_enrollment(env.ctl_json("enroll", host)["enrollment"])["token"]
    agent_token = _redeem(fx, env.url, token)["data"]["agent_token"]
    with fx.ws_connect(env.url, "/agent", agent_token) as ws:
        ws.send(_hello())
        assert _recv(ws)["type"] == "welcome"
        assert env.ctl_json("hosts", "show", host)["status"] == "online"
        fx.stop_and_check(env.fleetd)
        closed = _assert_closed_by_server(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1001

    again = fx.Fleetd(env.data_dir, tmp_path / "again.log").start()
    try:
        admin = fx.api_login(again.url, "admin", fx.ADMIN_PASSWORD)["token"]
        shown = fx.run_ctl(
            ("hosts", "show", host, "--json"), server=again.url, token=admin, config_dir=tmp_path
        )
        assert json.loads(shown.stdout)["status"] == "offline"
        # and the agent token survived the restart
        with fx.ws_connect(again.url, "/agent", agent_token) as ws:
            ws.send(_hello())
            assert _recv(ws)["type"] == "welcome"
    finally:
        fx.stop_and_check(again)


def test_a_reconnecting_agent_replaces_its_old_connection_and_stays_online(fleet, fx, enrolled):
    host = enrolled["host"]
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as first:
        first.send(_hello())
        assert _recv(first)["type"] == "welcome"
        with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as second:
            second.send(_hello(hostname="box-2"))
            assert _recv(second)["type"] == "welcome"
            # fleetd closes the older link itself
            _assert_closed_by_server(first)
            shown = fleet.ctl_json("hosts", "show", host)
            assert shown["status"] == "online" and shown["hostname"] == "box-2"
            second.send(json.dumps({"v": 1, "type": "no.such", "id": "p", "data": {}}))
            assert _recv(second)["data"]["re"] == "p"  # the new link is alive
            assert _status(fleet, host) == "online"
    fx.wait_until(lambda: _status(fleet, host) == "offline", timeout=10, what="host offline")


def test_removing_a_host_disconnects_its_agent(fleet, fx, enrolled):
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello())
        assert _recv(ws)["type"] == "welcome"
        fleet.ctl("hosts", "remove", enrolled["host"], "--yes")
        try:
            ws.send(json.dumps({"v": 1, "type": "no.such", "id": "p", "data": {}}))
        except ConnectionClosed:
            return
        _assert_closed_by_server(ws)


def _next_of(ws, kind):
    """The next frame of this type fleetd sends, skipping the others."""
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame.get("type") == kind:
            return frame


def _finish(ws, job_id, seq):
    """Take the job, run it and end it as fleet-agent would; wait for the ack."""
    ts = "2026-12-02T00:00:00Z"
    ws.send(protocol.encode("command.result", {"job_id": job_id, "accepted": True}))
    started = {"job_id": job_id, "kind": "check", "started_at": ts}
    ws.send(protocol.encode("job.started", started, seq=seq))
    ended = {"job_id": job_id, "status": "succeeded", "exit_code": 0, "finished_at": ts}
    ws.send(protocol.encode("job.finished", ended, seq=seq + 1))
    while _next_of(ws, "ack")["data"]["seq"] < seq + 1:
        pass


def test_a_run_now_on_a_ready_host_is_claimed_as_it_is_made(fleet, fx, enrolled):
    """jobs.run on a connected, idle host claims the job in its own
    transaction (one store trip): the reply already says dispatched and the
    command goes out. While the agent has it, the next run-now waits."""
    host = enrolled["host"]
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello())
        assert _recv(ws)["type"] == "welcome"
        # the first one may meet the host before it is caught up: queued, then offered
        first = fleet.rpc("jobs.run", host=host, kind="check")
        assert _next_of(ws, "command.run")["data"]["job_id"] == first["id"]
        _finish(ws, first["id"], seq=1)

        second = fleet.rpc("jobs.run", host=host, kind="check")
        assert second["status"] == "dispatched", second
        assert _next_of(ws, "command.run")["data"] == {"job_id": second["id"], "kind": "check"}
        assert fleet.rpc("jobs.show", id=second["id"])["status"] == "dispatched"

        third = fleet.rpc("jobs.run", host=host, kind="check")
        assert third["status"] == "queued" and third["queued_behind"] == 1, third
        _finish(ws, second["id"], seq=3)
        # the end of the second frees the host: the third goes out, once
        assert _next_of(ws, "command.run")["data"]["job_id"] == third["id"]
        assert fleet.rpc("jobs.show", id=third["id"])["status"] == "dispatched"


def test_re_enrolling_takes_an_admin_and_force_and_a_token_voids_the_older_ones(fleet, fx):
    """Whoever redeems a host's enrollment token becomes that host and gets
    its repositories' secrets: an operator cannot hand one out for a host
    that is enrolled, an admin only on purpose, and only the newest token
    of a host works."""
    host = fx.uniq("h")
    first = protocol.parse_enrollment(fleet.ctl_json("enroll", host)["enrollment"])["token"]
    second = protocol.parse_enrollment(fleet.ctl_json("enroll", host)["enrollment"])["token"]
    refused = _redeem(fx, fleet.url, first)  # voided by the second
    assert refused["type"] == "error" and "expired" in refused["data"]["message"]
    third = protocol.parse_enrollment(fleet.ctl_json("enroll", host)["enrollment"])["token"]
    assert _redeem(fx, fleet.url, third)["type"] == "enrolled"
    refused = _redeem(fx, fleet.url, second)  # voided by the enrollment
    assert refused["type"] == "error"

    operator = fleet.add_user("operator")
    out = fleet.ctl("enroll", host, token=operator.token, expect=1)
    assert "enrolled already" in out.stderr and "--force" in out.stderr
    out = fleet.ctl("enroll", host, "--force", token=operator.token, expect=3)
    assert "admin" in out.stderr
    fleet.ctl("enroll", host, expect=1)  # an admin too, without --force
    forced = fleet.ctl_json("enroll", host, "--force")
    assert (
        _redeem(fx, fleet.url, protocol.parse_enrollment(forced["enrollment"])["token"])["type"]
        == "enrolled"
    )
    (entry, *_) = [
        a for a in fleet.ctl_json("audit", "--action", "host.enroll_token") if a["target"] == host
    ]
    assert entry["detail"]["reenroll"] is True


def test_the_pins_an_agent_reports_are_bounded_and_only_pins_are_recorded(fleet, fx, enrolled):
    """What an agent says it pins reaches operators (hosts show): only
    well-formed pins are kept, a hostile tls.ack changes nothing."""
    host, good = enrolled["host"], "a" * 64
    junk = ["\x1b[2J" + "b" * 60, "B" * 64, "c" * 4000, good]
    with fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"]) as ws:
        ws.send(_hello(tls_pins=junk, features=["repositories", "tls.pins"]))
        assert _recv(ws)["type"] == "welcome"
        assert fleet.ctl_json("hosts", "show", host)["tls"] == {"trust": "pins", "pins": [good]}
        too_many = [f"{i:064x}" for i in range(protocol.MAX_PINS + 1)]
        for pins in (["nothex"], too_many):
            ack = {"pins": pins, "applied_at": "2030-01-01T00:00:00Z"}
            ws.send(json.dumps({"v": 1, "type": "tls.ack", "id": "t", "data": ack}))
        # the oversized one is a bad frame; the malformed pin is dropped quietly
        assert _recv(ws)["data"]["code"] == "bad_frame"
        ack = {"pins": ["d" * 64], "applied_at": "2030-01-01T00:00:00Z"}
        ws.send(json.dumps({"v": 1, "type": "tls.ack", "data": ack}))
        fx.wait_until(
            lambda: fleet.ctl_json("hosts", "show", host)["tls"]["pins"] == ["d" * 64],
            what="the acknowledged pins recorded",
            interval=0.2,
        )
