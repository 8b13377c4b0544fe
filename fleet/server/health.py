"""The fleet's health (`fleetctl status`, /metrics, alerts): for every host and group the
last successful backup, the last outcome and the next run; what runs now;
and the problems, each with a severity that the command's exit status
follows (Nagios' meaning: 0 OK, 1 warning, 2 critical).

A group is overdue when its schedules fired since its last success and
that success is older than 1.5 times the time between the schedules' last
two fires: a backup that never happened is caught, not only one that
failed, and a weekday schedule is not overdue on a Monday morning.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any, Optional

from peewee import fn

from .. import __version__
from ..common import cron
from ..common.timefmt import iso
from .scheduling.schedules import zone_of
from .security.tls import cannot_connect
from .store.models import Host, Job, Repository, Schedule, ScheduleGroup, SourceGroup
from .store.queries.listing import served_pin

OK, WARNING, CRITICAL = 0, 1, 2
SEVERITY = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}
RANK = {name: n for n, name in SEVERITY.items()}
OVERDUE_FACTOR = 1.5
LOOK_BACK = dt.timedelta(days=400)  # how far back a schedule's last fires are looked for
DEFAULT_OFFLINE_AFTER = 3600  # seconds
DEFAULT_UNCHECKED_AFTER = 14 * 86400  # the default check runs weekly: two missed
MAX_THRESHOLD = 10 * 365 * 86400
DONE = ("succeeded", "warning")


def last_fires(
    crons: list[tuple[str, dt.tzinfo]], now: dt.datetime
) -> Optional[tuple[dt.datetime, dt.timedelta]]:
    """(the schedules' last fire at or before now, the time since the fire
    before it), or None when they never fired in the look-back."""
    latest = [cron.latest_fire(e, tz, now - LOOK_BACK, now) for e, tz in crons]
    fired = [w for w in latest if w is not None]
    if not fired:
        return None
    last = max(fired)
    before = [
        cron.latest_fire(e, tz, now - LOOK_BACK, last - dt.timedelta(seconds=1)) for e, tz in crons
    ]
    earlier = [w for w in before if w is not None]
    if earlier:
        return last, last - max(earlier)
    upcoming = [cron.next_fire(e, tz, last) for e, tz in crons]
    return last, min(upcoming) - last  # a first fire: the gap to the next one


def overdue(
    crons: list[tuple[str, dt.tzinfo]],
    since: dt.datetime,
    now: dt.datetime,
    expect_every: Optional[int] = None,
) -> Optional[str]:
    """Why a group whose last success (or creation) was at `since` is
    overdue, or None. Without a schedule, by what it expects (if anything)."""
    return late_by(last_fires(crons, now) if crons else None, bool(crons), since, now, expect_every)


def late_by(
    fires: Optional[tuple[dt.datetime, dt.timedelta]],
    scheduled: bool,
    since: dt.datetime,
    now: dt.datetime,
    expect_every: Optional[int] = None,
) -> Optional[str]:
    """overdue() from its schedules' last_fires (computed once for every
    group with the same schedules)."""
    if not scheduled:
        if not expect_every:
            return None
        every = dt.timedelta(seconds=expect_every)
        late = now - since
        if late <= every * OVERDUE_FACTOR:
            return None
        return f"no successful backup for {_span(late)}, one expected every {_span(every)}"
    if fires is None:
        return None
    last, gap = fires
    if last <= since:
        return None  # nothing fired since: nothing is missing
    late = now - since
    if late <= gap * OVERDUE_FACTOR:
        return None
    return f"no successful backup for {_span(late)}, its schedules fire every {_span(gap)}"


def version_tuple(value: Optional[str]) -> Optional[tuple[int, ...]]:
    """'0.2.1' -> (0, 2, 1); None for what is not such a version."""
    head = (value or "").split("-", 1)[0].split("+", 1)[0]
    parts = head.split(".")
    if not head or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _ran(job: Optional[Job]) -> Optional[float]:
    """How long a job ran, in seconds (None before it started and ended)."""
    if job is None or job.started_at is None or job.finished_at is None:
        return None
    return max(0.0, (job.finished_at - job.started_at).total_seconds())


def _drilled(job: Optional[Job]) -> Optional[str]:
    """The snapshot a drill proved (its verdict names it)."""
    verdict = ((job.summary or {}) if job else {}).get("drill") or {}
    return verdict.get("snapshot") if isinstance(verdict, dict) else None


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}".replace(".0", "")
    return f"{seconds}s"


def _latest(kind: str, statuses: tuple[str, ...], by: Any) -> dict[int, Job]:
    """The newest job of this kind in these statuses, per group or repository."""
    newest = (
        Job.select(fn.MAX(Job.id))
        .where((Job.kind == kind) & Job.status.in_(statuses) & by.is_null(False))
        .group_by(by)
    )
    column = by.column_name
    # one query, and only the columns read here (a whole row is twice the cost)
    rows = Job.select(
        Job.id, Job.status, Job.started_at, Job.finished_at, Job.error, Job.summary, by
    ).where(Job.id.in_(newest))
    return {getattr(j, column): j for j in rows}


def running_json(j: Job, progress: Optional[dict]) -> dict:
    """A job with an agent, as status shows it (and status --watch streams it)."""
    return {
        "id": j.id,
        "host": j.host.name,
        "kind": j.kind,
        "group": j.group_name,
        "status": j.status,
        "started_at": iso(j.started_at),
        "progress": progress,
    }


def build(now: dt.datetime, offline_after: int, unchecked_after: int, progress: dict) -> dict:
    problems: list[dict[str, Any]] = []

    def problem(severity: int, kind: str, message: str, **where: Any) -> None:
        problems.append({"severity": SEVERITY[severity], "kind": kind, "message": message, **where})

    hosts = list(
        Host.select(
            Host.id,
            Host.name,
            Host.online,
            Host.enrolled_at,
            Host.last_seen_at,
            Host.agent_version,
            Host.timezone,
            Host.tls_trust,
            Host.tls_pins,
        ).order_by(Host.name)
    )
    # the key fleetd serves, as recorded at its start and at each activation
    served = served_pin()
    groups: dict[int, list[SourceGroup]] = defaultdict(list)
    for g in SourceGroup.select().order_by(SourceGroup.name):
        groups[g.host_id].append(g)
    crons: dict[int, list[tuple[str, dt.tzinfo]]] = defaultdict(list)
    zones = {h.id: h.timezone for h in hosts}
    links = (
        ScheduleGroup.select(ScheduleGroup.group, Schedule.cron, Schedule.timezone, Schedule.host)
        .join(Schedule)
        .where(Schedule.enabled)
        .tuples()
    )
    for group_id, expr, own_zone, host_id in links:
        crons[group_id].append((expr, zone_of(own_zone, zones.get(host_id))[2]))
    success = _latest("backup", DONE, Job.group)
    outcome = _latest("backup", ("succeeded", "warning", "failed", "lost"), Job.group)
    proven = _latest("drill", ("succeeded",), Job.group)
    # a drill lost with its agent proves nothing either way: not counted
    drilled = _latest("drill", ("succeeded", "failed"), Job.group)
    running = list(
        Job.select(Job, Host)
        .join(Host)
        .where(Job.status.in_(("dispatched", "running")))
        .order_by(Job.id)
    )

    # a fleet's groups share a few schedules: their times are worked out once
    # per distinct set (croniter costs ~1 ms a group: 10 s for 10,000)
    timing: dict[tuple, tuple[Optional[dt.datetime], Optional[tuple]]] = {}

    def times(own: list[tuple[str, dt.tzinfo]]) -> tuple[Optional[dt.datetime], Optional[tuple]]:
        key = tuple(own)
        if key not in timing:
            nxt = min((cron.next_fire(e, tz, now) for e, tz in own), default=None)
            timing[key] = (nxt, last_fires(own, now) if own else None)
        return timing[key]

    out_hosts = []
    ours = version_tuple(__version__)
    for h in hosts:
        theirs = version_tuple(h.agent_version)
        if ours and theirs and theirs < ours:
            problem(
                WARNING,
                "agent_behind",
                f"{h.name} runs fleet-agent {h.agent_version}, older than fleetd's "
                f"{__version__}: deploy the new fleet-agent.pyz",
                host=h.name,
            )
        offline_for = None
        if not h.online and h.enrolled_at is not None:
            refused = cannot_connect(h.tls_trust, h.tls_pins, served) if served else None
            if refused:
                # certain, and not curable by waiting: said at once, not after offline_after
                problem(CRITICAL, "tls_refused", f"{h.name} {refused}", host=h.name)
            offline_for = int((now - (h.last_seen_at or h.enrolled_at)).total_seconds())
            if offline_for >= offline_after:
                problem(
                    CRITICAL,
                    "offline",
                    f"{h.name} has been offline for {_span(dt.timedelta(seconds=offline_for))}",
                    host=h.name,
                )
        out_groups = []
        for g in groups[h.id]:
            ok = success.get(g.id)
            last = outcome.get(g.id)
            own = crons.get(g.id, [])
            nxt, fires = times(own)
            late = late_by(
                fires, bool(own), ok.finished_at if ok else g.created_at, now, g.expect_every
            )
            where = {"host": h.name, "group": g.name}
            if late:
                problem(CRITICAL, "overdue", f"{h.name}/{g.name}: {late}", **where)
            if last is not None and last.status in ("failed", "lost"):
                problem(
                    CRITICAL,
                    "backup_failed",
                    f"{h.name}/{g.name}: the last backup (job {last.id}) {last.status}"
                    + (f": {last.error}" if last.error else ""),
                    job=last.id,
                    **where,
                )
            elif last is not None and last.status == "warning":
                problem(
                    WARNING,
                    "backup_warning",
                    f"{h.name}/{g.name}: the last backup (job {last.id}) ended with a warning: "
                    + (last.error.splitlines()[-1] if last.error else "some files were not read"),
                    job=last.id,
                    **where,
                )
            drill = drilled.get(g.id)
            if drill is not None and drill.status == "failed":
                problem(
                    CRITICAL,
                    "drill_failed",
                    f"{h.name}/{g.name}: the last restore drill (job {drill.id}) {drill.status}"
                    + (f": {drill.error}" if drill.error else ""),
                    job=drill.id,
                    **where,
                )
            out_groups.append(
                {
                    "name": g.name,
                    "last_success_at": iso(ok.finished_at) if ok else None,
                    "last_success_job": ok.id if ok else None,
                    "last_success_added_bytes": (ok.summary or {}).get("data_added")
                    if ok
                    else None,
                    "last_status": last.status if last else None,
                    "last_job": last.id if last else None,
                    "last_at": iso(last.finished_at) if last else None,
                    "last_duration_seconds": _ran(last),
                    "next_run_at": iso(nxt),
                    "scheduled": bool(own),
                    "overdue": late is not None,
                    # "last proven restorable": the last drill that succeeded
                    "last_proven_at": iso(proven[g.id].finished_at) if g.id in proven else None,
                    "last_proven_snapshot": _drilled(proven.get(g.id)),
                    "last_drill_status": drill.status if drill else None,
                    "last_drill_job": drill.id if drill else None,
                }
            )
        out_hosts.append(
            {
                "name": h.name,
                "online": bool(h.online),
                "enrolled": h.enrolled_at is not None,
                "last_seen_at": iso(h.last_seen_at),
                "offline_seconds": offline_for,
                "groups": out_groups,
            }
        )

    out_repos = []
    check_ok = _latest("check", ("succeeded",), Job.repository)
    check_last = _latest("check", ("succeeded", "warning", "failed", "lost"), Job.repository)
    busy = {j.repository_id for j in running}
    ended = ("succeeded", "warning", "failed", "lost")
    upkeep = {kind: _latest(kind, ended, Job.repository) for kind in ("forget", "prune")}
    for r in Repository.select().order_by(Repository.name):
        last = check_last.get(r.id)
        ok = check_ok.get(r.id)
        for kind, latest in upkeep.items():
            job = latest.get(r.id)
            if job is not None and job.status in ("failed", "lost"):
                problem(
                    CRITICAL,
                    "maintenance_failed",
                    f"repository {r.name}: the last {kind} (job {job.id}) {job.status}"
                    + (f": {job.error}" if job.error else ""),
                    repository=r.name,
                    job=job.id,
                )
        if last is not None and last.status in ("failed", "lost"):
            problem(
                CRITICAL,
                "check_failed",
                f"repository {r.name}: the last check (job {last.id}) {last.status}",
                repository=r.name,
                job=last.id,
            )
        since = ok.finished_at if ok else r.created_at
        unchecked = (now - since).total_seconds() >= unchecked_after
        if unchecked:
            problem(
                WARNING,
                "unchecked",
                f"repository {r.name}: no successful check for {_span(now - since)}",
                repository=r.name,
            )
        if r.locks and r.id not in busy:
            problem(
                WARNING,
                "locked",
                f"repository {r.name} holds {r.locks} stale lock(s): "
                f"fleetctl maintenance run {r.name} unlock",
                repository=r.name,
            )
        out_repos.append(
            {
                "name": r.name,
                "locks": r.locks,
                "last_check_status": last.status if last else None,
                "last_check_at": iso(last.finished_at) if last else None,
                "last_good_check_at": iso(ok.finished_at) if ok else None,
                "unchecked": unchecked,
            }
        )

    worst = max((RANK[p["severity"]] for p in problems), default=OK)
    return {
        "status": SEVERITY[worst],
        "exit_code": worst,
        "checked_at": iso(now),
        "hosts_online": sum(1 for h in hosts if h.online),
        "hosts": out_hosts,
        "repositories": out_repos,
        "running": [running_json(j, progress.get(j.id)) for j in running],
        "problems": problems,
    }
