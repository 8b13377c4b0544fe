"""Repositories: named restic repositories that hosts use and share.

A repository's URL, password and backend environment are stored encrypted
(bound to the repository's row) and never leave fleetd but to the agents of
the hosts that use it. A host uses one or more: its default (the first,
where a group that names none backs up; `repos use` and `repo set` make
it), and those `repos attach` adds or a group names (--repo, --copy-to). `repo set HOST` (the per-host
form of the first releases) keeps working: it writes the repository named
after the host.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from peewee import fn

from ...common.protocol import MAX_REPOSITORIES, Field
from ..events import MaintenanceChanged, RepoChanged
from ..jobs import lifecycle
from ..scheduling import maintenance
from ..security.auth import Role
from ..security.secrets import SecretBox, repository_aad
from ..store.models import (
    Host,
    HostRepository,
    Job,
    Repository,
    RepoStats,
    Snapshot,
    SourceGroup,
    Template,
    utcnow,
)
from .common import audit, check_name, get_host
from .context import Context
from .errors import Conflict, Invalid, NotFound
from .registry import Method, collect
from .views import redact_url, repository_json

METHODS: list[Method] = []
method = collect(METHODS)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# restic backends: a local path, or one of these prefixes
REPO_SCHEMES = ("sftp:", "rest:", "s3:", "b2:", "azure:", "gs:", "swift:", "rclone:")

NAME = Field("name", "str", limit=64)
SECRETS = (
    Field("url", "str", limit=2048),
    Field("password", "str", limit=4096),
    Field("env", "dict[str,str]", False, limit=100),
)


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


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if not ENV_NAME_RE.match(key):
            raise Invalid(f"{key!r} is not an environment variable name")
    return env


def check_password(password: str) -> str:
    if not password:
        raise Invalid("the repository password is empty")
    return password


def write_secrets(
    box: SecretBox, repo: Repository, url: str, password: str, env: dict[str, str]
) -> None:
    """Encrypt into the row, bound to it ("repository:<id>"): a repository
    migrated from a host's own is re-bound on its first write."""
    repo.aad = f"repository:{repo.id}"
    repo.url_enc = box.encrypt(url, repository_aad(repo.aad, "url"))
    repo.password_enc = box.encrypt(password, repository_aad(repo.aad, "password"))
    repo.env_names = sorted(env)
    repo.env_enc = box.encrypt(json.dumps(env), repository_aad(repo.aad, "env")) if env else None
    repo.updated_at = utcnow()
    repo.save()


def read_secrets(box: SecretBox, repo: Repository) -> tuple[str, str, dict[str, str]]:
    url = box.decrypt(bytes(repo.url_enc), repository_aad(repo.aad, "url"))
    password = box.decrypt(bytes(repo.password_enc), repository_aad(repo.aad, "password"))
    env = {}
    if repo.env_enc:
        env = json.loads(box.decrypt(bytes(repo.env_enc), repository_aad(repo.aad, "env")))
    return url, password, env


def create(box: SecretBox, name: str, url: str, password: str, env: dict[str, str]) -> Repository:
    now = utcnow()
    # a row first (its id is what the secrets are bound to), then the secrets
    repo = Repository.create(
        name=name, url_enc=b"", password_enc=b"", aad="", created_at=now, updated_at=now
    )
    write_secrets(box, repo, url, password, env)
    maintenance.defaults(repo.id, now)  # forget daily, prune and check weekly
    return repo


def get_repository(name: str) -> Repository:
    repo = Repository.get_or_none(Repository.name == name)
    if repo is None:
        raise NotFound(f"no repository named {name!r}")
    return repo


def repositories_of(host: Host) -> list[Repository]:
    """The repositories the host uses, its default (the first) first."""
    return list(
        Repository.select()
        .join(HostRepository)
        .where(HostRepository.host == host)
        .order_by(HostRepository.position, HostRepository.attached_at)
    )


def default_of(host: Host) -> Optional[Repository]:
    """The host's default repository (its first), or None."""
    return (
        Repository.select()
        .join(HostRepository)
        .where(HostRepository.host == host)
        .order_by(HostRepository.position, HostRepository.attached_at)
        .first()
    )


def templates_naming(name: str) -> list[str]:
    """The templates whose specs name the repository (fleet.server.api.templates)."""
    out = []
    for t in Template.select(Template.name, Template.spec).order_by(Template.name):
        spec = t.spec
        groups = spec.get("groups", {}).values()
        if (
            name in spec.get("repositories", [])
            or name in spec.get("maintenance", {})
            or any(name in (g.get("repository"), g.get("copy_to")) for g in groups)
        ):
            out.append(t.name)
    return out


def users_of(repo: Repository) -> list[str]:
    """The names of the hosts that use the repository."""
    return [
        name
        for (name,) in Host.select(Host.name)
        .join(HostRepository)
        .where(HostRepository.repository == repo)
        .order_by(Host.name)
        .tuples()
    ]


def changed(ctx: Context, repo: Repository) -> None:
    """Its agents get the new settings once committed (and init runs again)."""
    for (host_id,) in (
        HostRepository.select(HostRepository.host).where(HostRepository.repository == repo).tuples()
    ):
        ctx.events.append(RepoChanged(host_id))


def use(ctx: Context, host: Host, repo: Repository) -> bool:
    """Make `repo` the host's default repository (its first); False when it
    already was. The old default stays attached only while one of the
    host's groups names it."""
    current = default_of(host)
    if current is not None and current.id == repo.id:
        return False
    refuse_copy_into_default(host, repo)
    HostRepository.update(position=HostRepository.position + 1).where(
        HostRepository.host == host
    ).execute()
    if not attach(ctx, host, repo, position=0):
        HostRepository.update(position=0).where(
            (HostRepository.host == host) & (HostRepository.repository == repo)
        ).execute()
        ctx.events.append(RepoChanged(host.id))
    if current is not None and (named_by(host, current) or attached_by_template(host, current)):
        follow_default(host, current, repo)  # it stays, for the groups or template naming it
    elif current is not None:
        detach(ctx, host, current, successor=repo)
    return True


def attached_by_template(host: Host, repo: Repository) -> Optional[str]:
    """The template that attached `repo` to the host, if one did."""
    return (
        HostRepository.select(HostRepository.template)
        .where((HostRepository.host == host) & (HostRepository.repository == repo))
        .scalar()
    )


def attach(ctx: Context, host: Host, repo: Repository, position: Optional[int] = None) -> bool:
    """The host uses `repo` too (after those it has, unless `position` is
    given); False when it already did. Its agent gets it and inits it."""
    if (
        HostRepository.select()
        .where((HostRepository.host == host) & (HostRepository.repository == repo))
        .exists()
    ):
        return False
    used = HostRepository.select().where(HostRepository.host == host).count()
    if used >= MAX_REPOSITORIES:
        raise Conflict(
            f"{host.name} uses {used} repositories, as many as a host may: "
            "detach one first (fleetctl repos detach)"
        )
    if position is None:
        last = (
            HostRepository.select(fn.MAX(HostRepository.position))
            .where(HostRepository.host == host)
            .scalar()
        )
        position = 0 if last is None else last + 1
    HostRepository.create(host=host, repository=repo, position=position, attached_at=utcnow())
    if position == 0:  # its first: the jobs queued while it had none go there
        Job.update(repository=repo).where(
            (Job.host == host) & (Job.status == lifecycle.QUEUED) & Job.repository.is_null()
        ).execute()
    ctx.events.append(RepoChanged(host.id))  # pushed to its agent; auto-init
    return True


def refuse_copy_into_default(host: Host, repo: Repository) -> None:
    """A group that names no repository backs up into the host's default:
    `repo` cannot become that while such a group copies into it."""
    clash = [
        name
        for (name,) in SourceGroup.select(SourceGroup.name)
        .where(
            (SourceGroup.host == host)
            & SourceGroup.repository.is_null()
            & (SourceGroup.copy_to == repo)
        )
        .order_by(SourceGroup.name)
        .tuples()
    ]
    if clash:
        raise Conflict(
            f"{host.name}'s group(s) {', '.join(clash)} copy into repository {repo.name}, "
            "which would become where they back up: give them another copy target or a "
            "repository of their own first (fleetctl groups edit --copy-to/--repo)"
        )


def named_by(host: Host, repo: Repository) -> list[str]:
    """The host's groups that name `repo`, for their backups or their copies."""
    return [
        name
        for (name,) in SourceGroup.select(SourceGroup.name)
        .where(
            (SourceGroup.host == host)
            & ((SourceGroup.repository == repo) | (SourceGroup.copy_to == repo))
        )
        .order_by(SourceGroup.name)
        .tuples()
    ]


# kinds a job keeps when its repository is the host's default and that moves:
# they follow the default (a backup of a group that names none, a listing)
FOLLOW_DEFAULT = ("backup", "snapshots", "stats")


def follow_default(host: Host, old: Repository, new: Repository) -> None:
    """The host's queued jobs that follow its default (see FOLLOW_DEFAULT)
    move from `old` to `new`, its default now."""
    following = SourceGroup.select(SourceGroup.id).where(
        (SourceGroup.host == host) & SourceGroup.repository.is_null()
    )
    Job.update(repository=new).where(
        (Job.host == host)
        & (Job.status == lifecycle.QUEUED)
        & (Job.repository == old)
        & Job.from_repository.is_null()
        & Job.kind.in_(FOLLOW_DEFAULT)
        & (Job.group.is_null() | Job.group.in_(following))
    ).execute()


def detach(
    ctx: Context, host: Host, repo: Repository, successor: Optional[Repository] = None
) -> None:
    """The host no longer uses `repo`: its queued jobs there follow the new
    default (`successor`) when they may, else end cancelled; what fleetd
    knew of its snapshots and sizes there goes (restic's data stays)."""
    lifecycle.freed(ctx.events, host.id)  # its jobs leave the repository's queue
    if successor is not None:
        follow_default(host, repo, successor)
    queued = Job.select(Job.id).where(
        (Job.host == host)
        & (Job.status == lifecycle.QUEUED)
        & ((Job.repository == repo) | (Job.from_repository == repo))
    )
    for job in queued:
        lifecycle.end(
            ctx.events,
            host.id,
            job.id,
            "cancelled",
            error=f"its host no longer uses repository {repo.name}",
        )
    HostRepository.delete().where(
        (HostRepository.host == host) & (HostRepository.repository == repo)
    ).execute()
    Snapshot.delete().where((Snapshot.host == host) & (Snapshot.repository == repo)).execute()
    RepoStats.delete().where((RepoStats.host == host) & (RepoStats.repository == repo)).execute()
    ctx.events.append(RepoChanged(host.id))


def shown(ctx: Context, repo: Repository) -> dict[str, Any]:
    return repository_json(repo, ctx.state.box, users_of(repo))


# -- named repositories ----------------------------------------------------------


@method("repos.create", Role.OPERATOR, (NAME, *SECRETS))
def repos_create(ctx: Context, p: dict) -> dict:
    """Create a named repository (URL, password, backend environment),
    stored encrypted; hosts use it with `repos use`."""
    name = check_name("repository", p["name"])
    if Repository.get_or_none(Repository.name == name) is not None:
        raise Conflict(f"a repository named {name!r} exists already")
    url = check_repo_url(p["url"])
    env = check_env(p.get("env") or {})
    repo = create(ctx.state.box, name, url, check_password(p["password"]), env)
    ctx.events.append(MaintenanceChanged(repo.id))
    audit(ctx, "repos.create", name, {"url": redact_url(url), "env": sorted(env)})
    return shown(ctx, repo)


@method("repos.list", Role.VIEWER, (), readonly=True)
def repos_list(ctx: Context, p: dict) -> list:
    """Every repository by name, secrets redacted, with the hosts using it."""
    repos = list(Repository.select().order_by(Repository.name))
    hosts: dict[int, list[str]] = {r.id: [] for r in repos}
    for repo_id, name in (
        HostRepository.select(HostRepository.repository, Host.name)
        .join(Host)
        .order_by(Host.name)
        .tuples()
    ):
        hosts[repo_id].append(name)
    return [repository_json(r, ctx.state.box, hosts[r.id]) for r in repos]


@method("repos.show", Role.VIEWER, (NAME,), readonly=True)
def repos_show(ctx: Context, p: dict) -> dict:
    """One repository, secrets redacted."""
    return shown(ctx, get_repository(p["name"]))


@method(
    "repos.edit",
    Role.OPERATOR,
    (
        NAME,
        Field("new_name", "str", False, limit=64),
        Field("url", "str", False, limit=2048),
        Field("password", "str", False, limit=4096),
        Field("env", "dict[str,str]", False, limit=100),
        Field("clear_env", "bool", False),
    ),
)
def repos_edit(ctx: Context, p: dict) -> dict:
    """Change a repository: the fields given; its hosts' agents get the new
    settings and check them with an init."""
    repo = get_repository(p["name"])
    if p.get("new_name") and p["new_name"] != repo.name:
        naming = templates_naming(repo.name)
        if naming:  # they name it by its name
            raise Conflict(
                f"repository {repo.name!r} is named by template(s) {', '.join(naming)}: "
                "change them first (fleetctl templates set)"
            )
        new = check_name("repository", p["new_name"])
        if Repository.get_or_none(Repository.name == new) is not None:
            raise Conflict(f"a repository named {new!r} exists already")
        repo.name = new
    url, password, env = read_secrets(ctx.state.box, repo)
    secrets = any(k in p for k in ("url", "password", "env")) or p.get("clear_env")
    if "url" in p:
        url = check_repo_url(p["url"])
    if "password" in p:
        password = check_password(p["password"])
    if p.get("clear_env"):
        env = {}
    if "env" in p:
        env = {**env, **check_env(p["env"])}
    if secrets:
        write_secrets(ctx.state.box, repo, url, password, env)
        changed(ctx, repo)
    else:
        repo.save()
    detail = {"changed": sorted(k for k in p if k != "name"), "url": redact_url(url)}
    audit(ctx, "repos.edit", repo.name, detail)
    return shown(ctx, repo)


@method("repos.delete", Role.OPERATOR, (NAME,))
def repos_delete(ctx: Context, p: dict) -> dict:
    """Forget a repository (restic's data is not touched); refused while a
    host uses it."""
    repo = get_repository(p["name"])
    naming = templates_naming(repo.name)
    if naming:
        raise Conflict(
            f"repository {repo.name!r} is named by template(s) {', '.join(naming)}: "
            "change them first (fleetctl templates set)"
        )
    users = users_of(repo)
    if users:
        raise Conflict(
            f"repository {repo.name!r} is used by {', '.join(users)}: "
            "give them another with 'fleetctl repos use' first"
        )
    repo.delete_instance()
    audit(ctx, "repos.delete", repo.name)
    return {"removed": repo.name}


@method(
    "repos.use",
    Role.OPERATOR,
    (NAME, Field("hosts", "list[str]", limit=1000)),
)
def repos_use(ctx: Context, p: dict) -> dict:
    """These hosts back up into the repository from now on (it becomes each
    one's repository; their agents get it and check it with an init)."""
    repo = get_repository(p["name"])
    if not p["hosts"]:
        raise Invalid("name at least one host")
    hosts = [get_host(name) for name in dict.fromkeys(p["hosts"])]
    moved = [h.name for h in hosts if use(ctx, h, repo)]
    if moved:
        audit(ctx, "repos.use", repo.name, {"hosts": moved})
    return {**shown(ctx, repo), "changed": moved}


HOSTS = Field("hosts", "list[str]", limit=1000)


def named_hosts(p: dict) -> list[Host]:
    if not p["hosts"]:
        raise Invalid("name at least one host")
    return [get_host(name) for name in dict.fromkeys(p["hosts"])]


@method("repos.attach", Role.OPERATOR, (NAME, HOSTS))
def repos_attach(ctx: Context, p: dict) -> dict:
    """These hosts use the repository too, beside their default (a group
    names it with --repo or --copy-to); their agents get it and init it."""
    repo = get_repository(p["name"])
    added = [h.name for h in named_hosts(p) if attach(ctx, h, repo)]
    if added:
        audit(ctx, "repos.attach", repo.name, {"hosts": added})
    return {**shown(ctx, repo), "changed": added}


@method("repos.detach", Role.OPERATOR, (NAME, HOSTS))
def repos_detach(ctx: Context, p: dict) -> dict:
    """These hosts stop using the repository (restic's data stays). Refused
    for a host whose groups name it, or for whom it is the only one."""
    repo = get_repository(p["name"])
    hosts = named_hosts(p)
    removed = []
    for h in hosts:
        used = [r.id for r in repositories_of(h)]
        if repo.id not in used:
            continue
        template = attached_by_template(h, repo)
        if template is not None:
            raise Conflict(
                f"template {template} attached repository {repo.name} to {h.name}: "
                "change the template or the host's labels (fleetctl templates)"
            )
        groups = named_by(h, repo)
        if groups:
            raise Conflict(
                f"{h.name}'s group(s) {', '.join(groups)} name repository {repo.name}: "
                "point them elsewhere first (fleetctl groups edit --repo/--copy-to)"
            )
        if len(used) == 1:
            raise Conflict(
                f"repository {repo.name} is the only one {h.name} uses: "
                "give it another with 'fleetctl repos use' instead"
            )
        successor = None
        if used[0] == repo.id:  # the default goes: the next one takes its place
            successor = Repository.get_by_id(used[1])
            refuse_copy_into_default(h, successor)
        detach(ctx, h, repo, successor)
        removed.append(h.name)
    if removed:
        audit(ctx, "repos.detach", repo.name, {"hosts": removed})
    return {**shown(ctx, repo), "changed": removed}


# -- a host's repository (the per-host form) ---------------------------------------


@method(
    "repo.set",
    Role.OPERATOR,
    (Field("host", "str", limit=64), *SECRETS),
)
def repo_set(ctx: Context, p: dict) -> dict:
    """Set a host's repository (URL, password, backend environment): the
    repository the host uses is changed when no other host shares it;
    otherwise a new one, named after the host, becomes its own. One that
    others share, or that nobody uses (it may be the only key to old
    backups), is never overwritten."""
    host = get_host(p["host"])
    url = check_repo_url(p["url"])
    password = check_password(p["password"])
    env = check_env(p.get("env") or {})
    box = ctx.state.box
    repo = default_of(host)
    if repo is not None and users_of(repo) == [host.name]:
        write_secrets(box, repo, url, password, env)
        changed(ctx, repo)
    else:
        repo = create(box, free_name(host.name), url, password, env)
        ctx.events.append(MaintenanceChanged(repo.id))
        use(ctx, host, repo)
    audit(ctx, "repo.set", host.name, {"url": redact_url(url), "env": sorted(env)})
    return {"host": host.name, **shown(ctx, repo)}


def free_name(base: str) -> str:
    """`base`, or base-2, base-3 ... when taken; within the names' 64 characters."""
    name, n = base, 1
    while Repository.get_or_none(Repository.name == name) is not None:
        n += 1
        suffix = f"-{n}"
        name = base[: 64 - len(suffix)] + suffix
    return name


@method("repo.show", Role.VIEWER, (Field("host", "str", limit=64),), readonly=True)
def repo_show(ctx: Context, p: dict) -> dict:
    """A host's repository, with its password and environment redacted."""
    host = get_host(p["host"])
    repo = default_of(host)
    if repo is None:
        raise NotFound(
            f"host {host.name} has no repository; set one with 'fleetctl repo set' "
            "or 'fleetctl repos use'"
        )
    return {"host": host.name, **shown(ctx, repo)}
