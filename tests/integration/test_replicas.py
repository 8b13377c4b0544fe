"""Several fleetd replicas on one PostgreSQL (issue 13): agents and
operators on any of them, events passed on through the event table, one
leader for the fleet-wide ticker. Real fleetd processes and a real
PostgreSQL; the agents here are raw /agent links, so that each frame is
the test's to send."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import zipfile

import pytest
from rawagent import RawAgent  # tests/ is on sys.path (rootdir conftest)
from websockets.exceptions import ConnectionClosed

from fleet.common import protocol

pytestmark = pytest.mark.own_store  # always three replicas on PostgreSQL: run once

TS = "2026-12-03T00:00:00Z"


class Link(RawAgent):
    """One agent's /agent link through one replica (tests/rawagent.py),
    connected and welcomed."""

    def __init__(self, fx, env, agent_token, hostname="replica-box", version=None, **hello):
        super().__init__(fx.ws_connect(env.url, "/agent", agent_token).__enter__(), timeout=20)
        if version is not None:
            hello["agent_version"] = version
        self.hello(fx.agent_hello(hostname=hostname, **hello))


@pytest.fixture
def three(fx, tmp_path):
    envs = fx.start_replicas(tmp_path, 3)
    yield envs
    for env in envs:
        fx.stop_and_check(env.fleetd)


def _leader(envs):
    return [e for e in envs if re.search(r"replica \w+ leads", e.fleetd.log())]


def test_three_replicas_serve_one_fleet_and_pass_events_on(fx, three):
    a, b, c = three
    host = fx.uniq("rep")
    enrolled = fx.enroll_agent(a, host)  # enrolled through A
    link = Link(fx, b, enrolled["agent_token"])  # connected through B
    fx.wait_until(
        lambda: c.ctl_json("hosts", "show", host)["status"] == "online",
        what="C to see the host online",
    )
    a.rpc("groups.create", host=host, name="etc", includes=["/etc"])

    # run-now on A: B, which holds the agent's link, dispatches it at once
    job = a.rpc("jobs.run", host=host, group="etc")
    run = link.next_of("command.run", job_id=job["id"])
    assert run["data"]["kind"] == "backup"
    link.ws.send(protocol.encode("command.result", {"job_id": job["id"], "accepted": True}))

    # tail on C follows the job running through B
    tail = fx.run_fleetctl_proc("jobs", "tail", str(job["id"]), server=c.url, token=c.admin_token)
    started = {"job_id": job["id"], "kind": "backup", "started_at": TS}
    link.acked(link.report("job.started", started))
    fx.wait_until(
        lambda: c.ctl_json("jobs", "show", job["id"])["status"] == "running",
        what="the job to run",
    )
    payloads = [f"line {i} of the backup" for i in range(1, 31)]
    for i, text in enumerate(payloads, start=1):
        line = {"job_id": job["id"], "seq": i, "ts": TS, "stream": "stdout", "payload": text}
        last = link.report("job.log", line)
    link.acked(last)
    ended = {"job_id": job["id"], "status": "succeeded", "exit_code": 0, "finished_at": TS}
    link.acked(link.report("job.finished", ended))
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    shown = [line for line in out.splitlines() if "of the backup" in line]
    assert [p for line in shown for p in payloads if line.endswith(p)] == payloads
    assert c.ctl_json("jobs", "show", job["id"])["status"] == "succeeded"

    # cancel from C of a job running through B: B tells the agent
    second = c.rpc("jobs.run", host=host, group="etc")
    link.next_of("command.run", job_id=second["id"])
    link.ws.send(protocol.encode("command.result", {"job_id": second["id"], "accepted": True}))
    started = {"job_id": second["id"], "kind": "backup", "started_at": TS}
    link.acked(link.report("job.started", started))
    c.ctl("jobs", "cancel", second["id"])
    link.next_of("command.cancel", job_id=second["id"])
    ended = {"job_id": second["id"], "status": "cancelled", "exit_code": 130, "finished_at": TS}
    link.acked(link.report("job.finished", ended))
    assert a.ctl_json("jobs", "show", second["id"])["status"] == "cancelled"

    # a schedule made on C reaches the agent through B
    c.ctl("schedules", "create", host, "--cron", "0 3 * * *", "--name", "nightly", "--group", "etc")
    pushed = link.next_of("schedule.set")
    assert [s["name"] for s in pushed["data"]["schedules"]] == ["nightly"]

    # the agent connects again through A: the older link through B is closed,
    # the host stays online, and the end of the old link does not change that
    again = Link(fx, a, enrolled["agent_token"])
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            link.ws.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
    assert c.ctl_json("hosts", "show", host)["status"] == "online"
    fx.wait_until(
        lambda: "connected through another fleetd" in b.fleetd.log(),
        what="B to let the old link go",
    )
    assert c.ctl_json("hosts", "show", host)["status"] == "online"
    again.close()
    fx.wait_until(
        lambda: b.ctl_json("hosts", "show", host)["status"] == "offline",
        what="the host to go offline when its one link ends",
    )

    # exactly one replica leads
    assert len(_leader(three)) == 1


def test_a_token_revoked_on_one_replica_is_refused_by_the_others(fx, three):
    a, b, _ = three
    user = a.add_user("operator")
    assert b.rpc("auth.whoami", token=user.token)["user"] == user.name  # cached on B now
    a.ctl("users", "remove", user.name, "--yes")
    fx.wait_until(
        lambda: _refused(fx, b, user.token),
        timeout=10,
        what="B to refuse the removed user's token",
    )


def _refused(fx, env, token):
    try:
        env.rpc("auth.whoami", token=token)
    except Exception:
        return True
    return False


def test_the_leader_sigkilled_another_leads_and_its_agents_go_offline(fx, three):
    a, b, c = three
    leader = fx.wait_until(lambda: _leader(three), what="a leader")[0]
    others = [e for e in three if e is not leader]
    host = fx.uniq("rep")
    enrolled = fx.enroll_agent(others[0], host)
    link = Link(fx, leader, enrolled["agent_token"])
    fx.wait_until(
        lambda: others[1].ctl_json("hosts", "show", host)["status"] == "online",
        what="the host online",
    )
    leader.fleetd.proc.send_signal(signal.SIGKILL)
    leader.fleetd.wait()
    with pytest.raises(ConnectionClosed):
        while True:
            link.ws.recv(timeout=10)
    # another takes the lead within seconds (its lock died with the process)
    new = fx.wait_until(lambda: _leader(others), timeout=15, what="another leader")
    assert len(new) == 1
    # the agent did not come back through another replica: offline once the
    # dead replica is seen silent (15 s) by the new leader
    fx.wait_until(
        lambda: others[0].ctl_json("hosts", "show", host)["status"] == "offline",
        timeout=40,
        what="the dead replica's host to go offline",
    )
    assert "is silent for over 15 s" in new[0].fleetd.log()


def test_failed_logins_on_one_replica_count_on_the_others(fx, three):
    a, b, _ = three
    user = a.add_user("viewer")
    for _ in range(5):  # the limit of one user from one address
        with pytest.raises(fx.RpcError) as refused:
            fx.api_login(a.url, user.name, "not-the-password")
        assert refused.value.code == "unauthorized"

    tries = []

    def limited_on_b():
        # fewer tries than B's own limit: only A's failures can make it refuse
        assert len(tries) < 4, "B did not count A's failures"
        tries.append(1)
        try:
            fx.api_login(b.url, user.name, "still-not-it")
        except fx.RpcError as exc:
            return exc.code == "rate_limited"
        raise AssertionError("a wrong password was taken")

    # B heard of A's failures: a guess there is slowed down as on A
    fx.wait_until(limited_on_b, timeout=10, interval=0.5, what="B to count A's failed logins")


def fake_agent_file(path, version):
    """A file fleetd serves as the agent (its version inside): enough for a
    rollout, which an agent standing in for the real one answers."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__main__.py", "print('not a real agent')\n")
        zf.writestr("site-packages/fleet/__init__.py", f'__version__ = "{version}"\n')
    return path


def test_a_rollout_started_on_one_replica_reaches_agents_on_the_others(fx, tmp_path):
    pyz = fake_agent_file(tmp_path / "fleet-agent.pyz", "8.8.8")
    a, b = fx.start_replicas(tmp_path / "fleet", 2, "--agent-pyz", str(pyz))
    try:
        host = fx.uniq("roll")
        enrolled = fx.enroll_agent(a, host)
        link = Link(fx, b, enrolled["agent_token"], features=["repositories", "upgrade"])
        fx.wait_until(
            lambda: a.ctl_json("hosts", "show", host)["status"] == "online",
            what="A to see the host online through B",
        )
        plan = a.ctl_json("agents", "upgrade", "--dry-run")
        assert [(h["host"], h["status"]) for h in plan["hosts"]] == [(host, "pending")]
        a.rpc("agents.upgrade", timeout=60)  # driven by A
        upgrade = link.next_of("agent.upgrade")  # sent by B, which holds the link
        assert upgrade["data"]["version"] == "8.8.8"
        link.close()
        # the "new agent" comes back through A
        again = Link(fx, a, enrolled["agent_token"], version="8.8.8", features=["upgrade"])
        done = fx.wait_until(
            lambda: (r := b.rpc("agents.rollout"))["status"] != "running" and r,
            timeout=30,
            what="the rollout to end",
        )
        assert done["status"] == "succeeded", done
        again.close()
    finally:
        for env in (a, b):
            fx.stop_and_check(env.fleetd)


def _now():
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _backup(link, job_id, status, error=None):
    """The agent's part of a backup, at the time it is now (an old one is overdue)."""
    link.ws.send(protocol.encode("command.result", {"job_id": job_id, "accepted": True}))
    link.report("job.started", {"job_id": job_id, "kind": "backup", "started_at": _now()})
    ended = {"job_id": job_id, "status": status, "exit_code": 0, "finished_at": _now()}
    if error:
        ended.update(exit_code=1, error=error)
    link.acked(link.report("job.finished", ended))


def test_alerts_notifications_and_pings_are_sent_once_not_once_per_replica(fx, tmp_path):
    receiver = fx.Receiver()
    envs = fx.start_replicas(tmp_path / "fleet", 3, "--alert-interval", "0.2")
    try:
        a, b, c = envs
        host = fx.uniq("once")
        enrolled = fx.enroll_agent(a, host)
        link = Link(fx, b, enrolled["agent_token"])
        url_file = tmp_path / "url"
        url_file.write_text(f"json://127.0.0.1:{receiver.port}/hook\n")
        a.ctl("notify", "add", "ops", "--url-file", url_file, "--on", "backup_failed")
        ping = tmp_path / "ping"
        ping.write_text(f"http://127.0.0.1:{receiver.port}/ping/check\n")
        a.rpc("groups.create", host=host, name="etc", includes=["/etc"])
        # scheduled: a failure of a group nobody schedules is not an alert
        b.rpc("schedules.create", host=host, name="hourly", cron="0 * * * *", groups=["etc"])
        c.ctl("groups", "edit", host, "etc", "--ping-url-file", ping)

        failed = a.rpc("jobs.run", host=host, group="etc")
        link.next_of("command.run", job_id=failed["id"])
        _backup(link, failed["id"], "failed", "Fatal: disk on fire")
        fx.wait_until(
            lambda: any(al["kind"] == "backup_failed" for al in c.ctl_json("alerts", "list")),
            what="the failure's alert",
        )
        ok = c.rpc("jobs.run", host=host, group="etc")
        link.next_of("command.run", job_id=ok["id"])
        _backup(link, ok["id"], "succeeded")

        def failure_resolved():
            alerts = c.ctl_json("alerts", "list", "--all")
            failures = [al for al in alerts if al["kind"] == "backup_failed"]
            return failures and all(al["resolved_at"] for al in failures)

        fx.wait_until(failure_resolved, timeout=20, what="the alert raised and resolved")
        # then a mark that ends what is to be looked at: nothing after it
        c.ctl("notify", "test", "ops")
        got = []
        while not got or "test notification" not in got[-1][1]:
            got.append(receiver.next_raw())
        paths = [path for path, _ in got]
        titles = [json.loads(body)["title"] for path, body in got if path == "/hook"]
        assert [t for t in titles if "raised" in t] and len(
            [t for t in titles if "raised" in t]
        ) == 1
        assert len([t for t in titles if "resolved" in t]) == 1, titles
        assert sorted(p for p in paths if p.startswith("/ping")) == sorted(
            ["/ping/check/start", "/ping/check/fail", "/ping/check/start", "/ping/check"]
        ), paths
    finally:
        for env in envs:
            fx.stop_and_check(env.fleetd)
        receiver.close()


def test_a_claim_waits_while_another_replica_claims_on_its_repository(fx, tmp_path, postgres):
    """On PostgreSQL a claim first holds the repositories it would work on
    (advisory locks, not waited for): held elsewhere, the host is looked at
    again a moment later, and gets its job once they are let go."""
    from fleet.server.store.db import locate
    from fleet.server.store.queries.hot import CLAIMS

    (a,) = fx.start_replicas(tmp_path / "fleet", 1)
    try:
        host = fx.uniq("claim")
        enrolled = fx.enroll_agent(a, host)
        repo = fx.uniq("r")
        a.rpc("repos.create", name=repo, url=f"/srv/{repo}", password="pw", env={})
        a.rpc("repos.use", name=repo, hosts=[host])
        with fx.store_sql(a.data_dir) as sql:
            ((repo_id,),) = sql('SELECT "id" FROM "repository" WHERE "name" = ?', repo)
        link = Link(fx, a, enrolled["agent_token"])
        init = link.next_of("command.run")  # the repository's auto-init, first
        _backup(link, init["data"]["job_id"], "succeeded")
        dbname = locate((a.data_dir / "database").read_text().strip()).postgresql["dbname"]
        with postgres.connect(dbname) as other:  # another replica, claiming on it
            other.execute("BEGIN")
            other.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIMS + repo_id,))
            job = a.rpc("jobs.run", host=host, kind="check")
            assert job["status"] == "queued"  # not claimed with the run-now: contended
            assert a.ctl_json("jobs", "show", job["id"])["status"] == "queued"
            other.execute("COMMIT")
        run = link.next_of("command.run", job_id=job["id"])  # looked at again, and sent
        assert run["data"]["kind"] == "check"
    finally:
        fx.stop_and_check(a.fleetd)
