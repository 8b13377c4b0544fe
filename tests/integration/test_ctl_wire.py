"""The /ctl, /login and upgrade-time checks, driven by a raw WebSocket client.

A bad request must get an error reply and leave the connection usable; a
bad credential must be refused with an HTTP status before the upgrade.
"""

from __future__ import annotations

import http.client
import json

import pytest
from websockets.exceptions import InvalidStatus

BAD_REQUESTS = [
    # (frame, expected code, expected id in the reply, words in the message)
    ("{this is not json", "bad_request", None, "not JSON"),
    ("[1, 2, 3]", "bad_request", None, "object"),
    (b'{"id": 1, "method": "auth.whoami", "params": {}}', "bad_request", None, "binary"),
    ('{"method": "auth.whoami", "params": {}}', "bad_request", None, "id"),
    ('{"id": true, "method": "auth.whoami"}', "bad_request", None, "id"),
    ('{"id": 5, "method": "no.such.method", "params": {}}', "unknown_method", 5, "no.such.method"),
    ('{"id": 6, "method": "", "params": {}}', "bad_request", 6, "method"),
    ('{"id": 7, "method": "hosts.list", "params": []}', "bad_request", 7, "params"),
    ('{"id": 8, "method": "hosts.show", "params": {"host": "a", "bogus": 1}}', "bad_request", 8,
     "bogus"),
    ('{"id": 9, "method": "hosts.show", "params": {"host": 42}}', "bad_request", 9, "host"),
    ('{"id": 10, "method": "hosts.show", "params": {}}', "bad_request", 10, "required"),
    ('{"id": "s-11", "method": "tokens.list", "params": {"all": "yes"}}', "bad_request", "s-11",
     "true or false"),
    ('{"id": 12, "method": "audit.list", "params": {"limit": NaN}}', "bad_request", None, "JSON"),
    ('{"id": 13, "method": "audit.list", "params": {"limit": 0}}', "bad_request", 13, "at least"),
    ('{"id": 14, "method": "repo.set", "params": {"host": "h", "url": "/r", "password": "p", '
     '"env": {"A": 1}}}', "bad_request", 14, "env"),
]  # fmt: skip


@pytest.mark.parametrize(
    "frame,code,re_id,words", BAD_REQUESTS, ids=[f"bad{i}" for i in range(len(BAD_REQUESTS))]
)
def test_a_bad_request_gets_an_error_reply_and_the_connection_survives(
    fleet, fx, frame, code, re_id, words
):
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=10))
        assert set(reply) == {"id", "error"}, reply
        assert reply["id"] == re_id
        assert reply["error"]["code"] == code
        assert words in reply["error"]["message"]
        # the same connection still answers
        assert fx.rpc_on(ws, "auth.whoami")["user"] == "admin"


def test_an_oversized_frame_is_refused_without_closing(fleet, fx):
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token, max_size=None) as ws:
        big = json.dumps({"id": 1, "method": "hosts.list", "params": {"pad": "x" * (1 << 20)}})
        ws.send(big)
        reply = json.loads(ws.recv(timeout=10))
        assert reply["error"]["code"] == "bad_request"
        assert "larger" in reply["error"]["message"]
        assert fx.rpc_on(ws, "auth.whoami")["user"] == "admin"


def test_requests_on_one_connection_are_each_answered_once_by_id(fleet, fx):
    """Requests of one connection run side by side: replies may come in any
    order, and the id says which is which."""
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
        for i, method in enumerate(("auth.whoami", "hosts.list", "nope", "auth.whoami"), 100):
            ws.send(json.dumps({"id": i, "method": method, "params": {}}))
        replies = sorted((json.loads(ws.recv(timeout=10)) for _ in range(4)), key=lambda r: r["id"])
    assert [r["id"] for r in replies] == [100, 101, 102, 103]
    assert replies[0]["result"]["user"] == "admin"
    assert isinstance(replies[1]["result"], list)
    assert replies[2]["error"]["code"] == "unknown_method"
    assert "result" in replies[3]


def _refused(fx, url, path, **kw):
    with pytest.raises(InvalidStatus) as exc, fx.ws_connect(url, path, **kw):
        pass
    return exc.value.response


def test_ctl_without_authorization_is_401_before_the_upgrade(fleet, fx):
    response = _refused(fx, fleet.url, "/ctl")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"Authorization" in response.body
    response = _refused(fx, fleet.url, "/ctl", headers={"Authorization": "Basic YWRtaW46eA=="})
    assert response.status_code == 401


def test_ctl_with_a_wrong_token_is_401(fleet, fx):
    response = _refused(fx, fleet.url, "/ctl", token="fleet_not-a-real-token")
    assert response.status_code == 401
    assert b"unknown, revoked or expired" in response.body


def test_an_unknown_path_is_404(fleet, fx):
    assert _refused(fx, fleet.url, "/nowhere", token=fleet.admin_token).status_code == 404
    assert _refused(fx, fleet.url, "/ctl/extra", token=fleet.admin_token).status_code == 404


def test_agent_endpoint_refuses_an_api_token(fleet, fx):
    assert _refused(fx, fleet.url, "/agent", token=fleet.admin_token).status_code == 401
    assert _refused(fx, fleet.url, "/agent").status_code == 401


def test_login_endpoint_answers_only_auth_login_and_survives_bad_frames(fleet, fx):
    with fx.ws_connect(fleet.url, "/login") as ws:
        ws.send('{"id": 1, "method": "hosts.list", "params": {}}')
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "unknown_method"
        ws.send("nonsense")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "bad_request"
        ws.send('{"id": 3, "method": "auth.login", "params": {"user": "admin"}}')
        reply = json.loads(ws.recv(timeout=10))
        assert reply["id"] == 3 and reply["error"]["code"] == "bad_request"
        assert "password" in reply["error"]["message"]
        result = fx.rpc_on(ws, "auth.login", user="admin", password=fx.ADMIN_PASSWORD)
    assert result["user"] == "admin" and result["role"] == "admin"
    assert fleet.ctl_json("whoami", token=result["token"])["user"] == "admin"


def test_too_many_bad_tokens_slow_the_address_but_not_its_good_tokens(fleetd_factory, fx):
    """Behind a NAT every operator and agent shares one address: twenty bad
    tokens from it must not shut the good ones out."""
    env = fleetd_factory()
    for i in range(20):
        assert _refused(fx, env.url, "/ctl", token=f"fleet_bad-{i}").status_code == 401
    # now its bad tokens are answered 429 ...
    assert _refused(fx, env.url, "/ctl", token="fleet_bad-more").status_code == 429
    result = env.ctl("whoami", token="fleet_bad-again", expect=3)
    assert "too many bad tokens" in result.stderr
    # ... and a good one still works, for people and agents alike
    assert env.ctl_json("whoami")["user"] == "admin"
    host = fx.uniq("nat")
    agent_token = fx.enroll_agent(env, host, hostname=host)["agent_token"]
    with fx.ws_connect(env.url, "/agent", agent_token) as ws:
        ws.send(fx.agent_hello())
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
    # plain HTTP health checks are not affected
    conn = http.client.HTTPConnection("127.0.0.1", env.fleetd.port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
