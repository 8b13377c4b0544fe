"""Live state on fleetd's event loop: agent sessions, job dispatch, tails.

The store is the truth; the hub only knows who is connected, which job
each agent is running, and who is watching which job.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from typing import Any, Optional

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..common import protocol
from . import jobs
from .secrets import SecretBox, repo_aad
from .store.db import Store
from .store.models import Repo

log = logging.getLogger("fleetd.hub")


class AgentSession:
    def __init__(self, host_id: int, host_name: str, connection: ServerConnection) -> None:
        self.host_id = host_id
        self.host_name = host_name
        self.connection = connection
        self.inflight: Optional[int] = None  # the job this agent is running
        self.caught_up = False  # the agent's spool, as of hello, is applied
        self.spool_seq = 0
        self.running_job: Optional[int] = None

    async def send(self, frame: str) -> bool:
        try:
            await self.connection.send(frame)
            return True
        except ConnectionClosed:
            return False


def repo_config(host_id: int, box: SecretBox) -> Optional[dict]:
    """config.update for a host, decrypted on the store thread."""
    repo = Repo.get_or_none(Repo.host == host_id)
    if repo is None:
        return None
    env = {}
    if repo.env_enc:
        env = json.loads(box.decrypt(repo.env_enc, repo_aad(host_id, "env")))
    return {
        "repo_url": box.decrypt(repo.url_enc, repo_aad(host_id, "url")),
        "repo_password": box.decrypt(repo.password_enc, repo_aad(host_id, "password")),
        "repo_env": env,
    }


class Hub:
    def __init__(self, store: Store, box: SecretBox) -> None:
        self.store = store
        self.box = box
        self.sessions: dict[int, AgentSession] = {}
        self.watchers: dict[int, set[asyncio.Queue]] = defaultdict(set)
        self.progress: dict[int, dict] = {}  # latest job.progress per running job
        self._dispatching: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    # -- sessions ---------------------------------------------------------

    async def attach(self, session: AgentSession) -> None:
        old = self.sessions.get(session.host_id)
        self.sessions[session.host_id] = session
        if old is not None and old.connection is not session.connection:
            log.warning(
                "host %s connected again; closing its previous connection", session.host_name
            )
            await old.connection.close(4000, "replaced by a newer connection of the same host")

    def detach(self, session: AgentSession) -> bool:
        """Forget the session; False when a newer one already replaced it."""
        if self.sessions.get(session.host_id) is session:
            del self.sessions[session.host_id]
            return True
        return False

    async def disconnect(self, host_id: int, reason: str) -> None:
        session = self.sessions.get(host_id)
        if session is not None:
            log.warning("closing the link of host %s: %s", session.host_name, reason)
            await session.connection.close(4001, reason)

    # -- pushes -----------------------------------------------------------

    async def push_config(self, host_id: int) -> None:
        session = self.sessions.get(host_id)
        if session is None:
            return  # sent on its next hello
        config = await self.store.run(repo_config, host_id, self.box)
        if config is not None:
            await session.send(protocol.encode("config.update", config))

    async def dispatch(self, host_id: int) -> None:
        """Send the host its next queued job if it is connected and idle."""
        session = self.sessions.get(host_id)
        if session is None or not session.caught_up:
            return  # dispatched when the agent is back and caught up
        async with self._dispatching[host_id]:
            if session.inflight is not None:
                return
            if await self.store.atomic(jobs.needs_init, host_id):
                await self.store.atomic(jobs.create_job, host_id, "init", "system")
            command = await self.store.run(jobs.next_job, host_id)
            if command is None:
                return
            session.inflight = command["job_id"]
            if not await session.send(protocol.encode("command.run", command)):
                session.inflight = None

    def dispatch_later(self, host_id: int, delay: float) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay + 0.5, lambda: asyncio.ensure_future(self.dispatch(host_id)))

    async def dispatch_all(self) -> None:
        """Offer every connected idle host its next due job (retries whose delay
        ran out while fleetd restarted, and any dispatch a race skipped)."""
        for host_id in list(self.sessions):
            await self.dispatch(host_id)

    def dispatch_lock(self, host_id: int) -> asyncio.Lock:
        """Held while a job of the host is being chosen and sent: a cancel
        takes it too, so it never falls between the two."""
        return self._dispatching[host_id]

    async def cancel(self, host_id: int, job_id: int) -> bool:
        """Ask the agent to stop the job it runs; False when it does not run it."""
        session = self.sessions.get(host_id)
        if session is None or session.inflight != job_id:
            return False
        return await session.send(protocol.encode("command.cancel", {"job_id": job_id}))

    # -- live tails -------------------------------------------------------

    def subscribe(self, job_id: int) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: int, queue: asyncio.Queue) -> None:
        watchers = self.watchers.get(job_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self.watchers[job_id]

    def publish(self, event: dict[str, Any]) -> None:
        if event["type"] == "finished":
            self.progress.pop(event["job_id"], None)
        for queue in self.watchers.get(event["job_id"], ()):
            queue.put_nowait(event)

    def report_progress(self, progress: dict) -> None:
        self.progress[progress["job_id"]] = progress
        self.publish({"job_id": progress["job_id"], "type": "progress", "progress": progress})

    def job_ended(self, session: AgentSession, job_id: int) -> None:
        self.progress.pop(job_id, None)
        if session.inflight == job_id:
            session.inflight = None
