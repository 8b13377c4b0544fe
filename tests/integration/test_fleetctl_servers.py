"""fleetctl with a list of fleetd replicas (FLEET_SERVER, --server, login):
tried in order on a refused connection or a failed handshake, never after
a request went out; all unreachable is one unreachable server's status."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.own_store  # fleetctl's list of servers, whatever the store: run once


@pytest.fixture
def refused() -> Iterator:
    """URLs whose ports refuse connections: bound (so nobody else takes
    them while the test runs), never listening."""
    socks = []

    def make() -> str:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        return f"ws://127.0.0.1:{s.getsockname()[1]}"

    yield make
    for s in socks:
        s.close()


def test_a_refused_first_server_is_passed_over(fleet, refused):
    dead = refused()
    hosts = fleet.ctl_json("hosts", "list", server=f"{dead},{fleet.url}")
    assert isinstance(hosts, list)
    me = fleet.ctl_json("whoami", server=f"{dead}, {fleet.url}/")
    assert me["server"] == f"{dead},{fleet.url}"  # the setting, as normalised


def test_every_server_refused_is_one_unreachable_server(fleet, refused):
    one, two = refused(), refused()
    single = fleet.ctl("hosts", "list", server=one, expect=5)
    assert single.stderr.startswith(f"fleetctl: error: cannot reach {one}: ")
    both = fleet.ctl("hosts", "list", "--json", server=f"{one},{two}", expect=5)
    message = both.stderr.removeprefix("fleetctl: error: ").strip()
    first, second = message.split("; ")
    assert first.startswith(f"cannot reach {one}: ") and second.startswith(f"cannot reach {two}: ")
    error = json.loads(both.stdout)["error"]
    assert (error["code"], error["exit"]) == ("unreachable", 5)
    assert error["message"] == message


def test_a_server_that_refuses_the_token_ends_it_there(fleet, refused):
    dead = refused()
    # fleetd answered: the next server is the same fleet, it would refuse too
    result = fleet.ctl("hosts", "list", server=f"{fleet.url},{dead}", token="bogus", expect=3)
    assert f"{fleet.url} refused the token" in result.stderr
    assert "cannot reach" not in result.stderr


def test_a_bad_url_in_the_list_is_a_usage_error(fleet):
    result = fleet.ctl("hosts", "list", server=f"{fleet.url},ftp://x", expect=2)
    assert "ftp://x" in result.stderr


def test_login_saves_the_list_and_later_commands_use_it(fleet, fx, tmp_path, refused):
    xdg = tmp_path / "xdg"
    dead = refused()
    listed = f"{dead},{fleet.url}"
    result = fleet.ctl(
        "login",
        "--server",
        listed,
        "--password-stdin",
        server=None,
        token=None,
        config_dir=xdg,
        input=fx.ADMIN_PASSWORD + "\n",
    )
    assert f"logged in to {fleet.url} as admin" in result.stderr
    saved = json.loads((xdg / "fleet" / "config.json").read_text())
    assert saved["server"] == listed
    me = fleet.ctl_json("whoami", server=None, token=None, config_dir=xdg)
    assert me["user"] == "admin" and me["server"] == listed
