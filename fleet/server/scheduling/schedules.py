"""Schedules between fleetd and the agents: the set an agent holds, and
the jobs a fire makes.

The agent keeps the schedule set and decides when it fires (it fires when
fleetd is down, too); fleetd pushes the set (`schedule.set`, a version that
every change bumps) and turns each fire into one backup job per source
group, actor the schedule. Each of those jobs has a uid made of the fire
(host, schedule, time, group), so that an agent that waited for fleetd in
vain and ran the fire's backups itself, under ids of its own, reports the
same jobs fleetd may have made of the fire meanwhile, not new ones.
Everything here runs on the store thread.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, Optional

from ...common import cron, protocol, retention
from ...common.timefmt import iso, parse_ts
from ..events import Event, SchedulesChanged
from ..jobs import lifecycle
from ..store.models import Host, Job, Schedule, ScheduleGroup, SourceGroup

log = logging.getLogger("fleetd.schedules")


def zone_of(own: Optional[str], host_zone: Optional[str]) -> tuple[str, str, dt.tzinfo]:
    """(zone name, where it comes from, the zone) of a schedule: its own, the
    host's as its agent reported it, or UTC while the host has not reported
    one (or reported one unknown here). The agent is sent the name, so both
    sides read the cron in the same zone."""
    if own:
        try:
            return own, "schedule", cron.zone(own)
        except cron.CronError:  # gone from this machine's zone database since
            log.warning("time zone %s is unknown here; reading the schedule in UTC", own)
            return "UTC", "default", dt.timezone.utc
    if host_zone:
        try:
            return host_zone, "host", cron.zone(host_zone)
        except cron.CronError:
            pass
    return "UTC", "default", dt.timezone.utc


def retention_warnings(host: Host, now: dt.datetime) -> dict[int, list[str]]:
    """group id -> what its retention cannot get from its enabled schedules
    (keep-hourly 24 on a daily schedule), for every group of the host with
    a retention policy. Two queries."""
    groups = {
        g.id: g for g in SourceGroup.select().where(SourceGroup.host == host.id) if g.retention
    }
    crons: dict[int, list[tuple[str, dt.tzinfo]]] = {gid: [] for gid in groups}
    links = (
        ScheduleGroup.select(ScheduleGroup.group, Schedule.cron, Schedule.timezone)
        .join(Schedule)
        .where(ScheduleGroup.group.in_(list(groups)) & Schedule.enabled)
        .tuples()
    )
    for group_id, expr, own_zone in links:
        crons[group_id].append((expr, zone_of(own_zone, host.timezone)[2]))
    return {
        gid: retention.unfillable(groups[gid].retention, cron.shortest_gap(crons[gid], now))
        for gid in groups
    }


def bump(events: list[Event], host_id: int) -> None:
    """The host's schedule set changed: a new version, pushed to its agent
    once committed."""
    Host.update(schedule_version=Host.schedule_version + 1).where(Host.id == host_id).execute()
    events.append(SchedulesChanged(host_id))


def uses_host_zone(host_id: int) -> bool:
    return (
        Schedule.select().where((Schedule.host == host_id) & Schedule.timezone.is_null()).exists()
    )


def group_wire(g: SourceGroup) -> dict[str, Any]:
    wire = {
        "id": g.id,
        "name": g.name,
        "includes": list(g.includes),
        "excludes": list(g.excludes),
        "retention": dict(g.retention or {}),
        "pre_hook": g.pre_hook or "",
        "post_hook": g.post_hook or "",
    }
    if g.repository_id is not None:  # else its host's default
        wire["repository_id"] = g.repository_id
    for key in ("hook_timeout", "timeout"):
        if getattr(g, key):
            wire[key] = getattr(g, key)
    return wire


def schedule_set(host_id: int, host_zone: Optional[str] = None) -> dict[str, Any]:
    """The schedule.set frame's data for a host: every schedule (disabled
    ones too: the agent keeps their place) with the groups it backs up, in
    full, so the agent can run them without fleetd. Two queries."""
    host = Host.get_by_id(host_id)
    zone_name = host_zone if host_zone is not None else host.timezone
    schedules = list(Schedule.select().where(Schedule.host == host_id).order_by(Schedule.id))
    groups: dict[int, list[dict[str, Any]]] = {s.id: [] for s in schedules}
    links = (
        ScheduleGroup.select(ScheduleGroup.schedule, SourceGroup)
        .join(SourceGroup)
        .where(ScheduleGroup.schedule.in_(list(groups)))
        .order_by(SourceGroup.name)
    )
    for link in links:
        groups[link.schedule_id].append(group_wire(link.group))
    out = []
    for s in schedules:
        name, _, _ = zone_of(s.timezone, zone_name)
        out.append(
            {
                "id": s.id,
                "name": s.name,
                "cron": s.cron,
                "timezone": name,
                "enabled": s.enabled,
                "source_groups": groups[s.id],
            }
        )
    return {"version": host.schedule_version, "schedules": out}


def on_hello(
    events: list[Event], host_id: int, agent_version: int, zone: Optional[str]
) -> Optional[dict[str, Any]]:
    """At hello: the schedule set to push, or None when the agent holds the
    current one (which is then recorded as applied: a lost schedule.ack
    costs nothing). An agent that holds none says 0, the version of a host
    that never had a schedule. A host whose zone changed, with schedules
    that follow it, gets a new version (their fire times moved)."""
    version, applied, stored_zone = (
        Host.select(Host.schedule_version, Host.applied_schedule_version, Host.timezone)
        .where(Host.id == host_id)
        .tuples()
        .get()
    )
    if zone and zone != stored_zone and uses_host_zone(host_id):
        bump(events, host_id)
        version += 1
        events.pop()  # pushed below, with this hello's zone, not after commit
    if agent_version == version:
        if applied != version:
            acknowledged(host_id, version)
        return None
    return schedule_set(host_id, zone)


def acknowledged(host_id: int, version: int) -> bool:
    """The agent holds this version of the set; False for one fleetd never made."""
    return bool(
        Host.update(applied_schedule_version=version)
        .where((Host.id == host_id) & (Host.schedule_version >= version))
        .execute()
    )


def fire_params(
    group: Optional[SourceGroup], scheduled_at: Optional[str], catch_up: bool
) -> dict[str, Any]:
    """A fire's backup of the group: what command.run carries, and the fire
    (a group gone since: the fire only)."""
    params = lifecycle.backup_params(group) if group is not None else {}
    params.update(scheduled_at=scheduled_at, catch_up=catch_up)
    return params


def waiting_backup(host_id: int, group_id: int, now: dt.datetime) -> Optional[Job]:
    """A backup of the group that fleetd holds queued and due: a new fire
    of it would only queue a second copy behind it."""
    return (
        Job.select()
        .where(
            (Job.host == host_id)
            & (Job.group == group_id)
            & (Job.kind == "backup")
            & (Job.status == lifecycle.QUEUED)
            & Job.agent_job.is_null()
            & (Job.not_before.is_null() | (Job.not_before <= now))
        )
        .order_by(Job.id)
        .first()
    )


def coalesce(job: Job, scheduled_at: dt.datetime, uid: str) -> None:
    """Fold a fire into a backup of its group still waiting. `uid` names the
    job the fire would have made: a fire folded already (resent under
    another seq) is not counted twice; two schedules firing the same group
    at one time are."""
    params = dict(job.params or {})
    if uid in params.get("folded", ()):
        return
    params["folded"] = [*params.get("folded", []), uid][-protocol.MAX_COALESCED :]
    params["coalesced"] = [*params.get("coalesced", []), iso(scheduled_at)][
        -protocol.MAX_COALESCED :
    ]
    params["coalesced_count"] = int(params.get("coalesced_count", 0)) + 1
    Job.update(params=params).where(Job.id == job.id).execute()


def apply_fire(
    events: list[Event], host_id: int, host_name: str, data: dict[str, Any], now: dt.datetime
) -> list[int]:
    """A schedule.fire: the jobs it makes (their ids). One backup per group of
    the schedule as fleetd has it, queued and offered to the host; a group
    whose backup already waits in the queue gets none (the fire is folded
    into the waiting one, and the log says so). A fire the agent runs itself
    (`jobs`) is recorded as its jobs, for it to report on."""
    scheduled_at = parse_ts(data["scheduled_at"])
    when = iso(scheduled_at)
    catch_up = bool(data.get("catch_up"))
    s = Schedule.get_or_none((Schedule.id == data["schedule_id"]) & (Schedule.host == host_id))
    if "jobs" in data:
        return [
            local_job(events, host_id, j["job_id"], j["uid"], j["group_id"], s, when, catch_up)
            for j in data["jobs"]
        ]
    if s is None:
        log.warning(
            "host %s fired schedule %s, which it no longer has; nothing to run",
            host_name,
            data["schedule_id"],
        )
        return []
    if not s.enabled:
        log.info("host %s fired schedule %s, disabled since; nothing to run", host_name, s.name)
        return []
    made = []
    groups = SourceGroup.select().join(ScheduleGroup).where(ScheduleGroup.schedule == s.id)
    for group in groups.order_by(SourceGroup.name):
        uid = protocol.fire_uid(host_id, s.id, when, group.id)
        if Job.select().where(Job.uid == uid).exists():
            continue  # this fire made it already (an agent's resend)
        waiting = waiting_backup(host_id, group.id, now)
        if waiting is not None:
            coalesce(waiting, scheduled_at, uid)
            log.info(
                "host %s: schedule %s fired for %s at %s while job %s still waits in the queue; "
                "folded into it",
                host_name,
                s.name,
                group.name,
                when,
                waiting.id,
            )
            continue
        job = lifecycle.create(
            events,
            host_id,
            "backup",
            "schedule",
            group=group,
            params=fire_params(group, when, catch_up),
            schedule=s.id,
            uid=uid,
        )
        made.append(job.id)
    if made:
        log.info(
            "host %s: schedule %s fired for %s%s: job(s) %s",
            host_name,
            s.name,
            when,
            " (catch-up)" if catch_up else "",
            ", ".join(map(str, made)),
        )
    return made


def local_job(
    events: list[Event],
    host_id: int,
    agent_job: int,
    uid: str,
    group_id: Optional[int],
    schedule: Optional[Schedule],
    scheduled_at: Optional[str],
    catch_up: bool,
    group_name: Optional[str] = None,
    coalesced: Sequence[str] = (),
) -> int:
    """The job an agent runs on its own under its id `agent_job`: the one
    already bound to that id, the one fleetd made of the same fire (same
    uid), or a new one. Any backup of that group still waiting in fleetd's
    queue is superseded by it."""
    found = Job.get_or_none((Job.host == host_id) & (Job.agent_job == agent_job))
    if found is not None and found.uid != uid:
        # an earlier agent's id for another job (the state dir was made anew)
        Job.update(agent_job=None).where(Job.id == found.id).execute()
        found = None
    if found is None:
        found = Job.get_or_none((Job.uid == uid) & (Job.host == host_id))
    if found is not None:
        changes: dict[str, Any] = {}
        if found.agent_job != agent_job:
            changes["agent_job"] = agent_job
        if coalesced:  # the later fires the agent folded into it
            changes["params"] = {**(found.params or {}), "coalesced": list(coalesced)}
        if changes:  # (each report of a bound job would otherwise write it again)
            Job.update(**changes).where(Job.id == found.id).execute()
        return found.id
    group = None
    if group_id is not None:
        group = SourceGroup.get_or_none(
            (SourceGroup.id == group_id) & (SourceGroup.host == host_id)
        )
    if group is None and group_name:
        group = SourceGroup.get_or_none(
            (SourceGroup.name == group_name) & (SourceGroup.host == host_id)
        )
    params = {**fire_params(group, scheduled_at, catch_up), "local": True}
    if coalesced:
        params["coalesced"] = list(coalesced)
    job = lifecycle.create(
        events,
        host_id,
        "backup",
        "schedule",
        group=group,
        params=params,
        schedule=schedule.id if schedule is not None else None,
        uid=uid,
        agent_job=agent_job,
    )
    if group is None and group_name:
        Job.update(group_name=group_name).where(Job.id == job.id).execute()
    if group is not None:
        # a backup of the group that a schedule fire left waiting in fleetd's
        # queue is done by this run (an operator's run-now is not)
        waiting = waiting_backup(host_id, group.id, dt.datetime.max)
        if waiting is not None and waiting.id != job.id and waiting.actor_kind == "schedule":
            lifecycle.end(
                events,
                host_id,
                waiting.id,
                "cancelled",
                error=f"superseded by job {job.id}, which the agent ran on its own",
            )
    return job.id


def started_local(events: list[Event], host_id: int, data: dict[str, Any]) -> int:
    """The job of a job.started under an agent's own id (see local_job)."""
    schedule = None
    if data.get("schedule_id") is not None:
        schedule = Schedule.get_or_none(
            (Schedule.id == data["schedule_id"]) & (Schedule.host == host_id)
        )
    return local_job(
        events,
        host_id,
        data["job_id"],
        data.get("uid") or f"agent-{host_id}{data['job_id']}",
        data.get("group_id"),
        schedule,
        data.get("scheduled_at"),
        bool(data.get("catch_up")),
        data.get("group"),
        data.get("coalesced") or (),
    )
