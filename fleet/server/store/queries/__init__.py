"""Hot queries as plain SQL: the statements every agent connect or dispatch
runs, where building the query through the ORM cost more than running it.
Each function runs on the store thread; placeholders are written `?` and
turned into the database's own style."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Optional

import peewee as pw

from ..models import db


@functools.cache
def _paramed(sql: str, param: str) -> str:
    return sql if param == "?" else sql.replace("?", param)


def on_postgresql() -> bool:
    """Whether the store is PostgreSQL (several replicas may write at once)."""
    return isinstance(db.obj, pw.PostgresqlDatabase)


def execute(sql: str, *params: Any) -> Any:
    """Run one statement on the store's connection; returns the cursor."""
    database = db.obj
    return database.execute_sql(_paramed(sql, database.param), params)


def execute_many(sql: str, params: list) -> None:
    """One statement for each parameter tuple, prepared once."""
    database = db.obj
    database.cursor().executemany(_paramed(sql, database.param), params)


def one(sql: str, *params: Any) -> Any:
    return execute(sql, *params).fetchone()


# a due time not computed yet, in SQL: sorts before every other, on SQLite
# (text) as on PostgreSQL (a timestamp), and reads back as dt.datetime.min
NOT_YET = "'0001-01-01 00:00:00'"


def earliest_due(sql: str, *params: Any) -> Optional[dt.datetime]:
    """The one value `sql` selects as a due time: None when nothing is
    due, dt.datetime.min for NOT_YET (one not computed yet)."""
    (due,) = one(sql, *params)
    if due is None or isinstance(due, dt.datetime):  # PostgreSQL's are datetimes already
        return due
    return dt.datetime.fromisoformat(due)


def rows(sql: str, *params: Any) -> list:
    return execute(sql, *params).fetchall()


def when(value: Any) -> Any:
    """A datetime as the store keeps it (the form peewee writes)."""
    return None if value is None else str(value)
