"""Several fleetd replicas on one PostgreSQL: who they are, the events they
pass to one another, and which of them runs the fleet-wide ticker.

The database is the truth and the only thing the replicas share; there is
no consensus of our own:

- Each replica has a row (`replica`) whose seen_at it moves every BEAT
  seconds. One silent for DEAD seconds is dead: the leader marks offline
  the hosts whose agents were connected through it and did not come back
  through another (fleet.server.store.models.Host.session_replica).
- Every event a replica commits is written to the `event` table in the
  transaction that made it (Store.publishing), or right after for the few
  made across transactions. NOTIFY on fleet_events is only the wake-up:
  each replica reads the table in id order from where it was, so a missed
  notification, or a replica busy for a while, loses nothing. Ids are
  handed out at insert, not commit, so a lower one may commit after a
  higher one was read: a missing id is waited for until every transaction
  that may hold it has ended before a read that did not find it
  (PostgreSQL's snapshot xmin, taken before that read, passed an xid
  assigned after the read that noticed it), GAP_CAP at most.
- Progress, which is never stored, goes by NOTIFY alone (fleet_progress):
  a lost one is replaced by the next.
- The leader holds a PostgreSQL advisory lock on a connection of its own
  and runs the ticker's fleet-wide sources (schedules' bookkeeping,
  maintenance, drills, history, lost jobs, alerts): exactly one replica
  does each piece. When it dies its connection goes and the lock with it;
  another replica takes it within LEAD_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any, Callable, Optional

import peewee as pw

from .events import Bus, Event, HostOffline, JobProgressed, decode, encode
from .store.db import Location, Store, StoreClosed, libpq_params
from .store.models import Host, Replica, StoredEvent, db, utcnow

log = logging.getLogger("fleetd.replicas")

EVENTS = "fleet_events"  # NOTIFY channel: the event table has news
PROGRESS = "fleet_progress"  # NOTIFY channel: progress of running jobs
LEADER_LOCK = 0x666C656574 + 1  # beside migrations' lock ("fleet")
BEAT = 3.0  # seconds between a replica's seen_at updates
DEAD = 15.0  # seconds of silence after which a replica is dead
LEAD_EVERY = 2.0  # seconds between a follower's tries for the leader's lock
LOCK_SILENCE = 10.0  # seconds the leader's lock connection may be silent
POLL = 1.0  # seconds between looks at the event table when no NOTIFY comes
GAP_CAP = 600.0  # seconds a missing event id is waited for at most
KEEP_EVENTS = dt.timedelta(minutes=10)  # events older are deleted (by the leader)
READ_BATCH = 1000  # events read at once
MAX_PENDING = 10_000  # events made outside a transaction kept while PostgreSQL is away
PROGRESS_EVERY = 0.25  # seconds: progress sent to other replicas at most this often
NOTIFY_MAX = 7000  # bytes of a NOTIFY payload (PostgreSQL's bound is 8000)
RECONNECT = 1.0  # seconds before a lost connection is made again
# the database's clock, not each machine's: replicas' clocks may differ
DB_NOW = pw.SQL("(now() AT TIME ZONE 'UTC')")


def record(origin: str, events: list[Event]) -> None:
    """On the store thread, inside the transaction that made `events`:
    write them for the other replicas, and wake them at commit (a NOTIFY
    is delivered only if the transaction commits)."""
    rows = [
        {"origin": origin, "kind": kind, "body": body, "at": utcnow()}
        for kind, body in (encode(e) for e in events if not isinstance(e, JobProgressed))
    ]
    if not rows:
        return
    # the transaction's own id first, before the events' ids are drawn: a
    # replica that notices one of them missing must know this transaction
    # older than an xid it takes after (see Gaps), which one whose first
    # write is this insert would not be (its xid comes mid-statement);
    # the NOTIFY in the same round trip (it is sent at commit anyway)
    db.obj.execute_sql("SELECT pg_current_xact_id(), pg_notify(%s, '')", (EVENTS,))
    for start in range(0, len(rows), 500):
        StoredEvent.insert_many(rows[start : start + 500]).execute()


class Gaps:
    """Which event ids were read, so that each is published once: `done` is
    the highest id below which every one was read or will never come;
    `seen` the ids read above it; `since` for each missing id, when it was
    first noticed missing and `bound`, an xid PostgreSQL assigned after the
    read that noticed it. The transaction that took the id, if any, had
    its own xid first (see record), so below `bound`: once a snapshot
    taken before a later read has its xmin (the oldest running
    transaction) at or past `bound`, that transaction had ended before
    the read, which would have found the id: it will never come (a
    transaction rolled back, or a savepoint).

    Not a snapshot's xmax for `bound`: that is one past the newest
    *ended* transaction, and a running one with a higher xid is neither
    in the snapshot's running list nor below its xmin, so xmin may pass
    xmax while it still holds a missing id (found by the benchmark: about
    one cross-replica run-now in 600 lost)."""

    def __init__(self, done: int) -> None:
        self.done = done
        self.seen: set[int] = set()
        self.since: dict[int, tuple[float, int]] = {}
        # ids up to here were looked at for being missing (never below
        # done): each look scans only what is above, not all that `done`
        # waits behind
        self.noticed = done

    def top(self) -> int:
        """The newest id read."""
        return max(self.seen, default=self.done)

    def fresh(self, event_id: int) -> bool:
        """Whether this id is read for the first time (then it is marked)."""
        if event_id <= self.done or event_id in self.seen:
            return False
        self.seen.add(event_id)
        return True

    def _newly_missing(self) -> Iterator[int]:
        """The ids below the newest read, missing and not noticed yet."""
        return (m for m in range(self.noticed + 1, self.top()) if m not in self.seen)

    def unnoticed(self) -> bool:
        """Whether an id is newly missing: advance() then needs a bound
        taken after this read."""
        return any(self._newly_missing())

    def advance(self, now: float, xmin: int, bound: int) -> None:
        """Move `done` past every id read, and past missing ones that will
        never come. bound: an xid assigned after the rows were read (only
        used when unnoticed() said so); xmin: of a snapshot taken before
        they were read, the missing ones among them too. Not a snapshot
        after the read: a transaction may commit between the read and it,
        its id then both unread and below that xmin."""
        for missing in self._newly_missing():
            self.since[missing] = (now, bound)
        self.noticed = max(self.noticed, self.top())
        while True:
            nxt = self.done + 1
            if nxt in self.seen:
                self.seen.discard(nxt)
            elif nxt in self.since and (
                xmin >= self.since[nxt][1] or now - self.since[nxt][0] >= GAP_CAP
            ):
                log.debug("event %d never came (a transaction rolled back)", nxt)
            else:
                break
            self.since.pop(nxt, None)
            self.done = nxt


class Replicas:
    """This fleetd as one of several on a PostgreSQL store."""

    def __init__(self, store: Store, bus: Bus, where: Location) -> None:
        self.store = store
        self.bus = bus
        self.where = where
        self.id = uuid.uuid4().hex[:12]
        self.url: Optional[str] = None
        self.leading = asyncio.Event()  # set while this replica holds the leader's lock
        self.leading_since = 0.0  # time.monotonic() when it took the lock
        # this replica was taken for dead and swept, and is back: its links
        # still up are written online again (Agents.rejoin)
        self.on_rejoin: Optional[Callable[[], Awaitable[None]]] = None
        self.on_lead: Optional[Callable[[bool], Awaitable[None]]] = None
        self._gaps: Optional[Gaps] = None
        self._xmin = 0  # of the snapshot after the last read: before the next one
        self._tasks: list[asyncio.Task] = []
        self._progress: dict[int, JobProgressed] = {}
        self._progress_task: Optional[asyncio.Task] = None
        self._pending: list[Event] = []  # made across transactions, to be written
        self._writer: Optional[asyncio.Task] = None
        self.received = 0  # events of other replicas published here (tests, metrics)

    # -- start and stop ------------------------------------------------------

    async def start(self, url: Optional[str]) -> None:
        self.url = url
        top = await self.store.atomic(self._register)
        self._gaps = Gaps(top)
        self.store.recorder = lambda events: record(self.id, events)
        self.bus.outbox = self._send
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._beat())]
        log.info("replica %s of the fleet on %s", self.id, self.where.describe())

    def elect(self, on_lead: Callable[[bool], Awaitable[None]]) -> None:
        """Try for the leader's part from now on; on_lead(True) once this
        replica has it, on_lead(False) if it loses it."""
        self.on_lead = on_lead
        self._tasks.append(asyncio.ensure_future(self._lead()))

    def _register(self) -> int:
        """This replica's row; the newest event id (where it starts reading)."""
        Replica.insert(
            id=self.id,
            url=self.url,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=DB_NOW,
            seen_at=DB_NOW,
        ).on_conflict_ignore().execute()
        return StoredEvent.select(StoredEvent.id).order_by(StoredEvent.id.desc()).scalar() or 0

    async def stop(self) -> None:
        """Before the store closes: events still to be written are written,
        and the replica's row goes (its hosts are marked offline by the
        caller, as one fleetd does at stop)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self.bus.outbox = None
        self.store.recorder = None
        try:
            await self.store.atomic(lambda: Replica.delete().where(Replica.id == self.id).execute())
        except StoreClosed:
            pass

    # -- events out ----------------------------------------------------------

    def _send(self, events: list[Event]) -> None:
        """The bus's outbox: events published without being written in their
        transaction. Progress goes by NOTIFY (coalesced per job), the rest
        to the event table in a transaction of its own."""
        stored = []
        for event in events:
            if isinstance(event, JobProgressed):
                self._progress[event.job_id] = event
            else:
                stored.append(event)
        if self._progress and (self._progress_task is None or self._progress_task.done()):
            self._progress_task = asyncio.ensure_future(self._send_progress())
        if stored:
            self._pending.extend(stored)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._pending:
            events, self._pending = self._pending, []
            try:
                await self.store.atomic(record, self.id, events)
            except StoreClosed:
                return
            except Exception as exc:  # PostgreSQL out of reach: kept, tried again
                log.warning(
                    "passing %d event(s) to the other replicas failed (%s); trying again",
                    len(events),
                    exc,
                )
                self._pending = events + self._pending
                if len(self._pending) > MAX_PENDING:  # a long outage: the oldest go
                    del self._pending[: len(self._pending) - MAX_PENDING]
                await asyncio.sleep(RECONNECT)

    async def _send_progress(self) -> None:
        await asyncio.sleep(PROGRESS_EVERY)  # what comes meanwhile shares the NOTIFY
        batch, self._progress = list(self._progress.values()), {}
        payloads: list[str] = []
        items: list[dict] = []
        size = 0
        for e in batch:
            item = {"job_id": e.job_id, "host_id": e.host_id, "progress": e.progress}
            length = len(json.dumps(item))
            if length > NOTIFY_MAX - 100:
                continue  # a progress this big is not worth a NOTIFY
            if items and size + length > NOTIFY_MAX - 100:
                payloads.append(json.dumps({"origin": self.id, "items": items}))
                items, size = [], 0
            items.append(item)
            size += length
        if items:
            payloads.append(json.dumps({"origin": self.id, "items": items}))

        def notify() -> None:
            for payload in payloads:
                db.obj.execute_sql("SELECT pg_notify(%s, %s)", (PROGRESS, payload))

        try:
            await self.store.run(notify)
        except StoreClosed:
            pass
        except Exception:
            log.warning("progress could not be passed to the other replicas", exc_info=True)

    # -- events in -----------------------------------------------------------

    async def _connect(self) -> Any:
        import psycopg

        params = libpq_params(self.where, f"fleetd {self.id}")
        return await psycopg.AsyncConnection.connect(autocommit=True, **params)

    async def _listen(self) -> None:
        """LISTEN, and read the event table whenever woken (or every POLL
        seconds: a NOTIFY sent while the connection was being made again
        is not lost, only late)."""
        while True:
            try:
                conn = await self._connect()
            except Exception as exc:
                log.warning("cannot listen for the other replicas' events: %s", exc)
                await asyncio.sleep(RECONNECT)
                continue
            try:
                # the xid a look may take (see Gaps) writes no data: not
                # worth waiting for its commit record to be flushed
                await conn.execute("SET synchronous_commit = off")
                await conn.execute(f"LISTEN {EVENTS}")
                await conn.execute(f"LISTEN {PROGRESS}")
                woken = True
                while True:
                    if woken:
                        await self._catch_up(conn)
                    woken = False
                    async for note in conn.notifies(timeout=POLL):
                        if note.channel == PROGRESS:
                            self._progress_in(note.payload)
                        else:
                            woken = True
                            break
                    else:
                        woken = True  # the timeout: look anyway
            except asyncio.CancelledError:
                await conn.close()
                raise
            except Exception as exc:
                log.warning("lost the events' connection (%s); making it again", exc)
                await conn.close()
                await asyncio.sleep(RECONNECT)

    async def _catch_up(self, conn: Any) -> None:
        """Publish what other replicas committed since the last look: the
        ids still missing below the newest read, then what is newer."""
        gaps = self._gaps
        assert gaps is not None
        rows = []
        if gaps.since:
            cursor = await conn.execute(
                'SELECT "id", "origin", "kind", "body" FROM "event" WHERE "id" = ANY(%s)',
                (sorted(gaps.since),),
            )
            rows += await cursor.fetchall()
        while True:
            cursor = await conn.execute(
                'SELECT "id", "origin", "kind", "body" FROM "event" WHERE "id" > %s '
                'ORDER BY "id" LIMIT %s',
                (gaps.top(), READ_BATCH),
            )
            page = await cursor.fetchall()
            # published at once: marked read, they would not be read again
            # should the statement below fail
            events = self._take(sorted(rows + page))
            rows = []
            if events:
                self.received += len(events)
                self.bus.publish_remote(events)
            # after the rows: the snapshot whose xmin the next look decides
            # by, and, when an id was found missing, an xid above any its
            # transaction may have (taking one costs a WAL record: only then)
            cursor = await conn.execute(
                "SELECT pg_snapshot_xmin(s)::text::bigint, "
                + ("pg_current_xact_id()::text::bigint " if gaps.unnoticed() else "0 ")
                + "FROM pg_current_snapshot() AS s"
            )
            xmin, bound = await cursor.fetchone()
            # xmin of the last look's snapshot, taken before this look read
            # the missing ids: a transaction ended before it is found now
            gaps.advance(time.monotonic(), self._xmin, bound)
            if len(page) < READ_BATCH:
                self._xmin = xmin
                return

    def _take(self, rows: list) -> list[Event]:
        """The events of the rows read for the first time, but this
        replica's own (published here when they were made)."""
        gaps = self._gaps
        assert gaps is not None
        events = []
        for event_id, origin, kind, body in rows:
            if not gaps.fresh(event_id) or origin == self.id:
                continue
            event = decode(kind, body)
            if event is not None:
                events.append(event)
        return events

    def _progress_in(self, payload: str) -> None:
        try:
            doc = json.loads(payload)
            if doc.get("origin") == self.id:
                return
            events = [
                JobProgressed(int(i["job_id"]), int(i["host_id"]), dict(i["progress"]))
                for i in doc["items"]
            ]
        except (ValueError, TypeError, KeyError):
            return
        self.bus.publish_remote(events)

    # -- liveness and the leader ---------------------------------------------

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            try:
                swept = await self.store.atomic(self._seen)
                if swept and self.on_rejoin is not None:
                    log.warning(
                        "replica %s was taken for dead: its agents are online again", self.id
                    )
                    await self.on_rejoin()
            except StoreClosed:
                return
            except Exception as exc:
                log.warning("could not say this replica is alive: %s", exc)

    def _seen(self) -> bool:
        """This replica's seen_at, now; True when its row was gone (taken
        for dead after a long pause, and swept) and is made again."""
        updated = Replica.update(seen_at=DB_NOW).where(Replica.id == self.id).execute()
        if not updated:
            self._register()
        return not updated

    async def _lead(self) -> None:
        """Try for the leader's lock until it is had; hold it while the
        connection lives."""
        while True:
            conn = None
            try:
                conn = await self._connect()
                # the lock must not outlive a leader whose machine died
                # without closing its socket: PostgreSQL ends a session
                # silent for longer than this (the leader speaks every
                # LEAD_EVERY seconds)
                await conn.execute(f"SET idle_session_timeout = '{int(LOCK_SILENCE * 1000)}ms'")
                while True:
                    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                    (got,) = await cursor.fetchone()
                    if got:
                        break
                    await asyncio.sleep(LEAD_EVERY)
                log.info("replica %s leads: it runs the fleet-wide ticker", self.id)
                self.leading_since = time.monotonic()
                self.leading.set()
                if self.on_lead is not None:
                    await self.on_lead(True)
                while True:  # the lock lives with the connection: watch it
                    await asyncio.sleep(LEAD_EVERY)
                    # an answer late past LOCK_SILENCE: PostgreSQL may have let
                    # the lock go (a half-open link): no longer the leader
                    await asyncio.wait_for(conn.execute("SELECT 1"), LOCK_SILENCE - LEAD_EVERY)
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise
            except Exception as exc:
                log.warning("the leader's connection failed: %s", exc)
            if conn is not None:
                await conn.close()
            if self.leading.is_set():
                self.leading.clear()
                log.warning("replica %s no longer leads", self.id)
                if self.on_lead is not None:
                    await self.on_lead(False)
            await asyncio.sleep(RECONNECT)


def sweep_dead(events: list[Event], now: dt.datetime, me: str) -> list[str]:
    """The leader's look for dead replicas (silent for DEAD seconds by the
    database's clock): the hosts still online through one of them did not
    come back through another, so they are offline; the replica's row
    goes. Returns their ids."""
    cutoff = DB_NOW - pw.SQL(f"interval '{int(DEAD)} seconds'")
    dead = [
        r.id
        for r in Replica.select(Replica.id).where((Replica.seen_at < cutoff) & (Replica.id != me))
    ]
    if not dead:
        return []
    gone = (
        Host.update(online=False, session_replica=None)
        .where(Host.session_replica.in_(dead) & (Host.online == True))  # noqa: E712
        .returning(Host.id)
        .execute()
    )  # one statement: a host back through another replica meanwhile is not touched
    events.extend(HostOffline(h.id) for h in gone)
    Replica.delete().where(Replica.id.in_(dead)).execute()
    return dead


def prune_events(now: dt.datetime) -> int:
    """Events older than KEEP_EVENTS: every replica read them long ago."""
    return StoredEvent.delete().where(StoredEvent.at < now - KEEP_EVENTS).execute()


class Upkeep:
    """The leader's ticker source for the replicas themselves: dead ones
    swept (their hosts offline) every BEAT seconds, old events pruned."""

    name = "replicas"

    def __init__(
        self,
        replicas: Replicas,
        apply: Callable[..., Awaitable[Any]],
        on_dead: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> None:
        self.replicas = replicas
        self.apply = apply  # Lifecycle.apply: a transaction, then its events
        self.on_dead = on_dead  # after a dead replica was swept: take up its work
        self.next: Optional[dt.datetime] = None

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        return now if self.next is None else self.next

    async def run_due(self, now: dt.datetime) -> None:
        self.next = now + dt.timedelta(seconds=BEAT)
        await self.replicas.store.atomic(prune_events, now)
        if time.monotonic() - self.replicas.leading_since < DEAD:
            # a new leader (after an outage of PostgreSQL, say) first gives
            # every replica the time to be heard again
            return
        dead = await self.apply(sweep_dead, now, self.replicas.id)
        for replica in dead:
            log.warning(
                "replica %s is silent for over %d s: its agents that did not come back "
                "through another replica are offline",
                replica,
                DEAD,
            )
        if dead and self.on_dead is not None:
            await self.on_dead()
