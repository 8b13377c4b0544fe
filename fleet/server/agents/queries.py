"""Queries to agents (ls, find, diff of a repository): sent as query.run,
answered in pages of query.result that go to the one waiting for them.

Nothing here is stored: a query lives as long as its caller waits. Its
pages wait in a bounded queue; an agent sending faster than the caller
takes them, or a page that does not check against its kind's items, ends
the query with an error instead of holding the agent's link up.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Callable

from ...common import protocol
from ...common.protocol import ProtocolError, check_fields
from ..events import QueryAsked, QueryMore, QueryPage
from ..security.secrets import SecretBox, SecretError

# pages a query may have waiting: the agent sends at most QUERY_WINDOW ahead
QUEUE_PAGES = 64
PAGE_TIMEOUT = 300.0  # seconds without a page before the query is given up


class QueryFailed(Exception):
    """The agent could not answer; `code` is one of protocol.QUERY_CODES or
    offline / timeout / overflow / bad_frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Pending:
    def __init__(self, link: object, kind: str) -> None:
        self.link = link  # the agent session it was sent down
        self.kind = kind
        self.pages: asyncio.Queue = asyncio.Queue(QUEUE_PAGES + 1)


class Queries:
    def __init__(self) -> None:
        self.pending: dict[int, _Pending] = {}
        # from a random start: an agent may still run a query of a fleetd
        # that restarted, whose ids would otherwise start again at 1
        self.ids = itertools.count(random.randrange(1, 1 << 48))

    async def ask(
        self,
        send: Callable[[str], Awaitable[bool]],
        link: object,
        kind: str,
        params: dict[str, Any],
        timeout: float = PAGE_TIMEOUT,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The pages of the answer, as they come. Raises QueryFailed."""
        query_id = next(self.ids)
        pending = _Pending(link, kind)
        self.pending[query_id] = pending
        done = False
        try:
            frame = protocol.encode(
                "query.run",
                {"query_id": query_id, "kind": kind, "window": protocol.QUERY_WINDOW, **params},
            )
            if not await send(frame):
                raise QueryFailed("offline", "the host's agent went offline")
            taken = 0  # pages taken since the agent was last told it may send more
            while not done:
                try:
                    page = await asyncio.wait_for(pending.pages.get(), timeout)
                except asyncio.TimeoutError:
                    raise QueryFailed("timeout", f"no answer within {timeout:.0f} s") from None
                if isinstance(page, QueryFailed):
                    # the agent ended it (or its link did); it still runs a
                    # query fleetd gave up on, and is told to stop (finally)
                    done = page.code not in ("overflow", "bad_frame")
                    raise page
                items, done = page
                yield items
                taken += 1
                if not done and taken >= protocol.QUERY_WINDOW // 2:
                    more = {"query_id": query_id, "pages": taken}
                    await send(protocol.encode("query.more", more))
                    taken = 0
        finally:
            self.pending.pop(query_id, None)
            if not done:  # the caller went away: the agent may stop
                await send(protocol.encode("query.cancel", {"query_id": query_id}))

    def deliver(self, link: object, data: dict[str, Any]) -> None:
        """A query.result that came up `link` (a stray one is dropped)."""
        pending = self.pending.get(data["query_id"])
        if pending is None or pending.link is not link:
            return
        page: Any
        if data.get("error") is not None:
            page = QueryFailed(data.get("code") or "failed", data["error"])
        else:
            try:
                spec = protocol.QUERY_ITEMS[pending.kind]
                items = [check_fields(item, spec) for item in data["items"]]
                page = (items, data["done"])
            except ProtocolError as exc:
                page = QueryFailed("bad_frame", f"the agent's answer is malformed: {exc}")
        if pending.pages.qsize() >= QUEUE_PAGES:
            page = QueryFailed("overflow", "the agent answered faster than it was read")
            self.pending.pop(data["query_id"], None)
        pending.pages.put_nowait(page)

    def link_gone(self, link: object) -> None:
        """An agent's link ended: every query sent down it fails."""
        for query_id, pending in list(self.pending.items()):
            if pending.link is link:
                self.pending.pop(query_id, None)
                fail(pending, QueryFailed("offline", "the host's agent went offline"))


def fail(pending: _Pending, error: QueryFailed) -> None:
    try:
        pending.pages.put_nowait(error)
    except asyncio.QueueFull:  # full of pages: the last one says it ended
        pending.pages.get_nowait()
        pending.pages.put_nowait(error)


# -- queries relayed between replicas ---------------------------------------------

# pages the replica holding the agent's link passes on before the asker
# says it took them (as an agent before query.more)
RELAY_WINDOW = protocol.QUERY_WINDOW
# seconds for the replica holding the agent's link to say it took a query:
# none does when the agent went offline meanwhile
RELAY_TAKEN = 10.0


class Relayed:
    """Queries for hosts whose agents are connected through another replica
    (fleet.server.replicas): the asker publishes QueryAsked; the replica
    holding the link asks its agent and publishes each page as QueryPage,
    at most RELAY_WINDOW ahead of the asker's QueryMore. The pages go
    through the event table like every event: bounded by the window, and
    kept there minutes, like the rest."""

    def __init__(self, replica: str, publish: Callable[[list], None], box: SecretBox) -> None:
        self.replica = replica
        self.publish = publish  # Bus.publish
        self.box = box  # the fleet's key: pages cross the event table sealed
        self.waiting: dict[str, asyncio.Queue] = {}  # asker: query -> its pages
        self.holders: dict[str, str] = {}  # asker: query -> the replica answering it
        self.credit: dict[str, asyncio.Queue] = {}  # holder: query -> the asker's word
        self.ids = itertools.count(1)

    # -- the asker -----------------------------------------------------------

    async def ask(
        self, host_id: int, kind: str, params: dict[str, Any], timeout: float = PAGE_TIMEOUT
    ) -> AsyncIterator[list[dict[str, Any]]]:
        query_id = f"{self.replica}-{next(self.ids)}"
        pages: asyncio.Queue = asyncio.Queue(RELAY_WINDOW + 2)
        self.waiting[query_id] = pages
        done = False
        try:
            self.publish([QueryAsked(query_id, self.replica, host_id, kind, dict(params))])
            taken = 0
            while not done:
                wait = timeout if query_id in self.holders else RELAY_TAKEN
                try:
                    page = await asyncio.wait_for(pages.get(), wait)
                except asyncio.TimeoutError:
                    if query_id not in self.holders:
                        raise QueryFailed("offline", "the host's agent is offline") from None
                    raise QueryFailed("timeout", f"no answer within {timeout:.0f} s") from None
                if page.error is not None:
                    done = True
                    raise QueryFailed(page.code or "failed", page.error)
                done = page.done
                if page.sealed is None:  # taken, or the last word: no items
                    continue
                yield self._open(query_id, page.sealed)
                taken += 1
                if not done and taken >= RELAY_WINDOW // 2:
                    self.publish([QueryMore(query_id, taken)])
                    taken = 0
        finally:
            self.waiting.pop(query_id, None)
            self.holders.pop(query_id, None)
            if not done:
                self.publish([QueryMore(query_id, cancel=True)])

    def page(self, event: QueryPage) -> None:
        """A QueryPage from the replica holding the link (a stray one is dropped)."""
        pages = self.waiting.get(event.query_id)
        if event.asker != self.replica or pages is None:
            return
        # two replicas holding a link of the host at once (it moved): the
        # first to answer is heard, the other not
        if self.holders.setdefault(event.query_id, event.holder) != event.holder:
            return
        if pages.full():  # more than the window: the holder is broken; end it
            self.waiting.pop(event.query_id, None)
            pages.get_nowait()
            event = QueryPage(event.query_id, event.asker, error="too many pages", code="overflow")
        pages.put_nowait(event)

    # -- the replica holding the link -----------------------------------------

    async def answer(self, event: QueryAsked, ask: Callable[..., AsyncIterator]) -> None:
        """Ask the agent (ask: Agents.query) and pass each page on."""
        credit: asyncio.Queue = asyncio.Queue()
        self.credit[event.query_id] = credit
        me = self.replica
        ahead = 0
        try:
            pages = ask(event.host_id, event.kind, event.params)
            self.publish([QueryPage(event.query_id, event.asker, holder=me)])  # taken
            try:
                async for items in pages:
                    # the asker's word: pages taken, or it gave up
                    while ahead >= RELAY_WINDOW or not credit.empty():
                        more = await asyncio.wait_for(credit.get(), PAGE_TIMEOUT)
                        if more.cancel:
                            return
                        ahead -= more.pages
                    ahead += 1
                    sealed = self._seal(event.query_id, items)
                    self.publish([QueryPage(event.query_id, event.asker, sealed, holder=me)])
                self.publish([QueryPage(event.query_id, event.asker, done=True, holder=me)])
            finally:
                await pages.aclose()
        except QueryFailed as exc:
            failed = QueryPage(
                event.query_id, event.asker, error=exc.message, code=exc.code, holder=me
            )
            self.publish([failed])
        except asyncio.TimeoutError:
            pass  # the asker went away without a word: its own timeout ended it there
        finally:
            self.credit.pop(event.query_id, None)

    def _seal(self, query_id: str, items: list[dict[str, Any]]) -> str:
        plain = json.dumps(items, separators=(",", ":"), ensure_ascii=False)
        return base64.b64encode(self.box.encrypt(plain, f"query-page:{query_id}")).decode()

    def _open(self, query_id: str, sealed: str) -> list[dict[str, Any]]:
        try:
            plain = self.box.decrypt(base64.b64decode(sealed), f"query-page:{query_id}")
            return list(json.loads(plain))
        except (SecretError, ValueError, TypeError):
            raise QueryFailed("bad_frame", "a relayed page does not open") from None

    def more(self, event: QueryMore) -> None:
        credit = self.credit.get(event.query_id)
        if credit is not None:
            credit.put_nowait(event)
