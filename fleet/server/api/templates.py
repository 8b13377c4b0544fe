"""Templates: settings defined once for every host a label selector picks.

A template is a selector and a spec: the repositories its hosts use, source
groups, schedules, and the maintenance of repositories. fleetd
materialises it on every host the selector picks: now, whenever a template
changes, and when a host gains or loses a label. What it made on a host
names it (the rows' `template`). An operator's change to such a row on one
host is an override: that field is the host's from then on (`overrides`)
until `--inherit` hands it back. A group or schedule a host was given by
hand wins over a template's of the same name; of two templates defining
one name, the lower priority (then the name) wins.

When a host stops being picked, what the template made there goes, except
what an operator changed there (it stays, as the host's own) and the
repositories it attached (restic's data and the snapshot lists stay in
reach; `repos detach` drops one).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import peewee as pw

from ...common import drills, protocol, selectors
from ...common.protocol import Field, ProtocolError
from ...common.timefmt import iso
from ..events import MaintenanceChanged
from ..scheduling.schedules import bump
from ..security.auth import Role
from ..store.models import (
    Host,
    HostRepository,
    Maintenance,
    Repository,
    Schedule,
    ScheduleGroup,
    SourceGroup,
    Template,
    db,
    utcnow,
)
from . import maintenance, schedules
from .common import at_most, audit, check_name, requirements
from .context import Caller, Context
from .errors import ApiError, Conflict, Forbidden, Invalid, NotFound
from .groups import (
    GROUP_FIELDS,
    MAX_GROUPS,
    MAXIMUM,
    apply_drill,
    apply_group_fields,
    apply_repositories,
    check_excludes,
    check_includes,
    check_retention,
)
from .registry import Method, collect
from .repos import MAX_REPOSITORIES, attach

METHODS: list[Method] = []
method = collect(METHODS)
log = logging.getLogger("fleetd.templates")
T = TypeVar("T")

MAX_PRIORITY = 1_000_000
DEFAULT_PRIORITY = 100
CHUNK = 25  # hosts applied in one transaction: about 0.1 s of the store thread
GRACE = dt.timedelta(seconds=60)  # a mark older than this was left by a request that ended

NAME = Field("name", "str", limit=64)
MAX_TEMPLATES = 1000
MAX_ITEMS = 100  # groups, schedules or repositories in one template
SPEC_KEYS = ("repositories", "maintenance", "groups", "schedules")

# a ping URL is one check's, so it is set per group on the host, not here
TEMPLATE_GROUP_FIELDS = tuple(f for f in GROUP_FIELDS if f.name != "ping_url")
GROUP_SETTINGS = tuple(f.name for f in TEMPLATE_GROUP_FIELDS)
SCHEDULE_SPEC_FIELDS = (*schedules.SCHEDULE_FIELDS, Field("enabled", "bool", False))
SCHEDULE_SETTINGS = ("cron", "groups", "timezone", "enabled")
MAINTENANCE_SETTINGS = tuple(f.name for f in maintenance.SET_FIELDS)

# what a group's setting is when its template does not give it
GROUP_DEFAULTS: dict[str, Any] = {
    "excludes": [],
    "retention": {},
    "pre_hook": "",
    "post_hook": "",
    "retries": 0,
    "retry_delay": 300,
    "repository": "",
    "copy_to": "",
    "copy_retention": None,
    "copy_cron": "",
    "expect_every": 0,
    "hook_timeout": 0,
    "timeout": 0,
    "drill_cron": "",
    "drill_sample": "",
}


# --- the spec ---------------------------------------------------------------


def checked_part(where: str, data: Any, fields: Sequence[Field]) -> dict[str, Any]:
    """One object of a spec checked against `fields`; unknown keys are
    refused (a typo must not be a setting silently left out)."""
    if not isinstance(data, dict):
        raise Invalid(f"{where}: expected an object")
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise Invalid(f"{where}: unknown setting {unknown[0]!r}")
    try:
        return protocol.check_fields(data, fields, f"{where}.")
    except ProtocolError as exc:
        raise Invalid(str(exc)) from None


def named_objects(where: str, data: Any, kind: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Invalid(f"{where}: expected an object of {kind}s by name")
    if len(data) > MAX_ITEMS:
        raise Invalid(f"{where}: at most {MAX_ITEMS} {kind}s")
    for name in data:
        check_name(kind, name)
    return data


def repository_named(where: str, name: str) -> Repository:
    repo = Repository.get_or_none(Repository.name == name)
    if repo is None:
        raise Invalid(f"{where}: no repository named {name!r} (fleetctl repos create)")
    return repo


def check_group(where: str, data: Any) -> dict[str, Any]:
    g = checked_part(where, data, TEMPLATE_GROUP_FIELDS)
    try:
        g["includes"] = check_includes(g.get("includes") or [])
        if "excludes" in g:
            g["excludes"] = check_excludes(g["excludes"])
        for key in ("retention", "copy_retention"):
            if key in g:
                g[key] = check_retention(g[key])
        for key, top in MAXIMUM.items():
            if key in g:
                at_most(key, g[key], top)
        for key in ("repository", "copy_to"):
            if g.get(key):
                repository_named(f"{where}.{key}", g[key])
        for key, label in (("copy_cron", "copy-cron"), ("drill_cron", "drill-cron")):
            if key in g:
                g[key] = maintenance.check_cron(label, g[key]) or ""
        if not g.get("copy_to") and (g.get("copy_retention") or g.get("copy_cron")):
            raise Invalid("a copy retention or schedule needs a repository to copy to (copy_to)")
        if g.get("drill_sample"):
            try:
                drills.parse_sample(g["drill_sample"])
            except ValueError as exc:
                raise Invalid(str(exc)) from None
    except Invalid as exc:
        raise Invalid(f"{where}: {exc.message}") from None
    return g


def check_spec(raw: Any) -> dict[str, Any]:
    """The spec as stored: every part checked as its own command would
    check it, crons normalised; raises Invalid naming the first fault."""
    if not isinstance(raw, dict):
        raise Invalid("a template's spec is a JSON object")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise Invalid(f"unknown part {unknown[0]!r} (a spec has {', '.join(SPEC_KEYS)})")
    repos = raw.get("repositories") or []
    if not isinstance(repos, list) or not all(isinstance(r, str) for r in repos):
        raise Invalid("repositories: expected a list of repository names")
    if len(repos) > MAX_REPOSITORIES:
        raise Invalid(f"repositories: a host uses at most {MAX_REPOSITORIES}")
    for name in repos:
        repository_named("repositories", name)
    spec: dict[str, Any] = {"repositories": list(dict.fromkeys(repos))}
    spec["maintenance"] = {}
    for name, data in named_objects("maintenance", raw.get("maintenance"), "repository").items():
        where = f"maintenance.{name}"
        repository_named(where, name)
        m = checked_part(where, data, maintenance.SET_FIELDS)
        try:
            spec["maintenance"][name] = maintenance.checked_settings(m)
        except Invalid as exc:
            raise Invalid(f"{where}: {exc.message}") from None
    spec["groups"] = {
        name: check_group(f"groups.{name}", data)
        for name, data in named_objects("groups", raw.get("groups"), "group").items()
    }
    spec["schedules"] = {}
    for name, data in named_objects("schedules", raw.get("schedules"), "schedule").items():
        where = f"schedules.{name}"
        s = checked_part(where, data, SCHEDULE_SPEC_FIELDS)
        if "cron" not in s:
            raise Invalid(f"{where}: a schedule needs a cron expression")
        if not s.get("groups"):
            raise Invalid(f"{where}: a schedule backs up at least one of the template's groups")
        missing = [g for g in s["groups"] if g not in spec["groups"]]
        if missing:
            raise Invalid(f"{where}: the template defines no group {missing[0]!r}")
        try:
            spec["schedules"][name] = {
                "cron": schedules.check_cron(s["cron"]),
                "groups": sorted(set(s["groups"])),
                "timezone": schedules.check_timezone(s.get("timezone") or "") or "",
                "enabled": s.get("enabled", True),
            }
        except Invalid as exc:
            raise Invalid(f"{where}: {exc.message}") from None
    if not any(spec[k] for k in SPEC_KEYS):
        raise Invalid("the spec is empty: give repositories, groups, schedules or maintenance")
    return spec


def hooks_of(spec: dict[str, Any]) -> dict[str, str]:
    """The hooks a spec sets, by "group.pre_hook", for the admin check and the audit log."""
    return {
        f"{name}.{hook}": g[hook]
        for name, g in spec.get("groups", {}).items()
        for hook in ("pre_hook", "post_hook")
        if (g.get(hook) or "").strip()
    }


# --- what a host should have ------------------------------------------------


@dataclass
class Wanted:
    """What the templates picking one host give it: name -> (template, settings)."""

    repositories: list[tuple[str, str]] = field(default_factory=list)
    groups: dict[str, tuple[str, dict]] = field(default_factory=dict)
    schedules: dict[str, tuple[str, dict]] = field(default_factory=dict)
    shadowed: list[str] = field(default_factory=list)  # what a stronger template defines too


def merge(specs: Iterable[tuple[str, dict]]) -> Wanted:
    """The templates' specs, strongest first, as one: the first to define a
    name has it."""
    want = Wanted()
    seen_repos: set[str] = set()
    for tname, spec in specs:
        for repo in spec.get("repositories", []):
            if repo not in seen_repos:
                seen_repos.add(repo)
                want.repositories.append((repo, tname))
        for part, into in (("groups", want.groups), ("schedules", want.schedules)):
            for name, settings in spec.get(part, {}).items():
                if name in into:
                    owner = into[name][0]
                    want.shadowed.append(f"{part[:-1]} {name} of {tname}: {owner} has it")
                    continue
                into[name] = (tname, settings)
    return want


def strongest_first(templates: Iterable[Template]) -> list[Template]:
    return sorted(templates, key=lambda t: (t.priority, t.name))


@functools.lru_cache(maxsize=1024)
def parsed(selector: str) -> tuple[selectors.Requirement, ...]:
    """A stored selector, parsed once (it was checked when stored)."""
    return selectors.parse(selector)


def picking(host_labels: dict[str, str], templates: Sequence[Template]) -> list[Template]:
    """The templates whose selectors pick a host with these labels, strongest first."""
    return [
        t
        for t in strongest_first(templates)
        if selectors.matches(parsed(t.selector), host_labels or {})
    ]


def group_params(settings: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """groups.edit's params for a group to be as `settings` say, but for
    the fields the host overrides."""
    p = {**GROUP_DEFAULTS, **settings}
    p["clear_copy_retention"] = True  # the template's, or none
    if "copy_retention" in overrides:
        del p["clear_copy_retention"]
    return {k: v for k, v in p.items() if k not in overrides and v is not None}


def group_state(g: SourceGroup) -> tuple:
    """What a template sets of a group, to tell whether applying changed it."""
    return (
        g.includes,
        g.excludes,
        g.retention,
        g.pre_hook,
        g.post_hook,
        g.retries,
        g.retry_delay,
        g.repository_id,
        g.copy_to_id,
        g.copy_retention,
        g.copy_cron,
        g.expect_every,
        g.hook_timeout,
        g.timeout,
        g.drill_cron,
        g.drill_sample,
        g.template,
    )


# --- applying ---------------------------------------------------------------


@dataclass
class Outcome:
    """What materialising did on one host."""

    host: str
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.removed)

    def json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "created": self.created,
            "updated": self.updated,
            "removed": self.removed,
            "notes": self.notes,
            "error": self.error,
        }


def materialise(
    ctx: Context, host: Host, templates: Optional[Sequence[Template]] = None
) -> Outcome:
    """Make the host hold what the templates picking it define. A host
    where that fails (a repository gone, too many schedules) keeps what it
    had, with the reason on the host (`template_error`), but for what no
    template picking it gives any more: that goes all the same."""
    if templates is None:
        templates = list(Template.select())
    picked = picking(host.labels, templates)
    out = Outcome(host.name)
    mark = len(ctx.events)
    with db.atomic() as savepoint:
        try:
            want = merge((t.name, t.spec) for t in picked)
            out.notes.extend(want.shadowed)
            apply_wanted(ctx, host, want, out)
        except ApiError as exc:
            savepoint.rollback()
            del ctx.events[mark:]
            out = Outcome(host.name, error=exc.message)
    if out.error is not None:
        names = {t.name for t in picked}
        with db.atomic() as savepoint:
            try:
                let_go(ctx, host, out, lambda row: row.template not in names)
            except ApiError:  # nothing of it, then: the host as it was
                savepoint.rollback()
                del ctx.events[mark:]
                out.removed.clear()
    if host.template_error != out.error or host.templates_due_at is not None:
        Host.update(template_error=out.error, templates_due_at=None).where(
            Host.id == host.id
        ).execute()
        host.template_error, host.templates_due_at = out.error, None
    return out


def apply_wanted(ctx: Context, host: Host, want: Wanted, out: Outcome) -> None:
    wanted_repos = {name for name, _ in want.repositories}
    for name, tname in want.repositories:
        repo = Repository.get_or_none(Repository.name == name)
        if repo is None:
            raise Invalid(f"template {tname} names repository {name!r}, which no longer exists")
        mine = (HostRepository.host == host) & (HostRepository.repository == repo)
        if attach(ctx, host, repo):
            HostRepository.update(template=tname).where(mine).execute()
            out.created.append(f"repository {name}")
        else:  # one attached by hand stays the host's own
            HostRepository.update(template=tname).where(
                mine & HostRepository.template.is_null(False)
            ).execute()

    groups = {g.name: g for g in SourceGroup.select().where(SourceGroup.host == host)}
    linked = scheduled_groups(host)
    for name, (tname, settings) in want.groups.items():
        g = groups.get(name)
        if g is not None and g.template is None:
            out.notes.append(f"group {name}: the host's own, not template {tname}'s")
            continue
        fresh = g is None
        if fresh:
            if len(groups) >= MAX_GROUPS:
                raise Invalid(f"host {host.name} has {MAX_GROUPS} source groups already")
            g = SourceGroup(host=host, name=name, includes=[], excludes=[], template=tname)
        before = None if fresh else group_state(g)
        g.template = tname
        p = group_params(settings, () if fresh else g.overrides)
        apply_group_fields(g, p)
        if "retention" in p:
            g.retention = p["retention"]
        for repo_name in apply_repositories(ctx, host, g, p):  # attached for it: the template's
            HostRepository.update(template=tname).where(
                (HostRepository.host == host)
                & (HostRepository.repository == Repository.get(Repository.name == repo_name))
            ).execute()
            wanted_repos.add(repo_name)
            out.created.append(f"repository {repo_name}")
        apply_drill(ctx, g, p)
        if fresh:
            g.save()
            groups[name] = g
            out.created.append(f"group {name}")
        elif group_state(g) != before:
            g.updated_at = utcnow()
            g.save()
            out.updated.append(f"group {name}")
            if g.id in linked:
                bump(ctx.events, host.id)  # agents run schedules from the groups they were sent

    # what the templates no longer give goes first, so a schedule renamed in
    # a spec does not count twice against the host's bound
    drop_schedules(ctx, host, out, lambda s: s.name not in want.schedules)
    existing = {s.name: s for s in Schedule.select().where(Schedule.host == host)}
    current = schedules.group_names(*(s.id for s in existing.values()))
    for name, (tname, settings) in want.schedules.items():
        s = existing.get(name)
        if s is not None and s.template is None:
            out.notes.append(f"schedule {name}: the host's own, not template {tname}'s")
            continue
        target = {
            "cron": settings["cron"],
            "timezone": settings["timezone"] or None,
            "enabled": settings["enabled"],
            "groups": settings["groups"],
        }
        if s is None:
            if len(existing) >= schedules.MAX_SCHEDULES:
                raise Invalid(f"host {host.name} has {schedules.MAX_SCHEDULES} schedules already")
            now = utcnow()
            s = existing[name] = Schedule(host=host, name=name, created_at=now)
            out.created.append(f"schedule {name}")
        else:
            for key in s.overrides:
                target.pop(key, None)
            now_ = {
                "cron": s.cron,
                "timezone": s.timezone,
                "enabled": s.enabled,
                "groups": sorted(current[s.id]),
            }
            if s.template == tname and all(now_[k] == v for k, v in target.items()):
                continue
            out.updated.append(f"schedule {name}")
        s.template = tname
        for key in ("cron", "timezone", "enabled"):
            if key in target:
                setattr(s, key, target[key])
        s.updated_at = utcnow()
        s.save()
        if "groups" in target:  # a group of the host's own by that name, if it has one
            schedules.link(s, [groups[g] for g in target["groups"]])
        bump(ctx.events, host.id)
    drop_groups(ctx, host, out, lambda g: g.name not in want.groups)
    release_repositories(host, out, lambda link: link.repository.name not in wanted_repos)


def scheduled_groups(host: Host) -> set[int]:
    """The ids of the host's groups some schedule of it backs up."""
    return {
        gid
        for (gid,) in ScheduleGroup.select(ScheduleGroup.group)
        .join(Schedule)
        .where(Schedule.host == host)
        .tuples()
    }


def release_repositories(host: Host, out: Outcome, gone: Callable[[HostRepository], bool]) -> None:
    """Repositories a template attached that go stay attached (their
    snapshots stay in reach), as the host's own."""
    for link in (
        HostRepository.select(HostRepository, Repository)
        .join(Repository)
        .where((HostRepository.host == host) & HostRepository.template.is_null(False))
    ):
        if gone(link):
            HostRepository.update(template=None).where(
                (HostRepository.host == host) & (HostRepository.repository == link.repository)
            ).execute()
            out.notes.append(f"repository {link.repository.name} stays attached, as the host's own")


def drop_schedules(
    ctx: Context, host: Host, out: Outcome, gone: Callable[[Schedule], bool]
) -> None:
    for s in Schedule.select().where((Schedule.host == host) & Schedule.template.is_null(False)):
        if gone(s):
            drop(ctx, host, s, "schedule", out)


def drop_groups(
    ctx: Context, host: Host, out: Outcome, gone: Callable[[SourceGroup], bool]
) -> None:
    """Template groups that go, but those a schedule that stays backs up
    (they stay, as the host's own, so no schedule loses a group unseen)."""
    linked = scheduled_groups(host)
    for g in SourceGroup.select().where(
        (SourceGroup.host == host) & SourceGroup.template.is_null(False)
    ):
        if gone(g):
            kept = "a schedule that stays backs it up" if g.id in linked else None
            drop(ctx, host, g, "group", out, kept=kept)


def let_go(ctx: Context, host: Host, out: Outcome, gone: Callable[[pw.Model], bool]) -> None:
    """Drop what of these templates' the host holds (but what was changed
    here, or is needed by what stays)."""
    drop_schedules(ctx, host, out, gone)
    drop_groups(ctx, host, out, gone)
    release_repositories(host, out, gone)


def drop(
    ctx: Context, host: Host, row: pw.Model, kind: str, out: Outcome, kept: Optional[str] = None
) -> None:
    """A row whose template no longer picks the host: gone, unless an
    operator changed it here or something that stays needs it (then it
    stays, as the host's own)."""
    if row.overrides and kept is None:
        kept = "it was changed here"
    if kept is not None:
        type(row).update(template=None, overrides=[]).where(type(row).id == row.id).execute()
        out.notes.append(f"{kind} {row.name} stays, as the host's own: {kept}")
        return
    if kind == "schedule":
        bump(ctx.events, host.id)
    row.delete_instance()
    out.removed.append(f"{kind} {row.name}")


def apply_maintenance(ctx: Context, t: Template) -> list[str]:
    """The template's maintenance settings onto its repositories, but for
    what an operator set there by hand since; names what changed."""
    changed = []
    for name, settings in t.spec.get("maintenance", {}).items():
        repo = Repository.get_or_none(Repository.name == name)
        if repo is None:
            continue
        m = Maintenance.get(Maintenance.repository == repo.id)
        if m.template not in (None, t.name):
            raise Conflict(
                f"template {m.template} sets the maintenance of repository {name} already"
            )
        updates = maintenance.changes(
            {k: v for k, v in settings.items() if k not in (m.overrides or [])}
        )
        diff = {k: v for k, v in updates.items() if not k.startswith("next_")}
        if m.template == t.name and all(getattr(m, k) == v for k, v in diff.items()):
            continue
        Maintenance.update(updated_at=utcnow(), template=t.name, **updates).where(
            Maintenance.repository == repo.id
        ).execute()
        ctx.events.append(MaintenanceChanged(repo.id))
        changed.append(name)
    return changed


def release_maintenance(t_name: str, keep: Iterable[str] = ()) -> None:
    """Repositories whose maintenance the template no longer sets keep
    their settings, as set by hand."""
    Maintenance.update(template=None, overrides=[]).where(
        (Maintenance.template == t_name)
        & Maintenance.repository.not_in(
            Repository.select(Repository.id).where(Repository.name.in_(list(keep) or [""]))
        )
    ).execute()


def hosts_touched(names: Sequence[str], selector_texts: Sequence[str]) -> list[Host]:
    """Hosts holding something of these templates, or picked by these selectors."""
    wanted = [parsed(s) for s in selector_texts]
    owning: set[int] = set()
    for model in (SourceGroup, Schedule, HostRepository):
        owning.update(
            hid
            for (hid,) in model.select(model.host).where(model.template.in_(list(names))).tuples()
        )
    return [
        h
        for h in Host.select().order_by(Host.name)
        if h.id in owning or any(selectors.matches(w, h.labels or {}) for w in wanted)
    ]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    failed = [o for o in outcomes if o.error]
    return {
        "hosts": [o.json() for o in outcomes],
        "picked": len(outcomes),
        "changed": sum(1 for o in outcomes if o.changed),
        "failed": len(failed),
    }


# --- methods ----------------------------------------------------------------


def get_template(name: str) -> Template:
    t = Template.get_or_none(Template.name == name)
    if t is None:
        raise NotFound(f"no template named {name!r}")
    return t


def check_selector(text: str) -> str:
    if not requirements(text):
        raise Invalid("a template needs a selector that picks hosts, e.g. role=web")
    return text.strip()


def template_json(t: Template, hosts: Optional[Sequence[dict]] = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": t.name,
        "selector": t.selector,
        "priority": t.priority,
        "spec": t.spec,
        "created_at": iso(t.created_at),
        "updated_at": iso(t.updated_at),
    }
    if hosts is not None:
        out["hosts"] = list(hosts)
    return out


def dry_run(ctx: Context, work: Callable[[], T]) -> T:
    """Run `work` and undo every change it made: what it would do."""
    mark = len(ctx.events)
    with db.atomic() as savepoint:
        result = work()
        savepoint.rollback()
    del ctx.events[mark:]
    return result


def mark_due(host_ids: Sequence[int]) -> None:
    """These hosts are to have the templates applied."""
    now = utcnow()
    for i in range(0, len(host_ids), 500):  # SQLite's bound on variables
        Host.update(templates_due_at=now).where(Host.id.in_(host_ids[i : i + 500])).execute()


def apply_marked(ctx: Context, host_ids: Sequence[int]) -> list[Outcome]:
    """Apply the templates to those of these hosts still marked (by name)."""
    templates = list(Template.select())
    hosts = (
        Host.select()
        .where(Host.id.in_(list(host_ids)) & Host.templates_due_at.is_null(False))
        .order_by(Host.name)
    )
    return [materialise(ctx, h, templates) for h in hosts]


# a change to templates, on the store thread: given None, it makes the
# change and names the hosts (ids, by name) to apply the templates to; given
# those ids (a dry run's later steps), it makes the change for them alone
Change = Callable[[Optional[list[int]]], "tuple[dict[str, Any], list[int]]"]


async def run_change(ctx: Context, change: Change, dry: bool) -> dict[str, Any]:
    """Make `change` in one transaction, then apply the templates to its
    hosts CHUNK at a time, each chunk its own transaction, so that the
    agents' reports and other requests go in between (5,000 hosts take
    seconds). Each chunk's events go out as it commits. The hosts still to
    do are marked, and the marks kept fresh while this goes on: a mark left
    by a fleetd that stopped midway is the ticker's (`run_due`). With
    `dry`, each step runs inside a transaction that is rolled back, the
    change made again for its chunk."""
    store = ctx.state.store
    if dry:
        info, ids = await store.atomic(dry_run, ctx, lambda: change(None))
    else:
        info, ids = await store.atomic(change, None)
    outcomes: list[Outcome] = []
    fresh = time.monotonic()
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
        if dry:
            outcomes += await store.atomic(dry_run, ctx, dry_chunk(ctx, change, chunk))
            continue
        if time.monotonic() - fresh > GRACE.total_seconds() / 3:
            await store.atomic(mark_due, ids[i:])  # still this request's
            fresh = time.monotonic()
        outcomes += await store.atomic(apply_marked, ctx, chunk)
        if ctx.events and ctx.state.bus is not None:
            ctx.state.bus.publish(list(ctx.events))
            ctx.events.clear()
    return {**info, **summary(outcomes), "dry_run": dry}


def dry_chunk(ctx: Context, change: Change, chunk: list[int]) -> Callable[[], list[Outcome]]:
    """What applying would do on `chunk`, the change made first (to be rolled back)."""

    def work() -> list[Outcome]:
        change(chunk)
        return apply_marked(ctx, chunk)

    return work


def system_context(events: list[Any]) -> Context:
    """A context for the ticker's applying: what it changes goes in `events`."""
    caller = Caller(user_id=0, name="system", role=Role.ADMIN, token_id=None, address="")
    return Context(caller=caller, state=None, events=events)  # type: ignore[arg-type]


def next_due() -> Optional[dt.datetime]:
    """When a mark left by a request that did not finish is the ticker's."""
    first = Host.select(pw.fn.MIN(Host.templates_due_at)).scalar()
    return None if first is None else first + GRACE


def run_due(events: list[Any], now: dt.datetime) -> None:
    """Apply the templates to CHUNK hosts whose marks were left behind."""
    ctx = system_context(events)
    templates = list(Template.select())
    left = (
        Host.select()
        .where(Host.templates_due_at <= now - GRACE)
        .order_by(Host.templates_due_at, Host.id)
        .limit(CHUNK)
    )
    for host in left:
        out = materialise(ctx, host, templates)
        if out.error:
            log.warning("templates not applied on %s: %s", host.name, out.error)


@method(
    "templates.set",
    Role.OPERATOR,
    (
        NAME,
        Field("selector", "str", limit=1024),
        Field("spec", "dict"),
        Field("priority", "int", False, minimum=0),
        Field("dry_run", "bool", False),
    ),
)
async def templates_set(ctx: Context, p: dict) -> dict:
    """Create or replace a template (a selector and a spec of repositories,
    groups, schedules and maintenance) and apply it to every host it
    picks, and to those it picked before; with `dry_run`, say what that
    would do and change nothing. The priority stays as it was unless given
    (100 for a new template)."""
    name = check_name("template", p["name"])
    selector = check_selector(p["selector"])
    if "priority" in p:
        at_most("priority", p["priority"], MAX_PRIORITY)

    def change(only: Optional[list[int]]) -> tuple[dict[str, Any], list[int]]:
        spec = check_spec(p["spec"])  # on the store thread: it reads repositories
        hooks = hooks_of(spec)
        if hooks and not ctx.caller.role.allows(Role.ADMIN):
            raise Forbidden(
                "hooks run as shell commands on every host: a template with one needs the admin role"
            )
        t = Template.get_or_none(Template.name == name)
        before = None if t is None else (t.selector, t.priority, hosts_part(t.spec))
        if t is None:
            if Template.select().count() >= MAX_TEMPLATES:
                raise Invalid(f"fleetd holds {MAX_TEMPLATES} templates, the most it may")
            t = Template(name=name, created_at=utcnow(), priority=DEFAULT_PRIORITY)
        t.selector, t.spec, t.updated_at = selector, spec, utcnow()
        t.priority = p.get("priority", t.priority)
        t.save()
        release_maintenance(name, keep=spec["maintenance"])
        maint = apply_maintenance(ctx, t)
        if only is not None:
            ids = only
        elif before == (t.selector, t.priority, hosts_part(spec)):
            ids = []  # its maintenance alone changed: no host's settings did
        else:
            old = [before[0]] if before is not None else []
            ids = [h.id for h in hosts_touched([name], [selector, *old])]
        mark_due(ids)
        if not p.get("dry_run") and only is None:
            audit(ctx, "template.set", name, {"selector": selector, "hosts": len(ids), **hooks})
        info = {**template_json(t), "maintenance": maint, "new": before is None}
        return info, ids

    return await run_change(ctx, change, bool(p.get("dry_run")))


def hosts_part(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a spec is applied host by host (maintenance is the repositories')."""
    return {k: v for k, v in spec.items() if k != "maintenance"}


@method("templates.list", Role.VIEWER, (), readonly=True)
def templates_list(ctx: Context, p: dict) -> list:
    """Every template by name, with how many hosts its selector picks."""
    # hosts share few distinct label sets: match each set once
    sets = Counter(json.dumps(h.labels or {}, sort_keys=True) for h in Host.select(Host.labels))
    label_sets = [(json.loads(k), n) for k, n in sets.items()]
    out = []
    for t in Template.select().order_by(Template.name):
        wanted = parsed(t.selector)
        picked = sum(n for labels, n in label_sets if selectors.matches(wanted, labels))
        out.append({**template_json(t), "picked": picked})
    return out


@method("templates.show", Role.VIEWER, (NAME,), readonly=True)
def templates_show(ctx: Context, p: dict) -> dict:
    """One template, and each host it picks: what it holds of the template,
    and why the templates could not be applied there, if they could not."""
    t = get_template(p["name"])
    wanted = parsed(t.selector)
    held: dict[int, list[str]] = {}
    rows = [
        (
            "repository",
            HostRepository.select(HostRepository.host, Repository.name)
            .join(Repository)
            .where(HostRepository.template == t.name),
        ),
        *(
            (kind, model.select(model.host, model.name).where(model.template == t.name))
            for model, kind in ((SourceGroup, "group"), (Schedule, "schedule"))
        ),
    ]
    for kind, query in rows:
        for hid, item in query.tuples():
            held.setdefault(hid, []).append(f"{kind} {item}")
    hosts = [
        {"host": h.name, "holds": sorted(held.get(h.id, [])), "template_error": h.template_error}
        for h in Host.select().order_by(Host.name)
        if selectors.matches(wanted, h.labels or {}) or h.id in held
    ]
    return template_json(t, hosts)


@method(
    "templates.delete",
    Role.OPERATOR,
    (NAME, Field("keep", "bool", False), Field("dry_run", "bool", False)),
)
async def templates_delete(ctx: Context, p: dict) -> dict:
    """Delete a template: what it made on hosts goes (but what was changed
    there), or with `keep` stays on each host as its own."""

    def change(only: Optional[list[int]]) -> tuple[dict[str, Any], list[int]]:
        t = get_template(p["name"])
        ids = only if only is not None else [h.id for h in hosts_touched([t.name], [t.selector])]
        if p.get("keep"):
            for model in (SourceGroup, Schedule):
                model.update(template=None, overrides=[]).where(model.template == t.name).execute()
            HostRepository.update(template=None).where(HostRepository.template == t.name).execute()
        release_maintenance(t.name)
        t.delete_instance()
        mark_due(ids)
        if not p.get("dry_run") and only is None:
            audit(ctx, "template.delete", t.name, {"keep": bool(p.get("keep")), "hosts": len(ids)})
        return {"removed": t.name}, ids

    return await run_change(ctx, change, bool(p.get("dry_run")))


@method(
    "templates.apply",
    Role.OPERATOR,
    (Field("name", "str", False, limit=64), Field("dry_run", "bool", False)),
)
async def templates_apply(ctx: Context, p: dict) -> dict:
    """Apply the templates again: to the hosts one template picks, or to
    every host (after fixing what kept them from applying)."""

    def change(only: Optional[list[int]]) -> tuple[dict[str, Any], list[int]]:
        chosen = [get_template(p["name"])] if p.get("name") else list(Template.select())
        maint = [name for t in chosen for name in apply_maintenance(ctx, t)]
        names, picks = [t.name for t in chosen], [t.selector for t in chosen]
        ids = only if only is not None else [h.id for h in hosts_touched(names, picks)]
        mark_due(ids)
        if not p.get("dry_run") and only is None:
            audit(ctx, "template.apply", p.get("name"), {"hosts": len(ids)})
        return {"maintenance": maint}, ids

    return await run_change(ctx, change, bool(p.get("dry_run")))


def origins(host: Host) -> list[dict[str, Any]]:
    """Where each of the host's settings came from: a template or by hand,
    and what of a template's the host overrides."""
    out: list[dict[str, Any]] = []
    for link in (
        HostRepository.select(HostRepository, Repository)
        .join(Repository)
        .where(HostRepository.host == host)
        .order_by(HostRepository.position)
    ):
        out.append(
            {
                "kind": "repository",
                "name": link.repository.name,
                "template": link.template,
                "overrides": [],
            }
        )
    for model, kind in ((SourceGroup, "group"), (Schedule, "schedule")):
        for row in model.select().where(model.host == host).order_by(model.name):
            out.append(
                {
                    "kind": kind,
                    "name": row.name,
                    "template": row.template,
                    "overrides": row.overrides,
                }
            )
    return out


def picked_by(host: Host) -> list[str]:
    """The templates whose selectors pick the host, strongest first."""
    light = Template.select(Template.name, Template.selector, Template.priority)
    return [t.name for t in picking(host.labels, list(light))]


def hooked_templates_gained(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Templates with hooks that pick a host with labels `after` but did not
    with `before`: labelling it so puts their shell commands on it."""
    templates = list(Template.select())
    had = {t.name for t in picking(before, templates)}
    return [t.name for t in picking(after, templates) if t.name not in had and hooks_of(t.spec)]


def check_label_powers(
    ctx: Context, host: str, before: dict[str, str], after: dict[str, str]
) -> None:
    """Hooks are the admin's: an operator may not give a host a template's
    hooks by labelling it."""
    if ctx.caller.role.allows(Role.ADMIN):
        return
    gained = hooked_templates_gained(before, after)
    if gained:
        raise Forbidden(
            f"these labels make template(s) {', '.join(gained)} apply to {host}, whose hooks run "
            "as shell commands there: that needs the admin role"
        )


def edited(
    row: pw.Model, settings: Iterable[str], inherited: Sequence[str], valid: Sequence[str]
) -> list[str]:
    """An operator changed these settings of a row on its host, and hands
    `inherited` back to its template: what is changed on a template's row
    is the host's from now on (an override). Returns the settings given
    back; the caller applies the templates again when there are any."""
    settings = set(settings)
    given_back: list[str] = []
    if inherited:
        both = sorted(settings & set(inherited))
        if both:
            raise Invalid(f"{both[0]}: give it a value or inherit it, not both")
        given_back = inherit(row, inherited, valid)
    if row.template is not None:
        row.overrides = sorted(set(row.overrides or []) | (settings & set(valid)))
    return given_back


def inherit(row: pw.Model, fields: Sequence[str], valid: Sequence[str]) -> list[str]:
    """Hand fields (or "all") back to the row's template; the ones given back."""
    if row.template is None:
        raise Invalid(f"{row.name} comes from no template: there is nothing to inherit")
    wanted = set(valid) if "all" in fields else set(fields)
    bad = sorted(wanted - set(valid))
    if bad:
        raise Invalid(
            f"--inherit {bad[0]}: not a setting a template gives (one of {', '.join(valid)}, all)"
        )
    given = sorted(set(row.overrides or []) & wanted)
    row.overrides = sorted(set(row.overrides or []) - wanted)
    return given


def refuse_rename(row: pw.Model, kind: str) -> None:
    """A template's group or schedule is known by its name on every host."""
    if row.template is not None:
        raise Conflict(
            f"{kind} {row.name} comes from template {row.template}: its name is the template's"
        )


def reapply(ctx: Context, host: Host) -> None:
    """Apply the host's templates again after a hand edit; a host that
    cannot take them makes the edit fail (rolled back with it)."""
    applied = materialise(ctx, host)
    if applied.error:
        raise Conflict(f"the templates of {host.name} cannot be applied: {applied.error}")


def refuse_removal(row: pw.Model, kind: str) -> None:
    """A template's group or schedule goes with the template (or the label
    that picks the host), not by hand: it would be back at the next apply."""
    if row.template is not None:
        raise Conflict(
            f"{kind} {row.name} comes from template {row.template}: change the host's labels "
            f"or the template (fleetctl templates), or 'templates delete --keep' to make it the host's own"
        )
