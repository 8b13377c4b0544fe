"""The agent file fleetd serves (GET /agent.pyz): found, read once, described.

fleetd reads the file when it starts (a new agent is rolled out by giving
fleetd the new file and restarting it): its bytes stay in memory, with its
SHA-256 and the version it carries, read from the fleet/__init__.py packed
inside (the version the agent will say in its hello).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..common import protocol

FILE_NAME = "fleet-agent.pyz"
VERSION_MEMBER = "site-packages/fleet/__init__.py"
_VERSION = re.compile(r"""^__version__\s*=\s*["']([0-9A-Za-z][0-9A-Za-z.+-]{0,63})["']""", re.M)


class AgentFileError(Exception):
    pass


@dataclass(frozen=True)
class AgentFile:
    path: Path
    version: str
    sha256: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        return {"version": self.version, "sha256": self.sha256, "size_bytes": self.size}


def candidates(data_dir: Path) -> list[Path]:
    """Where fleetd looks when not told: its data dir, then the dist/ of
    the checkout it runs from (what `make agent` builds)."""
    checkout = Path(__file__).resolve().parents[2]
    return [data_dir / FILE_NAME, checkout / "dist" / FILE_NAME]


def agent_version(data: bytes) -> str:
    """The version packed in an agent zipapp. Raises AgentFileError."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            text = zf.read(VERSION_MEMBER).decode("utf-8")
    except KeyError:
        raise AgentFileError(f"it holds no {VERSION_MEMBER}: not a fleet-agent zipapp") from None
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError) as exc:
        raise AgentFileError(f"not a zipapp: {exc}") from None
    match = _VERSION.search(text)
    if match is None:
        raise AgentFileError(f"its {VERSION_MEMBER} names no __version__")
    return match.group(1)


def load(path: Path) -> AgentFile:
    """Read and describe an agent file. Raises AgentFileError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > protocol.MAX_AGENT_BYTES:
        raise AgentFileError(f"{path} is larger than {protocol.MAX_AGENT_BYTES} bytes")
    try:
        version = agent_version(data)
    except AgentFileError as exc:
        raise AgentFileError(f"{path}: {exc}") from None
    return AgentFile(path, version, hashlib.sha256(data).hexdigest(), data)


def find(explicit: Optional[Path], data_dir: Path) -> Optional[AgentFile]:
    """The file given (it must load), else the first candidate that exists
    (None: fleetd serves no agent). Raises AgentFileError."""
    if explicit is not None:
        return load(explicit)
    for path in candidates(data_dir):
        if path.is_file():
            return load(path)
    return None


def sha256_line(agent: AgentFile) -> str:
    """GET /agent.pyz.sha256, as sha256sum prints it (`sha256sum -c` reads it)."""
    return f"{agent.sha256}  {FILE_NAME}\n"
