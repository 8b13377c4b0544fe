"""Shared harness (tests/integration and tests/e2e): a real fleetd
subprocess, the real fleetctl.

fleetd is started with `fleetd init` + `fleetd serve --listen 127.0.0.1:0`;
the port comes from the "fleetd listening on ..." line it prints. Nothing
here sleeps to synchronise: lines are awaited on a queue with a timeout,
conditions are polled against a deadline.

fleetctl runs in-process through click's CliRunner (fast), and a few tests
run the `./fleetctl` launcher as a real subprocess to check exit statuses.

Every helper is reached through a fixture (`fx`, `fleet`, `fleetd_factory`)
so the test modules import nothing from this file.

fleetd's rate limiters shape the layout: 5 failed logins lock a user and 20
an address (for 5 minutes), 20 bad bearer tokens block an address for a
minute. Each test module therefore gets its own fleetd (module-scoped
`fleet`), and tests that provoke a limiter, change server-wide state or make
fleetd log a traceback start a dedicated one (`fleetd_factory`). Stopping a
fleetd checks that SIGTERM exits 0 and that its log holds no traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from click.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from fleet.common import protocol
from fleet.ctl.main import cli as fleetctl_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEETCTL = REPO_ROOT / "fleetctl"
ADMIN_PASSWORD = "integration-admin-pw-1"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
LISTEN_RE = re.compile(r"^fleetd listening on (wss?)://(.+):(\d+)$")

_DEFAULT: Any = object()


def clean_env(**extra: Optional[str]) -> dict[str, str]:
    """os.environ without anything Fleet reads, plus `extra` (None removes)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "FLEETD_")) and k != "XDG_CONFIG_HOME"
    }
    env.update(store_env())  # a fleetd's way to its PostgreSQL, when the tests use one
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def fleetd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.server.cli", *map(str, args)]


def run_fleetd(
    *args: str, env: Optional[dict] = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """A short-lived fleetd command (init, or a serve expected to refuse)."""
    return subprocess.run(
        fleetd_argv(*args),
        cwd=REPO_ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# FLEET_TEST_STORE=postgresql: every fleetd the harness makes keeps its store
# in a database of its own on one real PostgreSQL (tests/postgres.py) that
# this process starts on first use; `make test` runs the integration and
# end-to-end suites both ways
STORE = os.environ.get("FLEET_TEST_STORE", "sqlite")
assert STORE in ("sqlite", "postgresql"), f"FLEET_TEST_STORE={STORE!r}: sqlite or postgresql"
_postgres: Any = None
_postgres_lock = threading.Lock()


def postgres_server() -> Any:
    """This process's PostgreSQL server, started on the first call."""
    global _postgres
    with _postgres_lock:
        if _postgres is None:
            from postgres import Postgres  # tests/ is on sys.path (rootdir conftest)

            server = Postgres().start()
            atexit.register(server.stop)
            _postgres = server
        return _postgres


def store_env() -> dict[str, str]:
    """What a fleetd needs in its environment to reach its store."""
    if STORE != "postgresql":
        return {}
    return {"FLEETD_DATABASE_PASSWORD": postgres_server().password}


def new_store_url(store: Optional[str] = None) -> Optional[str]:
    """A --database for a new fleetd: a fresh PostgreSQL database, or None
    (the SQLite file in its data directory)."""
    if (store or STORE) != "postgresql":
        return None
    server = postgres_server()
    return f"postgresql:///{server.create_database()}?host={server.root}&user=fleet"


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    if STORE == "sqlite":
        return
    skip = pytest.mark.skip(reason="looks at the SQLite file; PostgreSQL's own tests cover it")
    once = pytest.mark.skip(reason="picks its store itself, or needs none: run in the first half")
    for item in items:
        if "sqlite_file" in item.keywords:
            item.add_marker(skip)
        elif "own_store" in item.keywords:
            item.add_marker(once)


def store_location(data_dir: Path) -> Any:
    """Where the fleetd of `data_dir` keeps its store (fleet.server.store.db.Location)."""
    from fleet.server.store.db import Location, locate

    recorded = data_dir / "database"
    if recorded.exists():
        return locate(recorded.read_text().strip(), postgres_server().password)
    return Location(sqlite=data_dir / "fleet.db")


@contextlib.contextmanager
def store_sql(data_dir: Path) -> Iterator[Callable[..., list]]:
    """A connection to that store from the test, for either backend: yields
    run(sql, *params) -> rows, with `?` marks; committed at the end."""
    from fleet.server.store.db import connect

    database = connect(store_location(data_dir))
    database.connect()

    def run(sql: str, *params: Any) -> list:
        cursor = database.execute_sql(sql.replace("?", database.param), params)
        return cursor.fetchall() if cursor.description else []

    try:
        with database.atomic():
            yield run
    finally:
        database.close()


def store_bytes(data_dir: Path) -> bytes:
    """The store as it lies on disk, to look for what must not be there in
    plain text: SQLite's file and WAL, or, on PostgreSQL, this database's
    files and the server's WAL (after a CHECKPOINT writes them out)."""
    where = store_location(data_dir)
    if where.sqlite is not None:
        files = sorted(where.sqlite.parent.glob(where.sqlite.name + "*"))
        assert files, f"no store files in {where.sqlite.parent}"
        return b"".join(p.read_bytes() for p in files)
    server = postgres_server()
    with server.connect() as conn:
        conn.execute("CHECKPOINT")
        (oid,) = conn.execute(
            "SELECT oid FROM pg_database WHERE datname = %s", (where.postgresql["dbname"],)
        ).fetchone()
    files = [
        p for d in (server.data / "base" / str(oid), server.data / "pg_wal") for p in d.rglob("*")
    ]
    return b"".join(p.read_bytes() for p in files if p.is_file())


def init_data_dir(
    data_dir: Path,
    password: Optional[str] = ADMIN_PASSWORD,
    admin: str = "admin",
    store: Optional[str] = None,
) -> subprocess.CompletedProcess:
    env = clean_env(FLEET_ADMIN_PASSWORD=password)
    if store == "postgresql":
        env["FLEETD_DATABASE_PASSWORD"] = postgres_server().password
    url = new_store_url(store)
    database = ["--database", url] if url else []
    proc = run_fleetd("init", "--data-dir", str(data_dir), "--admin", admin, *database, env=env)
    assert proc.returncode == 0, f"fleetd init failed: {proc.stdout}{proc.stderr}"
    return proc


def uniq(prefix: str) -> str:
    """A fresh name per call, valid as a host, group, user or token name."""
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


_counter = itertools.count(1)


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)  # polling interval, not synchronisation: the deadline decides


# -- fleetctl's JSON against its man page ----------------------------------------

MAN_FLEETCTL = REPO_ROOT / "man" / "fleetctl.1"
_FIELD = re.compile(r'^\.BI (\w+) " \(([^)]*)\)"$')
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "time": lambda v: isinstance(v, str) and _TIME.fullmatch(v) is not None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def documented_json() -> dict[str, dict[str, str]]:
    """fleetctl.1's JSON OUTPUT: each object (by its .SS title), its fields
    with their written types ("time or null; only hosts show")."""
    objects: dict[str, dict[str, str]] = {}
    inside, current = False, None
    for line in MAN_FLEETCTL.read_text(encoding="utf-8").splitlines():
        if line.startswith(".SH"):
            inside = line == '.SH "JSON OUTPUT"'
        elif inside and line.startswith(".SS"):
            current = line[4:].strip('"')
        elif inside and current and (field := _FIELD.match(line)):
            objects.setdefault(current, {})[field.group(1)] = field.group(2)
    return objects


def check_json(value: Any, kind: str) -> None:
    """Every object in `value` (one, or a list) has exactly the fields the man
    page gives `kind` (those written "only ..." may be missing), each of its
    written type: a new field or a rename fails until the page says it."""
    fields = documented_json()[kind]
    items = value if isinstance(value, list) else [value]
    assert items, f"nothing to check against {kind!r}"
    for item in items:
        keys = set(item)
        always = {f for f, written in fields.items() if "; only" not in written}
        assert keys <= set(fields), f"{kind}: undocumented fields {sorted(keys - set(fields))}"
        assert always <= keys, f"{kind}: documented fields missing {sorted(always - keys)}"
        for key, v in item.items():
            written = fields[key].split(";")[0]
            base = written.removesuffix(" or null")
            if v is None:
                assert written.endswith(" or null"), f"{kind}.{key} is null, documented {written!r}"
            else:
                ok = _TYPES[base.split()[0]](v)
                assert ok, f"{kind}.{key} = {v!r} is not the documented {written!r}"


class Fleetd:
    """One `fleetd serve` subprocess; stdout lines arrive on a queue."""

    def __init__(
        self, data_dir: Path, log_path: Path, *extra: str, listen: str = "127.0.0.1:0"
    ) -> None:
        self.data_dir = data_dir
        self.listen = listen
        self.log_path = log_path
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self.scheme = ""
        self.port = 0
        self.env_extra: dict[str, str] = {}  # more of its environment (a store's password)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Fleetd:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        extra = list(self.extra)
        if not {"--agent-pyz", "--no-agent-pyz"} & set(extra):
            # the same in a fresh clone as in one where 'make agent' left dist/
            extra.append("--no-agent-pyz")
        self.proc = subprocess.Popen(
            fleetd_argv("serve", "--data-dir", str(self.data_dir), "--listen", self.listen, *extra),
            cwd=REPO_ROOT,
            env={**clean_env(), **self.env_extra},
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        line = self.next_line(timeout)
        match = LISTEN_RE.match(line or "")
        if not match:
            self.kill()
            raise AssertionError(
                f"fleetd did not report its address (got {line!r}); log:\n{self.log()}"
            )
        self.scheme, self.port = match.group(1), int(match.group(3))
        return self

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> Optional[str]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal fleetd and wait for it; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"fleetd did not exit within {timeout} s; log:\n{self.log()}"
            ) from None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- raw WebSocket access ------------------------------------------------------


def ws_connect(
    url: str, path: str, token: Optional[str] = None, headers: Optional[dict] = None, **kw: Any
) -> ClientConnection:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return connect(url + path, additional_headers=all_headers, open_timeout=10, **kw)


def agent_hello(hostname: str = "agent-box", version: int = 0, **extra: Any) -> str:
    """A hello frame as fleet-agent sends it (the protocol's version unless
    `version`), for raw-socket tests standing in for an agent."""
    data = {
        "protocol_version": version or protocol.PROTOCOL_VERSION,
        "agent_version": "9.9.9-test",
        "restic_version": "0.17.3",
        "hostname": hostname,
        "os": "linux",
        "arch": "x86_64",
        "timezone": "Europe/Paris",
        "features": ["repositories"],  # features=[]: an agent from before it
        **extra,
    }
    return json.dumps({"v": 1, "type": "hello", "id": "h1", "data": data})


def enroll_agent(env: Any, host: str, hostname: str = "agent-box") -> dict:
    """Enroll `host` and redeem its token on /enroll as an agent does: the
    `enrolled` frame's data (host_id, agent_token). fleetd closes the socket
    after its one answer."""
    token = protocol.parse_enrollment(env.ctl_json("enroll", host)["enrollment"])["token"]
    frame = {"v": 1, "type": "enroll", "id": "e1", "data": {"token": token, "hostname": hostname}}
    with ws_connect(env.url, "/enroll") as ws:
        ws.send(json.dumps(frame))
        reply = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert reply["type"] == "enrolled", reply
    return reply["data"]


_rpc_ids = itertools.count(1)


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def rpc_on(ws: ClientConnection, method: str, **params: Any) -> Any:
    req_id = next(_rpc_ids)
    ws.send(json.dumps({"id": req_id, "method": method, "params": params}))
    reply = json.loads(ws.recv(timeout=30))
    assert reply.get("id") == req_id, reply
    if "error" in reply:
        raise RpcError(reply["error"]["code"], reply["error"]["message"])
    return reply["result"]


def api_login(url: str, user: str, password: str, **kw: Any) -> dict:
    with ws_connect(url, "/login", **kw) as ws:
        return rpc_on(ws, "auth.login", user=user, password=password, token_name="it")


# -- fleetctl ------------------------------------------------------------------


def run_ctl(
    args: tuple,
    *,
    server: Optional[str],
    token: Optional[str],
    config_dir: Path,
    input: Optional[str] = None,
    expect: Optional[int] = 0,
    env: Optional[dict] = None,
) -> Result:
    """fleetctl in-process; asserts the exit status unless expect is None."""
    full_env = {
        "XDG_CONFIG_HOME": str(config_dir),
        "FLEET_SERVER": server,
        "FLEET_TOKEN": token,
        "FLEET_CAFILE": None,
        "COLUMNS": "250",
        "NO_COLOR": "1",
    }
    full_env.update(env or {})
    result = CliRunner(env=full_env).invoke(fleetctl_cli, [str(a) for a in args], input=input)
    if expect is not None:
        assert result.exit_code == expect, (
            f"fleetctl {' '.join(map(str, args))}: exit {result.exit_code}, expected {expect}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
        )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"fleetctl raised {result.exception!r}") from result.exception
    return result


def run_fleetctl_proc(
    *args: str,
    server: Optional[str] = None,
    token: Optional[str] = None,
    config_dir: Optional[Path] = None,
    input: Optional[str] = None,
) -> subprocess.Popen:
    """The ./fleetctl launcher as a real process (started, not awaited)."""
    env = clean_env(
        FLEET_SERVER=server,
        FLEET_TOKEN=token,
        XDG_CONFIG_HOME=str(config_dir) if config_dir else None,
        COLUMNS="250",
    )
    proc = subprocess.Popen(
        [str(FLEETCTL), *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.input_text = input  # type: ignore[attr-defined]
    return proc


def run_fleetctl_tty(
    *args: str,
    answers: tuple[str, ...] = (),
    server: Optional[str] = None,
    token: Optional[str] = None,
    config_dir: Optional[Path] = None,
    timeout: float = 60,
    cwd: Optional[Path] = None,
    env: Optional[dict[str, str]] = None,
) -> tuple[int, str]:
    """The ./fleetctl launcher on a pseudo-terminal, typing each answer when
    a prompt (a line ending in ': ') appears; (exit status, what it showed)."""
    import pty
    import select

    env = clean_env(
        FLEET_SERVER=server,
        FLEET_TOKEN=token,
        XDG_CONFIG_HOME=str(config_dir) if config_dir else None,
        COLUMNS="200",
        **(env or {}),
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(FLEETCTL), *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    shown, pending = "", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096).decode(errors="replace")
                except OSError:  # the process ended: EIO
                    break
                if not chunk:
                    break
                shown += chunk
                if pending and shown.rstrip(" ").endswith(":"):
                    os.write(master, (pending.pop(0) + "\n").encode())
                    shown += "\n"
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), shown
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(getattr(proc, "input_text", None), timeout=timeout)
    return proc.returncode, out, err


# -- one running fleetd, logged in as admin ---------------------------------------


class FleetEnv:
    """A running fleetd, an admin token, and shortcuts to drive it."""

    def __init__(
        self, fleetd: Fleetd, config_dir: Path, admin_token: str, cafile: Optional[Path] = None
    ) -> None:
        self.fleetd = fleetd
        self.config_dir = config_dir
        self.admin_token = admin_token
        self.cafile = cafile
        self.ssl = client_ssl(cafile)

    @property
    def url(self) -> str:
        return self.fleetd.url

    @property
    def data_dir(self) -> Path:
        return self.fleetd.data_dir

    def ctl(
        self,
        *args: Any,
        token: Optional[str] = _DEFAULT,
        input: Optional[str] = None,
        expect: Optional[int] = 0,
        config_dir: Optional[Path] = None,
        server: Optional[str] = _DEFAULT,
        env: Optional[dict] = None,
    ) -> Result:
        try:
            return run_ctl(
                args,
                server=self.url if server is _DEFAULT else server,
                token=self.admin_token if token is _DEFAULT else token,
                config_dir=config_dir or self.config_dir,
                input=input,
                expect=expect,
                env={"FLEET_CAFILE": str(self.cafile) if self.cafile else None, **(env or {})},
            )
        except AssertionError as exc:  # what fleetd said meanwhile explains most failures
            tail = "\n".join(self.fleetd.log().splitlines()[-30:])
            raise AssertionError(f"{exc}\nfleetd's log, last lines:\n{tail}") from None

    def ctl_json(self, *args: Any, **kw: Any) -> Any:
        result = self.ctl(*args, "--json", **kw)
        return json.loads(result.stdout)

    def rpc(self, method: str, token: Optional[str] = _DEFAULT, **params: Any) -> Any:
        tok = self.admin_token if token is _DEFAULT else token
        with ws_connect(self.url, "/ctl", tok, ssl=self.ssl) as ws:
            return rpc_on(ws, method, **params)

    def add_user(self, role: str, password: Optional[str] = None) -> types.SimpleNamespace:
        """A new user with `role`, logged in: .name, .password, .token."""
        name = uniq(role)
        password = password or f"pw-{uuid.uuid4().hex}"
        self.rpc("users.add", name=name, password=password, role=role)
        token = api_login(self.url, name, password, ssl=self.ssl)["token"]
        return types.SimpleNamespace(name=name, password=password, token=token, role=role)

    def enroll(self, host: Optional[str] = None) -> dict:
        return self.ctl_json("enroll", host or uniq("host"))


def client_ssl(cafile: Optional[Path]) -> Optional[ssl.SSLContext]:
    return ssl.create_default_context(cafile=str(cafile)) if cafile else None


def start_fleet(base: Path, *serve_args: str, cafile: Optional[Path] = None) -> FleetEnv:
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    init_data_dir(data_dir)
    fleetd = Fleetd(data_dir, base / "fleetd.log", *serve_args).start()
    config_dir = base / "xdg"
    config_dir.mkdir()
    try:
        token = api_login(fleetd.url, "admin", ADMIN_PASSWORD, ssl=client_ssl(cafile))["token"]
    except BaseException:
        fleetd.kill()
        raise
    return FleetEnv(fleetd, config_dir, token, cafile)


def free_ports(count: int) -> list[int]:
    """Ports free now, for servers that must know each other's URL before
    they start (a race with other processes is possible, and unlikely)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_replicas(
    base: Path, count: int, *serve_args: str, public_urls: bool = False
) -> list[FleetEnv]:
    """`count` fleetd replicas on one new PostgreSQL database, whatever
    FLEET_TEST_STORE says, sharing one data directory (its key and
    database file), each with its own log; the admin token works on each.
    public_urls: each is told every replica's URL, its own first (so its
    enrollment strings and welcomes carry them all)."""
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    init_data_dir(data_dir, store="postgresql")
    ports = free_ports(count) if public_urls else [0] * count
    urls = [f"ws://127.0.0.1:{port}" for port in ports]
    envs = []
    try:
        for i in range(count):
            args = list(serve_args)
            if public_urls:
                for url in urls[i:] + urls[:i]:
                    args += ["--public-url", url]
            fleetd = Fleetd(
                data_dir, base / f"fleetd-{i}.log", *args, listen=f"127.0.0.1:{ports[i]}"
            )
            fleetd.env_extra = {"FLEETD_DATABASE_PASSWORD": postgres_server().password}
            fleetd.start()
            config_dir = base / f"xdg-{i}"
            config_dir.mkdir()
            token = envs[0].admin_token if envs else None
            if token is None:
                token = api_login(fleetd.url, "admin", ADMIN_PASSWORD)["token"]
            envs.append(FleetEnv(fleetd, config_dir, token))
    except BaseException:
        for env in envs:
            env.fleetd.kill()
        raise
    return envs


class Receiver:
    """A local HTTP endpoint that keeps what is POSTed (a notification,
    Apprise's json://) or GETted (a ping) to it: (path, body)."""

    def __init__(self) -> None:
        import http.server

        got: queue.Queue = queue.Queue()
        self.got = got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("Content-Length", 0))
                got.put((self.path, self.rfile.read(size).decode()))
                self.send_response(200)
                self.end_headers()

            do_GET = do_POST  # noqa: N815 - http.server's name

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 20) -> Any:
        """The next body, as JSON (Apprise's json://)."""
        return json.loads(self.got.get(timeout=timeout)[1])

    def next_raw(self, timeout: float = 20) -> tuple[str, str]:
        return self.got.get(timeout=timeout)

    def close(self) -> None:
        self.server.shutdown()


def stop_and_check(fleetd: Fleetd) -> None:
    if fleetd.proc is None or fleetd.proc.returncode is not None:
        return
    code = fleetd.stop()
    assert code == 0, f"fleetd exited {code} on SIGTERM; log:\n{fleetd.log()}"
    assert "Traceback" not in fleetd.log(), fleetd.log()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetEnv]:
    """One fleetd per test module; stopped with SIGTERM, which must exit 0."""
    env = start_fleet(tmp_path_factory.mktemp("fleet"))
    yield env
    stop_and_check(env.fleetd)


@pytest.fixture
def fleetd_factory(tmp_path: Path) -> Iterator[Callable[..., FleetEnv]]:
    """Dedicated fleetds for tests that change server-wide state."""
    started: list[FleetEnv] = []
    names = itertools.count()

    def start(*serve_args: str, cafile: Optional[Path] = None) -> FleetEnv:
        env = start_fleet(tmp_path / f"fleetd{next(names)}", *serve_args, cafile=cafile)
        started.append(env)
        return env

    yield start
    for env in started:
        stop_and_check(env.fleetd)


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A real PostgreSQL server (tests/postgres.py), one per test session
    (per worker), started on first use."""
    return postgres_server()


@pytest.fixture(scope="session")
def fx() -> types.SimpleNamespace:
    """The harness's helpers, for test modules (which import nothing from here)."""
    return types.SimpleNamespace(
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        REPO_ROOT=REPO_ROOT,
        Fleetd=Fleetd,
        RpcError=RpcError,
        api_login=api_login,
        client_ssl=client_ssl,
        clean_env=clean_env,
        store_sql=store_sql,
        store_bytes=store_bytes,
        STORE=STORE,
        finish=finish,
        init_data_dir=init_data_dir,
        rpc_on=rpc_on,
        run_ctl=run_ctl,
        run_fleetctl_proc=run_fleetctl_proc,
        run_fleetctl_tty=run_fleetctl_tty,
        run_fleetd=run_fleetd,
        start_fleet=start_fleet,
        start_replicas=start_replicas,
        Receiver=Receiver,
        stop_and_check=stop_and_check,
        uniq=uniq,
        wait_until=wait_until,
        ws_connect=ws_connect,
        agent_hello=agent_hello,
        enroll_agent=enroll_agent,
        documented_json=documented_json,
        check_json=check_json,
    )
