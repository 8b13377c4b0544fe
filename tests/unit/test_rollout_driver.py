"""fleet.server.agents.rollout.Rollouts, the driver, against a real SQLite
store and bus, with a stand-in for the agent sessions: what it sends, how
answers and hellos move each host on, batch by batch, the skips, the busy
retry, the timeout, the halt, and taking a rollout up again after a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

from fleet.common import protocol
from fleet.server.agents import rollout
from fleet.server.events import AgentHello, Bus, RolloutChanged, UpgradeAnswered
from fleet.server.store.db import Store
from fleet.server.store.models import AuditLog, Host, RolloutHost, utcnow

OLD, NEW = "0.1.0", "0.2.0"
AGENT = {"version": NEW, "sha256": "ab" * 32, "size_bytes": 100}


class AgentFile:
    sha256 = AGENT["sha256"]


class Sessions:
    """Who is connected and what they can do; what was sent to whom."""

    def __init__(self, links: dict[int, tuple[str, ...]]) -> None:
        self.links = links
        self.sent: asyncio.Queue = asyncio.Queue()

    def connected(self, host_id: int) -> bool:
        return host_id in self.links

    def features(self, host_id: int) -> frozenset[str]:
        return frozenset(self.links.get(host_id, ()))

    async def reach(self, host_id: int):
        return self.features(host_id) if self.connected(host_id) else None

    def upgrade(self, host_id: int, data: dict) -> None:
        """As Agents.upgrade: the frame goes to whichever replica holds the link."""
        self.sent.put_nowait((host_id, json.loads(protocol.encode("agent.upgrade", data))))

    async def next_sent(self) -> tuple[int, dict]:
        return await asyncio.wait_for(self.sent.get(), 5)


def run(tmp_path: Path, scenario) -> None:
    async def main() -> None:
        store = Store(tmp_path / "fleet.db")
        await store.open()
        try:
            await scenario(store, Bus())
        finally:
            await store.close()

    asyncio.run(main())


def make_hosts(names: list[str]) -> dict[str, int]:
    return {n: Host.create(name=n, agent_token_hash=f"h-{n}", agent_version=OLD).id for n in names}


def start(store: Store, hosts: dict[str, int], batch: int, timeout: int):
    def create() -> int:
        planned = rollout.plan([(hid, n, OLD) for n, hid in hosts.items()], NEW, batch)
        return rollout.create("alice", None, batch, timeout, AGENT, planned).id

    return store.atomic(create)


async def ended(bus: Bus, rollout_id: int) -> asyncio.Future:
    done = asyncio.get_running_loop().create_future()

    def on_change(event: RolloutChanged) -> None:
        if event.rollout_id == rollout_id and event.ended and not done.done():
            done.set_result(None)

    bus.subscribe(RolloutChanged, on_change)
    return done


def test_batches_skips_busy_retry_and_the_halt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollout, "BUSY_RETRY", 0.01)

    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["a", "b", "c", "d", "e", "f"])
        ids = {v: k for k, v in hosts.items()}
        upgrade = ("upgrade",)
        sessions = Sessions(
            {
                hosts["a"]: upgrade,
                hosts["b"]: upgrade,
                hosts["d"]: (),
                hosts["e"]: upgrade,
                hosts["f"]: upgrade,
            }
        )
        rollouts = rollout.Rollouts(store, bus, sessions, AgentFile())
        rid = await start(store, hosts, batch=2, timeout=1)
        done = await ended(bus, rid)
        rollouts.start(rid)

        # batch 1: a and b; a is busy and asked again, then both come back new
        sent = {ids[(await sessions.next_sent())[0]] for _ in range(2)}
        assert sent == {"a", "b"}
        bus.publish([UpgradeAnswered(hosts["a"], NEW, False, "busy", "job 7 is running")])
        assert ids[(await sessions.next_sent())[0]] == "a"  # asked again
        bus.publish([AgentHello(hosts["a"], NEW), AgentHello(hosts["b"], NEW)])
        # batch 2: c offline, d too old: both skipped, nothing to wait for;
        # batch 3: e fails its checks, f never answers
        sent = {ids[(await sessions.next_sent())[0]] for _ in range(2)}
        assert sent == {"e", "f"}
        bus.publish([UpgradeAnswered(hosts["e"], NEW, False, "self_check", "exit 1")])
        await asyncio.wait_for(done, 5)
        view = await store.read(rollout.load, rid)
        lines = {h["host"]: (h["batch"], h["status"], h["detail"]) for h in view["hosts"]}
        assert lines == {
            "a": (1, "upgraded", None),
            "b": (1, "upgraded", None),
            "c": (2, "skipped", "offline"),
            "d": (2, "skipped", "its agent is too old to upgrade itself: replace its file by hand"),
            "e": (3, "failed", "self_check: exit 1"),
            "f": (3, "failed", f"no hello with fleet-agent {NEW} within 1 s"),
        }
        assert (view["status"], view["reason"], view["outcome"]) == (
            "halted",
            "e: self_check: exit 1",
            "halted",
        )
        audited = await store.read(lambda: [a.action for a in AuditLog.select()])
        assert audited == ["agents.rollout_halted"]

    run(tmp_path, scenario)


def test_a_rollback_halts_before_the_next_batch(tmp_path: Path) -> None:
    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["x", "y"])
        sessions = Sessions({h: ("upgrade",) for h in hosts.values()})
        rollouts = rollout.Rollouts(store, bus, sessions, AgentFile())
        rid = await start(store, hosts, batch=1, timeout=60)
        done = await ended(bus, rid)
        rollouts.start(rid)
        host, frame = await sessions.next_sent()
        assert host == hosts["x"]
        assert frame["type"] == "agent.upgrade"
        assert frame["data"] == {
            "version": NEW,
            "sha256": AGENT["sha256"],
            "size": 100,
            "deadline": 20,
        }  # a third of the timeout
        # back as it was without a word (it never got the frame): asked again
        bus.publish([AgentHello(hosts["x"], OLD)])
        assert (await sessions.next_sent())[0] == hosts["x"]
        bus.publish([AgentHello(hosts["x"], OLD, NEW, "no hello accepted")])
        await asyncio.wait_for(done, 5)
        view = await store.read(rollout.load, rid)
        assert [(h["host"], h["status"]) for h in view["hosts"]] == [
            ("x", "failed"),
            ("y", "pending"),
        ]
        assert view["reason"] == "x: rolled back: no hello accepted"
        assert sessions.sent.empty()  # y was never asked

    run(tmp_path, scenario)


def test_a_rollout_is_taken_up_again_after_a_restart(tmp_path: Path) -> None:
    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["o", "p", "q"])
        rid = await start(store, hosts, batch=1, timeout=60)

        def sent_before_the_restart() -> None:
            # p was sent the upgrade, came back new while fleetd was down; so
            # did o, sent it as fleetd stopped, before its row said so
            RolloutHost.update(status="sent", sent_at=utcnow() - dt.timedelta(seconds=5)).where(
                RolloutHost.host == hosts["p"]
            ).execute()
            Host.update(agent_version=NEW).where(Host.id.in_([hosts["o"], hosts["p"]])).execute()

        await store.atomic(sent_before_the_restart)
        sessions = Sessions({h: ("upgrade",) for h in hosts.values()})
        rollouts = rollout.Rollouts(store, bus, sessions, AgentFile())
        done = await ended(bus, rid)
        await rollouts.resume()
        assert (await sessions.next_sent())[0] == hosts["q"]  # o and p are done: q's turn
        bus.publish([AgentHello(hosts["q"], NEW)])
        await asyncio.wait_for(done, 5)
        view = await store.read(rollout.load, rid)
        assert (view["status"], view["outcome"]) == ("succeeded", "ok")
        assert view["counts"] == {"upgraded": 3} and sessions.sent.empty()

    run(tmp_path, scenario)


def test_a_rollout_of_a_file_fleetd_no_longer_serves_halts(tmp_path: Path) -> None:
    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["r"])
        rid = await start(store, hosts, batch=1, timeout=60)
        other = type("Other", (), {"sha256": "cd" * 32})()
        sessions = Sessions({hosts["r"]: ("upgrade",)})
        done = await ended(bus, rid)
        await rollout.Rollouts(store, bus, sessions, other).resume()
        await asyncio.wait_for(done, 5)
        view = await store.read(rollout.load, rid)
        assert view["status"] == "halted" and "no longer serves fleet-agent 0.2.0" in view["reason"]
        assert sessions.sent.empty()

    run(tmp_path, scenario)


def test_a_halted_rollout_sends_nothing_more(tmp_path: Path) -> None:
    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["s", "t"])
        sessions = Sessions({h: ("upgrade",) for h in hosts.values()})
        rollouts = rollout.Rollouts(store, bus, sessions, AgentFile())
        rid = await start(store, hosts, batch=1, timeout=60)
        rollouts.start(rid)
        assert (await sessions.next_sent())[0] == hosts["s"]
        assert await rollouts.halt(rid, "halted by alice") is True
        assert await rollouts.halt(rid, "again") is False  # ended already
        bus.publish([AgentHello(hosts["s"], NEW)])  # nobody follows it any more
        view = await store.read(rollout.load, rid)
        assert (view["status"], view["reason"]) == ("halted", "halted by alice")
        assert [(h["host"], h["status"]) for h in view["hosts"]] == [
            ("s", "sent"),
            ("t", "pending"),
        ]
        assert rid not in rollouts.tasks and sessions.sent.empty()

    run(tmp_path, scenario)


def test_a_resumed_rollout_waits_for_its_agents_to_come_back(tmp_path: Path) -> None:
    """After a restart no agent has redialled yet: the rollout waits for
    them (up to its grace) instead of skipping every host as offline."""

    async def scenario(store: Store, bus: Bus) -> None:
        hosts = await store.run(make_hosts, ["s", "t"])
        rid = await start(store, hosts, batch=1, timeout=60)
        sessions = Sessions({})  # fleetd just started: nobody is back
        rollouts = rollout.Rollouts(store, bus, sessions, AgentFile(), reconnect_grace=30)
        await rollouts.resume()
        assert sessions.sent.empty() and rid not in rollouts.tasks
        sessions.links[hosts["s"]] = ("upgrade",)
        bus.publish([AgentHello(hosts["s"], OLD)])  # s is back; t is not yet
        sessions.links[hosts["t"]] = ("upgrade",)
        bus.publish([AgentHello(hosts["t"], OLD)])
        assert (await sessions.next_sent())[0] == hosts["s"]  # not skipped as offline
        assert rid in rollouts.tasks
        await rollouts.halt(rid, "test over")

    run(tmp_path, scenario)
