"""A TCP relay between agents and fleetd that a test can cut and restore.

Agents dial the relay (fleetd's --public-url points at it), the relay
forwards to fleetd's real port. The relay can be made before fleetd
(`Relay()` listens at once; `retarget(port)` once fleetd has one), and
`retarget(port)` also follows a restarted fleetd.

`cut()` drops every relayed connection (both ends see a reset) and then,
like a host that became unreachable, refuses new connections (its
listening socket is closed; `restore()` listens again on the same port).
`cut(reset=True)` instead keeps accepting and resets each new connection
at once, as a TCP proxy or load balancer in front of a dead fleetd does.

Runs on its own thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional


class Relay:
    def __init__(self, target_port: int = 0) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # relayed since start, to tell reconnects apart
        self.refused = 0  # connections reset at once while cut with reset=True
        self._open = True
        self._generation = 0  # bumped by each cut: a dial in flight then is dropped
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", self.port, reuse_address=True
        )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            self.refused += 1
            writer.transport.abort()
            return
        generation = self._generation
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if not self._open or generation != self._generation:  # cut while dialling
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut(self, reset: bool = False) -> None:
        """Drop every relayed connection; refuse new ones (reset: accept and reset them)."""

        async def cut() -> None:
            self._open = False
            self._generation += 1
            if not reset and self._server is not None:
                self._server.close()
                self._server = None
            self._drop_all()

        self._call(cut())

    def restore(self) -> None:
        """Relay again (listening again on the same port if cut() closed it)."""

        async def restore() -> None:
            if self._server is None:
                await self._listen()
            self._open = True

        self._call(restore())

    def retarget(self, port: int) -> None:
        self.target_port = port

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            self._open = False
            if self._server is not None:
                self._server.close()
                self._server = None
            self._drop_all()
            me = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not me]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self._call(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
