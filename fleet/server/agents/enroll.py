"""/enroll: a single-use enrollment token in, the host's agent token out."""

from __future__ import annotations

import logging
from typing import Optional

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ...common import protocol
from ...common.protocol import ProtocolError
from ..security import auth
from ..store.db import Store
from ..store.models import AuditLog, EnrollmentToken, Host, utcnow
from ..store.queries import hot

log = logging.getLogger("fleetd.agent")


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
    hostname = protocol.printable(hostname)  # shown to operators: no escape sequences
    # a re-enrollment replaces the previous agent token: the old one stops working
    Host.update(
        agent_token_hash=auth.token_hash(agent_token),
        enrolled_at=now,
        hostname=hostname,
        last_seq=0,  # a new agent numbers its reports from 1 again
    ).where(Host.id == host.id).execute()
    EnrollmentToken.update(used_at=now).where(EnrollmentToken.id == row.id).execute()
    # any other token still out for this host dies with this enrollment
    EnrollmentToken.update(expires_at=now).where(
        (EnrollmentToken.host == host.id)
        & EnrollmentToken.used_at.is_null()
        & (EnrollmentToken.expires_at > now)
    ).execute()
    AuditLog.create(
        actor=f"agent:{host.name}",
        action="host.enroll",
        target=host.name,
        detail={"hostname": hostname},
        address=address,
    )
    return {"host_id": host.id, "host_name": host.name, "agent_token": agent_token}


def may_download(token: str) -> bool:
    """Whether a bearer token is an agent's or an enrollment token still
    good (not used, not expired): those fetch the agent file."""
    digest = auth.token_hash(token)
    if hot.agent_by_token(digest) is not None:
        return True
    return (
        EnrollmentToken.select()
        .where(
            (EnrollmentToken.token_hash == digest)
            & EnrollmentToken.used_at.is_null()
            & (EnrollmentToken.expires_at > utcnow())
        )
        .exists()
    )


def lookup_agent(token: str) -> Optional[tuple[int, str]]:
    """(host id, host name) of an agent token, or None."""
    return hot.agent_by_token(auth.token_hash(token))


async def serve_enroll(store: Store, connection: ServerConnection, address: str) -> None:
    """One `enroll` frame in, `enrolled` or an error frame out, then close."""
    try:
        raw = await connection.recv()
        frame = protocol.decode(raw, expect="agent")
        if frame.type != "enroll":
            raise ProtocolError(f"expected an enroll frame, got {frame.type}", re=frame.id)
        try:
            result = await store.atomic(
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
