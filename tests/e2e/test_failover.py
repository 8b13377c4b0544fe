"""Agent failover between fleetd replicas (issue 13), with real processes.

Two fleetd processes cannot share one SQLite data directory, so the
replicas here are one real fleetd reached by several URLs: TCP relays
(tests/e2e/relay.py) in front of it, and its own port. What the agent does
is the same as with replicas: a refused or dropped URL makes it dial the
next one, and what it spooled arrives once, whichever URL carries it.
"""

from __future__ import annotations

import json
import re
import shutil
import types

import pytest

from fleet.common import protocol

pytestmark = pytest.mark.own_store  # the agent's and fleetctl's side of failover: run once

HALF = 500  # hook lines before the gate, and after it
HOOK_LINE = re.compile(r"line (\d+)")


def servers_file(h) -> list:
    return json.loads((h.agent.state_dir / "servers.json").read_text())["urls"]


def enrolled_host(e2e, fleet, enrollment=None, start=True) -> types.SimpleNamespace:
    """A host with a repository (a copy of the session's), enrolled with
    `enrollment(token)` (default: fleetd's own string), its agent started."""
    name = e2e.fx.uniq("fo")
    base = e2e.tmp_path / name
    base.mkdir()
    h = types.SimpleNamespace(name=name, base=base, src=base / "src", agent=e2e.agent(name))
    h.src.mkdir()
    h.repo = base / "repo"
    shutil.copytree(e2e.template.repo, h.repo)
    (base / "pw").write_text(e2e.template.password + "\n")
    string = fleet.ctl_json("enroll", name)["enrollment"]
    if enrollment is not None:
        string = enrollment(protocol.parse_enrollment(string)["token"])
    proc = h.agent.enroll(string, hostname=name)
    assert proc.returncode == 0, f"enroll failed: {proc.stdout}{proc.stderr}"
    h.enroll_output = proc.stdout + proc.stderr
    fleet.ctl("repo", "set", name, "--url", h.repo, "--password-file", base / "pw")
    if start:
        e2e.start(fleet, h, wait_init=True)
    return h


def test_a_refused_first_replica_is_passed_over_at_enrollment_and_at_start(
    fleetd_factory, e2e, relay
):
    Relay = type(relay)
    with Relay() as first:
        fleet = fleetd_factory("--public-url", first.url, "--public-url", relay.url)
        first.retarget(fleet.fleetd.port)
        relay.retarget(fleet.fleetd.port)

        # both up: the agent enrolls with, and dials, the first
        h = enrolled_host(e2e, fleet)
        assert h.agent.identity["server_url"] == first.url
        assert servers_file(h) == [first.url, relay.url]
        assert e2e.agent_status(h)["servers"] == [first.url, relay.url]
        assert first.connections >= 1 and relay.connections == 0
        h.agent.wait_log(f"connected to {first.url}")

        # the first refuses connections (its host is down): the agent, restarted,
        # dials it first, is refused, and connects to the second
        assert h.agent.stop() == 0
        first.cut()
        e2e.start(fleet, h)
        h.agent.wait_log(f"connected to {relay.url}")
        assert re.search(
            rf"link to {re.escape(first.url)} down \(.*\); redialling in [0-9.]+ s, "
            rf"at {re.escape(relay.url)}",
            h.agent.log(),
        ), h.agent.log()

        # a new host enrolls through the second, and dials it first from then on
        other = enrolled_host(e2e, fleet)
        assert other.agent.identity["server_url"] == relay.url
        assert servers_file(other) == [first.url, relay.url]
        assert f"cannot reach {first.url}" in other.enroll_output
        other.agent.wait_log(f"connected to {relay.url}")
        assert first.refused == 0  # closed, not resetting: nothing reached it


def assert_delivered_once(e2e, fleet, job_id: int) -> dict:
    """The stored log: seqs 1..N, every hook line once and in order, restic's
    summary once."""
    job = e2e.show(fleet, job_id)
    lines = e2e.log_lines(fleet, job_id)
    seqs = [ln["seq"] for ln in lines]
    assert seqs == list(range(1, len(seqs) + 1)), "seqs are not 1..N"
    assert job["log_lines"] == len(lines)
    payloads = [ln["payload"] for ln in lines]
    hook = [p for p in payloads if HOOK_LINE.fullmatch(p)]
    assert hook == [f"line {i}" for i in range(1, 2 * HALF + 1)], (
        f"{len(hook)} hook lines, {len(set(hook))} of them different"
    )
    events = [json.loads(ln["payload"]) for ln in lines if ln["stream"] == "event"]
    assert len([ev for ev in events if ev.get("message_type") == "summary"]) == 1
    return job


def test_a_link_cut_mid_backup_fails_over_to_the_next_url_and_loses_nothing(
    fleetd_factory, e2e, relay, fx
):
    """The agent's list: a relay first, fleetd's own port next. The relay is
    cut mid-backup (and refuses from then on): the agent dials fleetd
    directly at once, and every log line arrives once."""
    fleet = fleetd_factory()  # told no URLs: its welcome leaves the agent's list alone
    relay.retarget(fleet.fleetd.port)
    urls = [relay.url, fleet.url]
    h = enrolled_host(
        e2e, fleet, lambda token: protocol.format_enrollment(urls[0], token, urls=urls)
    )
    assert servers_file(h) == urls
    h.agent.wait_log(f"connected to {relay.url}")
    relayed = relay.connections  # the enrollment's, and the link's
    assert relayed == 2

    e2e.write_tree(h.src, {"data/a.txt": "a\n" * 100, "etc/app.conf": "x = 1\n"})
    gate = h.base / "gate"
    group = e2e.group(fleet, h, "--pre-hook", e2e.gated_hook(gate, HALF))
    job_id = e2e.run(fleet, h.name, group)["id"]
    fx.wait_until(
        lambda: (
            (j := e2e.show(fleet, job_id))["status"] == "running" and j["log_lines"] >= HALF and j
        ),
        timeout=30,
        interval=0.1,
        what=f"job {job_id} to store the hook's first {HALF} lines",
    )

    connected = h.agent.count(f"connected to {fleet.url}")
    relay.cut()  # mid-session: both ends see a reset; new dials are refused
    h.agent.wait_log(f"connected to {fleet.url}", connected + 1, timeout=10)
    down = re.search(
        rf"link to {re.escape(relay.url)} down \(.*\); redialling in ([0-9.]+) s, "
        rf"at {re.escape(fleet.url)}",
        h.agent.log(),
    )
    assert down, h.agent.log()
    assert float(down.group(1)) <= 1.0  # the next replica promptly, not after a backoff
    gate.touch()  # the rest of the job goes over the new link

    done = e2e.wait_job(fleet, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["exit_code"] == 0, done
    assert_delivered_once(e2e, fleet, job_id)
    fx.wait_until(
        lambda: e2e.agent_status(h)["unacknowledged_frames"] == 0,
        timeout=10,
        what="fleetd to acknowledge the whole spool",
    )
    assert relay.connections == relayed  # nothing came back through the cut relay
    assert servers_file(h) == urls  # a fleetd told no URLs changed nothing


def test_agents_learn_a_replica_added_later_from_welcome(fleetd_factory, e2e, relay, fx):
    """An agent enrolled with one URL learns the replicas fleetd names in
    its welcome once fleetd is restarted knowing them (and a URL of another
    scheme is never taken)."""
    fleet = fleetd_factory("--public-url", relay.url)
    relay.retarget(fleet.fleetd.port)
    h = enrolled_host(e2e, fleet)
    assert "servers.json" not in {p.name for p in h.agent.state_dir.iterdir()}
    assert e2e.agent_status(h)["servers"] == [relay.url]

    Relay = type(relay)
    with Relay(fleet.fleetd.port) as added:
        old = fleet.fleetd
        assert old.stop() == 0
        new = fx.Fleetd(
            old.data_dir,
            old.log_path.with_name("fleetd-2.log"),
            "--public-url",
            f"{relay.url},{added.url}",
            listen=f"127.0.0.1:{old.port}",
        ).start()
        fleet.fleetd = new
        h.agent.wait_log(f"fleetd replicas: {relay.url}, {added.url}", timeout=30)
        assert servers_file(h) == [relay.url, added.url]
        assert e2e.agent_status(h)["servers"] == [relay.url, added.url]

        # the first goes away: the agent reaches the replica it was told of
        connected = h.agent.count(f"connected to {added.url}")
        relay.cut()
        h.agent.wait_log(f"connected to {added.url}", connected + 1, timeout=15)
        e2e.wait_host(fleet, h.name, "online")
