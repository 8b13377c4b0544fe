"""Jobs in the store: creating them, applying what agents report, choosing
what to dispatch. Every function here runs on the store thread, inside the
caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Optional

from peewee import EXCLUDED, fn

from ..common import protocol
from .store.models import Host, Job, JobLog, Repo, RepoStats, Snapshot, SourceGroup, utcnow

log = logging.getLogger("fleetd.jobs")

ACTIVE = ("queued", "running")


def parse_ts(value: str) -> dt.datetime:
    """An agent's RFC 3339 time; a malformed one becomes now (it is only a label)."""
    try:
        return dt.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return utcnow()


def backup_params(group: SourceGroup) -> dict:
    """What command.run carries for a backup of `group`, frozen at job creation."""
    return {
        "group": group.name,
        "includes": list(group.includes),
        "excludes": list(group.excludes),
        "tag": group.name,
        "pre_hook": group.pre_hook,
        "post_hook": group.post_hook,
    }


def create_job(
    host: Host,
    kind: str,
    actor_kind: str,
    actor_user: Optional[int] = None,
    group: Optional[SourceGroup] = None,
    params: Optional[dict] = None,
) -> Job:
    return Job.create(
        host=host,
        kind=kind,
        status="queued",
        actor_kind=actor_kind,
        actor_user=actor_user,
        group=group,
        group_name=group.name if group else None,
        params=params or {},
    )


def next_job(host_id: int) -> Optional[dict]:
    """The next queued job of a host that is due (init first), as a command.run payload."""
    now = iso(utcnow()) or ""
    queued = (
        Job.select()
        .where((Job.host == host_id) & (Job.status == "queued"))
        .order_by((Job.kind != "init"), Job.id)
    )
    for job in queued:
        if (job.params or {}).get("not_before", "") <= now:  # a retry waits out its delay
            return command_for(job)
    return None


def command_for(job: Job) -> dict:
    cmd = {"job_id": job.id, "kind": job.kind}
    cmd.update(
        {
            k: v
            for k, v in (job.params or {}).items()
            if k in COMMAND_KEYS and v not in (None, "", [])
        }
    )
    return cmd


COMMAND_KEYS = (
    "group",
    "includes",
    "excludes",
    "tag",
    "retention",
    "pre_hook",
    "post_hook",
    "args",
)


def retry_after_failure(job_id: int) -> Optional[tuple[int, int]]:
    """A failed backup whose group allows retries is queued again after the
    group's delay. Returns (new job id, delay in seconds) or None."""
    job = Job.get_by_id(job_id)
    if job.kind != "backup" or job.status != "failed" or job.group_id is None:
        return None
    group = SourceGroup.get_or_none(SourceGroup.id == job.group_id)
    attempt = int((job.params or {}).get("attempt", 1))
    if group is None or attempt > group.retries:
        return None
    params = {
        **job.params,
        "attempt": attempt + 1,
        "not_before": iso(utcnow() + dt.timedelta(seconds=group.retry_delay)),
    }
    retry = Job.create(
        host=job.host_id,
        kind="backup",
        status="queued",
        actor_kind=job.actor_kind,
        actor_user=job.actor_user_id,
        schedule=job.schedule_id,
        group=job.group_id,
        group_name=job.group_name,
        params=params,
    )
    log.info(
        "job %s failed; retry %d of %d is job %s in %d s",
        job.id,
        attempt,
        group.retries,
        retry.id,
        group.retry_delay,
    )
    return retry.id, group.retry_delay


def needs_init(host_id: int) -> bool:
    """Auto-init: a repository is set and no init job was made since it was.

    A failed init is not retried by itself (it would fail again, forever):
    `fleetctl repo init` or a new `repo set` tries again.
    """
    repo = Repo.get_or_none(Repo.host == host_id)
    if repo is None:
        return False
    since = (Job.host == host_id) & (Job.kind == "init") & (Job.created_at >= repo.updated_at)
    return not Job.select().where(since).exists()


def sync_seq(host_id: int, spool_seq: int, pending_from: int) -> int:
    """Line fleetd's record of the host's seqs up with the agent's spool at hello.

    The agent's numbering may have restarted (a new state dir after a
    reinstall) or fleetd's database may be older than the agent's acks (a
    restore): either way the next seq to apply is the agent's oldest
    unacknowledged one. Returns the seq fleetd is caught up at.
    """
    host = Host.get_by_id(host_id)
    last = host.last_seq
    if pending_from == 0:
        last = spool_seq  # nothing waiting: whatever was sent was acknowledged
    elif last > spool_seq or last < pending_from - 1:
        last = pending_from - 1
    if last != host.last_seq:
        log.warning(
            "host %s: seq record moved from %d to %d to follow its agent's spool",
            host.name,
            host.last_seq,
            last,
        )
        Host.update(last_seq=last).where(Host.id == host_id).execute()
    return last


def lose(query: Any, why: str) -> list[int]:
    """Mark the running jobs `query` selects lost; returns their ids."""
    lost = [j.id for j in query.where(Job.status == "running")]
    if lost:
        Job.update(status="lost", finished_at=utcnow(), error=why).where(Job.id.in_(lost)).execute()
    return lost


def mark_lost(host_id: int, still_running: Optional[int]) -> list[int]:
    """Jobs the agent no longer knows: it came back, its spool is drained,
    and it runs none of them."""
    query = Job.select(Job.id).where(Job.host == host_id)
    if still_running is not None:
        query = query.where(Job.id != still_running)
    return lose(query, "the agent restarted or lost the job before reporting its end")


def expire_lost(cutoff: dt.datetime) -> list[int]:
    """Running jobs of hosts offline since before `cutoff`: their agent never
    came back to say how they ended."""
    silent = Host.select(Host.id).where((Host.online == False) & (Host.last_seen_at < cutoff))  # noqa: E712
    query = Job.select(Job.id).where(Job.host.in_(silent))
    return lose(query, "the host went offline during the job and did not come back in time")


def fail_job(job_id: int, error: str) -> None:
    Job.update(status="failed", finished_at=utcnow(), error=error).where(
        (Job.id == job_id) & (Job.status.in_(ACTIVE))
    ).execute()


def apply_frames(host_id: int, frames: list[protocol.Envelope]) -> tuple[int, list[dict]]:
    """Apply an agent's reliable frames in seq order, each at most once.

    Returns the host's last applied seq (what to ack) and the events to
    publish to live tails once the transaction has committed.
    """
    host = Host.get_by_id(host_id)
    last = host.last_seq
    events: list[dict] = []
    log_rows: list[dict] = []
    owned: dict[int, bool] = {}

    def mine(job_id: int) -> bool:
        if job_id not in owned:
            owned[job_id] = Job.select().where((Job.id == job_id) & (Job.host == host_id)).exists()
            if not owned[job_id]:
                log.warning("host %s reported on job %s, which is not its own", host.name, job_id)
        return owned[job_id]

    for frame in frames:
        if frame.seq is None or frame.seq <= last:
            continue  # already applied before a reconnect
        last = frame.seq
        data = frame.data
        if frame.type == "job.log":
            if mine(data["job_id"]):
                row = {
                    "job": data["job_id"],
                    "seq": data["seq"],
                    "ts": parse_ts(data["ts"]),
                    "stream": data["stream"],
                    "payload": data["payload"],
                }
                log_rows.append(row)
                line = line_json(
                    data["job_id"], data["seq"], row["ts"], data["stream"], data["payload"]
                )
                events.append({"job_id": data["job_id"], "type": "log", "line": line})
        elif frame.type == "job.started":
            if mine(data["job_id"]):
                Job.update(status="running", started_at=parse_ts(data["started_at"])).where(
                    (Job.id == data["job_id"]) & (Job.status.in_(ACTIVE))
                ).execute()
                events.append({"job_id": data["job_id"], "type": "status", "status": "running"})
        elif frame.type == "job.finished":
            if mine(data["job_id"]):
                Job.update(
                    status=data["status"],
                    finished_at=parse_ts(data["finished_at"]),
                    exit_code=data["exit_code"],
                    summary=data.get("summary"),
                    error=data.get("error"),
                ).where(
                    # a job fleetd gave up on (lost) may still report its end; a
                    # cancelled one stays cancelled
                    (Job.id == data["job_id"]) & (Job.status.in_(("queued", "running", "lost")))
                ).execute()
                events.append(
                    {"job_id": data["job_id"], "type": "finished", "status": data["status"]}
                )
                if data["status"] == "failed":
                    retry = retry_after_failure(data["job_id"])
                    if retry is not None:
                        events.append({"job_id": retry[0], "type": "retry", "delay": retry[1]})
        elif frame.type == "snapshots.report":
            apply_snapshot_page(host_id, data)
        elif frame.type == "repo.locks":
            Host.update(repo_locks=data["count"], repo_locks_at=utcnow()).where(
                Host.id == host_id
            ).execute()
        elif frame.type == "repo.stats":
            RepoStats.insert(host=host_id, updated_at=utcnow(), **data).on_conflict(
                conflict_target=[RepoStats.host],
                preserve=[
                    RepoStats.size_bytes,
                    RepoStats.snapshot_count,
                    RepoStats.file_count,
                    RepoStats.raw_size_bytes,
                    RepoStats.lock_state,
                    RepoStats.updated_at,
                ],
            ).execute()
        else:
            log.info("host %s sent %s, which this fleetd does not apply", host.name, frame.type)
    for start in range(0, len(log_rows), 500):  # job logs are written in batches
        JobLog.insert_many(log_rows[start : start + 500]).on_conflict_ignore().execute()
    if last != host.last_seq:
        Host.update(last_seq=last).where(Host.id == host_id).execute()
    return last, events


def apply_snapshot_page(host_id: int, page: dict[str, Any]) -> None:
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
        }
        Snapshot.insert(**row).on_conflict(
            conflict_target=[Snapshot.host, Snapshot.snapshot_id],
            preserve=[Snapshot.tags, Snapshot.paths, Snapshot.reported_at],
            # a size learnt from the backup that made it is kept when later reports lack one
            update={
                Snapshot.size_bytes: fn.COALESCE(EXCLUDED.size_bytes, Snapshot.size_bytes),
                Snapshot.file_count: fn.COALESCE(EXCLUDED.file_count, Snapshot.file_count),
            },
        ).execute()
    if page.get("last", True):
        Snapshot.delete().where(
            (Snapshot.host == host_id)
            & ((Snapshot.reported_at < report_at) | Snapshot.reported_at.is_null())
        ).execute()


def iso(value: Optional[dt.datetime]) -> Optional[str]:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def line_json(job_id: int, seq: int, ts: dt.datetime, stream: str, payload: str) -> dict:
    return {"job": job_id, "seq": seq, "ts": iso(ts), "stream": stream, "payload": payload}


def job_json(job: Job) -> dict:
    user = job.actor_user.name if job.actor_user_id else None
    return {
        "id": job.id,
        "host": job.host.name,
        "kind": job.kind,
        "group": job.group_name,
        "status": job.status,
        "actor": user if job.actor_kind == "user" else job.actor_kind,
        "actor_kind": job.actor_kind,
        "schedule": job.schedule_id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "exit_code": job.exit_code,
        "summary": job.summary,
        "error": job.error,
    }
