"""Telling outside services: notifications and pings.

Notifications: each alert raised or resolved is sent, through Apprise (one
library for ntfy, email, Slack, Matrix, Telegram, webhooks and 100+ more),
to the notifiers whose filters it passes.

Pings: a source group with a Healthchecks-style ping URL has it pinged as
each of its backups starts (URL/start), succeeds (the URL itself) and fails
(URL/fail), so a dead-man's switch outside the fleet notices a backup that
never ran even when fleetd itself is down.

Sending runs in worker threads (both block on the network), never on
fleetd's event loop, and is tried again after RETRIES delays when it fails;
each notifier and group records when it last sent and its last failure.
URLs are secrets: encrypted in the store, bound to their row, never logged
or shown past their scheme (and, for a ping, host).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable
from typing import Any, Callable, Optional

import apprise

from .. import __version__
from .events import AlertChanged, Bus, JobEnded, JobStarted
from .security.secrets import SecretBox, ping_aad
from .security.secrets import notifier_aad as aad
from .store.db import Store, StoreClosed
from .store.models import Host, Job, Notifier, SourceGroup, utcnow

log = logging.getLogger("fleetd.notify")

RETRIES = (5.0, 30.0, 120.0)  # seconds before each further try
MAX_PENDING = 1000  # notifications waiting to be sent; past it the oldest are dropped


def send(url: str, title: str, body: str, failure: bool) -> Optional[str]:
    """One delivery (blocking): None, or why it failed."""
    sender = apprise.Apprise()
    if not sender.add(url):
        return "Apprise does not understand this URL"
    kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
    if not sender.notify(title=title, body=body, notify_type=kind):
        return "the service did not accept the notification"
    return None


def wants(n: Notifier, event: AlertChanged) -> bool:
    if n.kinds and event.kind not in n.kinds:
        return False
    if n.hosts and event.host not in n.hosts:
        return False
    return not n.groups or event.group in n.groups


def text(event: AlertChanged) -> tuple[str, str]:
    state = "raised" if event.raised else "resolved"
    where = "/".join(x for x in (event.host, event.group) if x)
    title = f"Fleet {event.severity}: {event.kind} {state}" + (f" ({where})" if where else "")
    body = event.message if event.raised else f"resolved: {event.message}"
    return title, f"{body}\n(alert {event.alert_id})"


class Notifications:
    """Subscribed to AlertChanged: finds the notifiers (store thread) and
    sends to each (worker thread), with retries."""

    def __init__(self, store: Store, box: SecretBox, bus: Bus) -> None:
        self.store = store
        self.box = box
        self.tasks: set[asyncio.Task] = set()
        # sent by the replica that raised or resolved the alert, once
        bus.subscribe(AlertChanged, self._changed, remote=False)

    def _changed(self, event: AlertChanged) -> None:
        if len(self.tasks) >= MAX_PENDING:
            log.warning("too many notifications waiting; alert %s not sent", event.alert_id)
            return
        task = asyncio.ensure_future(self._deliver(event))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _targets(self, event: AlertChanged) -> list[tuple[int, str, str]]:
        return [
            (n.id, n.name, self.box.decrypt(bytes(n.url_enc), aad(n.id)))
            for n in Notifier.select()
            if wants(n, event)
        ]

    async def _deliver(self, event: AlertChanged) -> None:
        try:
            targets = await self.store.read(self._targets, event)
        except StoreClosed:
            return
        title, body = text(event)
        await asyncio.gather(
            *(self._one(nid, name, url, title, body, event.raised) for nid, name, url in targets)
        )

    async def _one(
        self, nid: int, name: str, url: str, title: str, body: str, failure: bool
    ) -> None:
        error = await with_retries(f"notifier {name}", send, url, title, body, failure)
        try:
            await self.store.atomic(record, nid, error)
        except StoreClosed:
            pass

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


def record(nid: int, error: Optional[str]) -> None:
    Notifier.update(last_sent_at=utcnow(), last_error=error).where(Notifier.id == nid).execute()


async def with_retries(who: str, fn: Callable[..., Optional[str]], *args: Any) -> Optional[str]:
    """fn(*args) in a worker thread until it returns None (sent) or the
    RETRIES are spent; the last failure, or None."""
    error: Optional[str] = None
    for delay in (0.0, *RETRIES):
        if delay:
            await asyncio.sleep(delay)
        try:
            error = await asyncio.to_thread(fn, *args)
        except Exception as exc:  # a plugin's bug must not end the retries
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            break
        log.warning("%s: %s%s", who, error, "; trying again" if delay != RETRIES[-1] else "")
    return error


# -- pings ---------------------------------------------------------------------

PING_TIMEOUT = 10.0  # seconds a ping may take
PING_BODY = 10_000  # characters of the body at most (Healthchecks keeps 100 kB)


def ping_shown(url: str) -> str:
    """What may be shown of a ping URL: its scheme and host (the path holds
    the check's key)."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}/********"


def ping_url(url: str, phase: str) -> str:
    """Healthchecks' convention: the URL itself on success, with /start or
    /fail appended to its path otherwise (a query string stays last)."""
    if phase == "success":
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{phase}"))


def ping(url: str, body: str) -> Optional[str]:
    """One ping (blocking): POST the body; None, or why it failed (never
    the URL, which is a secret)."""
    request = urllib.request.Request(
        url,
        data=body[:PING_BODY].encode("utf-8", "replace"),
        method="POST",
        headers={
            "User-Agent": f"fleetd/{__version__}",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=PING_TIMEOUT) as response:
            response.read(4096)
    except urllib.error.HTTPError as exc:
        return f"the ping URL answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return f"the ping URL is out of reach: {exc.reason}"
    except (OSError, ValueError) as exc:
        return f"the ping failed: {type(exc).__name__}"
    return None


def phase_of(status: str) -> str:
    """The ping a backup's end sends: success for a snapshot made (one with
    unreadable files too: the body says so), fail for none."""
    return "success" if status in ("succeeded", "warning") else "fail"


def ping_body(job: Job, phase: str) -> str:
    what = f"{job.kind} of {job.host.name}/{job.group_name} (job {job.id})"
    if phase == "start":
        return f"{what} started"
    lines = [f"{what} {job.status}"]
    s = job.summary or {}
    if s.get("snapshot_id"):
        lines.append(
            f"snapshot {str(s['snapshot_id'])[:8]}: {s.get('files_new', 0)} new, "
            f"{s.get('files_changed', 0)} changed, {s.get('data_added', 0)} bytes added "
            f"in {float(s.get('total_duration') or 0):.1f} s"
        )
    if job.status == "warning":
        lines.append("some files could not be read: see fleetctl jobs log")
    if job.error:
        lines.append(job.error)
    return "\n".join(lines)


Phase = tuple[int, str]  # (job id, "start" | "end")


class Pings:
    """Subscribed to JobStarted and JobEnded: pings the URL of the group of
    each backup that has one. Events are gathered into one store read per
    turn of the loop (10,000 jobs ending at once are one query); a group's
    pings go out in order, so its start never lands after its end."""

    def __init__(self, store: Store, box: SecretBox, bus: Bus) -> None:
        self.store = store
        self.box = box
        self.waiting: list[Phase] = []
        self.reader: Optional[asyncio.Task] = None
        self.last: dict[int, asyncio.Task] = {}  # per group: its latest ping
        self.tasks: set[asyncio.Task] = set()
        # only backups ping: other jobs cost no read
        # by the replica that made the start or end: once
        bus.subscribe(
            JobStarted,
            lambda e: e.kind == "backup" and self._add((e.job_id, "start")),
            remote=False,
        )
        bus.subscribe(
            JobEnded, lambda e: e.kind == "backup" and self._add((e.job_id, "end")), remote=False
        )

    def _add(self, phase: Phase) -> None:
        if len(self.waiting) + len(self.tasks) >= MAX_PENDING:
            log.warning("too many pings waiting; job %s not pinged", phase[0])
            return
        self.waiting.append(phase)
        if self.reader is None:
            self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        """One read per batch, one batch after another: a start read in one
        batch is chained before the end read in the next."""
        try:
            while self.waiting:
                await asyncio.sleep(0)  # the rest of this batch of events first
                phases, self.waiting = self.waiting, []
                found = await self.store.read(self._targets, phases)
                for group_id, url, body in found:
                    self._chain(group_id, self._send(group_id, url, body, self.last.get(group_id)))
        except StoreClosed:
            self.waiting = []
        finally:
            self.reader = None

    def _targets(self, phases: list[Phase]) -> list[tuple[int, str, str]]:
        """(group, URL, body) of each phase of a backup whose group pings."""
        ids = sorted({job_id for job_id, _ in phases})
        jobs = {
            j.id: j
            for j in Job.select(Job, SourceGroup, Host)
            .join(SourceGroup)
            .switch(Job)
            .join(Host)
            .where(Job.id.in_(ids), Job.kind == "backup", SourceGroup.ping_url_enc.is_null(False))
        }
        out = []
        for job_id, phase in phases:
            job = jobs.get(job_id)
            if job is None:
                continue
            if phase == "end":
                phase = phase_of(job.status)
            url = self.box.decrypt(bytes(job.group.ping_url_enc), ping_aad(job.group_id))
            out.append((job.group_id, ping_url(url, phase), ping_body(job, phase)))
        return out

    def _chain(self, group_id: int, ping_: Awaitable[None]) -> None:
        task = asyncio.ensure_future(ping_)
        self.last[group_id] = task
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if self.last.get(group_id) is t:
                del self.last[group_id]

        task.add_done_callback(done)

    async def _send(
        self, group_id: int, url: str, body: str, before: Optional[asyncio.Task]
    ) -> None:
        if before is not None:
            await asyncio.wait({before})  # its pings go out in order
        error = await with_retries(f"ping of group {group_id}", ping, url, body)
        try:
            await self.store.atomic(record_ping, group_id, error)
        except StoreClosed:
            pass

    async def stop(self) -> None:
        for task in [*self.tasks, *([self.reader] if self.reader else [])]:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


def record_ping(group_id: int, error: Optional[str]) -> None:
    SourceGroup.update(ping_sent_at=utcnow(), ping_error=error).where(
        SourceGroup.id == group_id
    ).execute()
