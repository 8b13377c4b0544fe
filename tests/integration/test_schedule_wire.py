"""fleetd's side of schedules on /agent, with a raw WebSocket client standing
in for fleet-agent: schedule.set pushed after welcome and on every change,
schedule.ack recorded (hosts show/list `schedule_lagging`), schedule.fire
turned into one backup per group (deduplicated by the fire's uid, folded into
a backup still waiting), and the jobs an agent runs on its own (negative ids)
recorded as fleetd jobs."""

from __future__ import annotations

import json

import pytest
from rawagent import RawAgent  # tests/ is on sys.path (rootdir conftest)

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


@pytest.fixture
def enrolled(fleet, fx):
    """A host whose agent token was obtained through /enroll."""
    host = fx.uniq("sched")
    data = fx.enroll_agent(fleet, host)
    return {"host": host, "host_id": data["host_id"], "agent_token": data["agent_token"]}


TS = "2026-12-02T00:00:00Z"  # started_at, finished_at, applied_at of what the "agent" reports


class Agent(RawAgent):
    """One /agent link seen from the agent's side (tests/rawagent.py)."""

    def hello(self, **extra):
        return super().hello(_hello(**extra))


def _agent_link(fleet, fx, enrolled):
    return fx.ws_connect(fleet.url, "/agent", enrolled["agent_token"])


def _host(fleet, host):
    return fleet.ctl_json("hosts", "show", host)


def _listed(fleet, host):
    return next(h for h in fleet.ctl_json("hosts", "list") if h["name"] == host)


def _group(fleet, host, name, includes, **more):
    return fleet.rpc("groups.create", host=host, name=name, includes=includes, **more)


def _schedule(fleet, host, *groups, name="nightly", cron="0 3 * * *", timezone=None):
    args = ["schedules", "create", host, "--cron", cron, "--name", name]
    for group in groups:
        args += ["--group", group]
    if timezone:
        args += ["--timezone", timezone]
    return fleet.ctl_json(*args)


def _jobs(fleet, host, **filters):
    """The host's jobs, oldest first."""
    return sorted(fleet.rpc("jobs.list", host=host, **filters), key=lambda j: j["id"])


def _job(fleet, job_id):
    return fleet.ctl_json("jobs", "show", job_id)


def _wire_group(group):
    """A source group as schedule.set carries it."""
    return {
        "id": group["id"],
        "name": group["name"],
        "includes": group["includes"],
        "excludes": group["excludes"],
        "retention": group["retention"] or {},
        "pre_hook": group["pre_hook"] or "",
        "post_hook": group["post_hook"] or "",
    }


# -- the schedule set: pushed, acknowledged ------------------------------------


def test_a_schedule_made_while_connected_is_pushed_and_lags_until_acknowledged(fleet, fx, enrolled):
    host = enrolled["host"]
    etc = _group(fleet, host, "etc", ["/etc", "/srv/conf"], excludes=["*.tmp"])
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=0)
        agent.sync()
        assert agent.seen("schedule.set") == []  # it holds version 0, the current one
        shown = _host(fleet, host)
        assert (shown["schedule_version"], shown["applied_schedule_version"]) == (0, 0)
        assert shown["schedule_lagging"] is False

        made = _schedule(fleet, host, "etc")
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed == {
            "version": 1,
            "schedules": [
                {
                    "id": made["id"],
                    "name": "nightly",
                    "cron": "0 3 * * *",
                    "timezone": "Europe/Paris",  # the host's, as its hello said
                    "enabled": True,
                    "source_groups": [_wire_group(etc)],
                }
            ],
        }
        shown = _host(fleet, host)
        assert (shown["schedule_version"], shown["applied_schedule_version"]) == (1, 0)
        assert shown["schedule_lagging"] is True
        assert _listed(fleet, host)["schedule_lagging"] is True

        agent.send("schedule.ack", {"version": 1, "applied_at": TS})
        agent.sync()  # the ack is handled before the probe is answered
        shown = _host(fleet, host)
        assert (shown["schedule_version"], shown["applied_schedule_version"]) == (1, 1)
        assert shown["schedule_lagging"] is False
        assert _listed(fleet, host)["schedule_lagging"] is False


def test_a_change_made_while_offline_comes_right_after_welcome(fleet, fx, enrolled):
    host = enrolled["host"]
    home = _group(fleet, host, "home", ["/home"])
    made = _schedule(fleet, host, "home", name="daily", cron="30 1 * * *")
    shown = _host(fleet, host)
    assert shown["schedule_version"] == 1 and shown["applied_schedule_version"] == 0
    assert shown["schedule_lagging"] is True  # its agent never heard of it

    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=0)
        agent.sync()
        # right after welcome (a config.update may come first: no repo here, though)
        after = [f for f in agent.pending if f["type"] != "config.update"]
        assert after and after[0]["type"] == "schedule.set", after
        assert len(agent.seen("schedule.set")) == 1
        pushed = after[0]["data"]
        current = _host(fleet, host)["schedule_version"]
        assert pushed["version"] == current >= 1
        [entry] = pushed["schedules"]
        assert (entry["id"], entry["name"], entry["cron"], entry["enabled"]) == (
            made["id"],
            "daily",
            "30 1 * * *",
            True,
        )
        # no zone of its own: the host's, as this very hello reported it
        assert entry["timezone"] == "Europe/Paris"
        assert entry["source_groups"] == [_wire_group(home)]
        assert _host(fleet, host)["schedule_lagging"] is True  # pushed, not acknowledged

    fx.wait_until(lambda: _host(fleet, host)["status"] == "offline", what="host offline")
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=current)
        agent.sync()
        assert agent.seen("schedule.set") == []
        # saying so in hello is as good as a schedule.ack
        shown = _host(fleet, host)
        assert shown["schedule_version"] == current
        assert shown["applied_schedule_version"] == current
        assert shown["schedule_lagging"] is False
        assert _listed(fleet, host)["schedule_lagging"] is False

    # the host moved to another zone: its schedule, which follows it, fires at
    # other times, so the set it holds is stale
    fx.wait_until(lambda: _host(fleet, host)["status"] == "offline", what="host offline")
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=current, timezone="America/New_York")
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed["version"] == current + 1 == _host(fleet, host)["schedule_version"]
        assert pushed["schedules"][0]["timezone"] == "America/New_York"
        assert _host(fleet, host)["schedule_lagging"] is True


def test_editing_a_scheduled_group_or_the_schedule_pushes_a_new_set(fleet, fx, enrolled):
    host = enrolled["host"]
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=0)
        etc = _group(fleet, host, "etc", ["/etc"])
        spare = _group(fleet, host, "spare", ["/spare"])
        assert _host(fleet, host)["schedule_version"] == 0  # groups alone change nothing
        made = _schedule(fleet, host, "etc", name="nightly")
        assert agent.next_of("schedule.set")["data"]["version"] == 1

        fleet.rpc("groups.edit", host=host, name="etc", includes=["/etc", "/opt"])
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed["version"] == 2 == _host(fleet, host)["schedule_version"]
        [entry] = pushed["schedules"]
        assert entry["id"] == made["id"] and entry["enabled"] is True
        assert entry["source_groups"][0]["includes"] == ["/etc", "/opt"]

        # a group no schedule uses: no new version (the next push says 3, not 2 again)
        fleet.rpc("groups.edit", host=host, name="spare", includes=["/spare", "/more"])
        assert _host(fleet, host)["schedule_version"] == 2

        fleet.ctl("schedules", "disable", host, "nightly")
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed["version"] == 3
        [entry] = pushed["schedules"]  # a disabled schedule is still sent
        assert entry["enabled"] is False and entry["source_groups"][0]["name"] == "etc"

        fleet.ctl("schedules", "disable", host, "nightly")  # already: no change
        fleet.ctl("schedules", "edit", host, "nightly", "--group", "etc", "--group", "spare")
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed["version"] == 4
        assert [g["id"] for g in pushed["schedules"][0]["source_groups"]] == [
            etc["id"],
            spare["id"],
        ]

        fleet.ctl("schedules", "delete", host, "nightly", "--yes")
        pushed = agent.next_of("schedule.set")["data"]
        assert pushed == {"version": 5, "schedules": []}
        agent.sync()
        assert agent.seen("schedule.set") == []  # one push per change, no more


def test_an_ack_of_a_version_fleetd_never_made_is_not_recorded(fleet, fx, enrolled):
    host = enrolled["host"]
    _group(fleet, host, "etc", ["/etc"])
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=0)
        _schedule(fleet, host, "etc")
        assert agent.next_of("schedule.set")["data"]["version"] == 1

        agent.send("schedule.ack", {"version": 7, "applied_at": TS})
        agent.sync()
        shown = _host(fleet, host)
        assert (shown["schedule_version"], shown["applied_schedule_version"]) == (1, 0)
        assert shown["schedule_lagging"] is True
        assert _listed(fleet, host)["schedule_lagging"] is True

        agent.send("schedule.ack", {"version": 1, "applied_at": TS})
        agent.sync()
        assert _host(fleet, host)["schedule_lagging"] is False
        # and a hello claiming a version from the future is sent the real set
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=9)
        assert agent.next_of("schedule.set")["data"]["version"] == 1
        assert _host(fleet, host)["applied_schedule_version"] == 1


# -- fires ---------------------------------------------------------------------


@pytest.fixture
def scheduled(fleet, enrolled):
    """The enrolled host with groups etc and home, and schedule nightly of both."""
    host = enrolled["host"]
    groups = {g: _group(fleet, host, g, [f"/{g}"]) for g in ("etc", "home")}
    made = _schedule(fleet, host, "home", "etc", timezone="UTC")
    return {**enrolled, "groups": groups, "schedule": made["id"]}


def test_a_fire_makes_one_backup_per_group_and_a_resent_fire_none(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    etc, home = scheduled["groups"]["etc"]["id"], scheduled["groups"]["home"]["id"]
    when = "2026-12-01T03:00:00Z"
    fire = {"schedule_id": sid, "scheduled_at": when, "catch_up": True}
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        assert host_id == scheduled["host_id"]
        assert agent.acked(agent.report("schedule.fire", fire)) == 1

        jobs = _jobs(fleet, host)
        assert [(j["kind"], j["group"], j["actor"]) for j in jobs] == [
            ("backup", "etc", "schedule"),
            ("backup", "home", "schedule"),
        ]
        uids = [protocol.fire_uid(host_id, sid, when, g) for g in (etc, home)]
        for job, uid in zip(jobs, uids):
            shown = _job(fleet, job["id"])
            assert shown["uid"] == uid
            assert shown["schedule"] == sid and shown["actor_kind"] == "schedule"
            assert (shown["scheduled_at"], shown["catch_up"]) == (when, True)
            assert (shown["coalesced"], shown["run_by_agent"]) == ([], False)

        run = agent.next_of("command.run")["data"]
        assert run == {
            "job_id": jobs[0]["id"],
            "kind": "backup",
            "uid": uids[0],
            "group": "etc",
            "includes": ["/etc"],
            "tag": "etc",
            "scheduled_at": when,
            "catch_up": True,
        }
        assert _job(fleet, jobs[1]["id"])["status"] == "queued"  # one job at a time
        seq = agent.seq

    # the link dropped before the ack reached the agent: it resends the same seq
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws, seq=seq)
        agent.hello(schedule_version=1, spool_seq=seq, spool_pending=seq)
        assert agent.acked(agent.report("schedule.fire", fire, seq=seq)) == seq
        # the backup it never took is offered again on this link, as the same job
        assert agent.next_of("command.run")["data"]["job_id"] == jobs[0]["id"]
        assert [j["id"] for j in _jobs(fleet, host)] == [j["id"] for j in jobs]

        # the same fire under a new seq: the uids are known, nothing is made
        assert agent.acked(agent.report("schedule.fire", fire)) == seq + 1
        assert [j["id"] for j in _jobs(fleet, host)] == [j["id"] for j in jobs]
        assert _job(fleet, jobs[1]["id"])["coalesced"] == []

        # a fire of another time is another job per group
        later = "2026-12-02T03:00:00Z"
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": later}))
        new = [j for j in _jobs(fleet, host) if j["id"] > jobs[-1]["id"]]
        # etc's backup is with the agent: a new one; home's still waits: folded into it
        assert [(j["group"], j["scheduled_at"], j["catch_up"]) for j in new] == [
            ("etc", later, False)
        ]
        assert _job(fleet, jobs[1]["id"])["coalesced"] == [later]


def test_a_fire_of_a_disabled_deleted_or_foreign_schedule_makes_nothing(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    # another host's schedule
    other = fx.uniq("other")
    fleet.ctl("enroll", other)
    _group(fleet, other, "etc", ["/etc"])
    foreign = _schedule(fleet, other, "etc")["id"]
    spare = _schedule(fleet, host, "etc", name="spare")["id"]
    when = "2026-12-01T03:00:00Z"
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=_host(fleet, host)["schedule_version"])
        fleet.ctl("schedules", "disable", host, "nightly")
        fleet.ctl("schedules", "delete", host, "spare", "--yes")
        for schedule_id in (sid, spare, foreign):
            fire = {"schedule_id": schedule_id, "scheduled_at": when}
            seq = agent.report("schedule.fire", fire)
            assert agent.acked(seq) == seq  # acked all the same: never sent again
        assert _jobs(fleet, host) == []
        assert _jobs(fleet, other) == []
        fleet.ctl("schedules", "enable", host, "nightly")
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": when}))
        assert [j["group"] for j in _jobs(fleet, host)] == ["etc", "home"]


def test_fires_while_the_host_is_busy_fold_into_the_waiting_backups(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    first, second, third = (f"2026-12-0{d}T03:00:00Z" for d in (1, 2, 3))
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=1)
        check = fleet.rpc("jobs.run", host=host, kind="check")
        agent.next_of("command.run", job_id=check["id"])  # with the agent, not finished

        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": first}))
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": second}))
        backups = _jobs(fleet, host, kind="backup")
        assert [(j["group"], j["status"]) for j in backups] == [
            ("etc", "queued"),
            ("home", "queued"),
        ]
        for job in backups:
            shown = _job(fleet, job["id"])
            assert shown["scheduled_at"] == first
            assert shown["coalesced"] == [second]
        assert len(_jobs(fleet, host, kind="backup", status="queued")) == 2

        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": third}))
        assert [j["id"] for j in _jobs(fleet, host, kind="backup")] == [j["id"] for j in backups]
        assert _job(fleet, backups[0]["id"])["coalesced"] == [second, third]

        # the check ends: the first waiting backup goes out, saying what it covers
        agent.finish(check["id"])
        run = agent.next_of("command.run")["data"]
        assert run["job_id"] == backups[0]["id"]
        assert (run["scheduled_at"], run["coalesced"]) == (first, [second, third])
        assert "catch_up" in run and run["catch_up"] is False


def test_a_resent_fire_already_folded_is_not_folded_twice(fleet, fx, scheduled):
    """A fire fleetd folded into a waiting backup, sent again under a new seq
    (as a resend of a fire fleetd made a job of is a no-op)."""
    host, sid = scheduled["host"], scheduled["schedule"]
    first, second = "2026-12-01T03:00:00Z", "2026-12-02T03:00:00Z"
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        agent.hello(schedule_version=1)
        check = fleet.rpc("jobs.run", host=host, kind="check")
        agent.next_of("command.run", job_id=check["id"])
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": first}))
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": second}))
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": second}))
        backups = _jobs(fleet, host, kind="backup")
        assert len(backups) == 2
        for job in backups:
            shown = _job(fleet, job["id"])
            assert shown["coalesced"] == [second]
            assert shown["params"].get("coalesced_count") == 1


# -- jobs the agent runs on its own --------------------------------------------


def test_a_fire_the_agent_runs_itself_is_recorded_never_dispatched(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    when = "2026-12-01T03:00:00Z"
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        uid = protocol.fire_uid(host_id, sid, when, etc)
        fire = {
            "schedule_id": sid,
            "scheduled_at": when,
            "jobs": [{"group_id": etc, "job_id": -1, "uid": uid}],
        }
        agent.acked(agent.report("schedule.fire", fire))
        [job] = _jobs(fleet, host)
        assert job["id"] > 0 and job["uid"] == uid
        assert (job["kind"], job["group"], job["actor"], job["schedule"]) == (
            "backup",
            "etc",
            "schedule",
            sid,
        )
        assert job["run_by_agent"] is True and job["scheduled_at"] == when

        started = {
            "job_id": -1,
            "kind": "backup",
            "started_at": TS,
            "uid": uid,
            "group_id": etc,
            "group": "etc",
            "schedule_id": sid,
            "scheduled_at": when,
        }
        agent.acked(agent.report("job.started", started))
        assert _job(fleet, job["id"])["status"] == "running"
        line = {"job_id": -1, "seq": 1, "ts": TS, "stream": "stdout", "payload": "ran alone"}
        agent.report("job.log", line)
        ended = {"job_id": -1, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))

        shown = _job(fleet, job["id"])
        assert shown["status"] == "succeeded" and shown["exit_code"] == 0
        assert shown["run_by_agent"] is True and shown["log_lines"] == 1
        assert (shown["started_at"], shown["finished_at"]) == (TS, TS)
        lines = fleet.rpc("jobs.log", id=job["id"])["lines"]
        assert [(x["seq"], x["stream"], x["payload"]) for x in lines] == [
            (1, "stdout", "ran alone")
        ]
        out = fleet.ctl("jobs", "log", job["id"], "--json").stdout.splitlines()
        assert [json.loads(x)["payload"] for x in out] == ["ran alone"]

        # a run of its own fleetd never heard a fire of: recorded from job.started
        other = "2026-12-02T03:00:00Z"
        uid2 = protocol.fire_uid(host_id, sid, other, etc)
        started2 = {
            "job_id": -2,
            "kind": "backup",
            "started_at": TS,
            "uid": uid2,
            "group_id": etc,
            "schedule_id": sid,
            "scheduled_at": other,
            "catch_up": True,
        }
        agent.acked(agent.report("job.started", started2))
        made = [j for j in fleet.ctl_json("jobs", "list", "--host", host) if j["uid"] == uid2]
        assert len(made) == 1, made
        second = made[0]
        assert second["id"] > job["id"] and second["status"] == "running"
        assert (second["group"], second["schedule"], second["actor"]) == ("etc", sid, "schedule")
        assert (second["scheduled_at"], second["catch_up"], second["run_by_agent"]) == (
            other,
            True,
            True,
        )
        ended2 = {"job_id": -2, "status": "warning", "exit_code": 3, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended2))
        shown = _job(fleet, second["id"])
        assert (shown["status"], shown["exit_code"]) == ("warning", 3)
        assert len(_jobs(fleet, host)) == 2

        # neither was ever sent as a command: the next command.run is a run-now's
        check = fleet.rpc("jobs.run", host=host, kind="check")
        assert agent.next_of("command.run")["data"]["job_id"] == check["id"]
        assert agent.seen("command.run") == []


def test_a_job_fleetd_made_of_a_fire_is_bound_to_the_agents_run_of_it(fleet, fx, scheduled):
    """fleetd made a backup of the fire (it waits behind a busy host); the
    agent then ran the fire itself under its own id: the same job, by uid,
    never dispatched. A run of its own for a fire fleetd never heard of
    supersedes a backup of that group still waiting in fleetd's queue."""
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    first, second, third = (f"2026-12-0{d}T03:00:00Z" for d in (1, 2, 3))
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        check = fleet.rpc("jobs.run", host=host, kind="check")
        agent.next_of("command.run", job_id=check["id"])
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": first}))
        etc_job, home_job = _jobs(fleet, host, kind="backup")
        assert etc_job["group"] == "etc" and home_job["group"] == "home"

        # the agent's own run of the same fire and group: the fire again, with jobs
        uid = protocol.fire_uid(host_id, sid, first, etc)
        fire = {
            "schedule_id": sid,
            "scheduled_at": first,
            "jobs": [{"group_id": etc, "job_id": -3, "uid": uid}],
        }
        agent.acked(agent.report("schedule.fire", fire))
        assert [j["id"] for j in _jobs(fleet, host, kind="backup")] == [
            etc_job["id"],
            home_job["id"],
        ]
        shown = _job(fleet, etc_job["id"])
        assert (shown["status"], shown["run_by_agent"]) == ("queued", True)

        # the check ends: home's backup goes out, not etc's (older, but the agent's now)
        agent.finish(check["id"])
        assert agent.next_of("command.run")["data"]["job_id"] == home_job["id"]

        started = {"job_id": -3, "kind": "backup", "started_at": TS, "uid": uid}
        agent.acked(agent.report("job.started", started))
        assert _job(fleet, etc_job["id"])["status"] == "running"
        ended = {"job_id": -3, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))
        assert _job(fleet, etc_job["id"])["status"] == "succeeded"
        assert len(_jobs(fleet, host, kind="backup")) == 2

        # a later fire while home's backup is with the agent: a backup of each waits
        agent.acked(agent.report("schedule.fire", {"schedule_id": sid, "scheduled_at": second}))
        waiting = {j["group"]: j for j in _jobs(fleet, host, kind="backup", status="queued")}
        assert sorted(waiting) == ["etc", "home"]

        # the agent runs a fire of etc fleetd never heard of: etc's waiting backup goes
        uid3 = protocol.fire_uid(host_id, sid, third, etc)
        started3 = {
            "job_id": -4,
            "kind": "backup",
            "started_at": TS,
            "uid": uid3,
            "group_id": etc,
            "schedule_id": sid,
            "scheduled_at": third,
        }
        agent.acked(agent.report("job.started", started3))
        [own] = [j for j in _jobs(fleet, host, kind="backup") if j["uid"] == uid3]
        assert (own["status"], own["run_by_agent"], own["group"]) == ("running", True, "etc")
        superseded = _job(fleet, waiting["etc"]["id"])
        assert superseded["status"] == "cancelled"
        assert f"superseded by job {own['id']}" in superseded["error"]
        assert _job(fleet, waiting["home"]["id"])["status"] == "queued"


def test_a_job_the_agent_still_runs_on_its_own_survives_its_reconnect(fleet, fx, scheduled):
    """hello's running_job may be the agent's own (negative) id: that job is
    kept running; one the agent came back without is lost, and may still
    report how it really ended."""
    host, sid = scheduled["host"], scheduled["schedule"]
    etc, home = scheduled["groups"]["etc"]["id"], scheduled["groups"]["home"]["id"]
    when = "2026-12-01T03:00:00Z"
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        uids = {g: protocol.fire_uid(host_id, sid, when, g) for g in (etc, home)}
        fire = {
            "schedule_id": sid,
            "scheduled_at": when,
            "jobs": [
                {"group_id": etc, "job_id": -1, "uid": uids[etc]},
                {"group_id": home, "job_id": -2, "uid": uids[home]},
            ],
        }
        agent.report("schedule.fire", fire)
        started = {"job_id": -1, "kind": "backup", "started_at": TS, "uid": uids[etc]}
        agent.acked(agent.report("job.started", started))
        etc_job, home_job = _jobs(fleet, host)
        assert (etc_job["status"], home_job["status"]) == ("running", "queued")
        seq = agent.seq

    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws, seq=seq)
        agent.hello(schedule_version=1, spool_seq=seq, running_job=-1)
        agent.sync()  # caught up (nothing pending) before the probe was read
        assert _job(fleet, etc_job["id"])["status"] == "running"
        assert _job(fleet, home_job["id"])["status"] == "queued"  # the agent's queue
        ended = {"job_id": -1, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))
        assert _job(fleet, etc_job["id"])["status"] == "succeeded"
        started = {"job_id": -2, "kind": "backup", "started_at": TS, "uid": uids[home]}
        agent.acked(agent.report("job.started", started))
        assert _job(fleet, home_job["id"])["status"] == "running"
        seq = agent.seq

    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws, seq=seq)
        agent.hello(schedule_version=1, spool_seq=seq)  # running nothing
        agent.sync()
        lost = _job(fleet, home_job["id"])
        assert lost["status"] == "lost" and "agent" in lost["error"]
        ended = {"job_id": -2, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))
        assert _job(fleet, home_job["id"])["status"] == "succeeded"
        assert agent.seen("command.run") == []


def test_cancelling_a_job_the_agent_runs_itself_names_it_by_uid(fleet, fx, scheduled):
    """command.cancel of an agent's own job carries its uid (the agent knows
    it by that, not by fleetd's id), also when sent again as the job starts."""
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    when = "2026-12-01T03:00:00Z"
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        uid = protocol.fire_uid(host_id, sid, when, etc)
        fire = {
            "schedule_id": sid,
            "scheduled_at": when,
            "jobs": [{"group_id": etc, "job_id": -1, "uid": uid}],
        }
        agent.acked(agent.report("schedule.fire", fire))
        [job] = _jobs(fleet, host)

        answer = fleet.rpc("jobs.cancel", id=job["id"])
        assert answer["cancel"] == "requested"
        assert agent.next_of("command.cancel")["data"] == {"job_id": job["id"], "uid": uid}

        # the cancel crossed the job's start: fleetd says it again
        started = {"job_id": -1, "kind": "backup", "started_at": TS, "uid": uid}
        agent.acked(agent.report("job.started", started))
        again = agent.next_of("command.cancel")["data"]
        assert again == {"job_id": job["id"], "uid": uid}

        ended = {"job_id": -1, "status": "cancelled", "exit_code": 1, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))
        assert _job(fleet, job["id"])["status"] == "cancelled"


def _local_started(job_id, uid, group_id, sid, when):
    return {
        "job_id": job_id,
        "kind": "backup",
        "started_at": TS,
        "uid": uid,
        "group_id": group_id,
        "schedule_id": sid,
        "scheduled_at": when,
    }


def test_an_agent_id_reused_after_a_new_state_dir_makes_a_new_job(fleet, fx, scheduled):
    """A reinstalled agent numbers its own jobs from -1 again: a new run under
    -1 is a new job, and does not land on the old job that had that id."""
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        first = protocol.fire_uid(host_id, sid, "2026-12-01T03:00:00Z", etc)
        agent.report("job.started", _local_started(-1, first, etc, sid, "2026-12-01T03:00:00Z"))
        done = {"job_id": -1, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", done))
    with _agent_link(fleet, fx, scheduled) as ws:  # the new state dir: seqs from 1 again
        agent = Agent(ws)
        agent.hello(schedule_version=0)
        second = protocol.fire_uid(host_id, sid, "2026-12-05T03:00:00Z", etc)
        agent.report("job.started", _local_started(-1, second, etc, sid, "2026-12-05T03:00:00Z"))
        line = {"job_id": -1, "seq": 1, "ts": TS, "stream": "stdout", "payload": "second run"}
        agent.report("job.log", line)
        failed = {"job_id": -1, "status": "failed", "exit_code": 1, "finished_at": TS}
        agent.acked(agent.report("job.finished", failed))
    by_uid = {j["uid"]: j for j in _jobs(fleet, host)}
    assert (by_uid[first]["status"], _job(fleet, by_uid[first]["id"])["log_lines"]) == (
        "succeeded",
        0,
    )
    assert (by_uid[second]["status"], _job(fleet, by_uid[second]["id"])["log_lines"]) == (
        "failed",
        1,
    )


def test_a_run_of_the_agents_own_does_not_cancel_an_operators_run_now(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    asked = fleet.rpc("jobs.run", host=host, group="etc")  # the host is offline: it waits
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1, running_job=-1)["data"]["host_id"]
        uid = protocol.fire_uid(host_id, sid, "2026-12-01T03:00:00Z", etc)
        agent.report("job.started", _local_started(-1, uid, etc, sid, "2026-12-01T03:00:00Z"))
        done = {"job_id": -1, "status": "succeeded", "exit_code": 0, "finished_at": TS}
        agent.acked(agent.report("job.finished", done))
        # the run-now is still the operator's to have: dispatched, not cancelled
        sent = agent.next_of("command.run")["data"]
        assert sent["job_id"] == asked["id"]
    assert _job(fleet, asked["id"])["status"] in ("dispatched", "queued")


def test_progress_of_a_job_the_agent_runs_itself_reaches_its_followers(fleet, fx, scheduled):
    host, sid = scheduled["host"], scheduled["schedule"]
    etc = scheduled["groups"]["etc"]["id"]
    with _agent_link(fleet, fx, scheduled) as ws:
        agent = Agent(ws)
        host_id = agent.hello(schedule_version=1)["data"]["host_id"]
        uid = protocol.fire_uid(host_id, sid, "2026-12-01T03:00:00Z", etc)
        agent.acked(
            agent.report("job.started", _local_started(-1, uid, etc, sid, "2026-12-01T03:00:00Z"))
        )
        (job,) = [j for j in _jobs(fleet, host) if j["uid"] == uid]
        progress = {
            "job_id": -1,
            "percent_done": 0.5,
            "files_done": 3,
            "total_files": 6,
            "bytes_done": 1024,
            "total_bytes": 2048,
            "eta_seconds": 4,
            "throughput_bps": 256,
        }
        agent.send("job.progress", progress)
        agent.sync()
        shown = _job(fleet, job["id"])
        assert shown["status"] == "running" and shown["progress"]["percent_done"] == 0.5


def test_a_cancel_the_agent_missed_is_sent_again_when_it_is_back(fleet, fx, enrolled):
    """The first command.cancel may go down with the link (or come from a
    replica the agent just left): once the agent is back and caught up,
    fleetd says it again for the job it still runs, and not after it ended."""
    host = enrolled["host"]
    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws)
        agent.hello()
        check = fleet.rpc("jobs.run", host=host, kind="check")
        agent.next_of("command.run", job_id=check["id"])
        agent.send("command.result", {"job_id": check["id"], "accepted": True})
        started = {"job_id": check["id"], "kind": "check", "started_at": TS}
        agent.acked(agent.report("job.started", started))
        assert fleet.rpc("jobs.cancel", id=check["id"])["cancel"] == "requested"
        agent.next_of("command.cancel", job_id=check["id"])  # lost: never acted on
        seq = agent.seq

    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws, seq=seq)
        agent.hello(spool_seq=seq, running_job=check["id"])
        assert agent.next_of("command.cancel")["data"] == {"job_id": check["id"]}
        ended = {"job_id": check["id"], "status": "cancelled", "exit_code": 1, "finished_at": TS}
        agent.acked(agent.report("job.finished", ended))
        assert _job(fleet, check["id"])["status"] == "cancelled"
        seq = agent.seq

    with _agent_link(fleet, fx, enrolled) as ws:
        agent = Agent(ws, seq=seq)
        agent.hello(spool_seq=seq)
        agent.sync()  # caught up before the probe was answered
        assert agent.seen("command.cancel") == []
