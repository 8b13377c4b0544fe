"""Maintenance of a repository: when forget, prune and check run (fleetd's
ticker makes their jobs, see scheduling/maintenance.py), what they last did,
and running one now."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from ...common import cron
from ...common.protocol import FINAL_STATUSES, Field
from ...common.restic.commands import read_data_subset
from ...common.timefmt import iso
from ..events import MaintenanceChanged
from ..scheduling import maintenance as policy
from ..security.auth import Role
from ..store.models import Host, Job, Maintenance, Repository, utcnow
from .common import audit
from .context import Context
from .errors import Conflict, Invalid
from .registry import Method, collect
from .repos import get_repository

METHODS: list[Method] = []
method = collect(METHODS)

NAME = Field("name", "str", limit=64)
OFF = ("", "off", "never", "none")


def check_cron(action: str, expr: str) -> Optional[str]:
    """A maintenance time: a cron expression (UTC), or off."""
    if expr.strip().lower() in OFF:
        return None
    try:
        return cron.normalize(expr)
    except cron.CronError as exc:
        raise Invalid(f"--{action}: {exc}") from None


def check_subset(value: str) -> str:
    value = value.strip()
    if not value:
        return ""
    try:  # the forms the agent accepts: n/t, a percentage, a size
        return read_data_subset(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def last_jobs(repo: Repository) -> dict[str, Optional[dict[str, Any]]]:
    """The last ended forget, prune and check of the repository, by any
    host (a failed check stays shown until one succeeds)."""
    out: dict[str, Optional[dict[str, Any]]] = {}
    for action in policy.ACTIONS:
        job = (
            Job.select(Job, Host)
            .join(Host)
            .where(
                (Job.repository == repo.id) & (Job.kind == action) & Job.status.in_(FINAL_STATUSES)
            )
            .order_by(Job.finished_at.desc(), Job.id.desc())
            .first()
        )
        out[action] = (
            None
            if job is None
            else {
                "job": job.id,
                "host": job.host.name,
                "status": job.status,
                "finished_at": iso(job.finished_at),
                "error": job.error,
            }
        )
    return out


def maintenance_json(repo: Repository, m: Maintenance, now: dt.datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "repository": repo.name,
        "check_subset": m.check_subset,
        # the template that set it (None: by hand), and what was set by hand since
        "template": m.template,
        "overrides": m.overrides or [],
    }
    for action in policy.ACTIONS:
        expr = getattr(m, f"{action}_cron")
        due = getattr(m, f"next_{action}_at")
        if expr and due is None:
            due = cron.next_fire(expr, policy.UTC, now)
        out[action] = {"cron": expr, "next_at": iso(due) if expr else None}
    out["last"] = last_jobs(repo)
    check = out["last"]["check"]
    out["check_failed"] = bool(check and check["status"] in ("failed", "lost"))
    return out


def get_maintenance(repo: Repository) -> Maintenance:
    # every repository has one: made with it (or by migration 9)
    return Maintenance.get(Maintenance.repository == repo.id)


@method("maintenance.show", Role.VIEWER, (NAME,), readonly=True)
def maintenance_show(ctx: Context, p: dict) -> dict:
    """A repository's maintenance: when each action runs next (UTC), and
    how the last of each ended."""
    repo = get_repository(p["name"])
    return maintenance_json(repo, get_maintenance(repo), utcnow())


SET_FIELDS = (
    Field("forget", "str", False, limit=100),
    Field("prune", "str", False, limit=100),
    Field("check", "str", False, limit=100),
    Field("check_subset", "str", False, limit=32),
)


def changes(p: dict) -> dict[str, Any]:
    """The maintenance row's columns for these settings (crons UTC, 'off'
    never); a new cron is due from now on."""
    out: dict[str, Any] = {}
    for action in policy.ACTIONS:
        if action in p:
            out[f"{action}_cron"] = check_cron(action, p[action])
            out[f"next_{action}_at"] = None
    if "check_subset" in p:
        out["check_subset"] = check_subset(p["check_subset"])
    return out


def checked_settings(p: dict) -> dict[str, str]:
    """Settings as a template keeps them: crons normalised, 'off' for never."""
    columns = changes(p)
    out = {a: columns[f"{a}_cron"] or "off" for a in policy.ACTIONS if a in p}
    if "check_subset" in p:
        out["check_subset"] = columns["check_subset"]
    return out


@method(
    "maintenance.set",
    Role.OPERATOR,
    (NAME, *SET_FIELDS, Field("inherit", "list[str]", False, limit=len(SET_FIELDS) + 1)),
)
def maintenance_set(ctx: Context, p: dict) -> dict:
    """Change when a repository's forget, prune and check run (cron, UTC;
    'off' never) and how much of its data a check reads. What a template
    set, set here, is this repository's own from then on; `inherit` hands
    settings (or "all") back to the template."""
    from . import templates  # it builds on this module

    repo = get_repository(p["name"])
    updates = changes(p)
    if not updates and not p.get("inherit"):
        raise Invalid("nothing to change: give --forget, --prune, --check or --check-subset")
    now = utcnow()
    m = get_maintenance(repo)
    m.name = repo.name  # for templates' messages
    settings = set(p) - {"name", "inherit"}
    given_back = templates.edited(
        m, settings, p.get("inherit") or [], templates.MAINTENANCE_SETTINGS
    )
    if m.template is not None:
        updates["overrides"] = m.overrides
    if updates:
        Maintenance.update(updated_at=now, **updates).where(
            Maintenance.repository == repo.id
        ).execute()
        ctx.events.append(MaintenanceChanged(repo.id))
    if given_back:  # the template's values come back
        templates.apply_maintenance(ctx, templates.get_template(m.template))
    detail = {k: v for k, v in p.items() if k not in ("name", "inherit")}
    audit(ctx, "maintenance.set", repo.name, {**detail, "inherited": given_back})
    return maintenance_json(repo, Maintenance.get(Maintenance.repository == repo.id), now)


@method(
    "maintenance.run",
    Role.OPERATOR,
    (NAME, Field("action", "str", choices=(*policy.ACTIONS, "unlock"))),
)
def maintenance_run(ctx: Context, p: dict) -> dict:
    """Run one maintenance action of a repository now, on an online host
    that uses it; the jobs made (they wait their turn in its queue)."""
    repo = get_repository(p["name"])
    host = policy.runner(repo.id)
    if host is None:
        raise Conflict(f"no host using repository {repo.name} is online to run it")
    action = p["action"]
    made = policy.make_jobs(
        ctx.events, repo, action, get_maintenance(repo).check_subset, host, ctx.caller.user_id
    )
    audit(ctx, "maintenance.run", repo.name, {"action": action, "host": host.name, "jobs": made})
    return {"repository": repo.name, "action": action, "host": host.name, "jobs": made}
