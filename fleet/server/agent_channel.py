"""The agent side of fleetd: enrollment and the authenticated /agent session."""

from __future__ import annotations

import logging
from typing import Optional

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .. import __version__, protocol
from ..protocol import ProtocolError
from . import auth
from .ctl import ServerState
from .store.models import AuditLog, EnrollmentToken, Host, utcnow

log = logging.getLogger("fleetd.agent")

HEARTBEAT_INTERVAL = 30


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
        agent_token_hash=auth.token_hash(agent_token), enrolled_at=now, hostname=hostname
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
    """The authenticated session: hello first, then the agent's frames.

    Issue-3 work (heartbeats, jobs, delivery) lands here; for now the
    session validates every frame, answers hello with welcome and keeps the
    host's online state.
    """
    try:
        raw = await connection.recv()
        try:
            hello = protocol.decode(raw, expect="agent")
            if hello.type != "hello":
                raise ProtocolError(f"the first frame must be hello, not {hello.type}", re=hello.id)
        except ProtocolError as exc:
            await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
            await connection.close(1008, "expected hello")
            return
        if hello.data["protocol_version"] != protocol.PROTOCOL_VERSION:
            message = (
                f"protocol version {hello.data['protocol_version']} is not supported; "
                f"this fleetd speaks {protocol.PROTOCOL_VERSION}"
            )
            await connection.send(protocol.error_frame("unsupported_version", message, hello.id))
            await connection.close(1008, "unsupported protocol version")
            return
        await state.store.atomic(mark_online, host.id, hello.data)
        await connection.send(
            protocol.encode(
                "welcome",
                {
                    "server_version": __version__,
                    "heartbeat_interval": HEARTBEAT_INTERVAL,
                    "host_id": host.id,
                    "host_name": host.name,
                },
                id=hello.id,
            )
        )
        async for raw in connection:
            try:
                frame = protocol.decode(raw, expect="agent")
            except ProtocolError as exc:
                await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
                continue
            if frame.type == "heartbeat":
                await state.store.run(touch, host.id)
    except ConnectionClosed:
        pass
    finally:
        await state.store.run(mark_offline, host.id)


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
