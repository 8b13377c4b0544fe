"""What the agent does with each frame fleetd sends: ONE table, frame type
-> handler. A type without a handler (one a newer fleetd added) is logged at
debug level and otherwise ignored.

Handlers get the agent and the decoded frame (its data validated against
the protocol's spec; command.run's parameters are then checked again by its
job kind's schema).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..common import protocol, tlspins
from ..common.protocol import Envelope
from ..common.timefmt import now_iso
from . import upgrade
from .kinds import Refused
from .scheduler import started_fields
from .state import RepoConfig, StateError

if TYPE_CHECKING:  # pragma: no cover
    from .link import Agent

log = logging.getLogger("fleet-agent")

Handler = Callable[["Agent", Envelope], Awaitable[None]]


async def on_ack(agent: Agent, frame: Envelope) -> None:
    agent.acknowledge(frame.data["seq"])


async def on_config_update(agent: Agent, frame: Envelope) -> None:
    data = frame.data
    repos = [
        RepoConfig(r["url"], r["password"], dict(r.get("env") or {}), r["id"], r["name"])
        for r in data.get("repositories") or ()
    ] or [RepoConfig(data["repo_url"], data["repo_password"], dict(data.get("repo_env") or {}))]
    try:
        before = {r.id: r for r in agent.state.load_repos()}
    except (StateError, KeyError, TypeError):  # unreadable: replaced below
        before = {}
    for repo in repos:
        if before.get(repo.id) != repo:
            agent.runner.sizes_of(repo).stale = True  # another one: its sizes are measured anew
    agent.state.save_repos(repos)
    log.info("repository configuration updated (%d repositories)", len(repos))


async def on_command_run(agent: Agent, frame: Envelope) -> None:
    job_id = frame.data["job_id"]
    result: dict[str, Any] = {"job_id": job_id, "accepted": True}
    if agent.scheduler.owns(frame.data.get("uid")):
        # a fire's backup the agent took on itself while fleetd was away:
        # its reports (under the agent's id) name the same job
        log.info("job %s is a scheduled backup this agent already runs or ran", job_id)
        await agent.emit_now("command.result", result)
        return
    try:
        agent.runner.submit(dict(frame.data))
    except Refused as exc:
        log.warning("refused job %s (%s): %s", job_id, exc.code, exc.message)
        result.update(accepted=False, code=exc.code, error=exc.message)
    await agent.emit_now("command.result", result)


async def on_command_cancel(agent: Agent, frame: Envelope) -> None:
    """Stop a job; a fire's backup the agent made itself comes by its uid
    (running: stopped; still queued: it ends cancelled without running)."""
    uid = frame.data.get("uid")
    runner = agent.runner
    if uid is not None and runner.current_uid == uid:
        runner.cancel(runner.current)  # type: ignore[arg-type]
        return
    if runner.cancel(frame.data["job_id"]) or uid is None:
        return
    job = agent.scheduler.cancel_local(uid)
    if job is not None:
        log.info("scheduled job %s cancelled before it started", job["job_id"])
        await agent.runner.end_local(
            job["job_id"], started_fields(job), "cancelled", "cancelled before it started"
        )


async def on_schedule_set(agent: Agent, frame: Envelope) -> None:
    version = agent.scheduler.apply(frame.data)
    await agent.emit_now("schedule.ack", {"version": version, "applied_at": now_iso()})


async def on_tls_pins(agent: Agent, frame: Envelope) -> None:
    """Hold these key pins from now on (fleetd's served key and the one it
    staged), replacing the set atomically; answer with what is held. A set
    without the key of the fleetd this link is verified against, or for an
    agent that pins nothing, is refused: it would lock the agent out."""
    error = None
    held: Optional[list[str]] = None
    try:
        pins = tlspins.check_pins(frame.data["pins"])
        if agent.tls_pin is None:
            raise tlspins.PinError("this agent trusts the system's CAs, not pins")
        if agent.tls_pin not in pins:
            raise tlspins.PinError(
                f"the set lacks the key this fleetd presents (sha256 {tlspins.short(agent.tls_pin)})"
            )
        held = agent.state.load_pins()
        if held != pins:
            agent.state.save_pins(pins, now_iso())
            log.info("fleetd's key pins are now %s", tlspins.describe(pins))
            held = pins
    except (tlspins.PinError, StateError) as exc:
        error = str(exc)
        log.warning("kept the key pins held: fleetd sent a set I refuse: %s", error)
    if held is None:  # refused before they were read: say what is held
        try:
            held = agent.state.load_pins()
        except StateError:
            held = None
    answer: dict[str, Any] = {"pins": held or [], "applied_at": now_iso()}
    if error:
        answer["error"] = error
    await agent.emit_now("tls.ack", answer)


async def on_query_run(agent: Agent, frame: Envelope) -> None:
    await agent.queries.submit(dict(frame.data))


async def on_query_cancel(agent: Agent, frame: Envelope) -> None:
    agent.queries.cancel(frame.data["query_id"])


async def on_query_more(agent: Agent, frame: Envelope) -> None:
    agent.queries.grant(frame.data["query_id"], frame.data["pages"])


async def on_agent_upgrade(agent: Agent, frame: Envelope) -> None:
    """Fetch and check the agent fleetd serves, beside the link (which goes
    on reading: acks, cancels); see prepare_upgrade."""
    if agent.upgrading or agent.after_stop is not None:
        return  # one at a time: the first one answers
    agent.upgrading = True
    agent.upgrade_task = asyncio.ensure_future(prepare_upgrade(agent, frame.data))


async def prepare_upgrade(agent: Agent, data: dict[str, Any]) -> None:
    """Once the new file passes its checks, answer accepted and stop, to
    restart as the new agent (see upgrade.py). A failure before that is
    answered with why, and the old agent goes on."""
    version = data["version"]
    result: dict[str, Any] = {"version": version, "accepted": False}
    new = None
    try:
        program = upgrade.running_program()
        refused = upgrade.refusal(program, agent.runner.current)
        if refused is not None:
            raise refused
        assert program is not None
        identity = agent.identity
        server_url = agent.server_url  # the replica this link is to
        # the same trust as the link's: fleetd's key checked before the token goes
        trust = agent.trust() if server_url.startswith("wss://") else None
        loop = asyncio.get_running_loop()
        log.info("upgrade to fleet-agent %s: downloading it", version)
        new = await loop.run_in_executor(
            None,
            upgrade.download,
            server_url,
            identity.agent_token,
            trust,
            program.parent,
            data["size"],
            data["sha256"],
        )
        await loop.run_in_executor(None, upgrade.self_check, sys.executable, new, version)
        refused = upgrade.refusal(program, agent.runner.current)  # a job may have started
        if refused is not None:
            raise refused
    except Exception as exc:
        # whatever went wrong (a full disk, a damaged pins.json), fleetd hears
        # why now instead of waiting out its timeout
        if new is not None:
            new.unlink(missing_ok=True)
        agent.upgrading = False
        code = exc.code if isinstance(exc, upgrade.UpgradeError) else "failed"
        why = str(exc) or type(exc).__name__
        log.warning("not upgrading to fleet-agent %s (%s): %s", version, code, why)
        result.update(code=code, error=why[: protocol.MAX_STR])
        await agent.emit_now("upgrade.result", result)
        return
    except BaseException:  # cancelled: the agent is stopping
        if new is not None:
            new.unlink(missing_ok=True)
        agent.upgrading = False
        raise
    result["accepted"] = True
    await agent.emit_now("upgrade.result", result)
    agent.stop_for(
        ("upgrade", program, new, version, data["deadline"]), f"upgrading to fleet-agent {version}"
    )


async def on_error(agent: Agent, frame: Envelope) -> None:
    log.warning("fleetd: %s (%s)", frame.data["message"], frame.data["code"])


HANDLERS: dict[str, Handler] = {
    "ack": on_ack,
    "config.update": on_config_update,
    "command.run": on_command_run,
    "command.cancel": on_command_cancel,
    "schedule.set": on_schedule_set,
    "tls.pins": on_tls_pins,
    "query.run": on_query_run,
    "query.cancel": on_query_cancel,
    "query.more": on_query_more,
    "agent.upgrade": on_agent_upgrade,
    "error": on_error,
}


async def dispatch(agent: Agent, frame: Envelope) -> None:
    handler = HANDLERS.get(frame.type)
    if handler is None:
        log.debug("ignoring %s", frame.type)
        return
    await handler(agent, frame)
