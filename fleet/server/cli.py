"""`fleetd`: initialise a data directory, serve, move a SQLite store to PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Optional

import click
import peewee

from .. import __version__
from ..common.exitcodes import Exit
from .agentfile import AgentFileError
from .api.common import NAME_RE
from .app import (
    DB_NAME,
    KEY_NAME,
    ConfigError,
    ServeConfig,
    is_loopback,
    parse_listen,
    parse_public_urls,
    run_server,
)
from .security import auth
from .security.secrets import SecretError, create_key_file, load_key_file
from .security.tls import TlsError
from .store import transfer
from .store.db import Location, LocationError, close_connection, locate, open_database
from .store.models import AuditLog, User

DEFAULT_DATA_DIR = "/var/lib/fleetd"

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    envvar="FLEETD_DATA_DIR",
    show_default=True,
    help="Directory holding the database and the secret key (env FLEETD_DATA_DIR).",
)

database_option = click.option(
    "--database",
    metavar="URL",
    envvar="FLEETD_DATABASE",
    help="The store: postgresql://[USER@]HOST[:PORT]/DBNAME[?PARAM=VALUE...] (libpq's URL; no "
    "password in it), or sqlite:///PATH. Default: what 'fleetd init --database' wrote in "
    "DATA_DIR/database, else the SQLite file DATA_DIR/fleet.db (env FLEETD_DATABASE).",
)
password_file_option = click.option(
    "--database-password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="FLEETD_DATABASE_PASSWORD_FILE",
    help="File whose first line is the PostgreSQL password (else FLEETD_DATABASE_PASSWORD, "
    "else libpq's PGPASSWORD or ~/.pgpass).",
)
DATABASE_FILE = "database"  # DATA_DIR/database: the URL 'init --database' was given


class Fail(click.ClickException):
    """An error line on stderr and a chosen exit status."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.exit_code = int(code)

    def show(self, file=None) -> None:
        click.echo(f"fleetd: error: {self.message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetd")
def cli() -> None:
    """The Fleet control plane: serves agents (/agent) and operators (/ctl)."""


def write_new_private(path: Path, text: str) -> None:
    """A file only fleetd's user reads (it names the database and its user)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def database_password(password_file: Optional[Path]) -> Optional[str]:
    if password_file is not None:
        try:
            lines = password_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise Fail(f"cannot read {password_file}: {exc}") from None
        if not lines or not lines[0]:
            raise Fail(f"{password_file}: the first line is empty", Exit.USAGE)
        return lines[0]
    return os.environ.get("FLEETD_DATABASE_PASSWORD") or None


def store_location(
    data_dir: Path, database: Optional[str], password_file: Optional[Path]
) -> Location:
    """--database, else DATA_DIR/database, else DATA_DIR/fleet.db."""
    recorded = data_dir / DATABASE_FILE
    if database is None and recorded.exists():
        try:
            database = recorded.read_text().strip()
        except OSError as exc:
            raise Fail(f"cannot read {recorded}: {exc.strerror}") from None
    if database is None:
        return Location(sqlite=data_dir / DB_NAME)
    try:
        return locate(database, database_password(password_file))
    except LocationError as exc:
        raise Fail(str(exc), Exit.USAGE) from None


def already_initialised(where: Location) -> bool:
    """Whether the store has users already (a PostgreSQL another replica's
    init made)."""
    if where.sqlite is not None:
        return where.sqlite.exists()
    database = open_database(where)
    try:
        return User.select().exists()
    finally:
        database.close()


@cli.command()
@data_dir_option
@database_option
@password_file_option
@click.option(
    "--admin",
    "admin_name",
    default="admin",
    show_default=True,
    help="Name of the first admin user.",
)
def init(
    data_dir: Path, database: Optional[str], database_password_file: Optional[Path], admin_name: str
) -> None:
    """Create the database, the secret key and the first admin.

    The admin password is taken from FLEET_ADMIN_PASSWORD, or generated and
    printed once. Refuses to touch a directory that is already initialised.
    With --database postgresql://..., the schema and the admin go into that
    database and its URL into DATA_DIR/database; more fleetd replicas serve
    it with a copy of this data directory (secret.key and database).
    """
    if not NAME_RE.match(admin_name):
        raise Fail(
            f"--admin {admin_name!r}: a user name holds only letters, digits, '.', '_' or '-'",
            Exit.USAGE,
        )
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise Fail(f"cannot create {data_dir}: {exc.strerror}") from None
    where = store_location(data_dir, database, database_password_file)
    key_path = data_dir / KEY_NAME
    if (where.sqlite is not None and where.sqlite.exists()) or key_path.exists():
        raise Fail(f"{data_dir} is already initialised (found {DB_NAME} or {KEY_NAME})")
    password = os.environ.get("FLEET_ADMIN_PASSWORD")
    generated = not password
    if generated:
        password = auth.generate_password()
    elif len(password) < auth.MIN_PASSWORD:
        raise Fail(
            f"FLEET_ADMIN_PASSWORD needs at least {auth.MIN_PASSWORD} characters", Exit.USAGE
        )
    try:
        if where.is_postgresql and already_initialised(where):
            raise Fail(
                f"{where.describe()} is already initialised; a further replica serves it "
                f"with a copy of the first one's data directory ({KEY_NAME}, {DATABASE_FILE})"
            )
        create_key_file(key_path)
        database = open_database(where)
    except (SecretError, AgentFileError) as exc:
        raise Fail(str(exc)) from None
    except peewee.DatabaseError as exc:
        raise Fail(f"cannot open {where.describe()}: {exc}") from None
    with database.atomic():
        User.create(name=admin_name, password_hash=auth.hash_password(password), role="admin")
        AuditLog.create(actor="system", action="fleetd.init", target=admin_name)
    database.close()
    if where.sqlite is not None:
        os.chmod(where.sqlite, 0o600)
    else:
        write_new_private(data_dir / DATABASE_FILE, where.url() + "\n")
    click.echo(f"initialised {data_dir}")
    if where.is_postgresql:
        click.echo(f"database: {where.describe()}")
    click.echo(f"admin user: {admin_name}")
    if generated:
        click.echo(f"admin password (shown once): {password}")


@cli.command()
@data_dir_option
@database_option
@password_file_option
@click.option(
    "--listen",
    default="127.0.0.1:8433",
    show_default=True,
    help="HOST:PORT to listen on (port 0: any free port).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM certificate chain (agents pin its key; 'fleetctl tls activate' reads it again).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM private key.",
)
@click.option(
    "--public-url",
    multiple=True,
    envvar="FLEETD_PUBLIC_URL",
    help="URL agents use to reach this server (default: as the operator reached it). "
    "With replicas: repeated, or comma-separated, this replica's URL first, then the "
    "others' (enrollment strings carry them all, and agents fail over along them; "
    "env FLEETD_PUBLIC_URL).",
)
@click.option(
    "--heartbeat-interval",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Seconds between agent heartbeats; an agent silent for three is offline.",
)
@click.option(
    "--lost-after",
    type=click.IntRange(min=1),
    default=3600,
    show_default=True,
    help="Seconds a host may stay offline during a running job before the job counts as lost.",
)
@click.option(
    "--history-days",
    type=click.IntRange(min=0, max=36500),
    default=90,
    show_default=True,
    help="Days an ended job and its log are kept; 0 keeps them for ever.",
)
# at least 1: auto-init and `hosts list` go by the newest job of a kind
@click.option(
    "--history-keep",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Ended jobs of each host, source group and kind kept whatever their age "
    "(the newest failure of each is kept too).",
)
@click.option(
    "--metrics",
    is_flag=True,
    help="Serve GET /metrics (Prometheus) to callers with an API token.",
)
@click.option(
    "--agent-pyz",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The agent file to serve at GET /agent.pyz, for enroll --install and "
    "agents upgrade (default: DATA_DIR/fleet-agent.pyz, else the checkout's "
    "dist/fleet-agent.pyz, if there is one).",
)
@click.option("--insecure", is_flag=True, help="Allow listening beyond loopback without TLS.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe messages logged on stderr.",
)
# hidden: bounds a test wants small (the defaults are ServeConfig's)
@click.option("--idle-timeout", type=click.FloatRange(min=0.1), hidden=True)
@click.option("--max-connections", type=click.IntRange(min=1), hidden=True)
@click.option("--per-address-limit", type=click.IntRange(min=1), hidden=True)
@click.option("--history-delay", type=click.FloatRange(min=0), hidden=True)
@click.option("--alert-interval", type=click.FloatRange(min=0.05), hidden=True)
@click.option("--no-agent-pyz", is_flag=True, hidden=True)
def serve(
    data_dir: Path,
    database: Optional[str],
    database_password_file: Optional[Path],
    listen: str,
    tls_cert,
    tls_key,
    public_url,
    heartbeat_interval: int,
    lost_after: int,
    history_days: int,
    history_keep: int,
    metrics: bool,
    agent_pyz: Path | None,
    insecure: bool,
    log_level: str,
    idle_timeout: float | None = None,
    max_connections: int | None = None,
    per_address_limit: int | None = None,
    history_delay: float | None = None,
    alert_interval: float | None = None,
    no_agent_pyz: bool = False,
) -> None:
    """Serve agents and operators until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs every handshake at INFO; keep its noise down
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        host, port = parse_listen(listen)
    except ConfigError as exc:
        raise Fail(str(exc), Exit.USAGE) from None
    if bool(tls_cert) != bool(tls_key):
        raise Fail("--tls-cert and --tls-key go together", Exit.USAGE)
    if not tls_cert and not is_loopback(host) and not insecure:
        raise Fail(
            f"refusing to listen on {host} without TLS: tokens and repository passwords would "
            "cross the network in clear; give --tls-cert/--tls-key, or --insecure",
            Exit.USAGE,
        )
    where = store_location(data_dir, database, database_password_file)
    if where.sqlite is not None and not where.sqlite.exists():
        raise Fail(f"{data_dir} has no database; run 'fleetd init --data-dir {data_dir}' first")
    if not (data_dir / KEY_NAME).exists():
        raise Fail(
            f"{data_dir} has no {KEY_NAME}; run 'fleetd init' first, or copy the data "
            "directory of the fleetd that made this database"
        )
    try:
        public_urls = parse_public_urls(public_url)
    except ConfigError as exc:
        raise Fail(str(exc), Exit.USAGE) from None
    config = ServeConfig(
        data_dir, host, port, tls_cert, tls_key, public_urls, heartbeat_interval, lost_after
    )
    config.store = where
    if idle_timeout:
        config.enroll_timeout = config.login_idle_timeout = idle_timeout
        config.open_timeout = min(config.open_timeout, idle_timeout)
    config.max_connections = max_connections
    config.unauth_per_address = per_address_limit or config.unauth_per_address
    config.history_days, config.history_keep = history_days, history_keep
    config.metrics = metrics
    config.agent_pyz = agent_pyz
    config.serve_agent = not no_agent_pyz
    if alert_interval is not None:
        config.alert_interval = alert_interval
    if history_delay is not None:
        config.history_delay = history_delay
    # not asyncio.run: at the end it would cancel and unwind every connection
    # handler (seconds, for 10,000), after the store is closed and the
    # sockets told 1001 anyway
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run_server(config))
    except (SecretError, AgentFileError) as exc:
        raise Fail(str(exc)) from None
    except ssl.SSLError as exc:
        raise Fail(f"cannot load the TLS certificate or key: {exc.reason or exc}") from None
    except TlsError as exc:
        raise Fail(str(exc)) from None
    except (RuntimeError, peewee.DatabaseError) as exc:  # a newer schema, a damaged file
        raise Fail(f"cannot open {where.describe()}: {exc}") from None
    except OSError as exc:
        raise Fail(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    # everything is closed and written: skip tearing down 10,000 connections'
    # objects one by one at interpreter exit (a second or more at that size)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_line(exc: Exception) -> str:
    """An error's words on one line (libpq's run over several)."""
    return " ".join(str(exc).split())


@cli.command("migrate-store")
@data_dir_option
@database_option
@click.option(
    "--to",
    "to",
    metavar="URL",
    required=True,
    help="The empty PostgreSQL database to move the store into: "
    "postgresql://[USER@]HOST[:PORT]/DBNAME[?PARAM=VALUE...] (no password in it).",
)
@password_file_option
def migrate_store(
    data_dir: Path, database: Optional[str], to: str, database_password_file: Optional[Path]
) -> None:
    """Move a SQLite store into an empty PostgreSQL database. Stop fleetd first.

    Every table is copied (ids kept) in one transaction, checked (row counts,
    every secret decrypting with DATA_DIR/secret.key) before it commits; on
    any failure the target is left empty. The SQLite file is write-locked
    meanwhile. Then DATA_DIR/database names the target, so 'fleetd serve'
    serves PostgreSQL; fleet.db is left as it was, as a fallback.
    """
    try:
        target = locate(to, database_password(database_password_file), option="--to")
    except LocationError as exc:
        raise Fail(str(exc), Exit.USAGE) from None
    source = store_location(data_dir, database, None)
    if source.url() == target.url():
        raise Fail(f"--to names the store being moved ({source.describe()})", Exit.USAGE)
    if not target.is_postgresql:
        raise Fail(
            "--to names a SQLite file: migrate-store moves a store to PostgreSQL", Exit.USAGE
        )
    if source.sqlite is None:
        raise Fail(
            f"the store of {data_dir} is PostgreSQL already ({source.describe()}); "
            "migrate-store moves a SQLite store",
            Exit.USAGE if database else Exit.ERROR,
        )
    if not source.sqlite.exists():
        raise Fail(f"{source.sqlite} does not exist: nothing to move")
    try:
        box = load_key_file(data_dir / KEY_NAME)
    except SecretError as exc:
        raise Fail(str(exc)) from None
    try:
        sqlite = open_database(source)
    except (RuntimeError, peewee.DatabaseError) as exc:
        raise Fail(f"cannot open {source.describe()}: {one_line(exc)}") from None
    try:
        try:
            postgresql = open_database(target)
        except peewee.DatabaseError as exc:
            raise Fail(f"cannot open {target.describe()}: {one_line(exc)}") from None
        try:
            report = transfer.move(sqlite, postgresql, box)
        except transfer.TransferError as exc:
            raise Fail(f"{one_line(exc)}; nothing was written to {target.describe()}") from None
        finally:
            close_connection(postgresql)
    finally:
        sqlite.close()
    write_new_private(data_dir / DATABASE_FILE, target.url() + "\n")
    width = max(len(table) for table in report.rows)
    for table, rows in report.rows.items():
        click.echo(f"{table:<{width}}  {rows:>10}")
    click.echo(f"{'total':<{width}}  {report.total:>10}  rows in {report.seconds:.1f} s")
    click.echo(f"moved {source.describe()} to {target.describe()}")
    click.echo(f"{data_dir / DATABASE_FILE} names it now: 'fleetd serve' serves PostgreSQL")
    click.echo(
        f"{source.sqlite} is left as it was, as a fallback (remove {DATABASE_FILE} to go back)"
    )


def main() -> None:
    cli(prog_name="fleetd")


if __name__ == "__main__":
    main()
