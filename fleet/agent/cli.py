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
import subprocess
import sys
import time
from typing import Any, Optional

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .. import __version__
from ..common.exitcodes import Exit
from ..common.protocol import PROTOCOL_VERSION, ProtocolError
from ..common.timefmt import iso
from . import upgrade
from .enroll import FatalError, enroll
from .link import Agent
from .scheduler import Clock, entries, next_fire
from .spool import Spool, SpoolDamaged
from .state import State, StateDamaged, StateError, state_dir

log = logging.getLogger("fleet-agent")


# a damaged state file or spool: restarting cannot mend it, so the status the
# unit does not restart after (RestartPreventExitStatus=3) ends it for good
DAMAGED = Exit.AUTH


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
    """One agent per state dir: a second one would double every job. The
    lock file holds the pid of the agent holding it (an upgrade's rollback
    may restart the agent under another pid)."""
    # not truncated before the lock is ours: it holds the running agent's pid
    fh = os.fdopen(os.open(state.root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600), "r+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another fleet-agent is running with {state.root}", Exit.ERROR)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def give_way(state: State, why: str) -> None:
    """A new agent on trial that cannot even start (it cannot read the state
    the old one left) puts the old one back at once and execs it, rather
    than exit for the unit to give up on (status 3) or restart in a loop.
    Returns when there is no upgrade on trial, or the old file is gone."""
    marker = upgrade.load_marker(state)
    action, _ = upgrade.on_start(marker, __version__, time.time())
    if marker is None or action not in ("trial", "rollback"):
        return
    log.error("the new fleet-agent %s cannot start: %s; putting the old one back", __version__, why)
    upgrade.give_back(state, marker, f"the new agent could not start: {why}")


def upgrade_on_start(state: State) -> tuple[bool, Optional[tuple[str, str]]]:
    """What the upgrade marker says at start: (on trial, rollback to report).
    A new agent that must give way puts the old one back and execs it."""
    marker = upgrade.load_marker(state)
    action, why = upgrade.on_start(marker, __version__, time.time())
    if marker is None or action == "none":
        return False, None
    if action == "rollback":
        upgrade.give_back(state, marker, why)
        # the old file is gone: this one is all there is
        log.error("going on as fleet-agent %s", __version__)
        upgrade.clear_marker(state)
        return False, None
    if action == "trial":
        marker.starts += 1
        marker.pid = os.getpid()
        upgrade.save_marker(state, marker)
        log.info(
            "on trial as fleet-agent %s: the old agent comes back unless fleetd welcomes this one",
            __version__,
        )
        return True, None
    if marker.state == "pending":  # the swap never happened: write down why
        marker.state, marker.error = "rolled_back", why
        upgrade.save_marker(state, marker)
    return False, (marker.to, why)


def after_stop(state: State, after: tuple) -> None:
    """An upgrade: swap the files and exec the new agent. A rollback: put
    the old file back and exec it. Neither returns unless the exec fails."""
    if after[0] == "rollback":
        marker = upgrade.load_marker(state)
        if marker is None:
            return
        upgrade.roll_back(state, marker, after[1])
        upgrade.restart(marker.program, marker.argv)
    _, program, new, version, deadline = after
    argv = sys.argv[1:]
    marker = upgrade.Marker(
        to=version,
        previous=__version__,
        program=str(program),
        deadline=time.time() + deadline,
        argv=argv,
        pid=os.getpid(),
    )
    try:
        upgrade.install(state, program, new, marker)
    except OSError as exc:  # the old file is still in place: run it again, say why
        new.unlink(missing_ok=True)
        marker.state, marker.error = "rolled_back", f"could not install the new agent: {exc}"
        upgrade.save_marker(state, marker)
        upgrade.restart(str(program), argv)
    try:
        upgrade.start_guard(state, marker)
    except (OSError, subprocess.SubprocessError) as exc:  # the new agent's own timer still watches
        log.warning("could not start the upgrade guard: %s", exc)
    log.info("restarting as fleet-agent %s", version)
    upgrade.restart(str(program), argv)


async def run_agent(
    state: State,
    args: argparse.Namespace,
    trial: bool = False,
    report: Optional[tuple[str, str]] = None,
) -> tuple[int, Optional[tuple]]:
    """Run until a signal, or until the agent stops for an upgrade or a
    rollback; returns the exit status and what to do after the stop."""
    agent = Agent(
        state,
        state.load_identity(),
        restic=args.restic,
        cancel_grace=args.cancel_grace,
        spool_max_bytes=int(args.spool_max_mb * 1024 * 1024),
        clock=Clock(clock_offset()),
    )
    agent.trial, agent.upgrade_report = trial, report
    loop = asyncio.get_running_loop()
    stop: asyncio.Future = loop.create_future()
    agent.request_stop = lambda why: stop.done() or stop.set_result(why)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            sig, lambda s=sig: stop.done() or stop.set_result(f"received {signal.Signals(s).name}")
        )
    timer: Any = None
    if trial:
        marker = upgrade.load_marker(state)
        left = marker.deadline - time.time() if marker is not None else 0.0

        def give_up() -> None:
            if agent.trial:  # not welcomed in time: the old agent comes back
                agent.stop_for(
                    (
                        "rollback",
                        f"the new agent {__version__} got no hello accepted by its deadline",
                    ),
                    "upgrade deadline passed",
                )

        timer = loop.call_later(max(0.0, left), give_up)
    main = asyncio.ensure_future(agent.run_forever())
    done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
    if timer is not None:
        timer.cancel()
    if main in done:
        agent.spool.close()
        main.result()  # raises FatalError
        return 0, None
    log.info("%s: stopping", stop.result())
    await agent.shutdown()
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    return 0, agent.after_stop


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
    enrolled = False
    try:
        state.load_identity()
        enrolled = True
        state.load_pins()  # damaged: say so now, not at the first dial
    except StateError as exc:
        give_way(state, str(exc))
        damaged = enrolled or isinstance(exc, StateDamaged)
        fail(str(exc), DAMAGED if damaged else Exit.USAGE)  # DAMAGED: the unit stays down
    _lock = lock_state_dir(state)  # noqa: F841 - released at exit (and at exec)
    trial, report = upgrade_on_start(state)
    try:
        code, after = asyncio.run(run_agent(state, args, trial, report))
    except FatalError as exc:
        fail(str(exc), Exit(exc.exit_code))
    except (SpoolDamaged, StateError) as exc:  # schedules.json, read as the agent starts
        fail(str(exc), DAMAGED)
    except (sqlite3.Error, OSError) as exc:
        fail(f"cannot open the spool in {state.root}: {exc}", Exit.ERROR)
    if after is not None:
        try:
            after_stop(state, after)
        except OSError as exc:
            fail(f"cannot restart for the upgrade: {exc}", Exit.ERROR)
    sys.exit(code)


def cmd_upgrade_guard(args: argparse.Namespace) -> None:
    """Internal: started by an upgrading agent (see upgrade.py)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(upgrade.guard(State(state_dir(args.state_dir))))


def cmd_status(args: argparse.Namespace) -> None:
    state = State(state_dir(args.state_dir))
    try:
        identity = state.load_identity()
        repos = state.load_repos()
    except (StateError, KeyError, TypeError) as exc:
        fail(f"cannot read the agent's state: {exc}", Exit.NOT_FOUND)
    pending, marks, local = 0, {}, []
    if state.spool_path.exists():
        try:
            spool = Spool(state.spool_path)
            pending, marks, local = spool.count(), spool.marks(), spool.local_jobs()
            spool.close()
        except SpoolDamaged as exc:
            fail(str(exc), Exit.ERROR)
    try:
        servers = state.load_servers() or [identity.server_url]
    except StateError as exc:
        servers = [identity.server_url]
        print(f"fleet-agent: warning: {exc}", file=sys.stderr)
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
        # every replica's URL it dials in turn (the enrolled one alone: none named)
        "servers": servers,
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
        # an upgrade on trial, or rolled back and not yet told to fleetd
        "upgrade": upgrade_status(upgrade.load_marker(state)),
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
        if key == "upgrade":
            if value is None:
                continue
            value = f"to {value['to']} from {value['from']}: {value['state']}" + (
                f" ({value['error']})" if value["error"] else ""
            )
        print(f"{key.replace('_', ' '):24} {value}")


def upgrade_status(marker: Optional[upgrade.Marker]) -> Optional[dict[str, Any]]:
    if marker is None:
        return None
    return {
        "to": marker.to,
        "from": marker.previous,
        "state": "on trial" if marker.state == "pending" else "rolled back",
        "error": marker.error or None,
    }


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

    # internal: the watch over an upgrade, run from the old file
    p = sub.add_parser(
        "upgrade-guard",
        help="(internal) after an upgrade, put the old agent back if the new one is not "
        "welcomed by its deadline",
    )
    p.add_argument("--state-dir", help=state_help)
    p.set_defaults(func=cmd_upgrade_guard)
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
