"""Queries: browsing a repository for fleetd (ls, find, diff) beside the
jobs. They only read, without a lock (`--no-lock`), so they neither wait
for the job running nor hold up the next one; at most MAX_RUNNING at once.
Results go back as query.result frames of at most QUERY_PAGE items, sent
as restic prints them (a listing of 100,000 files is never held whole);
they are not spooled: a query lost with the link is asked again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, Callable, Optional

from ..common.protocol import MAX_STR, QUERY_CHUNK, QUERY_PAGE, ProtocolError, check_fields
from ..common.restic import commands, execute, parse
from .kinds import Refused, _opt, _req
from .runner import JobRunner, restic_env

log = logging.getLogger("fleet-agent")

MAX_RUNNING = 2
TIMEOUT = 600.0  # seconds a query may run before it is stopped
PAGE_BYTES = 512 * 1024  # a page is sent at this much JSON, whatever its count

Parser = Callable[[str], Optional[dict[str, Any]]]

_SCHEMA = {
    "ls": (_req("snapshot", "str", limit=64), _req("path", "str", limit=4096)),
    "find": (
        _req("patterns", "list[str]", limit=16),
        _opt("hosts", "list[str]", limit=100),
        _opt("tag", "str", limit=64),
    ),
    "diff": (_req("snapshot", "str", limit=64), _req("snapshot2", "str", limit=64)),
    "dump": (_req("snapshot", "str", limit=64), _req("path", "str", limit=4096)),
}


def prepare(data: dict[str, Any]) -> tuple[tuple, Optional[Parser]]:
    """The restic command of a query.run and the parser of its output lines
    (None: its output is a file's bytes, sent as they are). Raises Refused
    (unknown_kind, bad_params)."""
    kind = data.get("kind")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise Refused("unknown_kind", f"this agent cannot answer {kind} queries")
    try:
        p = check_fields(data, schema)
        if kind == "ls":
            directory = p["path"]
            return commands.ls(p["snapshot"], directory), lambda line: parse.ls_node(
                line, directory
            )
        if kind == "find":
            state = parse.FindState()
            argv = commands.find(p["patterns"], p.get("hosts") or (), p.get("tag") or "")
            return argv, state.line
        if kind == "dump":
            return commands.dump(p["snapshot"], p["path"]), None
        return commands.diff(p["snapshot"], p["snapshot2"]), parse.diff_line
    except (ProtocolError, ValueError) as exc:
        raise Refused("bad_params", f"bad parameters: {exc}") from None


class Queries:
    """The queries running; `emit` sends a frame now (the link's emit_now)."""

    def __init__(self, runner: JobRunner, emit: Callable[[str, dict], Any]) -> None:
        self.runner = runner
        self.emit = emit
        self.running: dict[int, asyncio.Event] = {}  # query id -> its cancel
        # pages each query may still send before fleetd asks for more
        self.credit: dict[int, int] = {}
        self.more: dict[int, asyncio.Event] = {}

    async def submit(self, data: dict[str, Any]) -> None:
        """Start a query, or answer at once why not."""
        query_id = data["query_id"]
        try:
            if query_id in self.running:
                raise Refused("bad_params", f"query {query_id} runs already")
            if len(self.running) >= MAX_RUNNING:
                raise Refused("busy", f"{MAX_RUNNING} queries running already")
            argv, parser = prepare(data)
            repo = self.runner.repository(data.get("repository_id"))
        except Refused as exc:
            await self._page(query_id, [], True, exc.message, exc.code)
            return
        cancel = asyncio.Event()
        self.running[query_id] = cancel
        if data.get("window"):
            self.credit[query_id] = data["window"]
            self.more[query_id] = asyncio.Event()
        asyncio.ensure_future(self._run(query_id, argv, parser, repo, cancel))

    def cancel(self, query_id: int) -> None:
        cancel = self.running.get(query_id)
        if cancel is not None:
            cancel.set()
            more = self.more.get(query_id)
            if more is not None:
                more.set()  # a page waiting for credit gives up

    def cancel_all(self) -> None:
        """The link went: no answer can reach whoever asked."""
        for query_id in list(self.running):
            self.cancel(query_id)

    def grant(self, query_id: int, pages: int) -> None:
        """query.more: fleetd took `pages` pages."""
        if query_id in self.credit:
            self.credit[query_id] += pages
            self.more[query_id].set()

    async def _room(self, query_id: int) -> None:
        """Wait until the query may send another page (fleetd's window)."""
        while self.credit.get(query_id, 1) <= 0 and not self.running[query_id].is_set():
            more = self.more[query_id]
            more.clear()
            await more.wait()
        if query_id in self.credit:
            self.credit[query_id] -= 1

    async def _page(
        self,
        query_id: int,
        items: list,
        done: bool,
        error: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        data: dict[str, Any] = {"query_id": query_id, "items": items, "done": done}
        if error is not None:
            data.update(error=error, code=code or "failed")
        await self.emit("query.result", data)

    async def _run(
        self,
        query_id: int,
        argv: tuple,
        parser: Optional[Parser],
        repo: Any,
        cancel: asyncio.Event,
    ) -> None:
        page: list[dict[str, Any]] = []

        size = 0  # of the page's items, as JSON (a frame holds 1 MiB at most)

        async def on_line(stream: str, line: str) -> None:
            nonlocal page, size
            if stream != "stdout" or parser is None:
                return
            try:
                item = parser(line)
            except Exception:  # one odd line must not stop restic's output being read
                log.exception("query %s: a line of restic's output could not be read", query_id)
                return
            if item is None:
                return
            item = {k: v for k, v in item.items() if v is not None}
            if any(isinstance(v, str) and len(v) > MAX_STR for v in item.values()):
                return  # a path longer than the protocol carries (PATH_MAX is 4096)
            page.append(item)
            size += len(json.dumps(item))
            if len(page) >= QUERY_PAGE or size >= PAGE_BYTES:
                full, page, size = page, [], 0
                await self._room(query_id)
                await self._page(query_id, full, False)

        async def on_bytes(chunk: bytes) -> None:
            await self._room(query_id)
            await self._page(query_id, [{"data": base64.b64encode(chunk).decode()}], False)

        timer = asyncio.get_running_loop().call_later(TIMEOUT, self.cancel, query_id)
        try:
            env, mask = restic_env(repo)
            result = await execute.run(
                self.runner.argv(argv),
                env,
                on_line,
                mask,
                cancel,
                self.runner.grace,
                on_bytes=on_bytes if parser is None else None,
                chunk=QUERY_CHUNK,
            )
            if result.exit_code == 0:
                await self._page(query_id, page, True)
            else:
                why = "stopped" if result.cancelled else (result.error or "restic failed")
                await self._page(query_id, [], True, why, "failed")
        except Exception as exc:  # the answer must come, whatever broke
            log.exception("query %s failed", query_id)
            await self._page(query_id, [], True, f"{type(exc).__name__}: {exc}", "failed")
        finally:
            timer.cancel()
            if self.running.get(query_id) is cancel:
                del self.running[query_id]
                self.credit.pop(query_id, None)
                self.more.pop(query_id, None)
