"""The agent's scheduler: fires the schedules fleetd sent, with or without fleetd.

fleetd owns the schedule set and pushes it (`schedule.set`, a version every
change bumps); the agent stores it (schedules.json), acknowledges the version,
and from then on decides alone when each schedule fires:

- It sleeps until the earliest next fire, reading the wall clock again at
  least every MAX_NAP seconds: asyncio sleeps on the monotonic clock, which
  stops during a suspend and ignores clock steps.
- Each schedule has a mark in the spool: the cron time of its last fire, or
  the time the schedule took its present form (a new, edited or re-enabled
  schedule fires from then on, never for the past). A fire moves the mark
  and spools `schedule.fire` in one transaction, so a restart neither fires
  twice nor skips.
- On each wake, a schedule whose cron matched in (mark, now] fires once, for
  the latest of those times; later than LATE after it, it is a catch-up (the
  agent was down, asleep, or its clock jumped forward). A clock set back
  fires nothing until it passes the mark again. DST: see common/cron.py.

Who runs the backups of a fire: with the link up, fleetd (it makes one job
per group and dispatches them; a fire while the host is busy queues behind
the running job, and fires of a group whose backup still waits fold into
it). With the link down, the agent itself: it mints negative job ids, lists
them in the fire (`jobs`), runs them one after the other from the
repository and groups it last received, and reports them like any job when
fleetd is back. A fire spooled while connected that fleetd never
acknowledged becomes the agent's own after AUTONOMY_AFTER seconds without a
link; both sides name a fire's job by the same uid (protocol.fire_uid), so
fleetd records one job whoever ran it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..common import cron, protocol
from ..common.timefmt import iso, parse_ts, utcnow
from .kinds import Refused
from .spool import Mark

if TYPE_CHECKING:  # pragma: no cover
    from .link import Agent

log = logging.getLogger("fleet-agent.scheduler")

LATE = dt.timedelta(seconds=60)  # a fire this much after its time is a catch-up
MAX_NAP = 60.0  # seconds between two readings of the wall clock, at most
AUTONOMY_AFTER = 60.0  # seconds without a link before an unacknowledged fire is run locally
FIRST_DIAL_WAIT = 20.0  # seconds the first fires wait for the first dial (fleetd may be there)
START_RETRY = 30.0  # seconds before a local job whose start could not be spooled is tried again
TICK_RETRY = 30.0  # seconds before a tick that failed (the spool's disk full) is tried again


class Clock:
    """The wall clock as naive UTC. `offset` (seconds) shifts it: tests set
    FLEET_AGENT_CLOCK_OFFSET to put a fire a moment away."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = dt.timedelta(seconds=offset)

    def now(self) -> dt.datetime:
        return utcnow() + self.offset


@dataclass(frozen=True)
class Entry:
    """One schedule as the agent runs it."""

    id: int
    name: str
    cron: str
    zone_name: str
    tz: dt.tzinfo
    enabled: bool
    groups: tuple[dict[str, Any], ...]

    @property
    def key(self) -> str:
        """What a fire time depends on: a change starts the schedule afresh."""
        return f"{self.cron}|{self.zone_name}|{int(self.enabled)}"


def entries(data: dict[str, Any]) -> list[Entry]:
    """The schedules of a schedule.set. One whose cron this agent cannot read
    is left out (and said so); an unknown zone falls back to UTC, loudly: a
    backup at the wrong hour beats none."""
    out = []
    for s in data.get("schedules", ()):
        name = s.get("name") or f"schedule-{s['id']}"
        try:
            expr = cron.normalize(s["cron"])
        except cron.CronError as exc:
            log.error("schedule %s left out: %s", name, exc)
            continue
        zone_name = s.get("timezone") or "UTC"
        try:
            tz = cron.zone(zone_name)
        except cron.CronError:
            log.error("schedule %s: time zone %s unknown on this host; using UTC", name, zone_name)
            zone_name, tz = "UTC", dt.timezone.utc
        groups = tuple(s.get("source_groups", ()))
        out.append(Entry(s["id"], name, expr, zone_name, tz, bool(s["enabled"]), groups))
    return out


def due(entry: Entry, last: dt.datetime, now: dt.datetime) -> Optional[tuple[dt.datetime, bool]]:
    """The fire due at `now`: the latest time the cron matched in (last,
    now] (however many it missed, one fire), and whether it is a catch-up."""
    if not entry.enabled:
        return None
    when = cron.latest_fire(entry.cron, entry.tz, last, now)
    if when is None:
        return None
    return when, now - when > LATE


def next_fire(e: Entry, mark: Optional[Mark], now: dt.datetime) -> Optional[dt.datetime]:
    """When the schedule fires next: after its mark, or after now when the
    clock is behind it (set back); None while it is disabled."""
    if not e.enabled:
        return None
    last = parse_ts(mark.last, now) if mark is not None else now
    return cron.next_fire(e.cron, e.tz, max(last, now))


def next_wake(
    schedules: list[Entry], marks: dict[int, Mark], now: dt.datetime
) -> Optional[tuple[dt.datetime, Entry]]:
    """The earliest next fire of the enabled schedules and its schedule, or None."""
    fires = [(when, e) for e in schedules if (when := next_fire(e, marks.get(e.id), now))]
    return min(fires, key=lambda f: f[0], default=None)


def local_job(host_id: int, e: Entry, group: dict[str, Any], at: str, catch_up: bool) -> dict:
    """A fire's backup of one group, as the agent runs it on its own (its
    job_id is minted when it is queued)."""
    command = {
        "kind": "backup",
        **protocol.backup_params(
            group["name"],
            group["includes"],
            group.get("excludes") or (),
            group.get("pre_hook") or None,
            group.get("post_hook") or None,
            group.get("hook_timeout") or None,
            group.get("timeout") or None,
        ),
        "scheduled_at": at,
        "catch_up": catch_up,
    }
    if group.get("repository_id") is not None:  # else the host's default
        command["repository_id"] = group["repository_id"]
    return {
        "job_id": 0,
        "uid": protocol.fire_uid(host_id, e.id, at, group["id"]),
        "group_id": group["id"],
        "group": group["name"],
        "schedule_id": e.id,
        "scheduled_at": at,
        "catch_up": catch_up,
        "command": command,
    }


def started_fields(job: dict[str, Any]) -> dict[str, Any]:
    """What job.started carries for a local job, for fleetd to record it."""
    keys = ("uid", "group_id", "group", "schedule_id", "scheduled_at", "catch_up")
    out = {k: job[k] for k in keys}
    if job["command"].get("coalesced"):
        out["coalesced"] = job["command"]["coalesced"]
    return out


class Scheduler:
    def __init__(
        self,
        agent: Agent,
        clock: Optional[Clock] = None,
        autonomy_after: float = AUTONOMY_AFTER,
    ) -> None:
        self.agent = agent
        self.spool = agent.spool
        self.clock = clock or Clock()
        self.autonomy_after = autonomy_after
        self.version = 0
        self.schedules: list[Entry] = []
        self.marks: dict[int, Mark] = {}
        # fires spooled while the link was up, until fleetd acks them:
        # seq -> (when spooled, monotonic; the backups they make)
        self.pending: dict[int, tuple[float, list[dict[str, Any]]]] = {}
        self.stopping = False
        self._wake = asyncio.Event()
        self._autonomy: Optional[asyncio.Task] = None
        self._said: Optional[tuple[Optional[str], str]] = ("", "")  # the last next fire logged
        self._submitted: Optional[int] = None  # the local job last handed to the runner
        self._retry_at: Optional[float] = None  # when a start that failed is tried again

    # -- the set --------------------------------------------------------------

    def load(self) -> None:
        """At start: the set last received, and the fires fleetd never
        acknowledged whose backups the agent has not taken on itself."""
        data = self.agent.state.load_schedules()
        if data is not None:
            self._install(data)
        for seq, _, frame in self.spool.pending_fires():
            if "jobs" not in frame:
                jobs = [j for j in self._jobs_of(frame) if not self.spool.taken(j["uid"])]
                if jobs:
                    self.pending[seq] = (time.monotonic(), jobs)

    def apply(self, data: dict[str, Any]) -> int:
        """A schedule.set from fleetd: stored, then in force at once."""
        self.agent.state.save_schedules(data)
        self._install(data)
        log.info(
            "schedule set version %s applied: %d schedule(s), %d enabled",
            self.version,
            len(self.schedules),
            sum(e.enabled for e in self.schedules),
        )
        return self.version

    def _install(self, data: dict[str, Any]) -> None:
        now = iso(self.clock.now())
        old = self.spool.marks()
        self.schedules = entries(data)
        self.marks = {}
        for e in self.schedules:
            kept = old.get(e.id)
            # new, edited or re-enabled: it fires from now on, not for the past
            self.marks[e.id] = kept if kept and kept.key == e.key else Mark(e.key, now)
        self.spool.set_marks(self.marks)
        self.version = int(data.get("version", 0))
        self._wake.set()

    def _entry(self, schedule_id: int) -> Optional[Entry]:
        return next((e for e in self.schedules if e.id == schedule_id), None)

    def _jobs_of(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        e = self._entry(frame["schedule_id"])
        if e is None:
            return []
        at, catch_up = frame["scheduled_at"], bool(frame.get("catch_up"))
        return [local_job(self.agent.identity.host_id, e, g, at, catch_up) for g in e.groups]

    # -- firing -----------------------------------------------------------------

    def tick(self, now: dt.datetime) -> Optional[dt.datetime]:
        """Fire what is due at `now` (each schedule at most once); the time
        of the next fire, or None when nothing is enabled."""
        for e in list(self.schedules):
            mark = self.marks.get(e.id)
            if mark is None or self.stopping:
                continue
            found = due(e, parse_ts(mark.last, now), now)
            if found is not None:
                self.fire(e, *found)
        wake = next_wake(self.schedules, self.marks, now)
        said = (iso(wake[0]), wake[1].name) if wake else None
        if said != self._said:  # once per change: the agent's log says what comes next
            self._said = said
            if said:
                log.info("next fire: schedule %s at %s UTC", said[1], said[0])
            else:
                log.info("no schedule enabled: nothing to fire")
        return wake[0] if wake else None

    async def run(self, first_dial: Optional[asyncio.Event] = None) -> None:
        """Fire what is due, sleep until the next fire (or a new set); for
        ever. The first fires (catch-ups at boot) wait for the first dial,
        so that fleetd, when it is there, makes their jobs."""
        if first_dial is not None:
            try:
                await asyncio.wait_for(first_dial.wait(), FIRST_DIAL_WAIT)
            except asyncio.TimeoutError:
                pass
        while True:
            now = self.clock.now()
            try:
                wake = self.tick(now)
            except Exception:  # the spool failing (disk full): the mark did not move
                log.exception("firing schedules failed; trying again in %.0f s", TICK_RETRY)
                wake = now + dt.timedelta(seconds=TICK_RETRY)
            self._wake.clear()
            timeout = None
            if wake is not None:
                timeout = min(MAX_NAP, max(0.0, (wake - now).total_seconds()) + 0.01)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def fire(self, e: Entry, when: dt.datetime, catch_up: bool) -> None:
        """Spool the fire with the schedule's new mark. fleetd makes its jobs
        when the link is up and the agent's own queue is empty; otherwise
        the agent queues them itself (in order behind its own)."""
        at = iso(when)
        frame: dict[str, Any] = {"schedule_id": e.id, "scheduled_at": at}
        if catch_up:
            frame["catch_up"] = True
        jobs = [local_job(self.agent.identity.host_id, e, g, at, catch_up) for g in e.groups]
        how = ""
        if jobs and (not self.agent.connected.is_set() or self.spool.local_jobs()):
            local, folded = self._queue(jobs)
            frame["jobs"] = [
                {"group_id": j["group_id"], "job_id": j["job_id"], "uid": j["uid"]} for j in local
            ]
            self.spool.fire(e.id, e.key, at, frame, local, folded)
            why = (
                "behind its own queue"
                if self.agent.connected.is_set()
                else "fleetd is out of reach"
            )
            ids = ", ".join(str(j["job_id"]) for j in local) or "none (folded into queued ones)"
            how = f"; the agent runs it itself ({why}) as job(s) {ids}"
        else:
            seq = self.spool.fire(e.id, e.key, at, frame)
            if jobs:
                self.pending[seq] = (time.monotonic(), jobs)
        self.marks[e.id] = Mark(e.key, at, True)
        self.agent.wake.set()
        log.info(
            "schedule %s fired for %s%s%s",
            e.name,
            at,
            " (catch-up of a missed window)" if catch_up else "",
            how,
        )
        self.kick()

    def _queue(
        self, jobs: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
        """Local jobs for these: new ones (with ids), and the queued ones that
        a group's later fire folds into (two fires of a group never queue
        twice, whether the earlier is queued already or in this batch)."""
        running = self.agent.runner.current  # submitted, its start not yet spooled
        waiting = {j["group_id"]: j for j in self.spool.local_jobs() if j["job_id"] != running}
        new: list[dict[str, Any]] = []
        folded: dict[int, dict[str, Any]] = {}
        for job in jobs:
            queued = waiting.get(job["group_id"])
            if queued is None:
                new.append(job)
                waiting[job["group_id"]] = job
                continue
            command = queued["command"]
            command["coalesced"] = [*command.get("coalesced", []), job["scheduled_at"]][
                -protocol.MAX_COALESCED :
            ]
            if queued["job_id"]:  # queued before this batch: its row changes
                folded[queued["job_id"]] = queued
            log.info(
                "schedule fire of %s at %s folded into a backup of it that still waits to run",
                job["group"],
                job["scheduled_at"],
            )
        for job, job_id in zip(new, self.spool.new_local_ids(len(new))):
            job["job_id"] = job["command"]["job_id"] = job_id
        return new, folded

    # -- running local jobs ------------------------------------------------------------

    def kick(self) -> None:
        """Start the next local job when the runner is free."""
        runner = self.agent.runner
        if runner.current is not None or self.stopping:
            return
        for job in self.spool.local_jobs():
            if job["job_id"] == self._submitted:  # still queued: its start was not spooled
                loop = asyncio.get_event_loop()
                if self._retry_at is None:
                    self._retry_at = loop.time() + START_RETRY
                    loop.call_later(START_RETRY, self.kick)
                    log.error(
                        "job %s could not start; trying again in %.0f s", job["job_id"], START_RETRY
                    )
                if loop.time() < self._retry_at:
                    return
            self._retry_at = None
            self._submitted = job["job_id"]
            try:
                runner.submit(job["command"], extra=started_fields(job), local=job["job_id"])
                return
            except Refused as exc:  # no repository, bad group: the job ends failed at once
                log.error("job %s (schedule) cannot run: %s", job["job_id"], exc.message)
                self.spool.drop_local(job["job_id"])
                asyncio.ensure_future(
                    runner.end_local(job["job_id"], started_fields(job), "failed", exc.message)
                )

    def owns(self, uid: Optional[str]) -> bool:
        """Is this fire backup already the agent's own (queued, running or run)?"""
        if not uid:
            return False
        return self.agent.runner.current_uid == uid or self.spool.taken(uid)

    def cancel_local(self, uid: str) -> Optional[dict[str, Any]]:
        """Take a queued local job out of the queue; the job, or None."""
        for job in self.spool.local_jobs():
            if job["uid"] == uid and job["job_id"] != self.agent.runner.current:
                self.spool.drop_local(job["job_id"])
                return job
        return None

    def stop(self) -> None:
        """The agent stops: nothing more fires or starts (a queued local job
        stays queued for the next start)."""
        self.stopping = True
        self.link_up()

    # -- the link ------------------------------------------------------------------------

    def acked(self, seq: int) -> None:
        """fleetd stored the fires up to seq: their jobs are fleetd's to run."""
        for fire_seq in [s for s in self.pending if s <= seq]:
            del self.pending[fire_seq]

    def link_up(self) -> None:
        if self._autonomy is not None:
            self._autonomy.cancel()
            self._autonomy = None

    def link_down(self) -> None:
        if self.pending and self._autonomy is None and not self.stopping:
            self._autonomy = asyncio.ensure_future(self._take_over())

    async def _take_over(self) -> None:
        """The link stayed down: the fires fleetd never acknowledged become
        the agent's own jobs (fleetd, once back, matches them by uid)."""
        # counted from the oldest fire, not from this drop: a link that comes
        # up and drops again without fleetd acknowledging it does not put
        # the backups off for ever
        oldest = min((since for since, _ in self.pending.values()), default=time.monotonic())
        await asyncio.sleep(max(0.0, oldest + self.autonomy_after - time.monotonic()))
        self._autonomy = None
        if self.agent.connected.is_set() or not self.pending or self.stopping:
            return
        jobs = [
            job
            for seq in sorted(self.pending)
            for job in self.pending[seq][1]
            if not self.owns(job["uid"])
        ]
        self.pending.clear()
        local, folded = self._queue(jobs)
        self.spool.queue_local(local, folded)
        log.warning(
            "fleetd has been out of reach for %.0f s since fires it never acknowledged: "
            "running their backups here as job(s) %s",
            self.autonomy_after,
            ", ".join(str(j["job_id"]) for j in local) or "(none: folded into queued ones)",
        )
        self.kick()
