"""Schedules: when a host backs up which of its source groups.

A schedule is a cron expression (fleet.common.cron decides what is accepted
and when it fires), a time zone (none: the host's own, as its agent
reports it), an enabled flag and one or more of the host's source groups.
Every change bumps the host's schedule version, which is what the agent
acknowledges once it holds the new set.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from ...common import cron
from ...common.protocol import Field
from ...common.timefmt import iso
from ..scheduling.schedules import bump, retention_warnings, zone_of
from ..security.auth import Role
from ..store.models import Host, Schedule, ScheduleGroup, SourceGroup, utcnow
from .common import audit, check_name, get_group, get_host
from .context import Context
from .errors import Conflict, Invalid, NotFound
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

MAX_GROUPS = 100  # source groups one schedule backs up
MAX_SCHEDULES = 100  # schedules per host
SHOWN_FIRES = 3

HOST = Field("host", "str", limit=64)
NAME = Field("name", "str", limit=64)
SCHEDULE_FIELDS = (
    Field("cron", "str", False, limit=cron.MAX_LEN),
    Field("groups", "list[str]", False, limit=MAX_GROUPS),
    Field("timezone", "str", False, limit=64),  # "" goes back to the host's zone
)


def check_cron(expr: str) -> str:
    try:
        return cron.normalize(expr)
    except cron.CronError as exc:
        raise Invalid(str(exc)) from None


def check_timezone(name: str) -> Optional[str]:
    if not name:
        return None  # the host's zone
    try:
        cron.zone(name)
    except cron.CronError as exc:
        raise Invalid(str(exc)) from None
    return name


def schedule_json(s: Schedule, host: Host, groups: list[str], now: dt.datetime) -> dict[str, Any]:
    name, source, tz = zone_of(s.timezone, host.timezone)
    fires = cron.next_fires(s.cron, tz, now, SHOWN_FIRES) if s.enabled else []
    return {
        "id": s.id,
        "host": host.name,
        "name": s.name,
        "cron": s.cron,
        "timezone": name,
        "timezone_from": source,
        "groups": groups,
        "enabled": s.enabled,
        "next_fires": [
            {"fires_at": iso(w), "local": cron.to_local(w, tz).isoformat()} for w in fires
        ],
        "created_at": iso(s.created_at),
        "updated_at": iso(s.updated_at),
        # the template that made it (None: by hand), and what this host overrides of it
        "template": s.template,
        "overrides": s.overrides or [],
    }


def group_names(*schedule_ids: int) -> dict[int, list[str]]:
    """The source group names of these schedules, by schedule id: one query."""
    out: dict[int, list[str]] = {sid: [] for sid in schedule_ids}
    rows = (
        ScheduleGroup.select(ScheduleGroup.schedule, SourceGroup.name)
        .join(SourceGroup)
        .where(ScheduleGroup.schedule.in_(schedule_ids))
        .order_by(SourceGroup.name)
        .tuples()
    )
    for sid, name in rows:
        out[sid].append(name)
    return out


def one_json(s: Schedule, host: Host, now: dt.datetime) -> dict[str, Any]:
    groups = group_names(s.id)[s.id]
    return {**schedule_json(s, host, groups, now), **warnings_of(groups, group_warnings(host, now))}


def check_free(host: Host, name: str) -> str:
    """A valid schedule name no other schedule of the host has."""
    check_name("schedule", name)
    if Schedule.get_or_none((Schedule.host == host) & (Schedule.name == name)):
        raise Conflict(f"host {host.name} already has a schedule {name!r}")
    return name


def get_schedule(host: Host, name: str) -> Schedule:
    s = Schedule.get_or_none((Schedule.host == host) & (Schedule.name == name))
    if s is None:
        raise NotFound(f"host {host.name} has no schedule {name!r}")
    return s


def check_groups(host: Host, names: list[str]) -> list[SourceGroup]:
    if not names:
        raise Invalid("a schedule needs at least one source group (--group)")
    return [get_group(host, n) for n in dict.fromkeys(names)]


def link(s: Schedule, groups: list[SourceGroup]) -> None:
    ScheduleGroup.delete().where(ScheduleGroup.schedule == s).execute()
    ScheduleGroup.insert_many([{"schedule": s.id, "group": g.id} for g in groups]).execute()


def free_name(host: Host) -> str:
    taken = {s.name for s in Schedule.select(Schedule.name).where(Schedule.host == host)}
    n = 1
    while f"schedule-{n}" in taken:
        n += 1
    return f"schedule-{n}"


@method("schedules.list", Role.VIEWER, (HOST,), readonly=True)
def schedules_list(ctx: Context, p: dict) -> list:
    """A host's schedules by name, each with its next fire times (local and UTC)."""
    host = get_host(p["host"])
    now = utcnow()
    rows = list(Schedule.select().where(Schedule.host == host).order_by(Schedule.name))
    groups = group_names(*(s.id for s in rows))
    warned = group_warnings(host, now)
    return [
        {**schedule_json(s, host, groups[s.id], now), **warnings_of(groups[s.id], warned)}
        for s in rows
    ]


def group_warnings(host: Host, now: dt.datetime) -> dict[str, list[str]]:
    """group name -> its retention warnings (see scheduling.schedules)."""
    by_id = retention_warnings(host, now)
    names = dict(
        SourceGroup.select(SourceGroup.id, SourceGroup.name)
        .where(SourceGroup.id.in_(list(by_id)))
        .tuples()
    )
    return {names[gid]: w for gid, w in by_id.items() if w}


def warnings_of(groups: list[str], warned: dict[str, list[str]]) -> dict[str, Any]:
    """What a schedule's groups keep that their schedules cannot give them."""
    return {"retention_warnings": {g: warned[g] for g in groups if g in warned}}


@method("schedules.show", Role.VIEWER, (HOST, NAME), readonly=True)
def schedules_show(ctx: Context, p: dict) -> dict:
    """One schedule of a host."""
    host = get_host(p["host"])
    return one_json(get_schedule(host, p["name"]), host, utcnow())


@method(
    "schedules.create",
    Role.OPERATOR,
    (
        HOST,
        Field("name", "str", False, limit=64),
        Field("enabled", "bool", False),
        *SCHEDULE_FIELDS,
    ),
)
def schedules_create(ctx: Context, p: dict) -> dict:
    """Create a schedule: a cron expression, the groups it backs up, a time zone."""
    host = get_host(p["host"])
    if "cron" not in p:
        raise Invalid("a schedule needs a cron expression (--cron)")
    expr = check_cron(p["cron"])
    groups = check_groups(host, p.get("groups") or [])
    zone = check_timezone(p.get("timezone") or "")
    if Schedule.select().where(Schedule.host == host).count() >= MAX_SCHEDULES:
        raise Invalid(f"host {host.name} has {MAX_SCHEDULES} schedules already, the most it may")
    name = check_free(host, p["name"]) if p.get("name") else free_name(host)
    now = utcnow()
    s = Schedule.create(
        host=host,
        name=name,
        cron=expr,
        timezone=zone,
        enabled=p.get("enabled", True),
        created_at=now,
        updated_at=now,
    )
    link(s, groups)
    bump(ctx.events, host.id)
    audit(ctx, "schedule.create", f"{host.name}/{name}", {"cron": expr})
    names = sorted(g.name for g in groups)
    return {**schedule_json(s, host, names, now), **warnings_of(names, group_warnings(host, now))}


@method(
    "schedules.edit",
    Role.OPERATOR,
    (
        HOST,
        NAME,
        Field("new_name", "str", False, limit=64),
        # settings handed back to the schedule's template (or "all")
        Field("inherit", "list[str]", False, limit=8),
        *SCHEDULE_FIELDS,
    ),
)
def schedules_edit(ctx: Context, p: dict) -> dict:
    """Change a schedule: the fields given; --group replaces its groups. On
    a schedule a template made, what is changed here is the host's own from
    then on; `inherit` hands settings back to the template."""
    from . import templates  # it builds on this module

    host = get_host(p["host"])
    s = get_schedule(host, p["name"])
    changed = sorted(k for k in p if k not in ("host", "name", "inherit"))
    given_back = templates.edited(s, changed, p.get("inherit") or [], templates.SCHEDULE_SETTINGS)
    renamed = bool(p.get("new_name")) and p["new_name"] != s.name
    if renamed:
        templates.refuse_rename(s, "schedule")
        s.name = check_free(host, p["new_name"])
    if "cron" in p:
        s.cron = check_cron(p["cron"])
    if "timezone" in p:
        s.timezone = check_timezone(p["timezone"])
    if "groups" in p:
        link(s, check_groups(host, p["groups"]))
    s.updated_at = utcnow()
    s.save()
    bump(ctx.events, host.id)
    if given_back or renamed:  # the template's values come back, or its schedule of the old name
        templates.reapply(ctx, host)
        s = get_schedule(host, s.name)
    audit(
        ctx,
        "schedule.edit",
        f"{host.name}/{p['name']}",
        {"changed": changed, "inherited": given_back},
    )
    return one_json(s, host, s.updated_at)


def set_enabled(ctx: Context, p: dict, enabled: bool) -> dict:
    host = get_host(p["host"])
    s = get_schedule(host, p["name"])
    now = utcnow()
    if s.enabled != enabled:
        if s.template is not None:  # the host's own from now on
            s.overrides = sorted({*s.overrides, "enabled"})
        s.enabled = enabled
        s.updated_at = now
        s.save()
        bump(ctx.events, host.id)
        audit(ctx, "schedule.enable" if enabled else "schedule.disable", f"{host.name}/{s.name}")
    return one_json(s, host, now)


@method("schedules.enable", Role.OPERATOR, (HOST, NAME))
def schedules_enable(ctx: Context, p: dict) -> dict:
    """Let a schedule fire again."""
    return set_enabled(ctx, p, True)


@method("schedules.disable", Role.OPERATOR, (HOST, NAME))
def schedules_disable(ctx: Context, p: dict) -> dict:
    """Stop a schedule from firing; it is kept, with its groups."""
    return set_enabled(ctx, p, False)


@method("schedules.delete", Role.OPERATOR, (HOST, NAME))
def schedules_delete(ctx: Context, p: dict) -> dict:
    """Delete a schedule (one no template made); its past jobs stay, without it."""
    from .templates import materialise, refuse_removal

    host = get_host(p["host"])
    s = get_schedule(host, p["name"])
    refuse_removal(s, "schedule")
    s.delete_instance()  # cascades to its group links; jobs keep schedule_id NULL
    bump(ctx.events, host.id)
    audit(ctx, "schedule.delete", f"{host.name}/{s.name}")
    materialise(ctx, host)  # a template's schedule of that name, shadowed until now, comes
    return {"removed": s.name, "host": host.name}
