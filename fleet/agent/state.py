"""What the agent keeps on disk, all of it mode 0600 in its state dir.

agent.json    server URL, host id and name, agent token, and (from before
              key pins) the SHA-256 of the certificate pinned at enrollment
server.pem    the server certificate seen at enrollment (TLS only)
pins.json     the public-key pins fleetd is trusted by (TLS only): the key
              it serves and the one staged next, as fleetd last sent them
servers.json  every fleetd replica's URL, in the order they are dialled (the
              enrollment string's, then as fleetd's welcome last named them);
              absent: agent.json's server_url alone
tls-refused.json  why the agent last refused fleetd's certificate (gone once
              a connection succeeds), for `fleet-agent status`
repo.json     the repositories the host uses (URL, password, backend
              environment, fleetd's id and name), its default first
schedules.json  the schedule set fleetd last sent (its version, crons, groups)
spool.db      frames not yet acknowledged by fleetd; each schedule's last fire;
              the backups the agent runs on its own while fleetd is away
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..common import tlspins

DEFAULT_STATE_DIR = "/var/lib/fleet-agent"


class StateError(Exception):
    pass


class StateDamaged(StateError):
    """A state file that exists but cannot be read or is not what it should be."""


def state_dir(value: Optional[str]) -> Path:
    return Path(value or os.environ.get("FLEET_AGENT_STATE_DIR") or DEFAULT_STATE_DIR)


def _save_json(path: Path, doc: dict[str, Any]) -> None:
    """A small state file replaced at once (write_private); StateError when it cannot be."""
    try:
        write_private(path, json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None


def write_private(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, readable by the owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    # the rename itself made durable: what fleetd is told was stored (tls.ack)
    # must be there after a power loss
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """Make the entries of a directory (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateDamaged(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise StateDamaged(f"{path} is damaged")
    return doc


@dataclass
class Identity:
    server_url: str
    host_id: int
    host_name: str
    agent_token: str
    tls_sha256: Optional[str] = None
    hostname: Optional[str] = None  # reported instead of the machine's name (enroll --hostname)

    def __repr__(self) -> str:  # never print the token
        return f"Identity({self.host_name}@{self.server_url})"


@dataclass
class RepoConfig:
    url: str
    password: str
    env: dict[str, str] = field(default_factory=dict)
    id: Optional[int] = None  # fleetd's; None: the one an older fleetd sent
    name: str = ""

    def __repr__(self) -> str:
        return "RepoConfig(<redacted>)"


class State:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def identity_path(self) -> Path:
        return self.root / "agent.json"

    @property
    def cert_path(self) -> Path:
        return self.root / "server.pem"

    @property
    def pins_path(self) -> Path:
        return self.root / "pins.json"

    @property
    def servers_path(self) -> Path:
        return self.root / "servers.json"

    @property
    def refusal_path(self) -> Path:
        return self.root / "tls-refused.json"

    @property
    def repo_path(self) -> Path:
        return self.root / "repo.json"

    @property
    def schedules_path(self) -> Path:
        return self.root / "schedules.json"

    @property
    def spool_path(self) -> Path:
        return self.root / "spool.db"

    def load_identity(self) -> Identity:
        doc = _read_json(self.identity_path)
        if doc is None:
            raise StateError(
                f"not enrolled: {self.identity_path} does not exist; run 'fleet-agent enroll' first"
            )
        try:
            identity = Identity(**doc)
        except TypeError:
            raise StateDamaged(f"{self.identity_path} is damaged") from None
        token = identity.agent_token
        # a token that cannot go into a header (a line break, a space) would
        # be quoted whole by the HTTP library's error on every redial
        if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
            raise StateDamaged(
                f"{self.identity_path} is damaged: its agent token is not one "
                "(run 'fleet-agent enroll' again)"
            )
        return identity

    def save_identity(self, identity: Identity) -> None:
        try:
            write_private(self.identity_path, json.dumps(asdict(identity), indent=2) + "\n")
        except OSError as exc:
            raise StateError(f"cannot write {self.identity_path}: {exc.strerror}") from None

    def load_pins(self) -> Optional[list[str]]:
        """The public-key pins fleetd is trusted by; None when the agent holds
        none (no TLS, the system's CAs, or a certificate pin from before key
        pins). A damaged file is a StateError: guessing could trust anyone."""
        doc = _read_json(self.pins_path)
        if doc is None:
            return None
        try:
            return tlspins.check_pins(doc.get("pins") or [])
        except tlspins.PinError as exc:
            raise StateError(
                f"{self.pins_path} is damaged ({exc}); enroll again, or restore the file"
            ) from None

    def save_pins(self, pins: list[str], updated_at: str) -> None:
        """Replace the pin set at once (write, fsync, rename): a crash leaves
        the old set or the new one, never a mix or nothing."""
        pins = tlspins.check_pins(pins)
        _save_json(self.pins_path, {"pins": pins, "updated_at": updated_at})

    def load_servers(self) -> Optional[list[str]]:
        """The replicas' URLs, or None when the agent holds none beyond
        agent.json's server_url. Raises StateDamaged when the file is not a
        list of URLs."""
        doc = _read_json(self.servers_path)
        if doc is None:
            return None
        urls = doc.get("urls")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise StateDamaged(f"{self.servers_path} is damaged")
        return urls

    def save_servers(self, urls: list[str], updated_at: str) -> None:
        """Replace the list at once (write, fsync, rename)."""
        _save_json(self.servers_path, {"urls": urls, "updated_at": updated_at})

    def load_refusal(self) -> Optional[dict[str, Any]]:
        """The last refusal of fleetd's certificate, if the agent has not
        connected since (shown by `fleet-agent status`)."""
        try:
            return _read_json(self.refusal_path)
        except StateError:
            return {"error": f"{self.refusal_path} is damaged"}

    def save_refusal(self, refusal: dict[str, Any]) -> None:
        write_private(self.refusal_path, json.dumps(refusal, indent=2) + "\n")

    def clear_refusal(self) -> None:
        try:
            self.refusal_path.unlink()
        except FileNotFoundError:
            pass

    def load_repos(self) -> list[RepoConfig]:
        """The host's repositories, its default first ([]: none yet). Raises
        StateError (or KeyError, TypeError) when repo.json is damaged."""
        doc = _read_json(self.repo_path)
        if doc is None:
            return []
        if "repositories" not in doc:  # written before a host had several
            return [RepoConfig(doc["url"], doc["password"], dict(doc.get("env") or {}))]
        return [
            RepoConfig(
                r["url"], r["password"], dict(r.get("env") or {}), r.get("id"), r.get("name", "")
            )
            for r in doc["repositories"]
        ]

    def load_repo(self, repository_id: Optional[int] = None) -> Optional[RepoConfig]:
        """One repository by fleetd's id, or the default (none named)."""
        repos = self.load_repos()
        if repository_id is None:
            return repos[0] if repos else None
        for repo in repos:
            if repo.id == repository_id:
                return repo
        return None

    def save_repos(self, repos: list[RepoConfig]) -> None:
        doc: dict[str, Any] = {"repositories": [asdict(r) for r in repos]}
        if repos:  # the default as an agent before several repositories reads it
            doc.update(url=repos[0].url, password=repos[0].password, env=repos[0].env)
        write_private(self.repo_path, json.dumps(doc) + "\n")

    def save_repo(self, repo: RepoConfig) -> None:
        self.save_repos([repo])

    def load_schedules(self) -> Optional[dict[str, Any]]:
        """The schedule.set data last applied, or None before the first."""
        return _read_json(self.schedules_path)

    def save_schedules(self, data: dict[str, Any]) -> None:
        write_private(self.schedules_path, json.dumps(data) + "\n")
