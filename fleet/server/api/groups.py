"""Source groups: what to back up on a host, how long to keep it, retries."""

from __future__ import annotations

import urllib.parse
from typing import Any

from ...common import drills as drills_common
from ...common import retention
from ...common.protocol import MAX_TIMEOUT, Field
from .. import notify
from ..events import MaintenanceChanged
from ..jobs import lifecycle
from ..scheduling.schedules import bump, retention_warnings
from ..security.auth import Role
from ..store.models import Host, Schedule, ScheduleGroup, SourceGroup, utcnow
from .common import at_most, audit, check_name, get_group, get_host
from .context import Context
from .errors import Conflict, Forbidden, Invalid
from .maintenance import check_cron
from .registry import Method, collect
from .repos import attach, get_repository
from .views import group_json

METHODS: list[Method] = []
method = collect(METHODS)

GROUP_FIELDS = (
    Field("includes", "list[str]", False, limit=1000),
    Field("excludes", "list[str]", False, limit=1000),
    Field("retention", "dict", False),
    Field("pre_hook", "str", False),
    Field("post_hook", "str", False),
    Field("retries", "int", False, minimum=0),
    Field("retry_delay", "int", False, minimum=0),
    # a repository by name ("": the host's default), attached to the host when
    # it does not use it yet; a second one each new snapshot is copied into
    # ("": none) and how long the copies are kept there (none: as here)
    Field("repository", "str", False, limit=64),
    Field("copy_to", "str", False, limit=64),
    Field("copy_retention", "dict", False),
    # when copies run (cron, UTC); "" or off: after each backup
    Field("copy_cron", "str", False, limit=256),
    # seconds between backups expected without a schedule; 0: none
    Field("expect_every", "int", False, minimum=0),
    # a Healthchecks-style URL pinged as its backups start and end; "": none
    Field("ping_url", "str", False, limit=2048),
    # time limits in seconds (0: the default: 30 minutes a hook, none a backup)
    Field("hook_timeout", "int", False, minimum=0),
    Field("timeout", "int", False, minimum=0),
    # restore drills: when (cron, UTC; "" or off: none) and how much ("20", "1%")
    Field("drill_cron", "str", False, limit=256),
    Field("drill_sample", "str", False, limit=16),
)
MAX_GROUPS = 200  # source groups per host: each goes to its agent in one frame
# what groups.edit's params change, as the setting a template gives
OVERRIDDEN = {"clear_retention": "retention", "clear_copy_retention": "copy_retention"}
# protocol.Field bounds ints from below only; the upper bounds are checked here
MAXIMUM = {
    "retries": 100,
    "retry_delay": 7 * 24 * 3600,  # seconds: 7 days
    "expect_every": 366 * 24 * 3600,  # seconds: a year
    "hook_timeout": MAX_TIMEOUT,
    "timeout": MAX_TIMEOUT,
}


def check_includes(paths: list[str]) -> list[str]:
    if not paths:
        raise Invalid("a source group needs at least one --include path")
    for path in paths:
        if not path.startswith("/"):
            raise Invalid(f"include path {path!r} is not absolute")
    return list(dict.fromkeys(paths))


def check_excludes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not pattern.strip():
            raise Invalid("an exclude pattern is empty")
    return list(dict.fromkeys(patterns))


def check_retention(policy: Any) -> dict:
    try:
        return retention.normalize(policy)
    except retention.RetentionError as exc:
        raise Invalid(str(exc)) from None


def apply_repositories(ctx: Context, host: Host, g: SourceGroup, p: dict) -> list[str]:
    """The group's repository and copy as named in `p`; returns the names
    of those the host did not use before (now attached)."""
    attached = []
    before = (g.repository_id, g.copy_to_id)
    for key in ("repository", "copy_to"):
        if key not in p:
            continue
        if not p[key]:
            setattr(g, key, None)
            continue
        repo = get_repository(p[key])
        if key == "copy_to" and lifecycle.repository_of(g, host.id) is None:
            raise Invalid(
                f"host {host.name} has no repository to back up into yet: give it one "
                "(fleetctl repos use, or --repo) before a repository to copy to"
            )
        if attach(ctx, host, repo):
            attached.append(repo.name)
        setattr(g, key, repo)
    if p.get("clear_copy_retention"):
        g.copy_retention = None
    if p.get("copy_retention"):
        merged = dict(g.copy_retention or {})
        merged.update(p["copy_retention"])
        g.copy_retention = check_retention(merged)
    if (g.repository_id, g.copy_to_id) != before:
        g.copied_until = None  # another copy: every snapshot there is to copy
    if "copy_cron" in p:
        expr = check_cron("copy-cron", p["copy_cron"])
        if expr != g.copy_cron:
            if g.copy_cron is None and g.copied_until is None and before[1] == g.copy_to_id:
                g.copied_until = utcnow()  # copied after each backup until now
            g.copy_cron, g.next_copy_at = expr, None  # due from now on
            ctx.events.append(MaintenanceChanged(g.copy_to_id or 0))  # the ticker looks again
    if g.copy_to_id is not None:
        own = lifecycle.repository_of(g, host.id)
        if g.copy_to_id == own:
            raise Invalid(
                f"source group {g.name} would copy into repository {g.copy_to.name}, "
                "where its backups go already"
            )
    elif g.copy_retention is not None and "copy_retention" in p:
        raise Invalid("a copy retention needs a repository to copy to (--copy-to)")
    elif g.copy_cron is not None and "copy_cron" in p:
        raise Invalid("a copy schedule needs a repository to copy to (--copy-to)")
    return attached


def check_hooks(ctx: Context, p: dict) -> dict[str, str]:
    """Hooks are shell commands every run executes as the agent's user on
    the host: only an admin sets one (anyone may remove one). The hooks
    set, for the audit log."""
    hooks = {k: p[k].strip() for k in ("pre_hook", "post_hook") if (p.get(k) or "").strip()}
    if hooks and not ctx.caller.role.allows(Role.ADMIN):
        raise Forbidden("hooks run as shell commands on the host: setting one needs the admin role")
    return hooks


def apply_group_fields(g: SourceGroup, p: dict) -> None:
    if "includes" in p:
        g.includes = check_includes(p["includes"])
    if "excludes" in p:
        g.excludes = check_excludes(p["excludes"])
    for hook in ("pre_hook", "post_hook"):
        if hook in p:
            setattr(g, hook, p[hook].strip() or None)
    for number in ("retries", "retry_delay"):
        if number in p:
            setattr(g, number, at_most(number, p[number], MAXIMUM[number]))
    if "expect_every" in p:
        every = at_most("expect_every", p["expect_every"], MAXIMUM["expect_every"])
        g.expect_every = every or None
    for limit in ("hook_timeout", "timeout"):
        if limit in p:
            setattr(g, limit, at_most(limit, p[limit], MAXIMUM[limit]) or None)


def apply_drill(ctx: Context, g: SourceGroup, p: dict) -> None:
    """The group's drill cron and sample; a new cron is due from now on."""
    if p.get("drill_sample"):
        try:
            drills_common.parse_sample(p["drill_sample"])
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        g.drill_sample = p["drill_sample"].strip()
    elif "drill_sample" in p:
        g.drill_sample = None  # the default
    if "drill_cron" in p:
        expr = check_cron("drill-cron", p["drill_cron"])
        if expr != g.drill_cron:
            g.drill_cron, g.next_drill_at = expr, None
            ctx.events.append(MaintenanceChanged(0))  # the ticker looks again


def apply_ping(ctx: Context, g: SourceGroup, p: dict) -> None:
    """The group's ping URL as given ("": none), encrypted and bound to the
    group's row (so it is saved once first)."""
    if "ping_url" not in p:
        return
    url = p["ping_url"].strip()
    g.ping_sent_at = g.ping_error = None
    if not url:
        g.ping_url_enc = g.ping_url_shown = None
        return
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("a ping URL is an http:// or https:// URL, e.g. https://hc-ping.com/<uuid>")
    g.ping_url_enc = ctx.state.box.encrypt(url, notify.ping_aad(g.id))
    g.ping_url_shown = notify.ping_shown(url)


@method("groups.list", Role.VIEWER, (Field("host", "str", limit=64),), readonly=True)
def groups_list(ctx: Context, p: dict) -> list:
    """A host's source groups, by name."""
    host = get_host(p["host"])
    warnings = retention_warnings(host, utcnow())
    return [group_json(g, warnings.get(g.id, ())) for g in host.groups.order_by(SourceGroup.name)]


@method(
    "groups.show",
    Role.VIEWER,
    (Field("host", "str", limit=64), Field("name", "str", limit=64)),
    readonly=True,
)
def groups_show(ctx: Context, p: dict) -> dict:
    """One source group of a host."""
    host = get_host(p["host"])
    return shown(host, get_group(host, p["name"]))


def shown(host: Host, group: SourceGroup) -> dict:
    """The group as methods return it, with its retention warnings."""
    return group_json(group, retention_warnings(host, utcnow()).get(group.id, ()))


@method(
    "groups.create",
    Role.OPERATOR,
    (Field("host", "str", limit=64), Field("name", "str", limit=64), *GROUP_FIELDS),
)
def groups_create(ctx: Context, p: dict) -> dict:
    """Create a source group: include paths, excludes, retention, hooks, retries."""
    host = get_host(p["host"])
    name = check_name("group", p["name"])
    if SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == name)):
        raise Conflict(f"host {host.name} already has a source group {name!r}")
    if SourceGroup.select().where(SourceGroup.host == host).count() >= MAX_GROUPS:
        raise Invalid(f"host {host.name} has {MAX_GROUPS} source groups, the most it may")
    hooks = check_hooks(ctx, p)
    group = SourceGroup(host=host, name=name, includes=[], excludes=[])
    apply_group_fields(group, p)
    group.includes = check_includes(group.includes)
    group.retention = check_retention(p.get("retention"))
    attached = apply_repositories(ctx, host, group, p)
    apply_drill(ctx, group, p)
    group.save()
    if p.get("ping_url"):
        apply_ping(ctx, group, p)  # bound to the row's id: known now
        group.save()
    detail: dict[str, Any] = {"attached": attached} if attached else {}
    detail.update(hooks)
    audit(ctx, "group.create", f"{host.name}/{name}", detail or None)
    return {**shown(host, group), "attached": attached}


@method(
    "groups.edit",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("name", "str", limit=64),
        Field("new_name", "str", False, limit=64),
        Field("clear_retention", "bool", False),
        Field("clear_copy_retention", "bool", False),
        # settings handed back to the group's template (or "all")
        Field("inherit", "list[str]", False, limit=len(GROUP_FIELDS) + 1),
        *GROUP_FIELDS,
    ),
)
def groups_edit(ctx: Context, p: dict) -> dict:
    """Change a source group: the fields given, retention merged (or cleared).
    On a group a template made, what is changed here is the host's own from
    then on (an override); `inherit` hands settings back to the template."""
    from . import templates  # it builds on this module's appliers

    host = get_host(p["host"])
    group = get_group(host, p["name"])
    hooks = check_hooks(ctx, p)
    changed = sorted(k for k in p if k not in ("host", "name", "inherit"))
    settings = {OVERRIDDEN.get(k, k) for k in changed}
    given_back = templates.edited(group, settings, p.get("inherit") or [], templates.GROUP_SETTINGS)
    renamed = bool(p.get("new_name")) and p["new_name"] != group.name
    if renamed:
        templates.refuse_rename(group, "source group")
        new = check_name("group", p["new_name"])
        if SourceGroup.get_or_none((SourceGroup.host == host) & (SourceGroup.name == new)):
            raise Conflict(f"host {host.name} already has a source group {new!r}")
        group.name = new
    apply_group_fields(group, p)
    if p.get("clear_retention") or "retention" in p:
        merged = {} if p.get("clear_retention") else dict(group.retention)
        merged.update(p.get("retention") or {})
        group.retention = check_retention(merged)
    attached = apply_repositories(ctx, host, group, p)
    apply_ping(ctx, group, p)
    apply_drill(ctx, group, p)
    group.updated_at = utcnow()
    group.save()
    if ScheduleGroup.select().where(ScheduleGroup.group == group).exists():
        bump(ctx.events, host.id)  # agents run schedules from the groups they were sent
    if given_back or renamed:  # the template's values come back, or its group of the old name
        templates.reapply(ctx, host)
        group = get_group(host, group.name)
    audit(
        ctx,
        "group.edit",
        f"{host.name}/{p['name']}",
        {"changed": changed, "inherited": given_back, "attached": attached, **hooks},
    )
    return {**shown(host, group), "attached": attached}


@method(
    "groups.delete", Role.OPERATOR, (Field("host", "str", limit=64), Field("name", "str", limit=64))
)
def groups_delete(ctx: Context, p: dict) -> dict:
    """Delete a source group that no schedule uses (and no template made)."""
    from .templates import materialise, refuse_removal

    host = get_host(p["host"])
    group = get_group(host, p["name"])
    refuse_removal(group, "source group")
    used = [
        s.name
        for s in Schedule.select(Schedule.name)
        .join(ScheduleGroup)
        .where(ScheduleGroup.group == group)
        .order_by(Schedule.name)
    ]
    if used:
        raise Conflict(
            f"source group {group.name} is used by schedule(s) {', '.join(used)}; "
            "remove it from them first",
        )
    group.delete_instance()
    audit(ctx, "group.delete", f"{host.name}/{group.name}")
    materialise(ctx, host)  # a template's group of that name, shadowed until now, comes
    return {"removed": group.name, "host": host.name}
