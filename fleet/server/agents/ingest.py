"""What agents report, applied to the store: each reliable frame at most
once, in seq order, and the frames of every agent that has something
waiting in one transaction (heartbeats, acks and log lines are coalesced
into few commits, not one per frame or per agent).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import defaultdict
from typing import Any, Callable, Optional

from peewee import EXCLUDED, fn

from ...common import protocol
from ...common.timefmt import iso, parse_ts
from ..clock import Clock
from ..events import Bus, Event, JobLogged
from ..jobs import lifecycle
from ..scheduling import schedules
from ..store.db import Store, StoreClosed, in_savepoints
from ..store.models import (
    Host,
    HostRepository,
    Job,
    JobLog,
    Repository,
    RepoStats,
    Snapshot,
    db,
    utcnow,
)
from ..store.queries import hot

log = logging.getLogger("fleetd.ingest")

# frames (job log lines, of a job.logs frame) applied in one transaction at
# most, across agents: a dispatch or a follower's next line waits behind one
# such transaction, a few ms
MAX_FRAMES = 250
SMALL_BATCH = 50  # a batch this small goes ahead of the big ones
INSERT_ROWS = 100  # job log rows per INSERT statement


def line_json(job_id: int, seq: int, ts: str, stream: str, payload: str) -> dict:
    """A job log line as followers and `jobs.log` get it (ts: RFC 3339 text,
    named logged_at there as every time fleetctl prints)."""
    return {"job": job_id, "seq": seq, "logged_at": ts, "stream": stream, "payload": payload}


def line_time(value: str) -> dt.datetime:
    """A log line's time: the fast path for the agent's own format, then the
    lenient parser (it is a label, not a reason to refuse the line)."""
    try:
        return dt.datetime.fromisoformat(value[:19])
    except ValueError:
        return parse_ts(value)


@functools.lru_cache(maxsize=8)
def _insert_sql(table: str, param: str, rows: int) -> str:
    values = ", ".join([f"({param}, {param}, {param}, {param}, {param})"] * rows)
    return (
        f'INSERT INTO "{table}" ("job_id", "seq", "ts", "stream", "payload") '
        f"VALUES {values} ON CONFLICT DO NOTHING"
    )


def insert_log_lines(rows: list[tuple]) -> None:
    """Job log rows (job, seq, ts, stream, payload), INSERT_ROWS to a
    statement: a line already stored (a resend) is skipped. Plain SQL:
    building the INSERT through the ORM cost more than the write itself,
    and few statements mean few GIL hand-offs between the store thread and
    the loop (sqlite3 drops the GIL for every statement it steps)."""
    if not rows:
        return
    database = db.obj
    table = JobLog._meta.table_name
    cursor = database.cursor()
    full = len(rows) - len(rows) % INSERT_ROWS
    if full:
        sql = _insert_sql(table, database.param, INSERT_ROWS)
        cursor.executemany(
            sql,
            [
                [v for row in rows[i : i + INSERT_ROWS] for v in row]
                for i in range(0, full, INSERT_ROWS)
            ],
        )
    if full < len(rows):
        rest = rows[full:]
        cursor.execute(
            _insert_sql(table, database.param, len(rest)), [v for row in rest for v in row]
        )


def sync_seq(host_id: int, spool_seq: int, pending_from: int) -> int:
    """Line fleetd's record of the host's seqs up with the agent's spool at hello.

    The agent's numbering may have restarted (a new state dir after a
    reinstall) or fleetd's database may be older than the agent's acks (a
    restore): either way the next seq to apply is the agent's oldest
    unacknowledged one. Returns the seq fleetd is caught up at.
    """
    name, recorded = hot.host_seq(host_id)
    last = recorded
    if pending_from == 0:
        last = spool_seq  # nothing waiting: whatever was sent was acknowledged
    elif last > spool_seq or last < pending_from - 1:
        last = pending_from - 1
    if last != recorded:
        log.warning(
            "host %s: seq record moved from %d to %d to follow its agent's spool",
            name,
            recorded,
            last,
        )
        hot.set_seq(host_id, last)
    return last


REFUSED = "refused"  # fleetd's own marker for a reliable frame it could not decode


class _Apply:
    """The state of applying one host's batch: the job log rows and live
    lines gathered so far, and which jobs are the host's own."""

    def __init__(self, events: list[Event], host: Host, now: Optional[dt.datetime]) -> None:
        self.events = events
        self.host = host
        self.now = now
        self.log_rows: list[tuple] = []
        self.lines: dict[int, list[dict]] = defaultdict(list)
        self._owned: dict[int, Optional[int]] = {}
        self._times: dict[str, tuple[str, str]] = {}
        self.frame_seq = 0  # the seq of the frame being applied
        self.applied = 0  # and the last one applied before it

    def job(self, job_id: int) -> Optional[int]:
        """fleetd's id of a job the host reports on, or None when it is not
        the host's. A negative id is the agent's own, for a job it made of a
        fire (see scheduling.schedules)."""
        if job_id not in self._owned:
            if job_id < 0:
                row = Job.get_or_none((Job.host == self.host.id) & (Job.agent_job == job_id))
                found = row.id if row is not None else None
            else:
                mine = Job.select().where((Job.id == job_id) & (Job.host == self.host.id)).exists()
                found = job_id if mine else None
            self._owned[job_id] = found
            if found is None:
                log.warning(
                    "host %s reported on job %s, which is not its own", self.host.name, job_id
                )
        return self._owned[job_id]

    def repository(self, data: dict) -> tuple[bool, Optional[int]]:
        """(known, id) of the repository a report is about: the one it
        names, when the host uses it (known False: it no longer does; the
        report is skipped); else the host's default (an older agent's
        report names none), None while it has none."""
        named = data.get("repository_id")
        if named is None:
            return True, hot.default_repository(self.host.id)
        used = (
            HostRepository.select()
            .where((HostRepository.host == self.host.id) & (HostRepository.repository == named))
            .exists()
        )
        if not used:
            log.info(
                "host %s reported on repository %s, which it no longer uses; skipped",
                self.host.name,
                named,
            )
        return used, named

    def bind(self, agent_job: int, job_id: int) -> None:
        self._owned[agent_job] = job_id

    def unbind(self, agent_job: int) -> None:
        self._owned.pop(agent_job, None)

    def line_times(self, value: str) -> tuple[str, str]:
        """A line's time as stored and as sent to followers: lines come many
        to the second, so each distinct value is parsed once a batch."""
        times = self._times.get(value)
        if times is None:
            ts = line_time(value)
            times = self._times[value] = (str(ts), iso(ts))
        return times

    def flush_lines(self) -> None:
        # log lines go before a job's end in the event order, as they were sent
        for job_id, batch in self.lines.items():
            self.events.append(JobLogged(job_id, self.host.id, tuple(batch)))
        self.lines.clear()


def _add_line(a: _Apply, job_id: int, line: dict) -> None:
    stored, sent = a.line_times(line["ts"])
    seq, stream, payload = line["seq"], line["stream"], line["payload"]
    a.log_rows.append((job_id, seq, stored, stream, payload))
    a.lines[job_id].append(line_json(job_id, seq, sent, stream, payload))


def _job_log(a: _Apply, data: dict) -> None:
    job_id = a.job(data["job_id"])
    if job_id is not None:
        _add_line(a, job_id, data)


def _job_logs(a: _Apply, data: dict) -> None:
    first, lines = data["first"], data["lines"]
    if first + len(lines) - 1 != a.frame_seq:
        log.warning(
            "host %s: job.logs of seqs %d.. (%d lines) came as seq %d; skipped",
            a.host.name,
            first,
            len(lines),
            a.frame_seq,
        )
        return
    job_id = a.job(data["job_id"])
    if job_id is not None:
        # a pack resent after a reconnect may straddle what was applied
        for line in lines[max(0, a.applied + 1 - first) :]:
            _add_line(a, job_id, line)


def _job_started(a: _Apply, data: dict) -> None:
    if data["job_id"] < 0 and data.get("kind") == "backup":  # a run of the agent's own
        a.bind(data["job_id"], schedules.started_local(a.events, a.host.id, data))
    job_id = a.job(data["job_id"])
    if job_id is not None:
        a.flush_lines()
        lifecycle.start(a.events, a.host.id, job_id, parse_ts(data["started_at"]))


def _job_finished(a: _Apply, data: dict) -> None:
    job_id = a.job(data["job_id"])
    if job_id is not None:
        a.flush_lines()
        lifecycle.end(
            a.events,
            a.host.id,
            job_id,
            data["status"],
            finished_at=parse_ts(data["finished_at"]),
            exit_code=data["exit_code"],
            summary=data.get("summary"),
            error=data.get("error"),
            now=a.now,
        )


def _snapshots(a: _Apply, data: dict) -> None:
    known, repository = a.repository(data)
    if known:
        apply_snapshot_page(a.host.id, data, repository)


def _locks(a: _Apply, data: dict) -> None:
    known, repository = a.repository(data)
    if not known:
        return
    now = utcnow()
    if repository is not None:
        Repository.update(locks=data["count"], locks_at=now).where(
            Repository.id == repository
        ).execute()
    if repository is None or repository == hot.default_repository(a.host.id):
        Host.update(repo_locks=data["count"], repo_locks_at=now).where(
            Host.id == a.host.id
        ).execute()


def _stats(a: _Apply, data: dict) -> None:
    known, repository = a.repository(data)
    if not known or repository is None:
        return  # sizes of a repository the host no longer uses, or of none
    values = {k: v for k, v in data.items() if k != "repository_id"}
    if "measured_at" in values:
        values["measured_at"] = parse_ts(values["measured_at"])
    RepoStats.insert(
        host=a.host.id, repository=repository, updated_at=utcnow(), **values
    ).on_conflict(
        conflict_target=[RepoStats.host, RepoStats.repository],
        preserve=[
            RepoStats.size_bytes,
            RepoStats.snapshot_count,
            RepoStats.file_count,
            RepoStats.raw_size_bytes,
            RepoStats.lock_state,
            RepoStats.updated_at,
            RepoStats.measured_at,
        ],
    ).execute()


def _fire(a: _Apply, data: dict) -> None:
    a.flush_lines()
    for job in data.get("jobs", ()):
        a.unbind(job["job_id"])  # bound by the fire: read again when needed
    schedules.apply_fire(a.events, a.host.id, a.host.name, data, a.now or utcnow())


def _refused(a: _Apply, data: dict) -> None:
    # the agent is told (an error frame) and the seq is passed: resending a
    # frame that can never be applied would stop everything behind it
    log.warning("host %s: a report was refused and skipped: %s", a.host.name, data["error"])


# reliable frame type -> how it is applied
APPLY: dict[str, Callable[[_Apply, dict], None]] = {
    "schedule.fire": _fire,
    "job.log": _job_log,
    "job.logs": _job_logs,
    "job.started": _job_started,
    "job.finished": _job_finished,
    "snapshots.report": _snapshots,
    "repo.locks": _locks,
    "repo.stats": _stats,
    REFUSED: _refused,
}


def apply_frames(
    events: list[Event],
    host_id: int,
    frames: list[protocol.Envelope],
    now: Optional[dt.datetime] = None,
) -> int:
    """Apply an agent's reliable frames in seq order, each at most once.

    Returns the host's last applied seq (what to ack); appends the events to
    publish once the transaction has committed.
    """
    name, recorded = hot.host_seq(host_id)
    host = Host(id=host_id, name=name)  # what the appliers need of it, not read again
    a = _Apply(events, host, now)
    last = recorded
    for frame in frames:
        if frame.seq is None or frame.seq <= last:
            continue  # already applied before a reconnect
        a.applied, a.frame_seq = last, frame.seq
        last = frame.seq
        apply = APPLY.get(frame.type)
        if apply is None:
            log.info("host %s sent %s, which this fleetd does not apply", host.name, frame.type)
        else:
            apply(a, frame.data)
    insert_log_lines(a.log_rows)
    a.flush_lines()
    if last != recorded:
        hot.set_seq(host_id, last)
    return last


def apply_snapshot_page(
    host_id: int, page: dict[str, Any], repository: Optional[int] = None
) -> None:
    """fleetd's projection of `restic snapshots`: exactly what the agent saw.

    Each page upserts its snapshots stamped with the report's time; the last
    page removes what no page of that report named. A report from an agent
    without pages is one last page.
    """
    report_at = parse_ts(page["report_at"]) if page.get("report_at") else utcnow()
    for snap in page["snapshots"]:
        row = {
            "host": host_id,
            "snapshot_id": snap["id"],
            "short_id": snap["short_id"],
            "time": parse_ts(snap["time"]),
            "hostname": snap["hostname"],
            "paths": snap["paths"],
            "tags": snap.get("tags") or [],
            "size_bytes": snap.get("size_bytes"),
            "file_count": snap.get("file_count"),
            "reported_at": report_at,
            "repository": repository,
        }
        Snapshot.insert(**row).on_conflict(
            conflict_target=[Snapshot.host, Snapshot.snapshot_id],
            preserve=[Snapshot.tags, Snapshot.paths, Snapshot.reported_at, Snapshot.repository],
            # a size learnt from the backup that made it is kept when later reports lack one
            update={
                Snapshot.size_bytes: fn.COALESCE(EXCLUDED.size_bytes, Snapshot.size_bytes),
                Snapshot.file_count: fn.COALESCE(EXCLUDED.file_count, Snapshot.file_count),
            },
        ).execute()
    if page.get("last", True):  # the rest of this host's list in that repository
        Snapshot.delete().where(
            (Snapshot.host == host_id)
            & (Snapshot.repository.is_null() | (Snapshot.repository == repository))
            & ((Snapshot.reported_at < report_at) | Snapshot.reported_at.is_null())
        ).execute()


def weight(frame: protocol.Envelope) -> int:
    """What a frame costs to apply, in job log lines (a job.logs frame holds many)."""
    return len(frame.data["lines"]) if frame.type == "job.logs" else 1


class _Batch:
    def __init__(self, host_id: int, frames: list[protocol.Envelope]) -> None:
        self.host_id = host_id
        self.frames = frames
        self.weight = sum(map(weight, frames))
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()


class Ingest:
    """One writer for every agent's reports: batches that wait while a
    transaction commits go together into the next one. Each host's frames
    are applied under a savepoint, so one host's bad batch fails only that
    host (its link is dropped and it resends), never the others'."""

    def __init__(self, store: Store, bus: Bus, clock: Optional[Clock] = None) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock or Clock()
        self._waiting: list[_Batch] = []
        self._task: Optional[asyncio.Task] = None

    async def submit(self, host_id: int, frames: list[protocol.Envelope]) -> int:
        """Apply `frames` of one host; returns its last applied seq once committed."""
        batch = _Batch(host_id, frames)
        self._waiting.append(batch)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await batch.done

    async def _run(self) -> None:
        while self._waiting:
            taken = self._take()
            if not taken:
                return
            try:
                results, events = await self.store.bulk(
                    self._apply, taken, self.clock.now(), self.store.recorder
                )
            except Exception as exc:  # the commit itself failed: nobody is acked
                if not isinstance(exc, StoreClosed):  # fleetd stops: the agents resend
                    log.exception("applying agents' reports failed")
                for batch in taken:
                    if not batch.done.done():
                        batch.done.set_exception(exc)
                continue
            self.bus.publish(events, recorded=True)
            for batch, result in zip(taken, results):
                if batch.done.done():
                    continue
                if isinstance(result, Exception):
                    batch.done.set_exception(result)
                else:
                    batch.done.set_result(result)

    def _take(self) -> list[_Batch]:
        """The batches for the next transaction: every small one first (a
        follower's job at restic's pace must not wait behind agents that
        stream as fast as they can), then the others in arrival order, up
        to MAX_FRAMES frames (at least one batch)."""
        # a batch whose caller is gone (its link dropped while fleetd stops)
        # is not applied: unacked, it comes again
        self._waiting = [b for b in self._waiting if not b.done.cancelled()]
        small = [b for b in self._waiting if b.weight <= SMALL_BATCH]
        rest = [b for b in self._waiting if b.weight > SMALL_BATCH]
        taken: list[_Batch] = []
        count = 0
        for batch in small + rest:
            if taken and count + batch.weight > MAX_FRAMES:
                break
            taken.append(batch)
            count += batch.weight
        chosen = set(map(id, taken))
        self._waiting = [b for b in self._waiting if id(b) not in chosen]
        return taken

    @staticmethod
    def _apply(
        taken: list[_Batch], now: dt.datetime, recorder: Optional[Callable[[list], None]]
    ) -> tuple[list[Any], list[Event]]:
        per_host: list[list[Event]] = [[] for _ in taken]
        events: list[Event] = []

        def gather(outcomes: list[tuple[bool, Any]]) -> None:
            # in the transaction: the events of the hosts whose frames applied,
            # written for the other replicas with them
            for mine, (ok, _) in zip(per_host, outcomes):
                if ok:
                    events.extend(mine)
            if events and recorder is not None:
                recorder(events)

        outcomes = in_savepoints(
            [
                functools.partial(apply_frames, mine, batch.host_id, batch.frames, now)
                for mine, batch in zip(per_host, taken)
            ],
            gather,
        )
        results: list[Any] = []
        for batch, (ok, value) in zip(taken, outcomes):
            results.append(value)
            if not ok:
                log.error("applying frames of host %s failed", batch.host_id, exc_info=value)
        return results, events
