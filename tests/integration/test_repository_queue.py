"""One queue per repository across the fleet, on a real fleetd with raw
sockets standing in for the agents: prune, check, forget and unlock take a
shared repository for themselves; backups from several hosts share it."""

from __future__ import annotations

import itertools
import json

import pytest

from fleet.common import protocol

TS = "2026-12-02T00:00:00Z"


class FakeAgent:
    """An agent link: takes commands, reports starts and ends under its seqs."""

    def __init__(self, ws):
        self.ws = ws
        self.seq = itertools.count(1)
        self.pending = []

    def next_of(self, kind, timeout=10):
        for i, frame in enumerate(self.pending):
            if frame["type"] == kind:
                return self.pending.pop(i)
        while True:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if frame["type"] == kind:
                return frame
            self.pending.append(frame)

    def take(self, kind):
        """The next command.run, which must be of this kind: accepted, started."""
        data = self.next_of("command.run")["data"]
        assert data["kind"] == kind, data
        self.ws.send(
            protocol.encode("command.result", {"job_id": data["job_id"], "accepted": True})
        )
        started = {"job_id": data["job_id"], "kind": kind, "started_at": TS}
        self.ws.send(protocol.encode("job.started", started, seq=next(self.seq)))
        return data["job_id"]

    def finish(self, job_id):
        done = {"job_id": job_id, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        self.ws.send(protocol.encode("job.finished", done, seq=next(self.seq)))

    def assert_nothing_sent(self, fleet):
        """No command.run came: a round trip through fleetd shows it."""
        fleet.rpc("auth.whoami")
        self.ws.send(json.dumps({"v": 1, "type": "no.such", "id": "probe", "data": {}}))
        while True:
            frame = json.loads(self.ws.recv(timeout=10))
            assert frame["type"] != "command.run", frame
            if frame["type"] == "error" and frame["data"].get("re") == "probe":
                return


@pytest.fixture
def shared(fleet, fx, tmp_path):
    """Two enrolled hosts using one repository, each with an 'etc' group, and
    their agents connected (their init jobs run and done)."""
    names = [fx.uniq("q"), fx.uniq("q")]
    tokens = {}
    for name in names:
        tokens[name] = fx.enroll_agent(fleet, name, hostname=name)["agent_token"]
        fleet.rpc("groups.create", host=name, name="etc", includes=["/etc"])
    repo = fx.uniq("shared")
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    fleet.ctl("repos", "create", repo, "--url", "/srv/shared", "--password-file", pw)
    fleet.ctl("repos", "use", repo, *names)
    with (
        fx.ws_connect(fleet.url, "/agent", tokens[names[0]]) as a,
        fx.ws_connect(fleet.url, "/agent", tokens[names[1]]) as b,
    ):
        agents = {names[0]: FakeAgent(a), names[1]: FakeAgent(b)}
        for agent in agents.values():
            agent.ws.send(fx.agent_hello())
            agent.next_of("welcome")
            agent.finish(agent.take("init"))
        yield {"repo": repo, "names": names, "agents": agents}


def _waiting(fleet, job_id):
    return fleet.ctl_json("jobs", "show", job_id)["waiting_for"]


def test_a_prune_waits_for_a_backup_of_another_host_and_backups_wait_for_it(fleet, fx, shared):
    web, db = shared["names"]
    a, b = shared["agents"][web], shared["agents"][db]
    repo = shared["repo"]

    backup = fleet.rpc("jobs.run", host=web, group="etc")["id"]
    assert a.take("backup") == backup
    prune = fleet.rpc("jobs.run", host=db, kind="prune")
    assert prune["status"] == "queued"
    b.assert_nothing_sent(fleet)
    assert _waiting(fleet, prune["id"]) == f"repository {repo}: backup job {backup} of {web} runs"
    listed = {j["id"]: j for j in fleet.ctl_json("jobs", "list", "--host", db)}
    assert listed[prune["id"]]["waiting_for"].startswith(f"repository {repo}: backup job")
    assert "waits: repository" in fleet.ctl("jobs", "list", "--host", db).stdout

    a.finish(backup)  # the repository is free: the other host's prune goes out
    assert b.take("prune") == prune["id"]

    second = fleet.rpc("jobs.run", host=web, group="etc")
    assert second["status"] == "queued"
    a.assert_nothing_sent(fleet)
    assert (
        _waiting(fleet, second["id"]) == f"repository {repo}: prune job {prune['id']} of {db} runs"
    )
    b.finish(prune["id"])
    assert a.take("backup") == second["id"]
    a.finish(second["id"])


def test_backups_of_hosts_sharing_a_repository_run_at_once(fleet, fx, shared):
    web, db = shared["names"]
    a, b = shared["agents"][web], shared["agents"][db]
    first = fleet.rpc("jobs.run", host=web, group="etc")["id"]
    second = fleet.rpc("jobs.run", host=db, group="etc")["id"]
    assert a.take("backup") == first and b.take("backup") == second  # neither waits
    for agent, job in ((a, first), (b, second)):
        agent.finish(job)


def test_a_queued_prune_goes_before_later_backups_of_other_hosts(fleet, fx, shared):
    """No starvation: backups queued after a prune on an online host wait for it."""
    web, db = shared["names"]
    a, b = shared["agents"][web], shared["agents"][db]
    repo = shared["repo"]
    running = fleet.rpc("jobs.run", host=web, group="etc")["id"]
    assert a.take("backup") == running
    prune = fleet.rpc("jobs.run", host=db, kind="check")["id"]
    later = fleet.rpc("jobs.run", host=web, group="etc")["id"]  # after the check
    a.finish(running)
    assert b.take("check") == prune  # the check first
    a.assert_nothing_sent(fleet)
    assert _waiting(fleet, later) == f"repository {repo}: check job {prune} of {db} runs"
    b.finish(prune)
    assert a.take("backup") == later
    a.finish(later)


def test_what_a_queued_job_waits_for_on_its_own_host(fleet, fx, shared):
    web, _ = shared["names"]
    a = shared["agents"][web]
    running = fleet.rpc("jobs.run", host=web, group="etc")["id"]
    assert a.take("backup") == running
    queued = fleet.rpc("jobs.run", host=web, kind="check")["id"]
    assert _waiting(fleet, queued) == f"its host runs job {running} (backup)"
    a.finish(running)
    assert a.take("check") == queued
    a.finish(queued)
    assert "waiting_for" not in fleet.ctl_json("jobs", "show", queued)


def test_when_the_host_of_a_waiting_prune_goes_offline_the_others_backups_go(fleet, fx, shared):
    """A queued prune on an online host goes before later backups; once its
    host is offline it no longer does, and fleetd offers the others at once."""
    web, db = shared["names"]
    a, b = shared["agents"][web], shared["agents"][db]
    # web is busy with a job that leaves the repository to others
    busy = fleet.rpc("jobs.run", host=web, kind="snapshots")["id"]
    assert a.take("snapshots") == busy
    prune = fleet.rpc("jobs.run", host=web, kind="prune")["id"]  # so its prune waits, queued
    assert prune
    backup = fleet.rpc("jobs.run", host=db, group="etc")["id"]
    b.assert_nothing_sent(fleet)  # the prune goes first
    a.ws.close()  # web's agent goes away
    assert b.take("backup") == backup
    b.finish(backup)
