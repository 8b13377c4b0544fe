"""The authenticated /agent session, and the registry of who is connected.

Memory holds sockets; the store holds every fact. A session knows its
socket, whether fleetd has caught up with the agent's spool, and the job
it sent down that socket. Reliable frames go through the shared Ingest
(batched with other agents' into one transaction, acked after commit);
liveness is written in batches too (Presence), not one commit per
heartbeat.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ... import __version__
from ...common import protocol, tlspins
from ...common.protocol import ProtocolError
from ..clock import Clock
from ..events import (
    AgentConnected,
    AgentHello,
    Bus,
    CancelRequested,
    HostOffline,
    HostRemoved,
    JobEnded,
    JobProgressed,
    JobStarted,
    QueryAsked,
    QueryMore,
    QueryPage,
    RepoChanged,
    SchedulesChanged,
    UpgradeAnswered,
    UpgradeRequested,
)
from ..jobs import lifecycle
from ..jobs.dispatch import BUSY_RETRY, Dispatcher
from ..scheduling import schedules
from ..security.secrets import SecretBox, repository_aad
from ..store.db import Store, StoreClosed
from ..store.models import Host, utcnow
from ..store.queries import hot
from .ingest import REFUSED, Ingest, sync_seq, weight
from .queries import Queries, QueryFailed, Relayed

log = logging.getLogger("fleetd.agent")

APPLY_BATCH = 250  # job log lines (or other frames) of one agent handed to the ingest at once
APPLY_BYTES = 1 << 20  # ... and their size on the wire, at most (one bigger frame goes alone)
INBOX = 2000  # frames read ahead of the ingest; past that the socket is not read (backpressure)
LABELS = (
    "agent_version",
    "restic_version",
    "hostname",
    "os",
    "arch",
    "timezone",
    "upgrade_failed",
    "upgrade_error",
)
FEATURES = ["job.logs"]  # told to agents in welcome: they may pack log lines
INBOX_BYTES = 2 << 20  # and bytes: an agent's send window is 1 MiB, so only a rogue one waits
# frames of one agent handled in a row before the loop goes round: frames
# already buffered are read without a suspension, so an agent streaming as
# fast as it can would otherwise hold the loop for a whole socket read
YIELD_EVERY = 64
PRESENCE_EVERY = 1.0  # seconds over which liveness writes are coalesced
# the close an older link of a host gets when a newer one is up (here or elsewhere)
REPLACED = (4000, "replaced by a newer connection of the same host")
PRESENCE_RETRY = 1.0  # seconds before a failed liveness write is tried again


class Inbox:
    """Reliable frames read ahead of the ingest, bounded in frames and in
    bytes: `put` waits while either is full, and the socket is not read
    meanwhile (300 pipelined frames of 1 MiB are not 300 MiB of fleetd).
    One producer (the session's reader), one consumer (its apply loop)."""

    def __init__(self, frames: int = INBOX, size: int = INBOX_BYTES) -> None:
        self.max_frames = frames
        self.max_bytes = size
        self.bytes = 0
        self._items: collections.deque[tuple[Optional[protocol.Envelope], int]] = (
            collections.deque()
        )
        self._put = asyncio.Event()
        self._taken = asyncio.Event()

    def empty(self) -> bool:
        return not self._items

    async def put(self, frame: Optional[protocol.Envelope], size: int) -> None:
        while self._items and (
            len(self._items) >= self.max_frames or self.bytes + size > self.max_bytes
        ):
            self._taken.clear()
            await self._taken.wait()
        self._items.append((frame, size))
        self.bytes += size
        self._put.set()

    async def get(self) -> tuple[Optional[protocol.Envelope], int]:
        """The next frame and its size on the wire."""
        while not self._items:
            self._put.clear()
            await self._put.wait()
        return self.get_nowait()

    def get_nowait(self) -> tuple[Optional[protocol.Envelope], int]:
        frame, size = self._items.popleft()
        self.bytes -= size
        self._taken.set()
        return frame, size


class AgentSession:
    def __init__(self, host_id: int, host_name: str, connection: ServerConnection) -> None:
        self.host_id = host_id
        self.host_name = host_name
        self.connection = connection
        self.inflight: Optional[int] = None  # the job sent down this socket
        self.caught_up = False  # the agent's spool, as of hello, is applied
        self.spool_seq = 0
        self.running_job: Optional[int] = None
        self.inbox: Optional[Inbox] = None  # reliable frames for the apply loop
        self.consumer: Optional[asyncio.Task] = None
        self.welcomed = False  # welcome sent: pushes may follow
        # the agent's own ids of jobs it made itself -> fleetd's (for progress)
        self.agent_jobs: dict[int, int] = {}
        self.schedules_changed = False  # a change committed before that: push after it
        self.features: frozenset[str] = frozenset()  # what the agent said it can do
        self.tls_pins: Optional[list[str]] = None  # the key pins it holds; None: it pins none
        self.served_pin: Optional[str] = None  # the key fleetd served when it connected
        self.epoch: Optional[int] = None  # the link's number (Host.session_epoch), once written

    async def send(self, frame: str) -> bool:
        try:
            await self.connection.send(frame)
            return True
        except ConnectionClosed:
            return False


def repo_config(host_id: int, box: SecretBox) -> Optional[dict]:
    """config.update for a host, decrypted on the store thread: every
    repository it uses, and its default again in the fields an older agent
    reads."""
    repositories = []
    for rid, name, url_enc, password_enc, env_enc, aad in hot.repo_secrets(host_id):
        env = {}
        if env_enc:
            env = json.loads(box.decrypt(bytes(env_enc), repository_aad(aad, "env")))
        repositories.append(
            {
                "id": rid,
                "name": name,
                "url": box.decrypt(bytes(url_enc), repository_aad(aad, "url")),
                "password": box.decrypt(bytes(password_enc), repository_aad(aad, "password")),
                "env": env,
            }
        )
    if not repositories:
        return None
    first = repositories[0]
    return {
        "repo_url": first["url"],
        "repo_password": first["password"],
        "repo_env": first["env"],
        "repositories": repositories,
    }


class Presence:
    """Who is online and when each host was last heard, written in batches.

    Connects and disconnects are group-committed: written at once, together
    with whatever arrived while the previous write was committing, and a
    connect is welcomed once its host shows online. Heartbeats only move
    last_seen_at, so they wait up to PRESENCE_EVERY to share a commit.
    """

    def __init__(self, store: Store, replica: Optional[str] = None) -> None:
        self.store = store
        self.replica = replica  # this fleetd's id among replicas (Host.session_replica)
        self.epochs: dict[int, int] = {}  # host -> the number of its link here, once written
        self._online: dict[int, Optional[dict]] = {}  # host -> hello (None: went offline)
        self._seen: set[int] = set()
        self._waiters: list[asyncio.Future] = []
        self._task: Optional[asyncio.Task] = None
        self._urgent = asyncio.Event()

    def online(self, host_id: int, hello: dict) -> asyncio.Future:
        """Mark the host online; the future is done once that is committed."""
        self._online[host_id] = hello
        return self._urgently()

    def offline(self, host_id: int) -> asyncio.Future:
        """Mark the host offline unless a newer link of it is up through
        another replica; the future's result, once committed, is the set of
        hosts that this write did mark offline."""
        self._online[host_id] = None
        return self._urgently()

    def seen(self, host_id: int) -> None:
        """A heartbeat: nobody waits for it to be written."""
        self._seen.add(host_id)
        self._start()

    def _urgently(self) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._urgent.set()
        self._start()
        return done

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._online or self._seen:
            if not self._online:
                # only heartbeats: a short window to share one commit, unless a
                # connect or disconnect comes first
                try:
                    await asyncio.wait_for(self._urgent.wait(), PRESENCE_EVERY)
                except asyncio.TimeoutError:
                    pass
            await self.flush()

    async def flush(self) -> None:
        while self._online or self._seen:
            self._urgent.clear()
            online, self._online = self._online, {}
            seen, self._seen = self._seen, set()
            waiters, self._waiters = self._waiters, []
            links = [(h, self.epochs.get(h)) for h, hello in online.items() if hello is None]
            try:
                epochs, gone = await self.store.atomic(
                    self._write, self.replica, online, links, seen
                )
            except StoreClosed:
                return  # fleetd stops: every host is marked offline as it does
            except Exception:
                log.exception("writing the presence of %d host(s) failed", len(online) + len(seen))
                # keep it for the next try, under anything newer; nobody is told it is done
                self._online = {**online, **self._online}
                self._seen |= seen
                self._waiters = waiters + self._waiters
                await asyncio.sleep(PRESENCE_RETRY)
                continue
            for host_id, _ in links:
                self.epochs.pop(host_id, None)
            self.epochs.update(epochs)
            marked = frozenset(gone)
            for w in waiters:
                if not w.done():
                    w.set_result(marked)

    @staticmethod
    def _write(
        replica: Optional[str],
        online: dict[int, Optional[dict]],
        links: list[tuple[int, Optional[int]]],
        seen: set[int],
    ) -> tuple[dict[int, int], list[int]]:
        now = utcnow()
        # plain SQL, one prepared statement each: 10,000 agents connecting
        # spent a fifth of fleetd's time building these UPDATEs in peewee
        epochs = hot.mark_online(
            now, replica, [(h, hello) for h, hello in online.items() if hello is not None]
        )
        gone = hot.mark_offline(now, links)
        rest = sorted(seen - set(online))
        for start in range(0, len(rest), 500):
            Host.update(last_seen_at=now).where(Host.id.in_(rest[start : start + 500])).execute()
        return epochs, gone


@dataclass
class Agents:
    """Everything an agent session touches: the registry of sessions, and
    the services it hands frames to."""

    store: Store
    bus: Bus
    box: SecretBox
    clock: Clock
    heartbeat_interval: int = 30
    tls: Any = None  # security.tls.ServedTls; None: fleetd serves no TLS itself
    replica: Optional[str] = None  # this fleetd's id among replicas on one PostgreSQL
    # every replica's URL, this one's first (--public-url), told in welcome
    # so that agents learn of a replica added later; none: not told
    public_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.sessions: dict[int, AgentSession] = {}
        self.lifecycle = lifecycle.Lifecycle(self.store, self.bus)
        self.ingest = Ingest(self.store, self.bus, self.clock)
        self.presence = Presence(self.store, self.replica)
        self.dispatcher = Dispatcher(self.lifecycle, self, self.clock)
        self.queries = Queries()  # ls, find, diff: asked of agents, never stored
        self.stopping = False  # fleetd is shutting down: everyone goes offline at once
        self.bus.subscribe(JobEnded, self._job_ended)
        self.bus.subscribe(JobStarted, self._job_started)
        self.bus.subscribe(HostRemoved, self._host_removed)
        self.bus.subscribe(RepoChanged, self._repo_changed)
        self.bus.subscribe(SchedulesChanged, self._schedules_changed)
        self.bus.subscribe(AgentConnected, self._connected_elsewhere)
        self.bus.subscribe(CancelRequested, self._cancel_requested)
        self.bus.subscribe(UpgradeRequested, self._upgrade_requested)
        # queries for agents connected through another replica, and theirs for ours
        # host -> the newest link number heard of through other replicas
        # while the link here was being written (AgentConnected)
        self._elsewhere: dict[int, int] = {}
        self.relayed = Relayed(self.replica, self.bus.publish, self.box) if self.replica else None
        if self.relayed is not None:
            self.bus.subscribe(QueryAsked, self._query_asked, local=False)
            self.bus.subscribe(QueryPage, self.relayed.page, local=False)
            self.bus.subscribe(QueryMore, self.relayed.more, local=False)

    # -- the registry (dispatch and the API use these) ---------------------

    def connected(self, host_id: int) -> bool:
        return host_id in self.sessions

    def ready(self, host_id: int) -> bool:
        session = self.sessions.get(host_id)
        return session is not None and session.caught_up

    def features(self, host_id: int) -> frozenset[str]:
        session = self.sessions.get(host_id)
        return session.features if session is not None else frozenset()

    async def reach(self, host_id: int) -> Optional[frozenset[str]]:
        """What the host's agent can do if it is connected here or, with
        replicas, through another one; None when it is offline."""
        session = self.sessions.get(host_id)
        if session is not None or self.replica is None:  # no store trip
            return session.features if session is not None else None
        return await self.store.read(self.reach_now, host_id)

    async def rejoin(self) -> None:
        """This replica was taken for dead (a long pause) and its hosts
        marked offline: those whose links here are still up are online
        again (fleet.server.replicas)."""
        links = [(h, s.epoch) for h, s in self.sessions.items() if s.epoch is not None]
        if self.replica is not None and links:
            back = await self.store.atomic(hot.mark_back, self.replica, links)
            log.info("%d host(s) online again through this replica", len(back))

    def reach_now(self, host_id: int) -> Optional[frozenset[str]]:
        """As reach, on the store thread."""
        session = self.sessions.get(host_id)
        if session is not None:
            return session.features
        return hot.link_features(host_id) if self.replica is not None else None

    def upgrade(self, host_id: int, data: dict) -> None:
        """agent.upgrade to the host's agent, through whichever replica
        holds its link (this one included)."""
        self.bus.publish([UpgradeRequested(host_id, data)])

    def _upgrade_requested(self, event: UpgradeRequested) -> None:
        session = self.sessions.get(event.host_id)
        if session is not None:
            asyncio.ensure_future(session.send(protocol.encode("agent.upgrade", event.upgrade)))

    async def send_to(self, host_id: int, frame: str) -> bool:
        """A frame to the host's agent; False when its link is down."""
        session = self.sessions.get(host_id)
        return session is not None and await session.send(frame)

    async def send_command(self, host_id: int, job_id: int, frame: str) -> bool:
        session = self.sessions.get(host_id)
        if session is None:
            return False
        session.inflight = job_id
        return await session.send(frame)

    async def cancel(self, host_id: int, job_id: int, uid: Optional[str] = None) -> bool:
        """Ask the agent to stop the job; False when its link is down. A job
        the agent made itself (from a schedule fire) it knows by its uid."""
        session = self.sessions.get(host_id)
        if session is None:
            return False
        data: dict = {"job_id": job_id}
        if uid is not None:
            data["uid"] = uid
        return await session.send(protocol.encode("command.cancel", data))

    async def push_config(self, host_id: int) -> None:
        session = self.sessions.get(host_id)
        if session is None:
            return  # sent on its next hello
        config = await self.store.read(repo_config, host_id, self.box)
        if config is not None:
            await session.send(protocol.encode("config.update", config))

    async def push_schedules(self, host_id: int) -> None:
        """The host's current schedule set, to its agent if connected (an
        agent that misses it gets it after its next hello)."""
        session = self.sessions.get(host_id)
        if session is None:
            return
        try:
            data = await self.store.read(schedules.schedule_set, host_id)
        except StoreClosed:
            return
        except Exception:
            log.exception("reading the schedule set of host %s failed", session.host_name)
            return
        if self.sessions.get(host_id) is session:  # not replaced meanwhile
            await session.send(protocol.encode("schedule.set", data))

    async def push_pins(self) -> int:
        """The key pins agents are to hold (the served key's and the staged
        one's), to every connected agent that pins keys and was served the
        current key; how many were sent it. The others get it at hello."""
        if self.tls is None:
            return 0
        pins = self.tls.pins()
        frame = protocol.encode("tls.pins", {"pins": pins})
        sent = 0
        for session in list(self.sessions.values()):
            # a session not yet welcomed gets the set in its welcome, not before it
            if (
                session.welcomed
                and session.tls_pins is not None
                and session.served_pin == self.tls.pin
            ):
                sent += await session.send(frame)
        return sent

    async def redial_all(self, reason: str, served_pin: str) -> int:
        """Close the links of the agents connected while fleetd served the key
        `served_pin`: they redial, and check the key served now at once."""
        closing = [s for s in self.sessions.values() if s.served_pin == served_pin]
        for session in closing:
            try:
                await session.connection.close(4002, reason)
            except ConnectionClosed:
                pass
        return len(closing)

    async def disconnect(self, host_id: int, reason: str) -> None:
        session = self.sessions.get(host_id)
        if session is not None:
            log.warning("closing the link of host %s: %s", session.host_name, reason)
            await session.connection.close(4001, reason)

    def _job_ended(self, event: JobEnded) -> None:
        session = self.sessions.get(event.host_id)
        if session is not None and session.inflight == event.job_id:
            session.inflight = None

    def _job_started(self, event: JobStarted) -> None:
        session = self.sessions.get(event.host_id)
        if event.agent_job is not None and session is not None:
            session.agent_jobs[event.agent_job] = event.job_id  # its progress comes by that id
        if event.cancel_requested:  # the cancel may have reached the agent before the job
            asyncio.ensure_future(self.cancel(event.host_id, event.job_id, event.uid))

    def _schedules_changed(self, event: SchedulesChanged) -> None:
        session = self.sessions.get(event.host_id)
        if session is None:
            return
        if session.welcomed:
            asyncio.ensure_future(self.push_schedules(event.host_id))
        else:  # nothing goes before welcome: pushed right after it
            session.schedules_changed = True

    def _connected_elsewhere(self, event: AgentConnected) -> None:
        """The host's agent connected through another replica: a link of
        it here is older (a dropped link this side has not noticed, or the
        agent failed over): closed, as on one fleetd."""
        if event.replica == self.replica:
            return
        session = self.sessions.get(event.host_id)
        if session is None:
            return
        if session.epoch is None:  # not written yet: compared once it is
            newer = self._elsewhere.get(event.host_id, 0)
            self._elsewhere[event.host_id] = max(newer, event.epoch)
            return
        if session.epoch >= event.epoch:
            return
        self._replace(session)

    def _replace(self, session: AgentSession) -> None:
        log.warning(
            "host %s connected again through another fleetd; closing its link here",
            session.host_name,
        )
        asyncio.ensure_future(session.connection.close(*REPLACED))

    def _cancel_requested(self, event: CancelRequested) -> None:
        """A cancel asked of any replica: the one holding the agent's link sends it."""
        if event.host_id in self.sessions:
            asyncio.ensure_future(self.cancel(event.host_id, event.job_id, event.uid))

    def _host_removed(self, event: HostRemoved) -> None:
        asyncio.ensure_future(self.disconnect(event.host_id, "host removed from fleetd"))

    def _repo_changed(self, event: RepoChanged) -> None:
        async def push_then_init() -> None:
            await self.push_config(event.host_id)  # the agent has it before any job needs it
            self.dispatcher.offer(event.host_id)  # auto-init for a new repository

        asyncio.ensure_future(push_then_init())

    async def _attach(self, session: AgentSession) -> None:
        old = self.sessions.get(session.host_id)
        self.sessions[session.host_id] = session
        if old is not None and old.connection is not session.connection:
            log.warning(
                "host %s connected again; closing its previous connection", session.host_name
            )
            await old.connection.close(*REPLACED)

    def query(
        self, host_id: int, kind: str, params: dict[str, Any]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Ask the host's agent a query (see agents.queries): its pages.
        Raises QueryFailed (offline, or an agent without queries)."""
        session = self.sessions.get(host_id)
        if session is None and self.relayed is not None:
            # through the replica holding its link (browse_target saw it online)
            return self.relayed.ask(host_id, kind, params)
        if session is None:
            raise QueryFailed("offline", "the host's agent is offline")
        if "queries" not in session.features:
            raise QueryFailed(
                "unsupported", "the host's fleet-agent is too old to browse: deploy the new one"
            )
        return self.queries.ask(session.send, session, kind, params)

    def _query_asked(self, event: QueryAsked) -> None:
        if event.host_id in self.sessions and self.relayed is not None:
            asyncio.ensure_future(self.relayed.answer(event, self.query))

    def _detach(self, session: AgentSession) -> bool:
        """Forget the session; False when a newer one already replaced it."""
        self.queries.link_gone(session)  # what was asked down it gets no answer
        if self.sessions.get(session.host_id) is session:
            del self.sessions[session.host_id]
            return True
        return False

    # -- one session --------------------------------------------------------

    async def serve(self, connection: ServerConnection, host_id: int, host_name: str) -> None:
        """hello -> welcome and config.update; then reliable frames go to the
        ingest in batches (acked once committed), while heartbeats, progress
        and command results are handled as they come. Silence for three
        heartbeat intervals ends the session."""
        hello = await self._hello(connection)
        if hello is None:
            return
        session = AgentSession(host_id, host_name, connection)
        session.running_job = hello.data.get("running_job")
        session.inflight = session.running_job
        session.spool_seq = hello.data.get("spool_seq", 0)
        session.features = frozenset(hello.data.get("features") or ())
        if "tls_pins" in hello.data:  # shown to operators: pins only, nothing else
            hello.data["tls_pins"] = [p for p in hello.data["tls_pins"] if tlspins.PIN_RE.match(p)]
            session.tls_pins = hello.data["tls_pins"]
        hello.data["tls_trust"] = trust_of(hello.data)
        if self.tls is not None:
            session.served_pin = self.tls.pin
        await self._attach(session)  # an older session's end then sees it replaced
        marked = self.presence.online(host_id, hello.data)
        log.info("host %s connected (agent %s)", host_name, hello.data["agent_version"])
        try:
            last_seq, config, schedule_set, agent_job = await self.store.atomic(
                self._open, host_id, hello.data
            )
            if agent_job is not None:
                session.agent_jobs[session.running_job] = agent_job  # type: ignore[index]
            await marked
            session.epoch = self.presence.epochs.get(host_id)
            if self.replica is not None and session.epoch is not None:
                if self._elsewhere.pop(host_id, 0) > session.epoch:
                    self._replace(session)  # a newer link through another replica came first
                self.bus.publish([AgentConnected(host_id, session.epoch, self.replica)])
            welcome = {
                "server_version": __version__,
                "heartbeat_interval": self.heartbeat_interval,
                "host_id": host_id,
                "host_name": host_name,
                "features": FEATURES,
            }
            if self.public_urls:
                welcome["urls"] = list(self.public_urls)
            await connection.send(protocol.encode("welcome", welcome, id=hello.id))
            if config is not None:
                await connection.send(protocol.encode("config.update", config))
            if schedule_set is not None:
                await connection.send(protocol.encode("schedule.set", schedule_set))
            if (
                self.tls is not None
                and session.tls_pins is not None
                and session.served_pin == self.tls.pin
                and session.tls_pins != self.tls.pins()
            ):  # an agent from before key pins learns them here, over a checked link
                await connection.send(protocol.encode("tls.pins", {"pins": self.tls.pins()}))
            session.welcomed = True
            self.bus.publish(
                [
                    AgentHello(
                        host_id,
                        hello.data["agent_version"],
                        hello.data.get("upgrade_failed"),
                        hello.data.get("upgrade_error"),
                    )
                ]
            )
            if hello.data.get("upgrade_failed"):
                log.warning(
                    "host %s rolled back its upgrade to fleet-agent %s: %s",
                    host_name,
                    hello.data["upgrade_failed"],
                    hello.data.get("upgrade_error") or "no reason given",
                )
            if session.schedules_changed:  # since the set above was read
                await self.push_schedules(host_id)
            await self._catch_up(session, last_seq)
            await self._receive(session)
        except ConnectionClosed:
            pass
        finally:
            # apply what arrived before the link dropped, then let go; but
            # not while fleetd stops: the agent resends what was not acked,
            # so a backlog of reports does not hold the stop up
            if session.inbox is not None:
                if self.stopping:
                    session.consumer.cancel()
                else:
                    await session.inbox.put(None, 0)
                await asyncio.gather(session.consumer, return_exceptions=True)
            self._elsewhere.pop(host_id, None)
            if self._detach(session) and not self.stopping:
                gone = await self.presence.offline(host_id)  # committed before anyone looks
                if host_id in gone:
                    self.bus.publish([HostOffline(host_id)])
                    log.info("host %s disconnected", host_name)
                else:
                    log.info(
                        "host %s disconnected here; it is connected through another fleetd",
                        host_name,
                    )

    def _open(
        self, host_id: int, hello: dict
    ) -> tuple[int, Optional[dict], Optional[dict], Optional[int]]:
        """At hello, in one transaction: the seq fleetd is caught up at, the
        repository configuration, the schedule set (None: the agent holds
        the current one) and fleetd's id of a job the agent runs under its
        own id."""
        last = sync_seq(host_id, hello.get("spool_seq", 0), hello.get("spool_pending", 0))
        pushed = schedules.on_hello(
            [], host_id, hello.get("schedule_version", 0), hello.get("timezone")
        )
        running = hello.get("running_job")
        mine = hot.job_of_agent(host_id, running) if running is not None and running < 0 else None
        return last, repo_config(host_id, self.box), pushed, mine

    async def _hello(self, connection: ServerConnection) -> Optional[protocol.Envelope]:
        try:
            raw = await asyncio.wait_for(connection.recv(), self.heartbeat_interval)
            hello = protocol.decode(raw, expect="agent")
            if hello.type != "hello":
                raise ProtocolError(f"the first frame must be hello, not {hello.type}", re=hello.id)
        except ProtocolError as exc:
            await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
            await connection.close(1008, "expected hello")
            return None
        except (asyncio.TimeoutError, ConnectionClosed):
            return None
        if hello.data["protocol_version"] != protocol.PROTOCOL_VERSION:
            message = (
                f"protocol version {hello.data['protocol_version']} is not supported; "
                f"this fleetd speaks {protocol.PROTOCOL_VERSION}"
            )
            await connection.send(protocol.error_frame("unsupported_version", message, hello.id))
            await connection.close(1008, "unsupported protocol version")
            return None
        for key in LABELS:  # shown to operators and logged: no escape sequences
            if isinstance(hello.data.get(key), str):
                hello.data[key] = protocol.printable(hello.data[key])
        return hello

    async def _enqueue(self, session: AgentSession, frame: protocol.Envelope, size: int) -> None:
        """Hand a reliable frame (`size` bytes on the wire) to the session's
        apply loop, which starts with the first one (an idle agent costs no
        queue and no task)."""
        if session.inbox is None:
            session.inbox = Inbox()
            session.consumer = asyncio.ensure_future(self._apply_loop(session, session.inbox))
        await session.inbox.put(frame, size)  # waits when the ingest is behind: backpressure

    async def _receive(self, session: AgentSession) -> None:
        connection = session.connection
        silence = 3 * self.heartbeat_interval
        loop = asyncio.get_running_loop()
        heard = loop.time()

        def watchdog() -> None:
            # one timer per session, moved only when it fires: not one per frame
            nonlocal timer
            quiet = loop.time() - heard
            if quiet < silence:
                timer = loop.call_later(silence - quiet, watchdog)
                return
            log.warning("host %s silent for %d s: marking it offline", session.host_name, silence)
            # a silent peer will not answer a closing handshake: drop the link now
            connection.transport.abort()

        timer = loop.call_later(silence, watchdog)
        in_a_row = 0
        try:
            async for raw in connection:
                heard = loop.time()
                in_a_row += 1
                if in_a_row == YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)  # let the others have the loop
                try:
                    frame = protocol.decode(raw, expect="agent")
                except ProtocolError as exc:
                    log.warning("bad frame from %s: %s", session.host_name, exc)
                    await connection.send(protocol.error_frame(exc.code, str(exc), exc.re))
                    if exc.seq is not None:  # passed in seq order, so it wedges nothing
                        refused = protocol.Envelope(REFUSED, {"error": str(exc)}, seq=exc.seq)
                        await self._enqueue(session, refused, len(raw))
                    continue
                if frame.type in protocol.RELIABLE:
                    await self._enqueue(session, frame, len(raw))
                    continue
                handler = FRAME_HANDLERS.get(frame.type)
                if handler is not None:
                    await handler(self, session, frame.data)
                else:
                    log.info("host %s sent %s; ignored", session.host_name, frame.type)
        finally:
            timer.cancel()

    async def _apply_loop(self, session: AgentSession, inbox: Inbox) -> None:
        """Hand reliable frames to the ingest in batches; ack each once committed."""
        while True:
            first, size = await inbox.get()
            batch = [first] if first is not None else []
            lines = weight(first) if first is not None else 0
            while not inbox.empty() and lines < APPLY_BATCH and size < APPLY_BYTES:
                frame, more = inbox.get_nowait()
                if frame is None:
                    first = None
                    break
                batch.append(frame)
                lines += weight(frame)
                size += more
            if batch:
                try:
                    last = await self.ingest.submit(session.host_id, batch)
                except Exception:
                    if self.stopping:
                        return  # nothing was acked: the agent resends after the restart
                    # nothing was acked: drop the link, the agent resends on reconnect
                    log.warning(
                        "frames of host %s not applied; closing its link", session.host_name
                    )
                    session.connection.transport.abort()
                    return
                await session.send(protocol.encode("ack", {"seq": last}))
                if not session.caught_up:
                    await self._catch_up(session, last)
            if first is None:
                return

    async def _catch_up(self, session: AgentSession, applied: int) -> None:
        """Once fleetd holds everything the agent had spooled at hello, what is
        still with the agent in the store but not running there is lost (or
        back in the queue if it never started); then dispatch."""
        if session.caught_up or applied < session.spool_seq:
            return
        lost, cancels = await self.lifecycle.apply(
            lifecycle.back,
            session.host_id,
            session.running_job,
            "the agent restarted or lost the job before reporting its end",
        )
        for job_id in lost:
            log.warning(
                "job %s of %s lost: the agent came back without it", job_id, session.host_name
            )
        for job_id, uid in cancels:  # an agent that already stopped it ignores this
            await self.cancel(session.host_id, job_id, protocol.fire_uid_of(uid))
        session.caught_up = True
        self.dispatcher.offer(session.host_id)


# -- frames handled as they come (reliable ones go to the ingest) -------------


async def on_heartbeat(agents: Agents, session: AgentSession, data: dict) -> None:
    agents.presence.seen(session.host_id)


async def on_progress(agents: Agents, session: AgentSession, data: dict) -> None:
    if data["job_id"] < 0:  # a job the agent made itself, under its own id
        job_id = session.agent_jobs.get(data["job_id"])
        if job_id is not None:
            progress = {**data, "job_id": job_id}
            agents.bus.publish([JobProgressed(job_id, session.host_id, progress)])
        return
    if data["job_id"] == session.inflight:  # only its own job
        agents.bus.publish([JobProgressed(data["job_id"], session.host_id, data)])


async def on_schedule_ack(agents: Agents, session: AgentSession, data: dict) -> None:
    try:
        known = await agents.store.atomic(schedules.acknowledged, session.host_id, data["version"])
    except StoreClosed:
        return
    if not known:
        log.warning(
            "host %s acknowledged schedule version %s, which fleetd never made",
            session.host_name,
            data["version"],
        )


def trust_of(hello: dict) -> Optional[str]:
    """How an agent trusts fleetd, from its hello (Host.tls_trust)."""
    if "tls_pins" in hello:
        return "pins" if hello["tls_pins"] else "certificate"
    if "tls.pins" in (hello.get("features") or ()):
        return "unpinned"
    return None  # an agent older than key pins: it may pin a certificate


async def on_tls_ack(agents: Agents, session: AgentSession, data: dict) -> None:
    """The key pins the agent holds now (it stored them before saying so)."""
    if data.get("error"):
        log.warning("host %s kept its key pins: %s", session.host_name, data["error"])
    if not data["pins"]:
        return  # it holds none yet (a certificate pin): nothing new to record
    try:
        pins = tlspins.check_pins(data["pins"])
    except tlspins.PinError as exc:
        log.warning("host %s acknowledged pins fleetd cannot read: %s", session.host_name, exc)
        return
    session.tls_pins = pins
    try:
        await agents.store.atomic(record_pins, session.host_id, pins)
    except StoreClosed:
        return


def record_pins(host_id: int, pins: list[str]) -> None:
    Host.update(tls_trust="pins", tls_pins=pins, tls_pins_at=utcnow()).where(
        Host.id == host_id
    ).execute()


async def on_command_result(agents: Agents, session: AgentSession, data: dict) -> None:
    job_id = data["job_id"]
    if data["accepted"] or job_id != session.inflight:
        return  # an answer about a job this session was not sent counts for nothing
    reason = data.get("error") or "refused"
    log.warning("host %s refused job %s: %s", session.host_name, job_id, reason)
    session.inflight = None
    if data.get("code") == "busy" or reason.startswith("busy"):
        # it stays queued; offered again shortly in case no job end is coming to trigger it
        await agents.lifecycle.apply(lifecycle.requeue, job_id, reason, False)
        agents.dispatcher.offer_later(session.host_id, BUSY_RETRY)
    else:
        await agents.lifecycle.apply(
            lifecycle.fail, session.host_id, job_id, f"the agent refused the job: {reason}"
        )


async def on_upgrade_result(agents: Agents, session: AgentSession, data: dict) -> None:
    version = protocol.printable(data["version"])  # an agent's words, for fleetd's log
    if data["accepted"]:
        log.info("host %s restarts as fleet-agent %s", session.host_name, version)
    else:
        log.warning(
            "host %s did not upgrade to fleet-agent %s (%s): %s",
            session.host_name,
            version,
            data.get("code") or "refused",
            protocol.printable(data.get("error") or "no reason given"),
        )
    error = data.get("error")
    agents.bus.publish(
        [
            UpgradeAnswered(
                session.host_id,
                data["version"],
                data["accepted"],
                data.get("code"),
                protocol.printable(error) if error else None,  # shown to operators
            )
        ]
    )


async def on_query_result(agents: Agents, session: AgentSession, data: dict) -> None:
    agents.queries.deliver(session, data)


FRAME_HANDLERS = {
    "query.result": on_query_result,
    "heartbeat": on_heartbeat,
    "job.progress": on_progress,
    "command.result": on_command_result,
    "schedule.ack": on_schedule_ack,
    "upgrade.result": on_upgrade_result,
    "tls.ack": on_tls_ack,
}
