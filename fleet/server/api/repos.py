"""A host's restic repository: set and show (secrets never leave redacted)."""

from __future__ import annotations

import json
import re

from ...common.protocol import Field
from ..events import RepoChanged
from ..security.auth import Role
from ..security.secrets import repo_aad
from ..store.models import Repo, utcnow
from .common import audit, get_host
from .context import Context
from .errors import Invalid, NotFound
from .registry import Method, collect
from .views import redact_url, repo_json

METHODS: list[Method] = []
method = collect(METHODS)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# restic backends: a local path, or one of these prefixes
REPO_SCHEMES = ("sftp:", "rest:", "s3:", "b2:", "azure:", "gs:", "swift:", "rclone:")


def check_repo_url(url: str) -> str:
    url = url.strip()
    if not url:
        raise Invalid("the repository URL is empty")
    if not (url.startswith("/") or url.startswith(REPO_SCHEMES)):
        raise Invalid(
            f"repository {redact_url(url)!r} is neither an absolute path nor a restic backend "
            f"URL ({', '.join(s + '...' for s in REPO_SCHEMES)})"
        )
    return url


@method(
    "repo.set",
    Role.OPERATOR,
    (
        Field("host", "str", limit=64),
        Field("url", "str", limit=2048),
        Field("password", "str", limit=4096),
        Field("env", "dict[str,str]", False, limit=100),
    ),
)
def repo_set(ctx: Context, p: dict) -> dict:
    """Set a host's repository (URL, password, backend environment), stored
    encrypted and pushed to its agent; a new repository is initialised."""
    host = get_host(p["host"])
    url = check_repo_url(p["url"])
    if not p["password"]:
        raise Invalid("the repository password is empty")
    env = p.get("env") or {}
    for key in env:
        if not ENV_NAME_RE.match(key):
            raise Invalid(f"{key!r} is not an environment variable name")
    box = ctx.state.box
    Repo.insert(
        host=host,
        url_enc=box.encrypt(url, repo_aad(host.id, "url")),
        password_enc=box.encrypt(p["password"], repo_aad(host.id, "password")),
        env_names=sorted(env),
        env_enc=box.encrypt(json.dumps(env), repo_aad(host.id, "env")) if env else None,
        updated_at=utcnow(),
    ).on_conflict(
        conflict_target=[Repo.host],
        preserve=[Repo.url_enc, Repo.password_enc, Repo.env_names, Repo.env_enc, Repo.updated_at],
    ).execute()
    audit(ctx, "repo.set", host.name, {"url": redact_url(url), "env": sorted(env)})
    ctx.events.append(RepoChanged(host.id))  # pushed to its agent; auto-init
    return repo_json(host, Repo.get_by_id(host.id), box)


@method("repo.show", Role.VIEWER, (Field("host", "str", limit=64),), readonly=True)
def repo_show(ctx: Context, p: dict) -> dict:
    """A host's repository, with its password and environment redacted."""
    host = get_host(p["host"])
    repo = Repo.get_or_none(Repo.host == host)
    if repo is None:
        raise NotFound(f"host {host.name} has no repository; set one with 'fleetctl repo set'")
    return repo_json(host, repo, ctx.state.box)
