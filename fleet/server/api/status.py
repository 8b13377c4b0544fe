"""status: the fleet at a glance (see fleet.server.health), and its running
jobs live (status --watch)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from websockets.exceptions import ConnectionClosedOK

from ...common.protocol import FINAL_STATUSES, Field
from ...common.timefmt import iso
from .. import health
from ..events import Bus, JobDispatched, JobEnded, JobProgressed, JobStarted
from ..security.auth import Role
from ..store.models import Alert, Host, Job, utcnow
from ..store.queries.hot import WITH_AGENT
from . import views
from .context import Context
from .registry import Method, collect

METHODS: list[Method] = []
method = collect(METHODS)


@method(
    "status.show",
    Role.VIEWER,
    (
        Field("offline_after", "int", False, minimum=0),
        Field("unchecked_after", "int", False, minimum=0),
    ),
)
async def status_show(ctx: Context, p: dict) -> dict:
    """The fleet at a glance, with its problems and their worst severity
    (0 ok, 1 warning, 2 critical)."""
    # a read of the whole fleet: on the store's scan thread, not ahead of
    # everyone's small reads
    offline_after = min(p.get("offline_after", health.DEFAULT_OFFLINE_AFTER), health.MAX_THRESHOLD)
    unchecked_after = min(
        p.get("unchecked_after", health.DEFAULT_UNCHECKED_AFTER), health.MAX_THRESHOLD
    )
    progress = dict(ctx.state.bus.progress) if ctx.state.bus else {}  # copied on the loop
    return await ctx.state.store.scan(status_view, offline_after, unchecked_after, progress)


def status_view(offline_after: int, unchecked_after: int, progress: dict) -> dict:
    view = health.build(utcnow(), offline_after, unchecked_after, progress)
    view["alerts_open"] = Alert.select().where(Alert.resolved_at.is_null()).count()
    return view


# -- status --watch --------------------------------------------------------------

WATCH_EVERY = 0.5  # seconds between two updates at most as often
WATCH_QUIET = 5.0  # seconds: an update (hosts online) even when no job moved
WATCH_RECENT = 10  # jobs that ended, in the first frame
WATCH_MAX = 10_000  # jobs changed between two updates past which a new snapshot is sent


class FleetWatch:
    """What changed across the fleet's jobs since the last update: gathered
    by bus subscribers (cheap: a set add or dict store per event), taken by
    the streaming method at most every WATCH_EVERY seconds. Past WATCH_MAX
    jobs changed (a caller that does not read) it keeps nothing and asks for
    a new snapshot instead."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.started: set[int] = set()
        self.progress: dict[int, dict] = {}
        self.ended: set[int] = set()
        self.overflowed = False
        self.known: set[int] = set()  # running jobs the caller was told of
        self.wake = asyncio.Event()
        self.subscriptions: list[tuple[type, Callable[[Any], None]]] = [
            (JobDispatched, self._started),
            (JobStarted, self._started),
            (JobProgressed, self._progressed),
            (JobEnded, self._ended),
        ]
        for kind, fn in self.subscriptions:
            bus.subscribe(kind, fn)

    def close(self) -> None:
        for kind, fn in self.subscriptions:
            self.bus.unsubscribe(kind, fn)

    def _changed(self) -> None:
        if len(self.started) + len(self.progress) + len(self.ended) > WATCH_MAX:
            self.overflowed = True
            self.started, self.progress, self.ended = set(), {}, set()
        self.wake.set()

    def _started(self, event: JobDispatched | JobStarted) -> None:
        if not self.overflowed:
            self.started.add(event.job_id)
            self._changed()

    def _progressed(self, event: JobProgressed) -> None:
        if not self.overflowed:
            if event.job_id not in self.known:
                self.started.add(event.job_id)  # began before the snapshot was read
            self.progress[event.job_id] = event.progress
            self._changed()

    def _ended(self, event: JobEnded) -> None:
        if not self.overflowed:
            self.ended.add(event.job_id)
            self.progress.pop(event.job_id, None)
            self._changed()

    def take(self) -> tuple[set[int], dict[int, dict], set[int], bool]:
        taken = (self.started, self.progress, self.ended, self.overflowed)
        self.started, self.progress, self.ended, self.overflowed = set(), {}, set(), False
        self.wake.clear()
        return taken


def fleet_counts() -> dict[str, int]:
    return {
        "hosts": Host.select().count(),
        "hosts_online": Host.select().where(Host.online == True).count(),  # noqa: E712
        "queued": Job.select().where(Job.status == "queued").count(),
    }


def watch_snapshot(progress: dict[int, dict]) -> dict[str, Any]:
    """The first frame (and the one after an overflow): every job with an
    agent and the latest that ended."""
    running = Job.select(Job, Host).join(Host).where(Job.status.in_(WITH_AGENT)).order_by(Job.id)
    recent = (
        Job.select(Job, Host)
        .join(Host)
        .where(Job.status.in_(FINAL_STATUSES))
        .order_by(Job.id.desc())
        .limit(WATCH_RECENT)
    )
    return {
        "type": "snapshot",
        "checked_at": iso(utcnow()),
        **fleet_counts(),
        "running": [health.running_json(j, progress.get(j.id)) for j in running],
        "ended": [views.job_json(j) for j in recent],
    }


def watch_update(started: set[int], progress: dict[int, dict], ended: set[int]) -> dict[str, Any]:
    """What changed: jobs that started (still with their agent), their
    latest progress, and jobs that ended, newest first."""
    rows = {
        j.id: j for j in Job.select(Job, Host).join(Host).where(Job.id.in_(sorted(started | ended)))
    }
    return {
        "type": "update",
        "checked_at": iso(utcnow()),
        **fleet_counts(),
        "started": [
            health.running_json(rows[i], progress.get(i))
            for i in sorted(started - ended)
            if i in rows and rows[i].status in WITH_AGENT
        ],
        "progress": {str(i): p for i, p in sorted(progress.items())},
        "ended": [views.job_json(rows[i]) for i in sorted(ended, reverse=True) if i in rows],
    }


@method("status.watch", Role.VIEWER, ())
async def status_watch(ctx: Context, p: dict) -> None:
    """Stream the fleet's running jobs, updated from events: a snapshot
    (running jobs with their progress, the latest ended), then what
    started, progressed and ended, at most twice a second (and every 5 s
    with the hosts online); it runs until the caller goes away."""
    store, bus = ctx.state.store, ctx.state.bus
    watch = FleetWatch(bus)  # before the snapshot, so nothing falls between
    try:
        snapshot = await store.read(watch_snapshot, dict(bus.progress))
        watch.known = {r["id"] for r in snapshot["running"]}
        await ctx.emit(snapshot)
        while True:
            await changed_or_quiet(watch, ctx)
            started, progress, ended, overflowed = watch.take()
            if overflowed:
                snapshot = await store.read(watch_snapshot, dict(bus.progress))
                watch.known = {r["id"] for r in snapshot["running"]}
                await ctx.emit(snapshot)
            else:
                update = await store.read(watch_update, started, progress, ended)
                watch.known |= {r["id"] for r in update["started"]}
                watch.known -= ended
                await ctx.emit(update)
            await asyncio.sleep(WATCH_EVERY)  # what comes meanwhile is one update
    finally:
        watch.close()


async def changed_or_quiet(watch: FleetWatch, ctx: Context) -> None:
    """Until something changed or WATCH_QUIET passed, unless the caller has
    gone away."""
    waiter = asyncio.ensure_future(watch.wake.wait())
    waits = {waiter} if ctx.closed is None else {waiter, ctx.closed}
    try:
        await asyncio.wait(waits, timeout=WATCH_QUIET, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if ctx.closed is not None and ctx.closed.done():
        raise ConnectionClosedOK(None, None)  # nobody left to stream to
