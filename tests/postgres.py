"""A real PostgreSQL server for the tests, started here in a temp dir.

Debian's `postgresql` package (make test installs it) gives initdb and
postgres under /usr/lib/postgresql/VERSION/bin. PostgreSQL refuses to run
as root, so as root the server runs as `nobody`, in a directory of its own
under /tmp (pytest's own temp dirs are root's, mode 0700). It listens on a
Unix socket in that directory only: no port to race for, nothing reachable
from outside. The password is scram-sha-256, given in a file, never on a
command line.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

USER = "fleet"


def bin_dir() -> Optional[Path]:
    """The newest PostgreSQL's binaries, or None when it is not installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


class Postgres:
    def __init__(self) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError(
                "PostgreSQL is not installed: 'make test' installs it (apt-get install postgresql)"
            )
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="fleet-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.password = secrets.token_urlsafe(16)
        self.proc: Optional[subprocess.Popen] = None
        self.as_root = os.geteuid() == 0
        self.log = self.root / "postgres.log"

    def _as_user(self) -> dict:
        """Popen's arguments that run a program as nobody (when root): the
        server itself, no wrapper process between it and its signals."""
        return {"user": "nobody", "group": "nogroup", "extra_groups": []} if self.as_root else {}

    def start(self, timeout: float = 60) -> Postgres:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(self.root, "nobody", "nogroup")
            shutil.chown(pwfile, "nobody", "nogroup")
        os.chmod(self.root, 0o700)
        os.chmod(pwfile, 0o600)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D", str(self.data), "-U", USER, "-E", "UTF8", "--no-sync",
                "--auth=scram-sha-256", f"--pwfile={pwfile}",
            ],
            check=True, capture_output=True, timeout=120, cwd=self.root, **self._as_user(),
        )  # fmt: skip
        pwfile.unlink()
        self._serve(timeout)
        return self

    def _serve(self, timeout: float) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - for the server's life
        if self.as_root:
            shutil.chown(self.log, "nobody", "nogroup")
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D", str(self.data), "-k", str(self.root), "-c", "listen_addresses=",
                # a test server: durability is not what is tested here
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ],
            stdout=log, stderr=log, cwd=self.root, **self._as_user(),
        )  # fmt: skip
        self.wait_ready(timeout)

    def halt(self) -> None:
        """Stop the server (a fast shutdown: clients are cut), keeping its data."""
        assert self.proc is not None
        self.proc.send_signal(2)
        self.proc.wait(timeout=30)

    def resume(self, timeout: float = 60) -> None:
        """Start it again on the same data, as after a restart or a failover."""
        self._serve(timeout)

    def dsn(self, dbname: str = "postgres") -> str:
        """Connection parameters (libpq keywords); the password separately."""
        return f"host={self.root} dbname={dbname} user={USER}"

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(self.dsn(dbname), password=self.password, autocommit=True)

    def wait_ready(self, timeout: float) -> None:
        """Until the server accepts a connection (the socket appears, then
        startup finishes); raises with its log when it does not."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                self.connect().close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready in {timeout} s:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)  # a server starting: nothing to wait on but its socket

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: a fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
