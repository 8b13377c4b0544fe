"""Domain events and the bus that carries them.

Events are published once the transaction that made them has committed, so
a subscriber that reads the store sees what the event says. Subscribers are
plain callables that must not block (they schedule work); live tails watch
one job through a bounded queue. On one node the bus is in-process; across
replicas it becomes a wake-up pointing at an events table.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union, get_args

log = logging.getLogger("fleetd.events")


@dataclass(frozen=True)
class JobQueued:
    job_id: int
    host_id: int
    due: bool = True  # False: it waits for a due time (a retry's delay)


@dataclass(frozen=True)
class JobDispatched:
    job_id: int
    host_id: int
    kind: str
    params: dict[str, Any]  # frozen when the job was made: what command.run carries
    uid: Optional[str] = None  # told to the agent: a scheduled job may be its own already
    repository_id: Optional[int] = None  # the repository it works on (of those the agent holds)
    from_repository_id: Optional[int] = None  # a copy's source
    # it works on a repository other than the host's default (a copy too):
    # an agent from before several repositories would run it on the default
    off_default: bool = False


@dataclass(frozen=True)
class JobStarted:
    job_id: int
    host_id: int
    cancel_requested: bool = False  # a cancel crossed the command on its way
    uid: Optional[str] = None  # set for a job the agent made itself: it knows it by that
    agent_job: Optional[int] = None  # ... and the agent's own id for it
    kind: str = field(default="", compare=False)  # backup, check, ...


@dataclass(frozen=True)
class JobEnded:
    job_id: int
    host_id: int
    status: str
    # other hosts using the host's repository with jobs queued: the end may
    # free the repository for them
    also: tuple[int, ...] = field(default=(), compare=False)
    kind: str = field(default="", compare=False)  # backup, check, ...


@dataclass(frozen=True)
class JobLogged:
    """Log lines of a job, committed. From another replica it comes without
    its lines (they are in the store): `upto` is the last one's seq."""

    job_id: int
    host_id: int
    lines: tuple[dict[str, Any], ...]
    upto: int = 0


@dataclass(frozen=True)
class JobProgressed:
    """Ephemeral: the latest progress of a running job (never stored)."""

    job_id: int
    host_id: int
    progress: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True)
class SchedulesChanged:
    """A host's schedule set has a new version, for its agent."""

    host_id: int


@dataclass(frozen=True)
class RepositoryFreed:
    """Hosts with jobs queued on a shared repository that something other
    than a job's end may have let go (a requeue, a host removed or moved to
    another repository, a host gone offline): look at them again."""

    host_ids: tuple[int, ...]


@dataclass(frozen=True)
class MaintenanceChanged:
    """A repository's maintenance times changed: the ticker looks again."""

    repository_id: int


@dataclass(frozen=True)
class HostRemoved:
    host_id: int


@dataclass(frozen=True)
class HostOffline:
    """A host's connection ended (written to the store)."""

    host_id: int


@dataclass(frozen=True)
class CredentialsChanged:
    """A token was revoked, or a user's role changed or the user was removed:
    cached token checks of them are dropped at once."""

    user_id: Optional[int] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class RepoChanged:
    """A host's repository was set or changed."""

    host_id: int


@dataclass(frozen=True)
class AlertChanged:
    """An alert was raised or resolved: notifiers are told (fleet.server.notify)."""

    alert_id: int
    raised: bool  # False: resolved
    kind: str
    severity: str
    host: Optional[str]
    group: Optional[str]
    message: str


@dataclass(frozen=True)
class AgentHello:
    """fleetd welcomed an agent's hello: the version it runs, and an upgrade
    it rolled back from (with why), if it says so."""

    host_id: int
    version: str
    upgrade_failed: Optional[str] = None
    upgrade_error: Optional[str] = None


@dataclass(frozen=True)
class UpgradeAnswered:
    """An agent's upgrade.result: it restarts into `version` now, or not (why)."""

    host_id: int
    version: str
    accepted: bool
    code: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class AgentConnected:
    """A host's agent connected through replica `replica`; `epoch` numbers
    its links (fleet.server.store.models.Host.session_epoch): an older link
    through another replica is closed."""

    host_id: int
    epoch: int
    replica: str


@dataclass(frozen=True)
class CancelRequested:
    """Stop this job: the replica its agent is connected through tells it."""

    job_id: int
    host_id: int
    uid: Optional[str] = None


@dataclass(frozen=True)
class UpgradeRequested:
    """A rollout's agent.upgrade for a host (its data): the replica holding
    the host's link sends it."""

    host_id: int
    upgrade: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class QueryAsked:
    """A query (ls, find, diff, dump) for a host whose agent is connected
    through another replica: that one asks it and passes the pages back."""

    query_id: str  # unique across replicas
    asker: str  # the replica waiting for the pages
    host_id: int
    kind: str
    params: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class QueryPage:
    """A page of a relayed query's answer, or how it ended (`error`). Its
    items sealed with the fleet's key (fleet.server.agents.queries): a
    file dumped may hold a secret, and the event table is no place for it."""

    query_id: str
    asker: str
    sealed: Optional[str] = None  # None and not done: the holder took the query
    done: bool = False
    holder: str = ""  # the replica answering (the asker hears one only)
    error: Optional[str] = None
    code: Optional[str] = None


@dataclass(frozen=True)
class QueryMore:
    """The asker took `pages` pages of a relayed query (more may come), or
    gave up on it (`cancel`)."""

    query_id: str
    pages: int = 0
    cancel: bool = False


@dataclass(frozen=True)
class AuthFailed:
    """A login or a token refused by one replica: the others count it too,
    so that the limits on an address or a user hold across the fleet.
    Never the password or the token itself."""

    address: str
    user: Optional[str] = None  # a login's user name; None: a bad token


@dataclass(frozen=True)
class RolloutStarted:
    """A rollout was made (on any replica): the leader drives it."""

    rollout_id: int


@dataclass(frozen=True)
class RolloutChanged:
    """A host of a rollout moved on (committed), or the rollout ended."""

    rollout_id: int
    host: Optional[dict[str, Any]] = None  # the host's line, as views show it
    ended: bool = False


Event = Union[
    JobQueued,
    JobDispatched,
    JobStarted,
    JobEnded,
    JobLogged,
    JobProgressed,
    HostRemoved,
    HostOffline,
    RepoChanged,
    CredentialsChanged,
    SchedulesChanged,
    MaintenanceChanged,
    RepositoryFreed,
    AlertChanged,
    AgentHello,
    UpgradeAnswered,
    RolloutChanged,
    AgentConnected,
    CancelRequested,
    AuthFailed,
    UpgradeRequested,
    QueryAsked,
    QueryPage,
    QueryMore,
    RolloutStarted,
]

# -- events between replicas (fleet.server.replicas) ---------------------------

# every kind but progress, which is never stored: it goes by NOTIFY alone
STORED_KINDS: dict[str, type] = {
    cls.__name__: cls for cls in get_args(Event) if cls is not JobProgressed
}


def encode(event: Event) -> tuple[str, str]:
    """(kind, JSON body) of an event, as the event table keeps it. A job's
    log lines stay out (they are in job_log): its last seq goes instead."""
    if isinstance(event, JobLogged):
        upto = max((line["seq"] for line in event.lines), default=event.upto)
        body: dict[str, Any] = {"job_id": event.job_id, "host_id": event.host_id, "upto": upto}
    else:
        body = {f.name: getattr(event, f.name) for f in fields(event)}
    return type(event).__name__, json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def decode(kind: str, body: str) -> Optional[Event]:
    """The event again; None for a kind this fleetd does not know (a newer
    replica's) or a body that does not fit it."""
    cls = STORED_KINDS.get(kind)
    if cls is None:
        return None
    try:
        values = json.loads(body)
        for f in fields(cls):
            if str(f.type).startswith("tuple") and isinstance(values.get(f.name), list):
                values[f.name] = tuple(values[f.name])
        if cls is JobLogged:
            values.setdefault("lines", ())
        return cls(**values)
    except (ValueError, TypeError):
        log.warning("an event %s from another replica does not fit: dropped", kind)
        return None


TAIL_QUEUE = 10_000  # events a tail may fall behind before it re-reads the store
ENDED_KEPT = 10_000  # ended jobs remembered, against late progress


class Watch:
    """One follower of one job. When it falls TAIL_QUEUE events behind, the
    queue is dropped and `overflowed` set: the follower re-reads the store."""

    def __init__(self, job_id: int, host_id: Optional[int]) -> None:
        self.job_id = job_id
        self.host_id = host_id
        self.queue: asyncio.Queue = asyncio.Queue(TAIL_QUEUE)
        self.overflowed = False
        self.gone = False  # the job's host was removed

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._wake()

    def end(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        # a marker the follower's get() returns; the flags say what happened
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class Bus:
    """Publishes events to subscribers and job watches. Events this fleetd
    committed come by publish(); those of other replicas on one PostgreSQL
    by publish_remote() (fleet.server.replicas), to the subscribers that
    want them: what must happen once in the fleet (a notification, a
    metric's count, a command sent down a link) happens on the replica
    that made the event."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Callable[[Any], None]]] = defaultdict(list)
        self._local_only: set[tuple[type, Callable[[Any], None]]] = set()
        self._remote_only: set[tuple[type, Callable[[Any], None]]] = set()
        # passes events on to the other replicas (fleet.server.replicas);
        # None: one fleetd alone
        self.outbox: Optional[Callable[[list[Event]], None]] = None
        self._watches: dict[int, set[Watch]] = defaultdict(set)
        self.progress: dict[int, dict[str, Any]] = {}  # latest progress per running job
        # jobs ended lately: a progress report of theirs that comes late (from
        # another replica, by NOTIFY) is not kept as if they ran
        self._ended: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.subscribe(JobProgressed, self._track_progress)
        self.subscribe(JobEnded, self._track_progress)
        self.subscribe(HostRemoved, self._end_watches)

    def subscribe(
        self, kind: type, fn: Callable[[Any], None], remote: bool = True, local: bool = True
    ) -> None:
        """fn(event) for every event of `kind`; remote=False: only for this
        fleetd's own events, local=False: only for other replicas'."""
        self._subscribers[kind].append(fn)
        if not remote:
            self._local_only.add((kind, fn))
        if not local:
            self._remote_only.add((kind, fn))

    def unsubscribe(self, kind: type, fn: Callable[[Any], None]) -> None:
        subscribers = self._subscribers.get(kind, [])
        if fn in subscribers:
            subscribers.remove(fn)
        self._local_only.discard((kind, fn))
        self._remote_only.discard((kind, fn))

    def watch(self, job_id: int, host_id: Optional[int] = None) -> Watch:
        w = Watch(job_id, host_id)
        self._watches[job_id].add(w)
        return w

    def unwatch(self, w: Watch) -> None:
        watches = self._watches.get(w.job_id)
        if watches is not None:
            watches.discard(w)
            if not watches:
                del self._watches[w.job_id]

    def _track_progress(self, event: JobProgressed | JobEnded) -> None:
        if isinstance(event, JobProgressed):
            if event.job_id not in self._ended:
                self.progress[event.job_id] = event.progress
            return
        self.progress.pop(event.job_id, None)
        self._ended[event.job_id] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _end_watches(self, event: HostRemoved) -> None:
        for watches in list(self._watches.values()):
            for w in list(watches):
                if w.host_id == event.host_id:
                    w.end()

    def publish(self, events: Iterable[Event], recorded: bool = False) -> None:
        """This fleetd's events, once committed; recorded: they were written
        to the event table in their transaction (Store.publishing), else
        the outbox passes them on now."""
        events = list(events)
        self._publish(events, False)
        if not recorded and events and self.outbox is not None:
            self.outbox(events)

    def publish_remote(self, events: Iterable[Event]) -> None:
        """Another replica's events, as read from the store."""
        self._publish(events, True)

    def _publish(self, events: Iterable[Event], remote: bool) -> None:
        for event in events:
            job_id = getattr(event, "job_id", None)
            if job_id is not None:
                for w in list(self._watches.get(job_id, ())):
                    w.offer(event)
            kind = type(event)
            for fn in self._subscribers.get(kind, ()):
                if (kind, fn) in (self._local_only if remote else self._remote_only):
                    continue
                try:
                    fn(event)
                except Exception:  # one subscriber's bug must not stop the others
                    log.exception("subscriber %r failed on %r", fn, event)
