"""fleet.agent.scheduler: when the agent fires, with an injected clock.

The scheduler is driven through `tick(now)`, the step its loop takes at each
wake-up, so clock jumps, suspends, restarts and DST nights are walked through
at any speed. The agent around it is real (state dir, spool); its runner is
a stand-in that records what it was given.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Optional

import pytest

from fleet.agent import scheduler as sched
from fleet.agent.link import Agent
from fleet.agent.state import Identity, State
from fleet.common import protocol

T0 = dt.datetime(2026, 5, 4, 2, 0, 0)  # a Monday, naive UTC
HOST_ID = 7


class FakeRunner:
    """Records submits; `busy` keeps it running a job."""

    def __init__(self) -> None:
        self.current: Optional[int] = None
        self.current_uid: Optional[str] = None
        self.submitted: list[tuple[dict, dict, Optional[int]]] = []
        self.ended: list[tuple[int, str]] = []
        self.busy = False

    def submit(self, command: dict, extra: Optional[dict] = None, local: Optional[int] = None):
        self.submitted.append((command, extra or {}, local))
        if self.busy and local is not None:
            self.spool.drop_local(local)  # as the real one does when it spools job.started
        if self.busy:
            self.current = command["job_id"]
            self.current_uid = (extra or {}).get("uid")

    async def end_local(self, job_id: int, extra: dict, status: str, error: str) -> None:
        self.ended.append((job_id, status))

    def free(self) -> None:
        self.current = self.current_uid = None


class Box:
    """An agent on a state dir, rebuilt on demand as after a restart."""

    def __init__(self, root) -> None:
        self.root = root
        self.agent: Optional[Agent] = None
        self.start()

    def start(self) -> Agent:
        if self.agent is not None:
            self.agent.spool.close()
        self.agent = Agent(State(self.root), Identity("ws://127.0.0.1:1", HOST_ID, "h", "tok"))
        self.agent.runner = FakeRunner()  # type: ignore[assignment]
        self.agent.runner.spool = self.agent.spool  # type: ignore[attr-defined]
        self.agent.connected.set()
        return self.agent

    @property
    def s(self) -> sched.Scheduler:
        return self.agent.scheduler  # type: ignore[union-attr]

    def frames(self, type_: str = "schedule.fire") -> list[dict]:
        return [d for _, t, d in self.agent.spool.pending(limit=10_000) if t == type_]  # type: ignore[union-attr]

    def apply(self, *schedules: dict, version: int = 1, now: dt.datetime = T0) -> None:
        self.s.clock = FixedClock(now)
        self.s.apply({"version": version, "schedules": list(schedules)})


class FixedClock(sched.Clock):
    def __init__(self, now: dt.datetime) -> None:
        self.at = now

    def now(self) -> dt.datetime:
        return self.at


def group(gid: int = 10, name: str = "etc") -> dict:
    return {"id": gid, "name": name, "includes": ["/etc"], "excludes": [], "retention": {}}


def schedule(sid: int = 1, cron: str = "0 3 * * *", tz: str = "UTC", **kw: Any) -> dict:
    return {
        "id": sid,
        "name": kw.pop("name", f"s{sid}"),
        "cron": cron,
        "timezone": tz,
        "enabled": kw.pop("enabled", True),
        "source_groups": kw.pop("groups", [group()]),
    }


@pytest.fixture
def box(tmp_path):
    b = Box(tmp_path)
    yield b
    b.agent.spool.close()  # type: ignore[union-attr]


def at(hh: int, mm: int = 0, ss: int = 0, day: int = 4) -> dt.datetime:
    return dt.datetime(2026, 5, day, hh, mm, ss)


# -- the pure rules ---------------------------------------------------------------------


def test_due_on_time_late_and_after_many_missed_windows():
    (e,) = sched.entries({"schedules": [schedule(cron="*/10 * * * *")]})
    assert sched.due(e, at(2, 0), at(2, 9, 59)) is None
    assert sched.due(
        e,
        at(2, 0),
        at(
            2,
            10,
            0,
        ),
    ) == (at(2, 10), False)
    assert sched.due(e, at(2, 0), at(2, 11, 0)) == (at(2, 10), False)  # 60 s late: on time
    assert sched.due(e, at(2, 0), at(2, 11, 1)) == (at(2, 10), True)  # later: a catch-up
    # six windows missed: one fire, for the latest
    assert sched.due(e, at(2, 0), at(3, 5)) == (at(3, 0), True)


def test_a_disabled_schedule_is_never_due_and_does_not_wake_the_agent():
    (e,) = sched.entries({"schedules": [schedule(enabled=False)]})
    assert sched.due(e, at(0), at(23)) is None
    assert sched.next_wake([e], {}, at(0)) is None


def test_entries_leave_out_a_cron_this_agent_cannot_read_and_fall_back_to_utc(caplog):
    got = sched.entries(
        {
            "schedules": [
                schedule(1, cron="0 3 * * * *"),
                schedule(2, tz="Mars/Olympus_Mons"),
            ]
        }
    )
    assert [(e.id, e.zone_name) for e in got] == [(2, "UTC")]
    text = caplog.text
    assert "s1 left out" in text and "Mars/Olympus_Mons unknown on this host" in text


# -- firing through tick ------------------------------------------------------------------


def test_a_new_schedule_fires_from_now_on_not_for_the_past(box):
    box.apply(schedule(cron="0 * * * *"), now=at(2, 30))
    assert box.s.tick(at(2, 30)) == at(3, 0)
    assert box.frames() == []
    assert box.agent.spool.marks()[1] == ("0 * * * *|UTC|1", "2026-05-04T02:30:00Z", False)
    assert box.s.tick(at(3, 0, 0)) == at(4, 0)
    assert box.agent.spool.marks()[1] == ("0 * * * *|UTC|1", "2026-05-04T03:00:00Z", True)
    assert box.frames() == [{"schedule_id": 1, "scheduled_at": "2026-05-04T03:00:00Z"}]
    box.s.tick(at(3, 0, 30))  # woken again within the minute: nothing more
    assert len(box.frames()) == 1


def test_a_restart_neither_fires_twice_nor_skips_and_a_missed_window_fires_once(box):
    box.apply(schedule(cron="0 * * * *"), now=at(2, 30))
    box.s.tick(at(3, 0, 1))
    assert len(box.frames()) == 1
    # restart in the same minute: the mark came back from the spool
    box.start()
    assert box.s.version == 1
    assert box.s.tick(at(3, 0, 40)) == at(4, 0)
    assert len(box.frames()) == 1
    # down from 03:01 to 06:20: 04:00, 05:00 and 06:00 come down to one catch-up
    box.start()
    box.s.tick(at(6, 20))
    fires = box.frames()
    assert fires[1:] == [
        {"schedule_id": 1, "scheduled_at": "2026-05-04T06:00:00Z", "catch_up": True}
    ]
    box.start()
    box.s.tick(at(6, 21))
    assert len(box.frames()) == 2


def test_clock_set_back_does_not_fire_a_window_again(box):
    box.apply(schedule(cron="0 * * * *"), now=at(2, 30))
    box.s.tick(at(3, 0))
    # NTP steps the clock back 40 minutes: 02:20 .. 03:00 again, nothing fires
    assert box.s.tick(at(2, 20)) == at(4, 0)
    box.s.tick(at(2, 59, 59))
    box.s.tick(at(3, 0, 0))
    assert len(box.frames()) == 1
    box.s.tick(at(4, 0))
    assert [f["scheduled_at"] for f in box.frames()] == [
        "2026-05-04T03:00:00Z",
        "2026-05-04T04:00:00Z",
    ]


def test_clock_jump_forward_and_suspend_fire_once_as_a_catch_up(box):
    box.apply(schedule(cron="*/15 * * * *"), now=at(2, 0))
    box.s.tick(at(2, 15))
    # the machine sleeps from 02:16 to 09:47 (or NTP steps the clock forward)
    box.s.tick(at(9, 47))
    assert [(f["scheduled_at"], f.get("catch_up", False)) for f in box.frames()] == [
        ("2026-05-04T02:15:00Z", False),
        ("2026-05-04T09:45:00Z", True),
    ]
    assert box.s.tick(at(9, 48)) == at(10, 0)
    assert len(box.frames()) == 2


@pytest.mark.parametrize(
    "zone,expr,night,local_fire",
    [
        # spring forward: 02:30 does not exist, the backup runs once at 03:00
        ("Europe/Paris", "30 2 * * *", dt.datetime(2026, 3, 28, 22, 0), "2026-03-29T01:00:00Z"),
        # fall back: 02:30 happens twice, the backup runs once, the first time
        ("Europe/Paris", "30 2 * * *", dt.datetime(2026, 10, 24, 22, 0), "2026-10-25T00:30:00Z"),
        ("America/New_York", "30 2 * * *", dt.datetime(2026, 3, 8, 4, 0), "2026-03-08T07:00:00Z"),
        # New York repeats 01:00-02:00 (EDT, then EST)
        ("America/New_York", "30 1 * * *", dt.datetime(2026, 11, 1, 3, 0), "2026-11-01T05:30:00Z"),
    ],
)
def test_a_dst_night_fires_the_daily_backup_once(box, zone, expr, night, local_fire):
    box.apply(schedule(cron=expr, tz=zone), now=night)
    now = night
    while now < night + dt.timedelta(hours=8):  # wake every minute through the night
        box.s.tick(now)
        now += dt.timedelta(minutes=1)
    assert [f["scheduled_at"] for f in box.frames()] == [local_fire]


def test_an_edited_or_re_enabled_schedule_starts_afresh(box):
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    # edited at 10:00 to fire at 04:00: no catch-up for 04:00 that already passed
    box.apply(schedule(cron="0 4 * * *"), version=2, now=at(10))
    box.s.tick(at(10, 1))
    assert box.frames() == []
    # disabled over the next day's 04:00, enabled again after it: nothing for it
    box.apply(schedule(cron="0 4 * * *", enabled=False), version=3, now=at(11))
    box.s.tick(at(5, day=5))
    box.apply(schedule(cron="0 4 * * *"), version=4, now=at(6, day=5))
    box.s.tick(at(6, 1, day=5))
    assert box.frames() == []
    box.s.tick(at(4, 0, day=6))
    assert [f["scheduled_at"] for f in box.frames()] == ["2026-05-06T04:00:00Z"]


def test_a_schedule_gone_from_the_set_stops_and_loses_its_mark(box):
    box.apply(schedule(1, cron="0 * * * *"), schedule(2, cron="30 * * * *"), now=at(2))
    box.apply(schedule(2, cron="30 * * * *"), version=2, now=at(2, 10))
    assert set(box.agent.spool.marks()) == {2}
    box.s.tick(at(2, 30))
    box.s.tick(at(3, 0))
    assert [(f["schedule_id"], f["scheduled_at"]) for f in box.frames()] == [
        (2, "2026-05-04T02:30:00Z")
    ]


# -- autonomy: fires while fleetd is out of reach -----------------------------------------------


def test_a_fire_without_fleetd_becomes_the_agents_own_jobs(box):
    two = [group(10, "etc"), group(11, "www")]
    box.apply(schedule(cron="0 3 * * *", groups=two), now=at(1))
    box.agent.connected.clear()
    box.s.tick(at(3, 0, 2))
    (frame,) = box.frames()
    uids = [protocol.fire_uid(HOST_ID, 1, "2026-05-04T03:00:00Z", g) for g in (10, 11)]
    assert frame["jobs"] == [
        {"group_id": 10, "job_id": -1, "uid": uids[0]},
        {"group_id": 11, "job_id": -2, "uid": uids[1]},
    ]
    runner = box.agent.runner
    # the runner was free: the first starts at once; the second waits in the spool
    (command, extra, local) = runner.submitted[0]
    assert (command["job_id"], command["group"], command["includes"], local) == (
        -1,
        "etc",
        ["/etc"],
        -1,
    )
    assert command["scheduled_at"] == "2026-05-04T03:00:00Z" and command["catch_up"] is False
    assert extra == {
        "uid": uids[0],
        "group_id": 10,
        "group": "etc",
        "schedule_id": 1,
        "scheduled_at": "2026-05-04T03:00:00Z",
        "catch_up": False,
    }
    assert box.s.owns(uids[0]) and box.s.owns(uids[1]) and not box.s.owns("fire-other")
    # survives a restart: the queued job is still there, under the same id
    box.start()
    box.agent.connected.clear()
    assert [j["job_id"] for j in box.agent.spool.local_jobs()] == [-1, -2]
    # ids are never reused
    assert box.agent.spool.new_local_ids(1) == [-3]


def test_fires_of_a_group_while_its_backup_waits_are_coalesced(box):
    box.apply(schedule(cron="*/5 * * * *"), now=at(2))
    box.agent.connected.clear()
    runner = box.agent.runner
    runner.busy = True  # a long backup holds the runner
    box.s.tick(at(2, 5))  # job -1 starts (and runs on)
    box.s.tick(at(2, 10))  # job -2 queues behind it
    box.s.tick(at(2, 15))  # folded into -2
    box.s.tick(at(2, 20))  # folded into -2
    fires = box.frames()
    assert [len(f["jobs"]) for f in fires] == [1, 1, 0, 0]
    (queued,) = box.agent.spool.local_jobs()
    assert queued["job_id"] == -2
    assert queued["command"]["coalesced"] == ["2026-05-04T02:15:00Z", "2026-05-04T02:20:00Z"]
    # the runner frees: -2 starts with the fires it covers in its command
    runner.busy = False
    runner.free()
    box.s.kick()
    command, _, _ = runner.submitted[-1]
    assert command["job_id"] == -2 and len(command["coalesced"]) == 2


def test_a_fire_with_the_link_up_is_fleetds_and_is_taken_over_if_never_acknowledged(box):
    box.s.autonomy_after = 0.05
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.s.tick(at(3, 0))
    (frame,) = box.frames()
    assert "jobs" not in frame and box.agent.runner.submitted == []
    ((_, jobs),) = box.s.pending.values()
    assert jobs[0]["uid"].startswith("fire-7-1-")

    async def link_drops() -> None:
        box.agent.connected.clear()
        box.s.link_down()
        await asyncio.wait_for(box.s._autonomy, 5)  # type: ignore[arg-type]

    asyncio.run(link_drops())
    (command, extra, local) = box.agent.runner.submitted[0]
    assert local == command["job_id"] == -1
    assert extra["uid"] == protocol.fire_uid(HOST_ID, 1, "2026-05-04T03:00:00Z", 10)
    assert box.s.pending == {}


def test_an_acknowledged_fire_stays_fleetds_when_the_link_drops(box):
    box.s.autonomy_after = 0.01
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.s.tick(at(3, 0))
    seq = box.agent.spool.last_seq()
    box.agent.acknowledge(seq)
    assert box.s.pending == {}
    box.agent.connected.clear()
    box.s.link_down()
    assert box.s._autonomy is None and box.agent.runner.submitted == []


def test_unacknowledged_fires_are_pending_again_after_a_restart(box):
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.s.tick(at(3, 0))
    box.start()
    ((_, jobs),) = box.s.pending.values()
    assert jobs[0]["scheduled_at"] == "2026-05-04T03:00:00Z"


def test_a_local_job_that_cannot_run_ends_failed_instead_of_vanishing(box):
    from fleet.agent.kinds import Refused

    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.agent.connected.clear()

    def refuse(*a, **k):
        raise Refused("no_repo", "no repository configured")

    box.agent.runner.submit = refuse  # type: ignore[method-assign]

    async def go() -> None:
        box.s.tick(at(3, 0))
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait_for(asyncio.gather(*others), 5)  # the report it started

    asyncio.run(go())
    assert box.agent.runner.ended == [(-1, "failed")]
    assert box.agent.spool.local_jobs() == []


def test_a_stopping_agent_neither_fires_nor_starts_a_queued_job(box):
    box.apply(schedule(cron="0 3 * * *", groups=[group(10, "etc"), group(11, "www")]), now=at(1))
    box.agent.connected.clear()
    runner = box.agent.runner
    runner.busy = True
    box.s.tick(at(3, 0))  # -1 runs, -2 waits
    box.s.stop()  # SIGTERM: -1 is being cancelled, and frees the runner
    runner.free()
    box.s.kick()
    box.s.tick(at(3, 0, day=5))
    assert [c["job_id"] for c, _, _ in runner.submitted] == [-1]
    assert len(box.frames()) == 1
    # -2 is still queued for the next start
    assert [j["job_id"] for j in box.agent.spool.local_jobs()] == [-2]


def test_a_fire_taken_over_is_not_taken_over_again_after_a_restart(box):
    box.s.autonomy_after = 0.01
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.s.tick(at(3, 0))  # link up: fleetd's to run, and fleetd never acks it

    async def link_drops(b: Box) -> None:
        b.agent.connected.clear()
        b.s.link_down()
        if b.s._autonomy is not None:
            await asyncio.wait_for(b.s._autonomy, 5)

    asyncio.run(link_drops(box))
    runner = box.agent.runner
    assert [c["job_id"] for c, _, _ in runner.submitted] == [-1]
    box.agent.spool.drop_local(-1)  # its start was spooled (the real runner does this)
    box.start()  # restarted, fleetd still away
    assert box.s.pending == {}
    asyncio.run(link_drops(box))
    assert box.agent.runner.submitted == []
    # and fleetd dispatching its own job of that fire later is told it is the agent's
    assert box.s.owns(protocol.fire_uid(HOST_ID, 1, "2026-05-04T03:00:00Z", 10))


def test_a_take_over_folds_a_groups_fires_into_one_backup(box):
    box.s.autonomy_after = 0.01
    box.apply(schedule(cron="*/5 * * * *"), now=at(2))
    for minute in (5, 10, 15, 20):
        box.s.tick(at(2, minute))
    assert len(box.s.pending) == 4

    async def link_drops() -> None:
        box.agent.connected.clear()
        box.s.link_down()
        await asyncio.wait_for(box.s._autonomy, 5)  # type: ignore[arg-type]

    asyncio.run(link_drops())
    (command, _, _) = box.agent.runner.submitted[0]
    assert command["scheduled_at"] == "2026-05-04T02:05:00Z"
    assert command["coalesced"] == [f"2026-05-04T02:{m}:00Z" for m in (10, 15, 20)]
    assert [j["job_id"] for j in box.agent.spool.local_jobs()] == [-1]


def test_with_the_link_back_a_fire_still_queues_behind_the_agents_own_jobs(box):
    box.apply(schedule(cron="*/5 * * * *"), now=at(2))
    box.agent.connected.clear()
    box.agent.runner.busy = True
    box.s.tick(at(2, 5))  # -1 runs
    box.s.tick(at(2, 10))  # -2 waits
    box.agent.connected.set()  # fleetd is back while the agent works through its queue
    box.s.tick(at(2, 15))
    last = box.frames()[-1]
    assert last["jobs"] == []  # folded into -2, not made twice by fleetd
    (queued,) = box.agent.spool.local_jobs()
    assert queued["command"]["coalesced"] == ["2026-05-04T02:15:00Z"]


def test_a_local_job_whose_start_cannot_be_spooled_is_retried_later_not_in_a_loop(box):
    box.apply(schedule(cron="0 3 * * *"), now=at(1))
    box.agent.connected.clear()
    runner = box.agent.runner  # not busy: takes the job and frees at once, row left queued

    async def go() -> None:
        box.s.tick(at(3, 0))
        for _ in range(100):  # what the runner's on_idle would do in a hot loop
            box.s.kick()

    asyncio.run(go())
    assert [c["job_id"] for c, _, _ in runner.submitted] == [-1]


def test_a_flapping_link_does_not_put_a_take_over_off_for_ever(box):
    """The wait is counted from the fire, not from the last drop: a link
    that keeps coming up and dropping, fleetd never acknowledging, does not
    put the backups off for ever."""
    box.s.autonomy_after = 30.0
    box.apply(schedule(cron="0 3 * * *"), now=at(1))

    async def go() -> None:
        box.s.tick(at(3, 0))
        for seq, (since, jobs) in box.s.pending.items():  # the fire was spooled 31 s ago
            box.s.pending[seq] = (since - 31.0, jobs)
        box.agent.connected.clear()
        box.s.link_down()  # a drop after a short link: no new 30 s wait
        await asyncio.wait_for(box.s._autonomy, 5)  # type: ignore[arg-type]

    asyncio.run(go())
    (command, extra, _) = box.agent.runner.submitted[0]
    assert command["job_id"] == -1 and "coalesced" not in extra


def test_job_started_of_a_local_job_carries_the_fires_it_covers(box):
    box.apply(schedule(cron="*/5 * * * *"), now=at(2))
    box.agent.connected.clear()
    box.agent.runner.busy = True
    for minute in (5, 10, 15):
        box.s.tick(at(2, minute))
    box.agent.runner.busy = False
    box.agent.runner.free()
    box.s.kick()
    (_, extra, _) = box.agent.runner.submitted[-1]
    assert extra["coalesced"] == ["2026-05-04T02:15:00Z"]
    assert protocol.check_fields(
        {"job_id": -2, "kind": "backup", "started_at": "x", **extra},
        protocol.MESSAGES["job.started"].fields,
    )["coalesced"] == ["2026-05-04T02:15:00Z"]
