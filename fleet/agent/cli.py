"""`fleet-agent`: enroll, run, status (argparse: the agent carries no click)."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import sqlite3
import ssl
import sys
from typing import Optional

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .. import __version__
from ..common.exitcodes import Exit
from ..common.protocol import PROTOCOL_VERSION, ProtocolError
from ..common.timefmt import iso
from .enroll import FatalError, enroll
from .link import Agent
from .scheduler import Clock, entries, next_fire
from .spool import Spool
from .state import State, StateError, state_dir

log = logging.getLogger("fleet-agent")


def fail(message: str, code: Exit) -> None:
    print(f"fleet-agent: error: {message}", file=sys.stderr)
    sys.exit(int(code))


def cmd_enroll(args: argparse.Namespace) -> None:
    os.umask(0o077)  # everything the agent writes is its own
    state = State(state_dir(args.state_dir))
    if state.identity_path.exists() and not args.force:
        fail(
            f"already enrolled ({state.identity_path} exists); give --force to enroll again",
            Exit.USAGE,
        )
    try:
        identity = asyncio.run(enroll(state, args.token, args.hostname))
    except ssl.SSLError as exc:  # before ValueError, which certificate errors also are
        fail(f"TLS with the server failed: {exc.reason or exc}", Exit.UNREACHABLE)
    except (ProtocolError, ValueError, OverflowError) as exc:  # a damaged string or URL
        fail(f"bad enrollment string: {exc}", Exit.USAGE)
    except FatalError as exc:
        fail(str(exc), Exit(exc.exit_code))
    except InvalidURI as exc:
        fail(f"bad server URL in the enrollment string: {exc}", Exit.USAGE)
    except InvalidStatus as exc:
        fail(f"the server answered HTTP {exc.response.status_code} to enrollment", Exit.UNREACHABLE)
    except StateError as exc:
        fail(str(exc), Exit.ERROR)
    except ConnectionClosed:
        fail("the server closed the connection without answering the enrollment", Exit.UNREACHABLE)
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        fail(f"cannot reach the server: {getattr(exc, 'strerror', None) or exc}", Exit.UNREACHABLE)
    print(
        f"enrolled as {identity.host_name} with {identity.server_url}; state saved in {state.root}"
    )
    print(
        "start the agent with: fleet-agent run"
        + (f" --state-dir {args.state_dir}" if args.state_dir else "")
    )


def lock_state_dir(state: State):
    """One agent per state dir: a second one would double every job."""
    fh = open(state.root / "agent.lock", "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another fleet-agent is running with {state.root}", Exit.ERROR)
    return fh


async def run_agent(state: State, args: argparse.Namespace) -> int:
    agent = Agent(
        state,
        state.load_identity(),
        restic=args.restic,
        cancel_grace=args.cancel_grace,
        spool_max_bytes=int(args.spool_max_mb * 1024 * 1024),
        clock=Clock(clock_offset()),
    )
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    main = asyncio.ensure_future(agent.run_forever())
    done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
    if main in done:
        agent.spool.close()
        main.result()  # raises FatalError
        return 0
    log.info("received %s: stopping", signal.Signals(stop.result()).name)
    await agent.shutdown()
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    return 0


def clock_offset() -> float:
    """FLEET_AGENT_CLOCK_OFFSET: seconds added to the scheduler's clock. For
    tests, which put a schedule's fire a moment away instead of waiting."""
    value = os.environ.get("FLEET_AGENT_CLOCK_OFFSET", "")
    try:
        return float(value) if value else 0.0
    except ValueError:
        fail(f"FLEET_AGENT_CLOCK_OFFSET={value!r} is not a number of seconds", Exit.USAGE)
        raise  # not reached


def cmd_run(args: argparse.Namespace) -> None:
    os.umask(0o077)  # the lock, the spool and its WAL hold nothing for others
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    state = State(state_dir(args.state_dir))
    try:
        state.load_identity()
    except StateError as exc:
        fail(str(exc), Exit.USAGE)
    try:
        state.load_pins()  # damaged: say so now, not at the first dial
    except StateError as exc:
        fail(str(exc), Exit.ERROR)
    _lock = lock_state_dir(state)  # noqa: F841 - released at exit
    try:
        sys.exit(asyncio.run(run_agent(state, args)))
    except FatalError as exc:
        fail(str(exc), Exit(exc.exit_code))
    except (sqlite3.Error, OSError) as exc:
        fail(f"cannot open the spool in {state.root}: {exc}", Exit.ERROR)


def cmd_status(args: argparse.Namespace) -> None:
    state = State(state_dir(args.state_dir))
    try:
        identity = state.load_identity()
        repos = state.load_repos()
    except (StateError, KeyError, TypeError) as exc:
        fail(f"cannot read the agent's state: {exc}", Exit.NOT_FOUND)
    pending, marks, local = 0, {}, []
    if state.spool_path.exists():
        spool = Spool(state.spool_path)
        pending, marks, local = spool.count(), spool.marks(), spool.local_jobs()
        spool.close()
    try:
        schedule_set = state.load_schedules() or {}
        pins = state.load_pins()
    except StateError as exc:
        fail(str(exc), Exit.ERROR)
    refusal = state.load_refusal()
    now = Clock(clock_offset()).now()
    schedules = []
    for e in entries(schedule_set):
        mark = marks.get(e.id)
        schedules.append(
            {
                "name": e.name,
                "cron": e.cron,
                "timezone": e.zone_name,
                "enabled": e.enabled,
                "groups": [g["name"] for g in e.groups],
                "last_fire": mark.last if mark is not None and mark.fired else None,
                "next_fire": iso(next_fire(e, mark, now)),
            }
        )
    info = {
        "host": identity.host_name,
        "host_id": identity.host_id,
        "server": identity.server_url,
        "tls_pinned": bool(pins or identity.tls_sha256),
        # the keys fleetd is trusted by; None: a certificate pin of before
        # key pins (until fleetd sends them), or no pin at all
        "tls_pins": pins,
        # why fleetd's certificate was last refused, until a connection succeeds
        "tls_refused": refusal,
        "repository_configured": bool(repos),
        "repositories": [r.name or "(default)" for r in repos],
        "unacknowledged_frames": pending,
        "schedule_version": schedule_set.get("version", 0),
        "schedules": schedules,
        # backups of schedule fires the agent runs itself (fleetd out of reach), not yet started
        "queued_local_jobs": [
            {"job": j["job_id"], "group": j["group"], "scheduled_at": j["scheduled_at"]}
            for j in local
        ],
        "state_dir": str(state.root),
        "agent_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "schedules":
            for s in value:
                state_ = "enabled" if s["enabled"] else "disabled"
                print(
                    f"{'schedule ' + s['name']:24} {s['cron']} ({s['timezone']}, {state_}) "
                    f"groups {', '.join(s['groups'])}; last fire {s['last_fire'] or '-'}, "
                    f"next {s['next_fire'] or '-'} UTC"
                )
            continue
        if key == "queued_local_jobs":
            value = len(value)
        if key == "tls_pins":
            value = ", ".join(value) if value else "-"
        if key == "tls_refused":
            if not value:
                continue
            value = f"{value.get('at', '?')}: {value.get('message') or value.get('error')}"
        if key == "repositories":
            value = ", ".join(value) or "-"
        print(f"{key.replace('_', ' '):24} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-agent",
        description="The Fleet agent: runs restic for fleetd on this server.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 enrollment or token refused, 4 not enrolled (status), 5 server unreachable.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fleet-agent {__version__} (protocol {PROTOCOL_VERSION})",
    )
    state_help = "state directory (default: $FLEET_AGENT_STATE_DIR or /var/lib/fleet-agent)"
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("enroll", help="exchange an enrollment string for this host's agent token")
    p.add_argument(
        "token", metavar="ENROLLMENT", help="the fleet1:... string printed by 'fleetctl enroll'"
    )
    p.add_argument("--state-dir", help=state_help)
    p.add_argument("--hostname", help="name to report (default: this machine's hostname)")
    p.add_argument("--force", action="store_true", help="enroll again over an existing identity")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("run", help="connect to fleetd and run the jobs it sends, until SIGTERM")
    p.add_argument("--state-dir", help=state_help)
    p.add_argument(
        "--restic",
        default=os.environ.get("FLEET_RESTIC", "restic"),
        help="restic binary (default: restic on PATH, or $FLEET_RESTIC)",
    )
    p.add_argument(
        "--cancel-grace",
        type=float,
        default=10.0,
        help="seconds to wait after SIGINT, then after SIGTERM, before the next signal when cancelling restic (default 10)",
    )
    p.add_argument(
        "--spool-max-mb",
        type=float,
        default=64,
        help="bound of the spool of unacknowledged reports; past it the oldest log lines go first (default 64)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show this agent's enrollment and spool")
    p.add_argument("--state-dir", help=state_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Optional[list] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        sys.exit(int(Exit.USAGE))
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(int(Exit.INTERRUPTED))


if __name__ == "__main__":
    main()
