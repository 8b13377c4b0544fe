"""TLS: which key fleetd serves, which is staged next, who holds its pin.

The rotation to a new key: `tls.stage` (the new certificate's key pin goes
to every agent), `tls.status` (who holds it), `tls.activate` (fleetd loads
its certificate files again and serves them, when every pinning agent
holds the new key's pin). See security/tls.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Optional

from ...common import tlspins
from ...common.protocol import Field
from ..security import tls
from ..security.auth import Role
from ..store.models import Host, TlsKey, utcnow
from .common import audit
from .context import Context
from .errors import Conflict, Invalid
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)

log = logging.getLogger("fleetd")

MAX_CERT = 64 * 1024  # a PEM certificate, request or public key
NAMED = 10  # hosts named in a refusal, at most


def served(ctx: Context) -> tls.ServedTls:
    if ctx.state.tls is None:
        raise Invalid(
            "fleetd serves no TLS itself (started without --tls-cert): there is no key to pin"
        )
    return ctx.state.tls


def host_trust() -> list[tls.HostTrust]:
    """Every enrolled host, as fleetd knows its trust (store thread)."""
    rows = (
        Host.select(Host.name, Host.online, Host.tls_trust, Host.tls_pins)
        .where(Host.agent_token_hash.is_null(False))
        .order_by(Host.name)
    )
    return [tls.HostTrust(h.name, h.online, h.tls_trust, h.tls_pins) for h in rows]


def host_tls_json(
    trust: Optional[str], pins: Optional[list[str]], online: bool, state: Optional[tls.ServedTls]
) -> dict[str, Any]:
    """How a host's agent trusts fleetd, and whether it can connect (hosts
    show, tls status)."""
    out: dict[str, Any] = {"trust": trust, "pins": pins}
    if state is not None:
        held = pins or []
        out["holds_served"] = trust == "unpinned" or (trust == "pins" and state.pin in held)
        if state.staged:
            out["holds_staged"] = trust == "unpinned" or (trust == "pins" and state.staged in held)
        out["problem"] = tls.cannot_connect(trust, pins, state.pin) if not online else None
    return out


def status_of(state: tls.ServedTls) -> dict[str, Any]:
    hosts = host_trust()
    rows = []
    for h in hosts:
        rows.append(
            {"host": h.name, "status": "online" if h.online else "offline"}
            | host_tls_json(h.trust, h.pins, h.online, state)
        )
    lack = tls.lacking(hosts, state.staged) if state.staged else []
    return {
        "served": {"pin": state.pin, "sha256": state.fingerprint},
        "staged": state.staged,
        "certificate": str(state.cert_file),
        "key": str(state.key_file),
        "hosts": rows,
        # what `tls activate` waits for: every pinning agent holds the staged pin
        "ready": bool(state.staged) and not lack,
        "lacking": [h.name for h in lack],
    }


@method("tls.status", Role.VIEWER, readonly=True)
def tls_status(ctx: Context, p: dict) -> dict:
    """The key fleetd serves (its pin and certificate SHA-256), the key
    staged next, and per enrolled host how its agent trusts fleetd: the
    pins it holds, whether it holds the served and the staged key, why it
    cannot connect. `ready`: every pinning agent holds the staged pin."""
    return status_of(served(ctx))


@method("tls.stage", Role.ADMIN, (Field("pem", "str", limit=MAX_CERT),))
async def tls_stage(ctx: Context, p: dict) -> dict:
    """Stage a new key, given as PEM: its certificate, certificate request
    or public key (only the public key is read). Its pin goes to every agent
    now, and to agents enrolled from now on, beside the served key's.
    Replaces a key staged before."""
    state = served(ctx)
    async with state.changing:
        try:
            _, spki = tlspins.public_key_block(p["pem"])
        except tlspins.PinError as exc:
            raise Invalid(str(exc)) from None
        pin = hashlib.sha256(spki).hexdigest()
        if pin == state.pin:
            raise Invalid(
                f"this certificate's key (sha256 {tlspins.short(pin)}) is the one fleetd serves: "
                "a renewal that keeps the key needs no staging; install it and run "
                "'fleetctl tls activate' (or restart fleetd)"
            )
        await ctx.state.store.atomic(record_staged, ctx, pin, state.staged)
        state.staged = pin
        pushed = await ctx.state.agents.push_pins()
        log.info("staged TLS key %s; its pin went to %d agent(s)", pin, pushed)
        return {"staged": pin, "pushed": pushed}


def record_staged(ctx: Context, pin: Optional[str], before: Optional[str]) -> None:
    TlsKey.delete().where(TlsKey.state == "staged").execute()
    if pin is not None:
        TlsKey.create(pin=pin, state="staged", since=utcnow(), actor=ctx.caller.name)
        audit(ctx, "tls.stage", pin, {"replaced": before} if before else None)
    else:
        audit(ctx, "tls.unstage", before)


@method("tls.unstage", Role.ADMIN)
async def tls_unstage(ctx: Context, p: dict) -> dict:
    """Forget the staged key; agents are told to drop its pin."""
    state = served(ctx)
    async with state.changing:
        if state.staged is None:
            raise Invalid("no key is staged")
        before = state.staged
        await ctx.state.store.atomic(record_staged, ctx, None, before)
        state.staged = None
        pushed = await ctx.state.agents.push_pins()
        return {"unstaged": before, "pushed": pushed}


@method("tls.activate", Role.ADMIN, (Field("force", "bool", False),))
async def tls_activate(ctx: Context, p: dict) -> dict:
    """Load fleetd's certificate and key files (--tls-cert, --tls-key) again
    and serve them to new connections. The same key (a renewal): at once.
    A new key: only the staged one, and only when every pinning agent holds
    its pin (`force`: every online one; an offline agent without it must be
    enrolled again). Agents connected with the old key are told to redial."""
    state = served(ctx)
    async with state.changing:
        try:  # files: read off the event loop
            new = await asyncio.get_running_loop().run_in_executor(
                None, tls.load, state.cert_file, state.key_file
            )
        except tls.TlsError as exc:
            raise Invalid(str(exc)) from None
        old = state.pin
        if new.pin == old:
            if new.fingerprint != state.fingerprint and not p.get("force"):
                # the same key, but agents enrolled before key pins pin the
                # certificate itself until they connect once
                hosts = await ctx.state.store.read(host_trust)
                whole = [h.name for h in hosts if h.trust == "certificate"]
                if whole:
                    raise Conflict(
                        f"{len(whole)} host(s) pin fleetd's certificate itself, not its key "
                        f"(enrolled before key pins, not connected since): "
                        f"{', '.join(whole[:NAMED])}; a new certificate would lock them out: "
                        "let their agents connect once (they then learn the key pins), "
                        "or --force"
                    )
            state.switch(new)
            await ctx.state.store.atomic(
                audit, ctx, "tls.renew", new.pin, {"sha256": new.fingerprint}
            )
            return {"activated": new.pin, "renewed": True, "lacking": []}
        if new.pin != state.staged:
            raise Conflict(
                f"{state.cert_file} holds key sha256 {tlspins.short(new.pin)}, which is not staged: "
                "stage it first ('fleetctl tls stage CERT') and activate once every agent holds its pin"
            )
        hosts = await ctx.state.store.read(host_trust)
        lack = tls.lacking(hosts, new.pin, bool(p.get("force")))
        if lack:
            named = "; ".join(f"{h.name} ({tls.why_not(h, new.pin)})" for h in lack[:NAMED])
            more = f" and {len(lack) - NAMED} more" if len(lack) > NAMED else ""
            hint = "" if p.get("force") else " (--force: only online hosts must hold it)"
            raise Conflict(
                f"{len(lack)} host(s) do not hold the staged key's pin and could not connect: "
                f"{named}{more}{hint}"
            )
        offline = [h.name for h in tls.lacking(hosts, new.pin) if not h.online]
        await ctx.state.store.atomic(record_activated, ctx, new.pin, old, offline)
        state.switch(new)
        state.staged = None
        log.info("serving TLS key %s (was %s)", new.pin, old)
        redialled = await ctx.state.agents.redial_all(
            "fleetd serves a new certificate key; redial", old
        )
        return {"activated": new.pin, "renewed": False, "lacking": offline, "redialled": redialled}


def record_activated(ctx: Context, pin: str, old: str, offline: list[str]) -> None:
    TlsKey.delete().where(TlsKey.state.in_(["served", "staged"])).execute()
    TlsKey.create(pin=pin, state="served", since=utcnow(), actor=ctx.caller.name)
    detail: dict[str, Any] = {"replaced": old}
    if offline:
        detail["locked_out"] = offline
    audit(ctx, "tls.activate", pin, detail)


def without_tls() -> None:
    """At a start without TLS: no key is served, none to compare pins with."""
    TlsKey.delete().where(TlsKey.state == "served").execute()


def started(pin: str) -> tuple[Optional[str], Optional[str], bool, list[str]]:
    """At start, with the key fleetd serves: (the staged key's pin, the key
    served before when it changed, whether the new one had been staged, the
    hosts that may not hold its pin then). Records the served key (store
    thread)."""
    rows = {k.state: k.pin for k in TlsKey.select()}
    before, staged = rows.get("served"), rows.get("staged")
    if before == pin and staged != pin:
        return staged, None, False, []
    was_staged = staged == pin
    TlsKey.delete().where((TlsKey.state == "served") | (TlsKey.pin == pin)).execute()
    TlsKey.create(pin=pin, state="served", since=utcnow(), actor="system")
    lack = [h.name for h in tls.lacking(host_trust(), pin)] if before is not None else []
    return (None if was_staged else staged), before, was_staged, lack
