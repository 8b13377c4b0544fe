"""GET /metrics: Prometheus' text format, computed from the store at each
scrape (so two replicas would say the same), off unless `fleetd serve
--metrics`, and only for a caller with an API token (any role).

Per host: online, last seen. Per group: the last successful backup's time
(`fleet_group_last_success_timestamp_seconds`), the data it added, the last
backup's duration and outcome, overdue, the last restore drill that
succeeded and the last one's outcome. Per repository: stored size,
snapshots, locks, the last check's time and outcome. The problems
`fleetctl status` reports, by kind and severity; jobs by status.

The fleetd_* metrics are this process's own (Process): connections open,
accepted and refused, jobs dispatched and ended, since it started; each
replica has its own, as Prometheus' instance label tells apart.
"""

from __future__ import annotations

import calendar
import collections
import datetime as dt
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Callable, Optional, Protocol

from peewee import fn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..common.timefmt import parse_ts
from . import health
from .events import Bus, JobDispatched, JobEnded
from .store.models import Alert, Job, Repository, RepoStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _ts(value: Optional[str]) -> Optional[float]:
    """An ISO time from the status view as Unix seconds."""
    if not value:
        return None
    return float(calendar.timegm(parse_ts(value).timetuple()))


def families(now: dt.datetime) -> list[GaugeMetricFamily]:
    """Every metric, read from the store (on its thread)."""
    view = health.build(
        now, health.DEFAULT_OFFLINE_AFTER, health.DEFAULT_UNCHECKED_AFTER, progress={}
    )
    online = GaugeMetricFamily(
        "fleet_host_online", "1 when the host's agent is connected", labels=["host"]
    )
    seen = GaugeMetricFamily(
        "fleet_host_last_seen_timestamp_seconds",
        "When the host's agent was last heard",
        labels=["host"],
    )
    success = GaugeMetricFamily(
        "fleet_group_last_success_timestamp_seconds",
        "When the group's last successful backup ended",
        labels=["host", "group"],
    )
    added = GaugeMetricFamily(
        "fleet_group_last_success_added_bytes",
        "What the group's last successful backup added to its repository",
        labels=["host", "group"],
    )
    outcome = GaugeMetricFamily(
        "fleet_group_last_backup_status",
        "1 for the status the group's last backup ended with",
        labels=["host", "group", "status"],
    )
    duration = GaugeMetricFamily(
        "fleet_group_last_backup_duration_seconds",
        "How long the group's last backup ran",
        labels=["host", "group"],
    )
    overdue = GaugeMetricFamily(
        "fleet_group_overdue", "1 when the group's backup is overdue", labels=["host", "group"]
    )
    proven = GaugeMetricFamily(
        "fleet_group_last_proven_timestamp_seconds",
        "When the group's last restore drill succeeded (last proven restorable)",
        labels=["host", "group"],
    )
    drill_ok = GaugeMetricFamily(
        "fleet_group_last_drill_ok",
        "1 when the group's last restore drill succeeded, 0 when it failed",
        labels=["host", "group"],
    )
    for h in view["hosts"]:
        online.add_metric([h["name"]], 1.0 if h["online"] else 0.0)
        if h["last_seen_at"]:
            seen.add_metric([h["name"]], _ts(h["last_seen_at"]))
        for g in h["groups"]:
            labels = [h["name"], g["name"]]
            if g["last_success_at"]:
                success.add_metric(labels, _ts(g["last_success_at"]))
            if g["last_success_added_bytes"] is not None:
                added.add_metric(labels, float(g["last_success_added_bytes"]))
            if g["last_status"]:
                outcome.add_metric([*labels, g["last_status"]], 1.0)
            if g["last_duration_seconds"] is not None:
                duration.add_metric(labels, g["last_duration_seconds"])
            overdue.add_metric(labels, 1.0 if g["overdue"] else 0.0)
            if g["last_proven_at"]:
                proven.add_metric(labels, _ts(g["last_proven_at"]))
            if g["last_drill_status"]:
                drill_ok.add_metric(labels, 1.0 if g["last_drill_status"] == "succeeded" else 0.0)

    raw = GaugeMetricFamily(
        "fleet_repository_stored_bytes",
        "What the repository stores after deduplication and compression",
        labels=["repository"],
    )
    snaps = GaugeMetricFamily(
        "fleet_repository_snapshots", "Snapshots in the repository", labels=["repository"]
    )
    locks = GaugeMetricFamily(
        "fleet_repository_locks", "restic locks in the repository", labels=["repository"]
    )
    checked = GaugeMetricFamily(
        "fleet_repository_last_check_timestamp_seconds",
        "When the repository's last check ended",
        labels=["repository"],
    )
    check_ok = GaugeMetricFamily(
        "fleet_repository_last_check_ok", "1 when its last check succeeded", labels=["repository"]
    )
    sizes = _sizes()
    for r in view["repositories"]:
        labels = [r["name"]]
        stored, count = sizes.get(r["name"], (None, None))
        if stored is not None:
            raw.add_metric(labels, float(stored))
        if count is not None:
            snaps.add_metric(labels, float(count))
        if r["locks"] is not None:
            locks.add_metric(labels, float(r["locks"]))
        if r["last_check_at"]:
            checked.add_metric(labels, _ts(r["last_check_at"]))
            check_ok.add_metric(labels, 1.0 if r["last_check_status"] == "succeeded" else 0.0)

    problems = GaugeMetricFamily(
        "fleet_problems", "Problems fleetctl status reports", labels=["kind", "severity"]
    )
    counted: dict[tuple[str, str], int] = defaultdict(int)
    for p in view["problems"]:
        counted[(p["kind"], p["severity"])] += 1
    for (kind, severity), n in sorted(counted.items()):
        problems.add_metric([kind, severity], float(n))
    alerts = GaugeMetricFamily(
        "fleet_alerts_open", "Open alerts, by kind and severity", labels=["kind", "severity"]
    )
    for kind, severity, n in (
        Alert.select(Alert.kind, Alert.severity, fn.COUNT(Alert.id))
        .where(Alert.resolved_at.is_null())
        .group_by(Alert.kind, Alert.severity)
        .tuples()
    ):
        alerts.add_metric([kind, severity], float(n))
    jobs = GaugeMetricFamily("fleet_jobs", "Jobs fleetd holds, by status", labels=["status"])
    for state, n in Job.select(Job.status, fn.COUNT(Job.id)).group_by(Job.status).tuples():
        jobs.add_metric([state], float(n))
    return [
        online,
        seen,
        success,
        added,
        outcome,
        duration,
        overdue,
        proven,
        drill_ok,
        raw,
        snaps,
        locks,
        checked,
        check_ok,
        problems,
        alerts,
        jobs,
    ]


def _sizes() -> dict[str, tuple[Optional[int], Optional[int]]]:
    """repository name -> (stored bytes, snapshots): the stored size as the
    host that measured it last saw it, the snapshots of every host summed."""
    out: dict[str, tuple[Optional[int], Optional[int]]] = {}
    rows = (
        RepoStats.select(RepoStats, Repository.name)
        .join(Repository)
        .order_by(RepoStats.measured_at.asc(nulls="first"))
    )
    for s in rows:
        stored, count = out.get(s.repository.name, (None, 0))
        out[s.repository.name] = (
            s.raw_size_bytes if s.raw_size_bytes is not None else stored,
            (count or 0) + s.snapshot_count,
        )
    return out


class Counted(Protocol):
    accepted: collections.Counter[str]  # connections, by endpoint
    refused: collections.Counter[str]  # connections, by reason


class Process:
    """fleetd's own counters since it started, kept as plain ints where they
    happen (ConnectionLimits, the bus) and read at scrape time."""

    def __init__(
        self, bus: Optional[Bus], counted: Counted, open_: Callable[[], dict[str, int]]
    ) -> None:
        self.counted = counted
        self.open = open_
        self.started = time.time()
        self.dispatched = 0
        self.ended: collections.Counter[str] = collections.Counter()  # by status
        if bus is not None:  # this replica's counts: each counts what it did
            bus.subscribe(JobDispatched, self._dispatched, remote=False)
            bus.subscribe(JobEnded, self._ended, remote=False)

    def _dispatched(self, _: JobDispatched) -> None:
        self.dispatched += 1

    def _ended(self, event: JobEnded) -> None:
        self.ended[event.status] += 1

    def families(self) -> list[Any]:
        start = GaugeMetricFamily("fleetd_start_time_seconds", "When this fleetd started")
        start.add_metric([], self.started)
        open_ = GaugeMetricFamily(
            "fleetd_connections_open",
            "Connections open now: agents, operators (ctl) and all TCP connections",
            labels=["endpoint"],
        )
        for endpoint, n in sorted(self.open().items()):
            open_.add_metric([endpoint], float(n))
        accepted = CounterMetricFamily(
            "fleetd_connections_accepted",
            "Connections accepted, by endpoint (metrics: scrapes)",
            labels=["endpoint"],
        )
        for endpoint, n in sorted(self.counted.accepted.items()):
            accepted.add_metric([endpoint], float(n))
        refused = CounterMetricFamily(
            "fleetd_connections_refused",
            "Connections refused, by reason (bad_token, no_token, rate_limited, "
            "connection_limit, hard_limit, unauthenticated_per_address)",
            labels=["reason"],
        )
        for reason, n in sorted(self.counted.refused.items()):
            refused.add_metric([reason], float(n))
        dispatched = CounterMetricFamily(
            "fleetd_jobs_dispatched", "Jobs this fleetd sent to agents"
        )
        dispatched.add_metric([], float(self.dispatched))
        ended = CounterMetricFamily(
            "fleetd_jobs_ended", "Jobs this fleetd saw end, by status", labels=["status"]
        )
        for state, n in sorted(self.ended.items()):
            ended.add_metric([state], float(n))
        return [start, open_, accepted, refused, dispatched, ended]


class _Snapshot(Collector):
    def __init__(self, metrics: list[Any]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        return iter(self.metrics)


def render(metrics: list[Any]) -> bytes:
    """The exposition text of one scrape: `families` read from the store,
    and the process's own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)
