"""fleetd replicas' URLs (issue 13): `fleetd serve --public-url` given more
than once (or as a comma-separated FLEETD_PUBLIC_URL) puts every URL in the
enrollment string and in the welcome an agent gets; one URL, or none,
changes nothing of what fleetd said before."""

from __future__ import annotations

import json

import pytest

from fleet.common import protocol

pytestmark = pytest.mark.own_store  # fleetd's URLs, whatever the store: run once

A, B, C = "ws://fleet-a.example:8433", "ws://fleet-b.example:8433", "ws://fleet-c.example/fleet"


def _welcome(fx, env, host: str) -> dict:
    token = fx.enroll_agent(env, host)["agent_token"]
    with fx.ws_connect(env.url, "/agent", token) as ws:
        ws.send(fx.agent_hello())
        while True:
            frame = json.loads(ws.recv(timeout=10))
            if frame["type"] == "welcome":
                return frame["data"]
            assert frame["type"] in ("config.update", "schedule.set"), frame


def test_every_public_url_is_in_the_enrollment_string_and_the_welcome(fleetd_factory, fx):
    env = fleetd_factory("--public-url", A, "--public-url", f"{B}, {C}/")
    result = env.ctl_json("enroll", "replicated")
    assert result["server_url"] == A
    assert result["server_urls"] == [A, B, C]
    doc = protocol.parse_enrollment(result["enrollment"])
    assert doc["url"] == A  # what an agent from before replicas dials
    assert doc["urls"] == [A, B, C]
    assert protocol.enrollment_urls(doc) == [A, B, C]
    assert _welcome(fx, env, "replicated")["urls"] == [A, B, C]


def test_one_public_url_makes_the_string_it_always_made(fleetd_factory, fx):
    env = fleetd_factory("--public-url", A + "/")
    result = env.ctl_json("enroll", "single")
    assert (result["server_url"], result["server_urls"]) == (A, [A])
    doc = protocol.parse_enrollment(result["enrollment"])
    assert doc == {"url": A, "token": doc["token"]}  # no "urls": an older agent reads it all
    assert _welcome(fx, env, "single")["urls"] == [A]


def test_without_a_public_url_the_operators_url_is_the_one(fleet, fx):
    result = fleet.ctl_json("enroll", fx.uniq("plain"))
    assert result["server_urls"] == [result["server_url"]] == [fleet.url]
    assert "urls" not in protocol.parse_enrollment(result["enrollment"])


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"FLEETD_PUBLIC_URL": f"{A},http://b:8433"}, (), "is not a ws:// or wss:// URL"),
        ({}, ("--public-url", A, "--public-url", "wss://b:8433"), "all be ws:// or all wss://"),
        ({"FLEETD_PUBLIC_URL": ",".join(f"ws://h{i}:1" for i in range(17))}, (), "more than 16"),
        ({}, ("--public-url", "fleet-a:8433"), "is not a ws:// or wss:// URL"),
    ],
)
def test_bad_public_urls_are_refused_before_serving(fx, tmp_path, env, args, message):
    data_dir = tmp_path / "data"
    fx.init_data_dir(data_dir)
    proc = fx.run_fleetd(
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--no-agent-pyz",
        *args,
        env=fx.clean_env(**env),
        timeout=30,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "listening" not in proc.stdout
