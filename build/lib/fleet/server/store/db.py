"""Opening the database and running store work off the event loop.

fleetd's event loop never waits on disk: every store call runs on one
dedicated thread (SQLite allows one writer at a time anyway, and one
thread means one connection and no lock contention inside the process).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import peewee as pw

from .migrations import migrate
from .models import db

T = TypeVar("T")

PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
    # FULL: an acknowledged write survives a power cut, not just a crash.
    "synchronous": "full",
}


def open_database(path: Path) -> pw.SqliteDatabase:
    """Open (creating if needed) the SQLite file, bind the models, migrate."""
    database = pw.SqliteDatabase(str(path), pragmas=PRAGMAS)
    db.initialize(database)
    database.connect(reuse_if_open=True)
    try:
        migrate(database)
    except Exception:
        database.close()
        raise
    return database


class Store:
    """Runs callables on the store thread: `await store.run(fn, *args)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._database: pw.SqliteDatabase | None = None

    async def open(self) -> None:
        self._database = await self.run(open_database, self.path)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def atomic(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn inside one transaction on the store thread."""

        def call() -> T:
            with db.atomic():
                return fn(*args, **kwargs)

        return await self.run(call)

    async def close(self) -> None:
        if self._database is not None:
            await self.run(self._database.close)
            self._database = None
        self._executor.shutdown(wait=True)
