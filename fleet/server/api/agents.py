"""Agents: which version each host runs, the file fleetd serves, and
upgrades rolled out host by host (see agents/rollout.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from ...common.protocol import MAX_UPGRADE_DEADLINE, Field
from ..agents import rollout
from ..events import RolloutChanged
from ..security.auth import Role
from ..store.models import Host
from .common import audit
from .context import Context, next_or_gone
from .errors import Conflict, NotFound
from .hosts import selected_hosts
from .registry import Method, collect
from .views import host_status

METHODS: list[Method] = []
method = collect(METHODS)

DEFAULT_TIMEOUT = 300  # seconds a host has to come back with the new version
MIN_TIMEOUT = 3
MAX_TIMEOUT = 3 * MAX_UPGRADE_DEADLINE  # the agent gets a third of it
MAX_BATCH = 1000


def served(ctx: Context) -> Optional[dict[str, Any]]:
    agent = ctx.state.agent_file
    return agent.describe() if agent is not None else None


def enrolled_hosts(selector: Optional[str]) -> list[Host]:
    """Hosts with an agent (enrolled), by name, those the selector picks."""
    hosts = selected_hosts(selector) if selector else Host.select().order_by(Host.name)
    return [h for h in hosts if h.agent_token_hash is not None]


@method("agents.served", Role.VIEWER)
async def agents_served(ctx: Context, p: dict) -> Optional[dict]:
    """The agent file fleetd serves at GET /agent.pyz (version, sha256,
    size), or null when it serves none."""
    return served(ctx)


@method("agents.list", Role.VIEWER, (Field("selector", "str", False, limit=1024),), readonly=True)
def agents_list(ctx: Context, p: dict) -> dict:
    """Each enrolled host's agent version against the one fleetd serves
    (current, behind, ahead, unknown)."""
    offered = served(ctx)
    version = offered["version"] if offered else None
    rows = [
        {
            "host": h.name,
            "status": host_status(h),
            "agent_version": h.agent_version,
            "state": rollout.compare(h.agent_version, version),
        }
        for h in enrolled_hosts(p.get("selector"))
    ]
    return {"served": offered, "agents": rows}


@method(
    "agents.upgrade",
    Role.ADMIN,
    (
        Field("selector", "str", False, limit=1024),
        Field("batch", "int", False, minimum=1, maximum=MAX_BATCH),
        Field("timeout", "int", False, minimum=MIN_TIMEOUT, maximum=MAX_TIMEOUT),
        Field("dry_run", "bool", False),
    ),
)
async def agents_upgrade(ctx: Context, p: dict) -> dict:
    """Roll the agent fleetd serves out to the hosts (those the selector
    picks), `batch` at a time: the next batch goes once each host of this
    one said hello with the new version within `timeout` seconds; the first
    failure halts it. The rollout goes on in fleetd (agents.rollout
    follows it). With dry_run, the plan, nothing done."""
    offered = served(ctx)
    if offered is None:
        raise NotFound(
            "fleetd serves no agent file: start it with --agent-pyz FILE (see fleetd(8))"
        )
    batch = p.get("batch") or 1
    timeout = p.get("timeout") or DEFAULT_TIMEOUT
    selector = p.get("selector")
    store = ctx.state.store
    if p.get("dry_run"):
        return await store.read(dry_run, ctx, selector, batch, timeout, offered)
    view = await store.atomic(start, ctx, selector, batch, timeout, offered)
    if view["status"] == "running":
        ctx.state.rollouts.begin(view["id"])
    return view


def planned(selector: Optional[str], batch: int, served_version: str) -> list[rollout.Planned]:
    hosts = [(h.id, h.name, h.agent_version) for h in enrolled_hosts(selector)]
    return rollout.plan(hosts, served_version, batch)


def dry_run(ctx: Context, selector: Optional[str], batch: int, timeout: int, offered: dict) -> dict:
    """The rollout as it would go now: who is skipped (offline, too old) and
    who goes in which batch."""
    agents = ctx.state.agents
    hosts = []
    for i, step in enumerate(planned(selector, batch, offered["version"]), 1):
        status, detail = step.status, None
        if status == "pending" and agents is not None:
            features = agents.reach_now(step.host_id)
            if features is None:
                status, detail = "skipped", "offline"
            elif rollout.FEATURE not in features:
                status, detail = "skipped", "its agent is too old to upgrade itself"
        hosts.append(
            {
                "host": step.name,
                "position": i,
                "batch": step.batch,
                "from_version": step.version,
                "status": status,
                "detail": detail,
            }
        )
    return {
        "dry_run": True,
        "version": offered["version"],
        "sha256": offered["sha256"],
        "selector": selector,
        "batch": batch,
        "timeout_seconds": timeout,
        "hosts": hosts,
    }


def start(ctx: Context, selector: Optional[str], batch: int, timeout: int, offered: dict) -> dict:
    """The rollout's rows, in one transaction with the check that no other
    is under way."""
    other = rollout.running()
    if other is not None:
        raise Conflict(
            f"rollout {other} is under way; follow it with 'fleetctl agents upgrade --status'"
        )
    steps = planned(selector, batch, offered["version"])
    r = rollout.create(ctx.caller.name, selector, batch, timeout, offered, steps)
    audit(
        ctx,
        "agents.upgrade",
        selector or "all",
        {
            "rollout": r.id,
            "version": offered["version"],
            "hosts": len(steps),
            "batch": batch,
            "timeout": timeout,
        },
    )
    return rollout.load(r.id)  # type: ignore[return-value]


@method("agents.halt", Role.ADMIN, (Field("id", "int", False, minimum=1),))
async def agents_halt(ctx: Context, p: dict) -> dict:
    """Halt the rollout under way (or rollout `id`): no host is sent the
    upgrade after this; those sent it already go on with theirs."""
    store = ctx.state.store
    rollout_id = p.get("id") or await store.read(rollout.running)
    view = await store.read(rollout.load, rollout_id) if rollout_id else None
    if view is None or view["status"] != "running":
        raise NotFound(
            f"rollout {rollout_id} has ended" if view else "no agent rollout is under way"
        )
    reason = f"halted by {ctx.caller.name}"
    if await ctx.state.rollouts.halt(view["id"], reason):
        await store.atomic(audit, ctx, "agents.halt", f"rollout {view['id']}", None)
    return await store.read(rollout.load, view["id"])


@method(
    "agents.rollout",
    Role.VIEWER,
    (Field("id", "int", False, minimum=1), Field("follow", "bool", False)),
)
async def agents_rollout(ctx: Context, p: dict) -> dict:
    """A rollout (default: the latest). With follow, stream each host's
    line as it moves on ({"type": "host", "host": {...}, "version": ...}),
    ending with the rollout once it has ended."""
    store, bus = ctx.state.store, ctx.state.bus
    changes: asyncio.Queue = asyncio.Queue()
    wanted: dict[str, Optional[int]] = {"id": p.get("id")}

    def offer(event: RolloutChanged) -> None:
        if wanted["id"] is None or event.rollout_id == wanted["id"]:
            changes.put_nowait(event)

    follow = bool(p.get("follow")) and bus is not None
    if follow:  # before reading, so nothing falls between
        bus.subscribe(RolloutChanged, offer)
    try:
        view = await store.read(rollout.load, p.get("id"))
        if view is None:
            raise NotFound(f"no rollout {p['id']}" if p.get("id") else "no agent rollout yet")
        if not follow or view["status"] != "running":
            return view
        wanted["id"] = view["id"]
        for line in view["hosts"]:
            await ctx.emit({"type": "host", "host": line, "version": view["version"]})
        while True:
            event = await next_or_gone(changes, ctx)
            if event.rollout_id != view["id"]:
                continue
            if event.ended:
                break
            if event.host is not None:
                await ctx.emit({"type": "host", "host": event.host, "version": view["version"]})
        return await store.read(rollout.load, view["id"])
    finally:
        if follow:
            bus.unsubscribe(RolloutChanged, offer)
