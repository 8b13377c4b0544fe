"""fleet.agent.servers: which fleetd replica the agent dials next, how long
it waits first, and which URLs it takes from fleetd (never another scheme)."""

from __future__ import annotations

import json
import logging
import random

import pytest

from fleet.agent import servers as servers_mod
from fleet.agent.link import Agent, backoff, refused_backoff
from fleet.agent.servers import PROMPT_EVERY, PROMPT_MAX, Servers, accept_urls
from fleet.agent.state import Identity, State

A, B, C = "ws://a:8433", "ws://b:8433", "ws://c:8433"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ceiling(n: int) -> float:
    """What backoff(n) answers at most (its rng's uniform at the top)."""
    return backoff(n, FixedRng(1.0))


class FixedRng(random.Random):
    """uniform(a, b) at a fixed fraction of the way from a to b."""

    def __init__(self, at: float) -> None:
        super().__init__(0)
        self.at = at

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.at


def make(urls, current=None, at=1.0) -> tuple[Servers, FakeClock]:
    clock = FakeClock()
    return Servers(list(urls), current, clock, FixedRng(at)), clock


# -- which URL ------------------------------------------------------------------


def test_round_robin_from_the_current_url():
    s, _ = make([A, B, C], current=B)
    assert s.current == B
    assert [s.advance() for _ in range(4)] == [C, A, B, C]
    assert make([A, B], current="ws://elsewhere")[0].current == A  # not listed: the first


def test_a_new_list_keeps_the_agent_on_the_url_it_is_connected_to():
    s, _ = make([A, B], current=B)
    assert s.replace([C, A, B], connected=B) is True
    assert (s.urls, s.current, s.advance()) == ([C, A, B], B, C)
    assert s.replace([C, A, B], connected=B) is False  # the same: nothing to save
    assert s.replace([], connected=B) is False and s.urls == [C, A, B]


def test_an_agent_needs_a_url():
    with pytest.raises(ValueError):
        Servers([])


@pytest.mark.parametrize(
    "offered, scheme, connected, kept, dropped",
    [
        ([A, B], "ws", A, [A, B], []),
        # never a downgrade: an agent enrolled over wss drops ws:// URLs
        (["wss://a", "ws://b", "wss://c/"], "wss", "wss://a", ["wss://a", "wss://c"], ["ws://b"]),
        # nor an upgrade it holds no pins for the other way round
        (["wss://a", A], "ws", A, [A], ["wss://a"]),
        # not URLs at all
        (["http://x", "a:1", "", A], "ws", A, [A], ["http://x", "a:1", ""]),
        # the replica it is connected to works: kept, last, when fleetd did not name it
        ([B, C], "ws", A, [B, C, A], []),
        ([], "ws", A, [A], []),
        # duplicates once
        ([B, B + "/", A], "ws", None, [B, A], []),
    ],
)
def test_accept_urls(offered, scheme, connected, kept, dropped):
    assert accept_urls(offered, scheme, connected) == (kept, dropped)


def test_accept_urls_is_bounded():
    offered = [f"ws://h{i}" for i in range(40)]
    kept, _ = accept_urls(offered, "ws", A)
    assert len(kept) == 16 and kept[-1] == A and kept[:15] == offered[:15]


# -- how long before the next dial ----------------------------------------------------


def test_with_one_url_the_delays_are_a_lone_fleetds():
    s, _ = make([A])
    delays = [s.failed(established=False, lasted=1, backoff=backoff) for _ in range(8)]
    assert delays == [ceiling(n) for n in range(8)]
    assert s.current == A
    # a link that was up and dropped is no exception with one fleetd
    assert s.failed(established=True, lasted=5, backoff=backoff) == ceiling(8)


def test_a_round_of_replicas_counts_as_one_redial():
    s, _ = make([A, B, C])
    seen = []
    for _ in range(9):
        delay = s.failed(established=False, lasted=1, backoff=backoff)
        seen.append((s.current, delay))
    # each replica is dialled no more often than one fleetd alone was
    assert seen == [
        (B, ceiling(0)),
        (C, ceiling(0)),
        (A, ceiling(0)),
        (B, ceiling(1)),
        (C, ceiling(1)),
        (A, ceiling(1)),
        (B, ceiling(2)),
        (C, ceiling(2)),
        (A, ceiling(2)),
    ]


def test_after_a_drop_the_next_replica_is_dialled_promptly_once_a_minute():
    s, clock = make([A, B])
    for _ in range(10):  # a while of failures: the backoff has grown
        s.failed(established=False, lasted=1, backoff=backoff)
    assert s.failed(established=False, lasted=1, backoff=backoff) > 10
    # connected, then dropped a few seconds later: the next one at once
    delay = s.failed(established=True, lasted=3, backoff=backoff)
    assert delay <= PROMPT_MAX
    # dropped again soon after: a link that keeps dropping backs off
    clock.now += 5
    assert s.failed(established=True, lasted=3, backoff=backoff) > 10
    clock.now += PROMPT_EVERY
    assert s.failed(established=True, lasted=3, backoff=backoff) <= PROMPT_MAX


def test_a_link_up_a_while_starts_the_backoff_over():
    s, _ = make([A, B])
    for _ in range(10):
        s.failed(established=False, lasted=1, backoff=backoff)
    s._last_prompt = None
    s.failed(established=True, lasted=PROMPT_EVERY + 1, backoff=backoff)  # prompt
    assert s.failed(established=False, lasted=1, backoff=backoff) == ceiling(0)


def test_the_real_delays_are_jittered_within_their_bounds():
    s = Servers([A, B], clock=FakeClock())
    delay = s.failed(established=True, lasted=3, backoff=backoff)
    assert servers_mod.PROMPT_MIN <= delay <= PROMPT_MAX


def test_a_refused_key_moves_on_and_backs_off_long_once_every_replica_refused():
    s, _ = make([A, B, C])
    delays = [(s.refused(refused_backoff, backoff), s.current) for _ in range(6)]
    assert delays == [
        (ceiling(0), B),
        (ceiling(0), C),
        (refused_backoff(0, FixedRng(1.0)), A),
        (ceiling(0), B),
        (ceiling(0), C),
        (refused_backoff(1, FixedRng(1.0)), A),
    ]
    one, _ = make([A])
    assert one.refused(refused_backoff, backoff) == refused_backoff(0, FixedRng(1.0))
    assert one.refused(refused_backoff, backoff) == refused_backoff(1, FixedRng(1.0))


# -- the agent's list: what it loads and what it learns from welcome --------------------


@pytest.fixture
def make_agent(tmp_path):
    made = []

    def build(url: str = A) -> Agent:
        agent = Agent(State(tmp_path), Identity(url, 1, "h1", "tok"))
        made.append(agent)
        return agent

    yield build
    for agent in made:
        agent.spool.close()


def saved(tmp_path) -> list:
    return json.loads((tmp_path / "servers.json").read_text())["urls"]


def test_an_agent_learns_the_replicas_from_welcome_and_saves_them(make_agent, tmp_path):
    agent = make_agent()
    assert (agent.servers.urls, agent.server_url) == ([A], A)
    agent.learn_servers(None, A)  # a fleetd not told its URLs: nothing changes
    assert not (tmp_path / "servers.json").exists()
    agent.learn_servers([A], A)  # the same list: nothing written
    assert not (tmp_path / "servers.json").exists()
    agent.learn_servers([A, B, C], A)
    assert saved(tmp_path) == [A, B, C]
    assert (tmp_path / "servers.json").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))  # written whole, renamed into place
    # the next run dials them in turn, from the enrolled one
    again = make_agent()
    assert again.servers.urls == [A, B, C] and again.servers.current == A


def test_a_tls_agent_never_takes_a_plain_url(make_agent, tmp_path, caplog):
    agent = make_agent("wss://a:8433")
    with caplog.at_level(logging.WARNING, logger="fleet-agent"):
        agent.learn_servers(["wss://a:8433", "ws://b:8433", "wss://c:8433"], "wss://a:8433")
    assert saved(tmp_path) == ["wss://a:8433", "wss://c:8433"]
    assert "not dialling 'ws://b:8433'" in caplog.text
    # nor from a servers.json that someone wrote by hand
    (tmp_path / "servers.json").write_text(json.dumps({"urls": ["ws://b:8433", "wss://c"]}))
    with caplog.at_level(logging.WARNING, logger="fleet-agent"):
        assert make_agent("wss://a:8433").servers.urls == ["wss://c"]


def test_a_damaged_list_leaves_the_enrolled_url(make_agent, tmp_path, caplog):
    (tmp_path / "servers.json").write_text('{"urls": 5}')
    with caplog.at_level(logging.WARNING, logger="fleet-agent"):
        agent = make_agent()
    assert agent.servers.urls == [A]
    assert "servers.json is damaged" in caplog.text
