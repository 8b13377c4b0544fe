"""The agent side of fleetd: enrollment and the authenticated /agent session."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .. import __version__
from ..common import protocol
from ..common.protocol import ProtocolError
from . import auth, jobs
from .ctl import ServerState
from .hub import AgentSession
from .store.models import AuditLog, EnrollmentToken, Host, utcnow

log = logging.getLogger("fleetd.agent")

APPLY_BATCH = 1000  # reliable frames applied in one transaction at most


class EnrollError(Exception):
    pass


def redeem_enrollment(token: str, hostname: str, address: str) -> dict:
    """Exchange a single-use enrollment token for the host's agent token.

    Runs on the store thread in one transaction, so two agents racing with
    the same token cannot both win.
    """
    row = (
        EnrollmentToken.select(EnrollmentToken, Host)
        .join(Host)
        .where(EnrollmentToken.token_hash == auth.token_hash(token))
        .first()
    )
    now = utcnow()
    if row is None:
        raise EnrollError("unknown enrollment token")
    if row.used_at is not None:
        raise EnrollError("this enrollment token was already used; ask for a new one")
    if row.expires_at <= now:
        raise EnrollError("this enrollment token has expired; ask for a new one")
    agent_token = auth.new_token("agent")
    host = row.host
    # a re-enrollment replaces the previous agent token: the old one stops working
    Host.update(
        agent_token_hash=auth.token_hash(agent_token),
        enrolled_at=now,
        hostname=hostname,
        last_seq=0,  # a new agent numbers its reports from 1 again
    ).where(Host.id == host.id).execute()
    EnrollmentToken.update(used_at=now).where(EnrollmentToken.id == row.id).execute()
    AuditLog.create(
        actor=f"agent:{host.name}",
        action="host.enroll",
        target=host.name,
        detail={"hostname": hostname},
        address=address,
    )
    return {"host_id": host.id, "host_name": host.name, "agent_token": agent_token}


def lookup_agent(token: str) -> Optional[Host]:
    return Host.get_or_none(Host.agent_token_hash == auth.token_hash(token))


async def serve_enroll(state: ServerState, connection: ServerConnection, address: str) -> None:
    """One `enroll` frame in, `enrolled` or an error frame out, then close."""
    try:
        raw = await connection.recv()
        frame = protocol.decode(raw, expect="agent")
        if frame.type != "enroll":
            raise ProtocolError(f"expected an enroll frame, got {frame.type}", re=frame.id)
        try:
            result = await state.store.atomic(
                redeem_enrollment, frame.data["token"], frame.data["hostname"], address
            )
        except EnrollError as exc:
            log.warning("enrollment refused from %s: %s", address, exc)
            await connection.send(protocol.error_frame("enroll_refused", str(exc), frame.id))
            return
        log.info("host %s enrolled from %s", result["host_name"], address)
        await connection.send(protocol.encode("enrolled", result, id=frame.id))
    except ProtocolError as exc:
        await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
    except ConnectionClosed:
        pass


async def serve_agent(state: ServerState, connection: ServerConnection, host: Host) -> None:
    """The authenticated session of one agent.

    hello -> welcome and config.update; then reliable frames are applied in
    batches by one consumer (a batch is one transaction, acked once it has
    committed), while heartbeats, progress and command results are handled
    as they come. Silence for three heartbeat intervals ends the session.
    """
    hub = state.hub
    try:
        raw = await asyncio.wait_for(connection.recv(), state.heartbeat_interval)
        hello = protocol.decode(raw, expect="agent")
        if hello.type != "hello":
            raise ProtocolError(f"the first frame must be hello, not {hello.type}", re=hello.id)
    except ProtocolError as exc:
        await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
        await connection.close(1008, "expected hello")
        return
    except (asyncio.TimeoutError, ConnectionClosed):
        return
    if hello.data["protocol_version"] != protocol.PROTOCOL_VERSION:
        message = (
            f"protocol version {hello.data['protocol_version']} is not supported; "
            f"this fleetd speaks {protocol.PROTOCOL_VERSION}"
        )
        await connection.send(protocol.error_frame("unsupported_version", message, hello.id))
        await connection.close(1008, "unsupported protocol version")
        return
    session = AgentSession(host.id, host.name, connection)
    session.running_job = hello.data.get("running_job")
    session.inflight = session.running_job
    session.spool_seq = hello.data.get("spool_seq", 0)
    await hub.attach(session)  # before marking online: an older session's end then sees it replaced
    await state.store.atomic(mark_online, host.id, hello.data)
    log.info("host %s connected (agent %s)", host.name, hello.data["agent_version"])
    incoming: asyncio.Queue = asyncio.Queue()
    consumer = asyncio.ensure_future(apply_loop(state, session, incoming))
    try:
        await connection.send(
            protocol.encode(
                "welcome",
                {
                    "server_version": __version__,
                    "heartbeat_interval": state.heartbeat_interval,
                    "host_id": host.id,
                    "host_name": host.name,
                },
                id=hello.id,
            )
        )
        await hub.push_config(host.id)
        last_seq = await state.store.atomic(
            jobs.sync_seq, host.id, session.spool_seq, hello.data.get("spool_pending", 0)
        )
        await catch_up(state, session, last_seq)
        while True:
            try:
                raw = await asyncio.wait_for(connection.recv(), 3 * state.heartbeat_interval)
            except asyncio.TimeoutError:
                log.warning(
                    "host %s silent for %d s: marking it offline",
                    host.name,
                    3 * state.heartbeat_interval,
                )
                # a silent peer will not answer a closing handshake: drop the link now
                connection.transport.abort()
                break
            try:
                frame = protocol.decode(raw, expect="agent")
            except ProtocolError as exc:
                log.warning("bad frame from %s: %s", host.name, exc)
                await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
                continue
            if frame.type in protocol.RELIABLE:
                incoming.put_nowait(frame)
            elif frame.type == "heartbeat":
                await state.store.run(touch, host.id)
            elif frame.type == "job.progress":
                if frame.data["job_id"] == session.inflight:  # only its own job
                    hub.report_progress(frame.data)
            elif frame.type == "command.result":
                await command_result(state, session, frame.data)
            else:
                log.info("host %s sent %s; ignored", host.name, frame.type)
    except ConnectionClosed:
        pass
    finally:
        # apply what arrived before the link dropped, then let go
        incoming.put_nowait(None)
        await asyncio.gather(consumer, return_exceptions=True)
        if hub.detach(session):
            await state.store.run(mark_offline, host.id)
            log.info("host %s disconnected", host.name)


async def apply_loop(state: ServerState, session: AgentSession, incoming: asyncio.Queue) -> None:
    """Apply reliable frames in batches: one transaction, then one ack."""
    hub = state.hub
    while True:
        first = await incoming.get()
        batch = [first] if first is not None else []
        while not incoming.empty() and len(batch) < APPLY_BATCH:
            frame = incoming.get_nowait()
            if frame is None:
                first = None
                break
            batch.append(frame)
        if batch:
            try:
                last, events = await state.store.atomic(jobs.apply_frames, session.host_id, batch)
            except Exception:
                # nothing was acked: drop the link, the agent resends on reconnect
                log.exception(
                    "applying frames of host %s failed; closing its link", session.host_name
                )
                session.connection.transport.abort()
                return
            await session.send(protocol.encode("ack", {"seq": last}))
            ended = False
            for event in events:
                hub.publish(event)
                if event["type"] == "finished":
                    hub.job_ended(session, event["job_id"])
                    ended = True
                elif event["type"] == "retry":  # due after its delay
                    hub.dispatch_later(session.host_id, event["delay"])
            if not session.caught_up:
                await catch_up(state, session, last)
            elif ended:
                await hub.dispatch(session.host_id)
        if first is None:
            return


async def catch_up(state: ServerState, session: AgentSession, applied: int) -> None:
    """Once fleetd holds everything the agent had spooled at hello, what is
    still 'running' without the agent running it is lost; then dispatch."""
    if session.caught_up or applied < session.spool_seq:
        return
    session.caught_up = True
    lost = await state.store.atomic(jobs.mark_lost, session.host_id, session.running_job)
    for job_id in lost:
        log.warning("job %s of %s lost: the agent came back without it", job_id, session.host_name)
        state.hub.publish({"job_id": job_id, "type": "finished", "status": "lost"})
    await state.hub.dispatch(session.host_id)


async def command_result(state: ServerState, session: AgentSession, data: dict) -> None:
    job_id = data["job_id"]
    if data["accepted"] or job_id != session.inflight:
        return  # an answer about a job this session was not sent counts for nothing
    reason = data.get("error") or "refused"
    log.warning("host %s refused job %s: %s", session.host_name, job_id, reason)
    if session.inflight == job_id:
        session.inflight = None
    if data.get("code") == "busy" or reason.startswith("busy"):  # older agents: no code
        # it stays queued; try again shortly in case no job end is coming to trigger it
        loop = asyncio.get_running_loop()
        loop.call_later(2.0, lambda: asyncio.ensure_future(state.hub.dispatch(session.host_id)))
    else:
        await state.store.atomic(jobs.fail_job, job_id, f"the agent refused the job: {reason}")
        state.hub.publish({"job_id": job_id, "type": "finished", "status": "failed"})


def mark_online(host_id: int, hello: dict) -> None:
    Host.update(
        online=True,
        last_seen_at=utcnow(),
        hostname=hello["hostname"],
        agent_version=hello["agent_version"],
        restic_version=hello["restic_version"],
        os=hello["os"],
        arch=hello["arch"],
        timezone=hello.get("timezone"),
    ).where(Host.id == host_id).execute()


def touch(host_id: int) -> None:
    Host.update(last_seen_at=utcnow()).where(Host.id == host_id).execute()


def mark_offline(host_id: int) -> None:
    Host.update(online=False).where(Host.id == host_id).execute()
