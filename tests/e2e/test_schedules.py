"""Schedules end to end: real fleetd, real agents (the zipapp), real restic.

Nothing waits for a real cron minute: each agent runs with its scheduler's
clock shifted (FLEET_AGENT_CLOCK_OFFSET) so that a nightly 03:00 schedule
is a few seconds away when it starts. Waits are on log lines and job states.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
from typing import Any

FIRE = dt.datetime(2031, 6, 2, 3, 0)  # the nightly fire the tests put a moment away
FIRE_ISO = "2031-06-02T03:00:00Z"
NEXT_ISO = "2031-06-03T03:00:00Z"
LEAD = 8.0  # seconds of the agent's clock before FIRE when it starts


def offset_for(agent_time: dt.datetime) -> str:
    """The clock offset that makes the agent's clock read `agent_time` now."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return f"{(agent_time - now).total_seconds():.3f}"


def start_at(e2e: Any, fleet: Any, h: Any, agent_time: dt.datetime, **kw: Any) -> None:
    h.agent.env["FLEET_AGENT_CLOCK_OFFSET"] = offset_for(agent_time)
    e2e.start(fleet, h, **kw)


def nightly(fleet: Any, e2e: Any, h: Any, *groups: str) -> dict:
    args: list[Any] = ["schedules", "create", h.name, "--cron", "0 3 * * *"]
    for g in groups:
        args += ["--group", g]
    return fleet.ctl_json(*args, "--timezone", "UTC", "--name", "nightly")


def scheduled_host(fleet: Any, e2e: Any, files: dict) -> tuple[Any, str, dict]:
    """A host (agent not started) with files, a group and the nightly schedule."""
    h = e2e.host(fleet, start=False)
    e2e.write_tree(h.src, files)
    group = e2e.group(fleet, h)
    return h, group, nightly(fleet, e2e, h, group)


def backups(e2e: Any, fleet: Any, h: Any) -> list[dict]:
    return e2e.jobs(fleet, h.name, kind="backup")


def wait_backups(e2e: Any, fleet: Any, h: Any, count: int, timeout: float = 60) -> list[dict]:
    jobs = e2e.fx.wait_until(
        lambda: len(b := backups(e2e, fleet, h)) >= count and b,
        timeout=timeout,
        interval=0.1,
        what=f"{count} backup job(s) on {h.name}",
    )
    return [e2e.wait_job(fleet, j["id"], timeout=timeout) for j in jobs]


def snapshots(e2e: Any, h: Any) -> list[dict]:
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_applied(e2e: Any, fleet: Any, h: Any) -> dict:
    return e2e.fx.wait_until(
        lambda: not (info := e2e.host_info(fleet, h.name))["schedule_lagging"] and info,
        timeout=20,
        interval=0.1,
        what=f"{h.name} to apply its schedule set",
    )


def test_a_schedule_fires_and_makes_a_real_snapshot_as_the_schedule(fleet, e2e):
    h, group, made = scheduled_host(fleet, e2e, {"etc/app.conf": "setting = 1\n"})
    start_at(e2e, fleet, h, FIRE - dt.timedelta(seconds=LEAD), wait_init=True)
    info = wait_applied(e2e, fleet, h)
    assert info["applied_schedule_version"] == info["schedule_version"] >= 1

    (job,) = wait_backups(e2e, fleet, h, 1)
    assert job["status"] == "succeeded", job
    assert (job["actor"], job["schedule"], job["group"]) == ("schedule", made["id"], group)
    assert (job["scheduled_at"], job["catch_up"], job["run_by_agent"]) == (FIRE_ISO, False, False)
    (snap,) = snapshots(e2e, h)
    assert snap["tags"] == [group] and snap["paths"] == [str(h.src)]
    assert job["summary"]["snapshot_id"] and snap["id"].startswith(job["summary"]["snapshot_id"])
    lines = [line["payload"] for line in e2e.log_lines(fleet, job["id"])]
    assert f"fleet-agent: scheduled backup for {FIRE_ISO}" in lines
    h.agent.wait_log(f"next fire: schedule nightly at {NEXT_ISO} UTC")
    assert h.agent.count("schedule nightly fired for") == 1


def test_the_version_and_ack_flow_and_a_change_while_the_agent_is_offline(fleet, e2e):
    h = e2e.host(fleet)
    group = e2e.group(fleet, h)
    before = e2e.host_info(fleet, h.name)["schedule_version"]
    nightly(fleet, e2e, h, group)
    info = wait_applied(e2e, fleet, h)
    assert info["applied_schedule_version"] == before + 1
    h.agent.wait_log(f"schedule set version {before + 1} applied: 1 schedule(s), 1 enabled")

    assert h.agent.stop() == 0
    e2e.wait_host(fleet, h.name, "offline")
    fleet.ctl("schedules", "edit", h.name, "nightly", "--cron", "15 4 * * *")
    fleet.ctl("schedules", "disable", h.name, "nightly")
    info = e2e.host_info(fleet, h.name)
    assert info["schedule_lagging"] is True
    assert info["schedule_version"] == before + 3 and info["applied_schedule_version"] == before + 1
    listed = {row["name"]: row for row in fleet.ctl_json("hosts", "list")}
    assert listed[h.name]["schedule_lagging"] is True

    e2e.start(fleet, h)
    info = wait_applied(e2e, fleet, h)
    assert info["applied_schedule_version"] == before + 3
    held = json.loads((h.agent.state_dir / "schedules.json").read_text())
    assert held["version"] == before + 3
    assert [(s["cron"], s["enabled"]) for s in held["schedules"]] == [("15 4 * * *", False)]
    assert "no schedule enabled: nothing to fire" in h.agent.log()


def test_a_restart_does_not_fire_twice_and_a_missed_window_fires_once(fleet, e2e):
    h, group, _ = scheduled_host(fleet, e2e, {"a.txt": "alpha\n"})
    start_at(e2e, fleet, h, FIRE - dt.timedelta(seconds=LEAD), wait_init=True)
    (first,) = wait_backups(e2e, fleet, h, 1)
    assert first["status"] == "succeeded" and first["scheduled_at"] == FIRE_ISO

    # restarted 20 s after the fire: its mark is in the spool, nothing fires again
    assert h.agent.stop() == 0
    proc = h.agent.cli("status", "--state-dir", h.agent.state_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    (held,) = json.loads(proc.stdout)["schedules"]
    assert (held["name"], held["groups"], held["last_fire"], held["next_fire"]) == (
        "nightly",
        [group],
        FIRE_ISO,
        NEXT_ISO,
    )
    said = h.agent.count(f"next fire: schedule nightly at {NEXT_ISO} UTC")
    start_at(e2e, fleet, h, FIRE + dt.timedelta(seconds=20))
    h.agent.wait_log(f"next fire: schedule nightly at {NEXT_ISO} UTC", said + 1)
    assert h.agent.count("schedule nightly fired for") == 1
    assert len(backups(e2e, fleet, h)) == 1

    # down over three nights: back at 05:10 on the third day, one catch-up fire
    assert h.agent.stop() == 0
    e2e.write_tree(h.src, {"b.txt": "beta\n"})
    start_at(e2e, fleet, h, FIRE + dt.timedelta(days=3, hours=2, minutes=10))
    first_again, second = wait_backups(e2e, fleet, h, 2)
    assert first_again["id"] == first["id"]
    assert second["status"] == "succeeded", second
    assert (second["scheduled_at"], second["catch_up"]) == ("2031-06-05T03:00:00Z", True)
    lines = [line["payload"] for line in e2e.log_lines(fleet, second["id"])]
    assert any("catch-up" in line for line in lines), lines
    h.agent.wait_log("next fire: schedule nightly at 2031-06-06T03:00:00Z UTC")
    assert h.agent.count("schedule nightly fired for") == 2
    assert len(backups(e2e, fleet, h)) == 2
    assert len(snapshots(e2e, h)) == 2


def test_fleetd_down_when_a_schedule_is_due_the_backup_still_runs_and_shows_up_later(
    fleetd_factory, e2e, fx
):
    fleet = fleetd_factory()
    h, group, made = scheduled_host(fleet, e2e, {"data/x.bin": b"\x00" * 4096, "y.txt": "y\n"})
    start_at(e2e, fleet, h, FIRE - dt.timedelta(seconds=LEAD), wait_init=True)
    wait_applied(e2e, fleet, h)

    old = fleet.fleetd
    downs = h.agent.count("link to ")
    assert old.stop(signal.SIGTERM) == 0
    h.agent.wait_log("link to ", downs + 1, timeout=10)
    h.agent.wait_log("the agent runs it itself (fleetd is out of reach) as job(s) -1", timeout=30)
    h.agent.wait_log("job -1 (backup) succeeded", timeout=60)
    (snap,) = snapshots(e2e, h)  # the backup happened with fleetd down
    assert snap["tags"] == [group]

    new = fx.Fleetd(
        old.data_dir, old.log_path.with_name("fleetd-restarted.log"), listen=f"127.0.0.1:{old.port}"
    ).start()
    fleet.fleetd = new  # teardown: SIGTERM must exit 0 and its log hold no traceback
    (job,) = wait_backups(e2e, fleet, h, 1)
    assert job["status"] == "succeeded" and job["exit_code"] == 0, job
    assert (job["actor"], job["schedule"], job["group"]) == ("schedule", made["id"], group)
    assert (job["scheduled_at"], job["run_by_agent"]) == (FIRE_ISO, True)
    assert job["summary"]["snapshot_id"] and snap["id"].startswith(job["summary"]["snapshot_id"])
    lines = [line["payload"] for line in e2e.log_lines(fleet, job["id"])]
    assert any("run by the agent on its own" in line for line in lines), lines
    assert any('"message_type":"summary"' in line.replace(" ", "") for line in lines)
    assert [j["id"] for j in fleet.ctl_json("jobs", "list", "--host", h.name)] == [
        job["id"],
        *[j["id"] for j in e2e.jobs(fleet, h.name, kind="init")],
    ]
    e2e.wait_host(fleet, h.name, "online")


def test_a_bad_cron_or_a_foreign_group_is_refused_with_exit_2_or_4(fleet, e2e):
    h = e2e.host(fleet, start=False, set_repo=False)
    group = e2e.group(fleet, h)
    for expr in ("61 * * * *", "0 3 * * * *", "@reboot", "0 3 L * *"):
        result = fleet.ctl(
            "schedules", "create", h.name, "--cron", expr, "--group", group, expect=2
        )
        assert "cron" in result.stderr.lower() or "field" in result.stderr.lower(), result.stderr
    result = fleet.ctl(
        "schedules", "create", h.name, "--cron", "0 3 * * *", "--group", "nope", expect=4
    )
    assert "nope" in result.stderr
    assert fleet.ctl_json("schedules", "list", h.name) == []


def test_fires_while_the_host_is_busy_queue_behind_it_and_coalesce(fleet, e2e):
    """A run-now holds the host (its pre-hook waits on a gate) when two
    schedules fire the same group at once: one backup queues behind the
    running job, the second fire is folded into it and its log says so."""
    h = e2e.host(fleet, start=False)
    e2e.write_tree(h.src, {"a.txt": "alpha\n"})
    gate = h.base / "gate"
    hook = f"n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done"
    slow = e2e.group(fleet, h, "--pre-hook", hook, name="slow")
    group = e2e.group(fleet, h)
    nightly(fleet, e2e, h, group)
    fleet.ctl(
        "schedules",
        "create",
        h.name,
        "--cron",
        "0 3 * * *",
        "--group",
        group,
        "--timezone",
        "UTC",
        "--name",
        "also-nightly",
    )
    start_at(e2e, fleet, h, FIRE - dt.timedelta(seconds=LEAD), wait_init=True)
    busy = e2e.run(fleet, h.name, slow)
    e2e.wait_job(fleet, busy["id"], ("running",))

    h.agent.wait_log("schedule also-nightly fired for", timeout=30)
    h.agent.wait_log("schedule nightly fired for", timeout=30)
    scheduled = e2e.fx.wait_until(
        lambda: [j for j in backups(e2e, fleet, h) if j["actor"] == "schedule"],
        timeout=20,
        what="the scheduled backup",
    )
    (waiting,) = scheduled
    waiting = e2e.fx.wait_until(
        lambda: (j := e2e.show(fleet, waiting["id"]))["coalesced"] and j,
        timeout=20,
        what="the second fire to be folded in",
    )
    assert waiting["status"] == "queued" and waiting["coalesced"] == [FIRE_ISO]

    gate.touch()
    assert e2e.wait_job(fleet, busy["id"])["status"] == "succeeded"
    done = e2e.wait_job(fleet, waiting["id"])
    assert done["status"] == "succeeded", done
    assert done["started_at"] >= e2e.show(fleet, busy["id"])["finished_at"]
    lines = [line["payload"] for line in e2e.log_lines(fleet, done["id"])]
    assert any("also covers the schedule's fire(s) at " + FIRE_ISO in line for line in lines)
    assert [j["id"] for j in backups(e2e, fleet, h) if j["actor"] == "schedule"] == [done["id"]]
