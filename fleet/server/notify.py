"""Notifications: each alert raised or resolved is sent, through Apprise
(one library for ntfy, email, Slack, Matrix, Telegram, webhooks and 100+
more), to the notifiers whose filters it passes.

Sending runs in a worker thread (Apprise blocks on the network), never on
fleetd's event loop, and is tried again after RETRIES delays when it fails;
each notifier records when it last sent and its last failure. Its URL is a
secret: encrypted in the store, bound to its row, never logged or shown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import apprise

from .events import AlertChanged, Bus
from .security.secrets import SecretBox
from .store.db import Store, StoreClosed
from .store.models import Notifier, utcnow

log = logging.getLogger("fleetd.notify")

RETRIES = (5.0, 30.0, 120.0)  # seconds before each further try
MAX_PENDING = 1000  # notifications waiting to be sent; past it the oldest are dropped


def aad(notifier_id: int) -> str:
    return f"notifier:{notifier_id}:url"


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
        bus.subscribe(AlertChanged, self._changed)

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
        error: Optional[str] = None
        for delay in (0.0, *RETRIES):
            if delay:
                await asyncio.sleep(delay)
            try:
                error = await asyncio.to_thread(send, url, title, body, failure)
            except Exception as exc:  # a plugin's bug must not end the retries
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                break
            log.warning(
                "notifier %s: %s%s", name, error, "; trying again" if delay != RETRIES[-1] else ""
            )
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
