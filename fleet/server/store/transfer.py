"""Moving a SQLite store into an empty PostgreSQL database
(`fleetd migrate-store`).

Rows go through the peewee models, so each value is read as SQLite holds
it and written as PostgreSQL wants it (0/1 -> boolean, text -> timestamp,
bytes -> bytea); ids are kept. Both databases are open at once: the models
are bound to the source to read a batch and to the target to write it
(Database.bind_ctx), never to both.

The whole copy is one transaction on the target, checked before it
commits (row counts, and every secret decrypting with the data
directory's key): a failure leaves the target as empty as it was. The
source is held under a SQLite write lock for as long, so a fleetd still
serving it fails its writes instead of losing them in the move.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import peewee as pw

from ..security.secrets import (
    SecretBox,
    SecretError,
    notifier_aad,
    ping_aad,
    repository_aad,
)
from .models import MODELS, Notifier, Repository, SchemaVersion, SourceGroup

BATCH = 1000  # rows read and inserted at a time: a job_log of millions never sits in memory

Model = type[pw.Model]


class TransferError(Exception):
    """The move was refused or failed; the target holds no row of it."""


@dataclass
class Report:
    """What was copied: rows per table (in copy order) and how long it took."""

    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def copy_order() -> list[Model]:
    """Every table but schema_version (the target has its own), parents
    before the tables whose foreign keys name them."""
    return [m for m in pw.sort_models(MODELS) if m is not SchemaVersion]


def _primary_key(model: Model) -> list[pw.Field]:
    meta = model._meta
    if isinstance(meta.primary_key, pw.CompositeKey):
        return [meta.fields[name] for name in meta.primary_key.field_names]
    return [meta.primary_key]


def nonempty_tables(database: pw.Database) -> list[str]:
    """The tables of `database` holding a row (schema_version aside)."""
    with database.bind_ctx(MODELS):
        return [m._meta.table_name for m in copy_order() if m.select().exists()]


def copy_table(model: Model, source: pw.Database, target: pw.Database, batch: int = BATCH) -> int:
    """Copy one table in primary-key order, `batch` rows at a time; returns
    the rows copied. SQLite's cursor steps through the table as it is read,
    so only one batch is held."""
    fields = model._meta.sorted_fields
    with source.bind_ctx(MODELS):
        rows: Iterator[tuple] = iter(
            model.select(*fields).order_by(*_primary_key(model)).tuples().iterator()
        )
    copied = 0
    while True:
        with source.bind_ctx(MODELS):
            chunk = list(itertools.islice(rows, batch))
        if not chunk:
            return copied
        with target.bind_ctx(MODELS):
            model.insert_many(chunk, fields=fields).as_rowcount().execute()
        copied += len(chunk)


def count_rows(database: pw.Database, models: list[Model]) -> dict[str, int]:
    with database.bind_ctx(MODELS):
        return {m._meta.table_name: m.select().count() for m in models}


def secrets(database: pw.Database) -> Iterator[tuple[str, bytes, str]]:
    """Every encrypted value of the store: (what it is, ciphertext, the
    associated data it was sealed with), by the rules of the code that
    encrypts them (api/repos.py, api/notify.py, api/groups.py)."""
    with database.bind_ctx(MODELS):
        for r in Repository.select().order_by(Repository.id).iterator():
            for what, blob in (
                ("url", r.url_enc),
                ("password", r.password_enc),
                ("env", r.env_enc),
            ):
                if blob is not None:
                    yield f"repository {r.name!r}: its {what}", blob, repository_aad(r.aad, what)
        groups = SourceGroup.select(SourceGroup.id, SourceGroup.name, SourceGroup.ping_url_enc)
        for g in groups.where(SourceGroup.ping_url_enc.is_null(False)).iterator():
            yield f"group {g.name!r} (id {g.id}): its ping URL", g.ping_url_enc, ping_aad(g.id)
        for n in Notifier.select(Notifier.id, Notifier.name, Notifier.url_enc).iterator():
            yield f"notifier {n.name!r}: its URL", n.url_enc, notifier_aad(n.id)


def check_secrets(database: pw.Database, box: SecretBox) -> int:
    """Decrypt every secret of `database`; returns how many. Raises
    TransferError on the first that does not decrypt."""
    checked = 0
    for what, blob, aad in secrets(database):
        try:
            box.decrypt(bytes(blob), aad)
        except SecretError:
            raise TransferError(
                f"{what} does not decrypt with the data directory's secret.key after the copy "
                "(is this the key of that store?)"
            ) from None
        checked += 1
    return checked


def sqlite_sequences(source: pw.Database) -> dict[str, int]:
    """The highest id each AUTOINCREMENT table (job, alert) ever handed out:
    SQLite never hands it out again, even once its row is deleted."""
    try:
        return {
            name: seq for name, seq in source.execute_sql("SELECT name, seq FROM sqlite_sequence")
        }
    except pw.OperationalError:  # no AUTOINCREMENT table
        return {}


def set_sequences(target: pw.Database, models: list[Model], floors: dict[str, int]) -> None:
    """Each BIGSERIAL sequence past the highest id copied (ids were given
    explicitly, so PostgreSQL did not advance them), and past the floor
    SQLite's AUTOINCREMENT kept."""
    for model in models:
        key = model._meta.primary_key
        if not isinstance(key, pw.AutoField):
            continue
        table = model._meta.table_name
        with target.bind_ctx(MODELS):
            highest = model.select(pw.fn.MAX(key)).scalar() or 0
        last = max(highest, floors.get(table, 0))
        # setval(seq, n, true): the next id is n + 1; (1, false): it is 1
        target.execute_sql(
            "SELECT setval(pg_get_serial_sequence(%s, %s), %s, %s)",
            (f'"{table}"', key.column_name, max(last, 1), last > 0),
        )


@contextlib.contextmanager
def write_lock(source: pw.Database) -> Iterator[None]:
    """SQLite's write lock (BEGIN IMMEDIATE) for the whole copy: the copy
    reads one state of the source, and a fleetd still serving it fails its
    writes (after its busy timeout) instead of writing rows the move would
    leave behind. Nothing is written: it ends in a rollback."""
    try:
        source.execute_sql("BEGIN IMMEDIATE")
    except pw.OperationalError as exc:
        raise TransferError(f"cannot lock the SQLite store ({exc}): stop fleetd first") from None
    try:
        yield
    finally:
        source.execute_sql("ROLLBACK")


def move(
    source: pw.Database,
    target: pw.Database,
    box: SecretBox,
    batch: int = BATCH,
) -> Report:
    """Copy every table of the SQLite `source` into the empty PostgreSQL
    `target` (both opened and migrated to the latest schema), verify, and
    commit. Raises TransferError, with nothing written to the target, when
    the target has rows, the source is locked by a writer, a row does not
    go in, or the check after the copy finds a difference."""
    started = time.monotonic()
    models = copy_order()
    report = Report()
    table = ""
    try:
        with write_lock(source), target.atomic():  # one transaction: a failure rolls it all back
            full = nonempty_tables(target)
            if full:
                raise TransferError(
                    f"the target database is not empty (rows in {', '.join(full)}); "
                    "migrate-store moves a store into an empty database only"
                )
            for model in models:
                table = model._meta.table_name
                report.rows[table] = copy_table(model, source, target, batch)
            table = ""
            before, after = count_rows(source, models), count_rows(target, models)
            differ = [f"{t}: {before[t]} -> {after[t]}" for t in before if before[t] != after[t]]
            if differ:
                raise TransferError(f"row counts differ after the copy ({'; '.join(differ)})")
            check_secrets(target, box)
            set_sequences(target, models, sqlite_sequences(source))
    except (pw.DatabaseError, ValueError) as exc:
        where = f" in table {table}" if table else ""
        message = str(exc).strip() or type(exc).__name__
        raise TransferError(f"the copy failed{where}: {message}") from None
    report.seconds = time.monotonic() - started
    return report
