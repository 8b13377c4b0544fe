"""Where fleetctl keeps its server URL and token.

`$XDG_CONFIG_HOME/fleet/config.json` (default ~/.config), mode 0600.
FLEET_SERVER and FLEET_TOKEN override the file, so scripts need no file.
The server may be a comma-separated list of fleetd replicas' URLs: the
client tries them in order (see client.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_SERVER = "ws://127.0.0.1:8433"  # DEFAULT_PORT


@dataclass
class Settings:
    server: str = DEFAULT_SERVER
    token: Optional[str] = None
    cafile: Optional[str] = None


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleet" / "config.json"


DEFAULT_PORT = 8433  # fleetd serve's


def normalize_server(url: str) -> str:
    """Accept ws(s)://, http(s):// or a bare host[:port] (fleetd's port
    8433 when none is given); answer a ws(s):// URL. Raises ValueError for
    any other scheme."""
    url = url.strip().rstrip("/")
    for plain, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(plain):
            return ws + url[len(plain) :]
    if url.startswith(("ws://", "wss://")):
        return url
    if "://" in url or not url:
        raise ValueError(f"server URL {url!r}: give ws://, wss://, http://, https:// or host:port")
    host = url.split("/", 1)[0]
    bare_port = host.rsplit(":", 1)[-1].isdigit() if ":" in host.lstrip("[") else False
    if host.startswith("[") and not host.endswith("]"):
        bare_port = True  # [::1]:8433
    return "ws://" + (url if bare_port else f"{host}:{DEFAULT_PORT}" + url[len(host) :])


def normalize_servers(value: str) -> str:
    """A comma-separated list of servers (one is a list too), each as
    normalize_server answers it, joined by commas. Raises ValueError."""
    urls = [normalize_server(u) for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError(
            f"server URL {value!r}: give ws://, wss://, http://, https:// or host:port"
        )
    return ",".join(dict.fromkeys(urls))


def load() -> Settings:
    settings = Settings()
    path = config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), (str, type(None))) for k in ("server", "token", "cafile")
    ):
        raise ValueError(
            f"{path} is damaged: expected an object of strings; run 'fleetctl login' again"
        )
    settings.server = doc.get("server") or settings.server
    settings.token = doc.get("token")
    settings.cafile = doc.get("cafile")
    if os.environ.get("FLEET_SERVER"):
        settings.server = os.environ["FLEET_SERVER"]
    if os.environ.get("FLEET_TOKEN"):
        settings.token = os.environ["FLEET_TOKEN"]
    if os.environ.get("FLEET_CAFILE"):
        settings.cafile = os.environ["FLEET_CAFILE"]
    settings.server = normalize_servers(settings.server)
    return settings


def save(settings: Settings) -> Path:
    """Write the file atomically with mode 0600 (it holds a bearer token)."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"server": settings.server, "token": settings.token}
    if settings.cafile:
        doc["cafile"] = settings.cafile
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
