"""Dispatch: a connected, caught-up host is offered its next due job.

Hosts to offer are collected as events arrive (a job queued, a job ended,
an agent caught up, a retry due) and claimed together: one transaction
claims the next job of every waiting host (`lifecycle.claim`, one
statement each). A run-now claims its job in the transaction that makes it
(`claim_now`): one trip through the store instead of two. Whoever claimed,
the command.run goes out when the claim's JobDispatched is published, that
is once the claim is committed. The store decides who gets what, so a
dispatch can neither be lost between two awaits nor given twice; the
dispatcher itself holds only the set of hosts to look at and the commands
to send.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Optional, Protocol

from ...common import protocol
from ...common.protocol import ProtocolError
from ..clock import Clock
from ..events import Event, HostOffline, JobDispatched, JobEnded, JobQueued, RepositoryFreed
from ..store.db import StoreClosed
from ..store.models import Job
from ..store.queries import hot
from . import lifecycle

log = logging.getLogger("fleetd.dispatch")

BATCH = 1000  # hosts claimed for in one transaction
BUSY_RETRY = 2.0  # seconds before a host that answered busy is offered again
CONTENDED_RETRY = 0.1  # seconds before a host whose repository was being claimed on is again
REPOSITORIES = "repositories"  # an agent's hello feature: it holds every repository of its host
# job kinds an agent runs only when its hello says so (an older one drops them)
KIND_FEATURES = {"restore": "restore", "drill": "drills"}

# command.run keys taken from a job's params (frozen when the job was made):
# every field the protocol gives command.run, but the two fleetd sets itself
COMMAND_KEYS = frozenset(
    f.name
    for f in protocol.MESSAGES["command.run"].fields
    if f.name not in ("job_id", "kind", "uid", "repository_id", "from_repository_id")
)


def command_for(
    job_id: int,
    kind: str,
    params: Optional[dict[str, Any]],
    uid: Optional[str] = None,
    repository_id: Optional[int] = None,
    from_repository_id: Optional[int] = None,
) -> dict[str, Any]:
    cmd: dict[str, Any] = {"job_id": job_id, "kind": kind}
    if repository_id is not None:  # an older agent ignores it: it has one, the default
        cmd["repository_id"] = repository_id
    if from_repository_id is not None:
        cmd["from_repository_id"] = from_repository_id
    if protocol.fire_uid_of(uid):
        # a job of a schedule fire: the agent may have made it already,
        # having run the fire on its own while fleetd was out of reach
        cmd["uid"] = uid
    for key, value in (params or {}).items():
        if key in COMMAND_KEYS and value not in (None, "", []):
            cmd[key] = value
    return cmd


class Sessions(Protocol):
    def ready(self, host_id: int) -> bool: ...

    def features(self, host_id: int) -> frozenset[str]: ...

    async def send_command(self, host_id: int, job_id: int, frame: str) -> bool: ...


class Dispatcher:
    def __init__(self, lifecycle_: lifecycle.Lifecycle, sessions: Sessions, clock: Clock) -> None:
        self.lifecycle = lifecycle_
        self.sessions = sessions
        self.clock = clock
        self._hosts: set[int] = set()
        self._task: Optional[asyncio.Task] = None
        self._outbox: collections.deque[JobDispatched] = collections.deque()
        self._sender: Optional[asyncio.Task] = None
        lifecycle_.bus.subscribe(JobQueued, self._queued)
        # the host is free, and the repository maybe for the hosts sharing it
        lifecycle_.bus.subscribe(JobEnded, lambda e: self.offer(e.host_id, *e.also))
        lifecycle_.bus.subscribe(RepositoryFreed, lambda e: self.offer(*e.host_ids))
        lifecycle_.bus.subscribe(HostOffline, self._host_offline)
        # a claim is made by the replica holding the host's link: it sends it
        lifecycle_.bus.subscribe(JobDispatched, self._dispatched, remote=False)

    def _host_offline(self, event: HostOffline) -> None:
        """A queued job of an offline host no longer goes first in its
        repository: the hosts sharing it may go."""

        async def look() -> None:
            try:
                waiting = await self.lifecycle.store.read(hot.sharing_hosts_waiting, event.host_id)
            except StoreClosed:
                return
            self.offer(*waiting)

        asyncio.ensure_future(look())

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

    def claim_now(self, events: list[Event], host_id: int) -> Optional[Job]:
        """On the store thread, in the transaction that just queued a job for
        the host: claim its next job there and then when the host is ready.
        (Reading the sessions from this thread is a race that costs nothing:
        a host seen ready that just dropped gets its job requeued when the
        send fails, and one not yet seen ready is offered when it is.)"""
        if not self.sessions.ready(host_id):
            return None
        try:
            return lifecycle.claim(events, host_id, self.clock.now())
        except hot.Contended:
            return None  # its JobQueued offers the host again

    def offer_later(self, host_id: int, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.offer, host_id)

    async def _run(self) -> None:
        while self._hosts:
            hosts = [self._hosts.pop() for _ in range(min(BATCH, len(self._hosts)))]
            try:
                contended = await self.lifecycle.apply(self._claim, hosts, self.clock.now())
                for host_id in contended:  # another replica claims on its repository
                    self.offer_later(host_id, CONTENDED_RETRY)
            except StoreClosed:
                return  # fleetd stops: the jobs stay queued in the store
            except Exception:
                log.exception("dispatching to %d host(s) failed", len(hosts))

    def _dispatched(self, event: JobDispatched) -> None:
        self._hosts.discard(event.host_id)  # claimed already: nothing to look at
        self._outbox.append(event)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._outbox:
            event = self._outbox.popleft()
            why = self._unsendable(event)
            try:
                frame = protocol.encode(
                    "command.run",
                    command_for(
                        event.job_id,
                        event.kind,
                        event.params,
                        event.uid,
                        event.repository_id,
                        event.from_repository_id,
                    ),
                )
            except ProtocolError as exc:  # a job made from what an agent reported, gone wrong
                why = f"the job cannot be sent to its agent: {exc}"
            if why is not None:
                await self._fail(event, why)
                continue
            if await self.sessions.send_command(event.host_id, event.job_id, frame):
                continue
            try:  # the link went between the claim and the send
                await self.lifecycle.apply(lifecycle.requeue, event.job_id, "its link dropped")
            except StoreClosed:
                return  # the agent finds the job dispatched when it is back: requeued then
            except Exception:
                log.exception("requeueing job %s failed", event.job_id)

    def _unsendable(self, event: JobDispatched) -> Optional[str]:
        """Why the job must not go to the host's agent: one that predates
        several repositories per host runs every job on its default, so a
        job on another one (a forget with another retention, a prune) would
        act on the wrong repository; one that predates a job kind drops the
        command unanswered (the host's queue would wait on it for ever), or
        would take a dry run for a restore."""
        needs = KIND_FEATURES.get(event.kind)
        if needs is not None and needs not in self.sessions.features(event.host_id):
            return (
                f"this host's fleet-agent predates {event.kind} jobs "
                f"(it does not say '{needs}'): upgrade fleet-agent"
            )
        if not event.off_default or REPOSITORIES in self.sessions.features(event.host_id):
            return None
        return (
            "this host's fleet-agent predates hosts with several repositories and would "
            "run the job on its default repository: upgrade fleet-agent"
        )

    async def _fail(self, event: JobDispatched, why: str) -> None:
        log.warning("job %s not sent: %s", event.job_id, why)
        try:
            await self.lifecycle.apply(lifecycle.fail, event.host_id, event.job_id, why)
        except StoreClosed:
            return
        except Exception:
            log.exception("failing job %s failed", event.job_id)

    @staticmethod
    def _claim(events: list[Event], hosts: list[int], now: Any) -> list[int]:
        """Claim for each host; returns those to look at again (contended)."""
        contended = []
        for host_id in hosts:  # each claim appends its JobDispatched: sent from there
            try:
                lifecycle.claim(events, host_id, now)
            except hot.Contended:
                contended.append(host_id)
        return contended
