"""Dispatch: a connected, caught-up host is offered its next due job.

Hosts to offer are collected as events arrive (a job queued, a job ended,
an agent caught up, a retry due) and claimed together: one transaction
claims the next job of every waiting host (`lifecycle.claim`, one
statement each), then the command.run frames go out. The store decides
who gets what, so a dispatch can neither be lost between two awaits nor
given twice; the dispatcher itself holds only the set of hosts to look at.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Protocol

from ...common import protocol
from ..clock import Clock
from ..events import Event, JobEnded, JobQueued
from ..store.db import StoreClosed
from ..store.models import Job
from . import lifecycle

log = logging.getLogger("fleetd.dispatch")

BATCH = 1000  # hosts claimed for in one transaction
BUSY_RETRY = 2.0  # seconds before a host that answered busy is offered again

# command.run keys taken from a job's params (frozen when the job was made):
# every field the protocol gives command.run, but the two fleetd sets itself
COMMAND_KEYS = frozenset(
    f.name for f in protocol.MESSAGES["command.run"].fields if f.name not in ("job_id", "kind")
)


def command_for(job: Job) -> dict[str, Any]:
    cmd: dict[str, Any] = {"job_id": job.id, "kind": job.kind}
    for key, value in (job.params or {}).items():
        if key in COMMAND_KEYS and value not in (None, "", []):
            cmd[key] = value
    return cmd


class Sessions(Protocol):
    def ready(self, host_id: int) -> bool: ...

    async def send_command(self, host_id: int, job_id: int, frame: str) -> bool: ...


class Dispatcher:
    def __init__(self, lifecycle_: lifecycle.Lifecycle, sessions: Sessions, clock: Clock) -> None:
        self.lifecycle = lifecycle_
        self.sessions = sessions
        self.clock = clock
        self._hosts: set[int] = set()
        self._task: Optional[asyncio.Task] = None
        lifecycle_.bus.subscribe(JobQueued, self._queued)
        lifecycle_.bus.subscribe(JobEnded, lambda e: self.offer(e.host_id))  # the host is free

    def _queued(self, event: JobQueued) -> None:
        if event.due:  # a retry waits for its due time (the ticker offers it then)
            self.offer(event.host_id)

    def offer(self, *host_ids: int) -> None:
        """Look at these hosts soon; coalesced with whatever else is waiting."""
        ready = [h for h in host_ids if self.sessions.ready(h)]
        if not ready:
            return
        self._hosts.update(ready)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def offer_later(self, host_id: int, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.offer, host_id)

    async def _run(self) -> None:
        while self._hosts:
            hosts = [self._hosts.pop() for _ in range(min(BATCH, len(self._hosts)))]
            try:
                claimed = await self.lifecycle.apply(self._claim, hosts, self.clock.now())
            except StoreClosed:
                return  # fleetd stops: the jobs stay queued in the store
            except Exception:
                log.exception("dispatching to %d host(s) failed", len(hosts))
                continue
            for job in claimed:
                frame = protocol.encode("command.run", command_for(job))
                if not await self.sessions.send_command(job.host_id, job.id, frame):
                    # the link went between the claim and the send
                    await self.lifecycle.apply(lifecycle.requeue, job.id, "its link dropped")

    @staticmethod
    def _claim(events: list[Event], hosts: list[int], now: Any) -> list[Job]:
        out = []
        for host_id in hosts:
            job = lifecycle.claim(events, host_id, now)
            if job is not None:
                out.append(job)
        return out
