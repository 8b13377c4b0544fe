"""Build restic command lines as tuples. Pure: no I/O, no environment.

The repository and its password never appear here: they travel in the
environment (RESTIC_REPOSITORY, RESTIC_PASSWORD), which execute builds, so
they cannot show up in a process list or a logged command line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .. import retention

Command = tuple[str, ...]

RESTIC = "restic"


def init() -> Command:
    return (RESTIC, "init", "--json")


def _hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    # several --host flags select the snapshots of any of them
    return tuple(arg for host in hosts for arg in ("--host", host))


def backup(
    includes: Sequence[str], excludes: Sequence[str] = (), tag: str = "", host: str = ""
) -> Command:
    """host: the name the snapshot is recorded under (restic's default is
    the machine's name); Fleet's host name, so that hosts sharing a
    repository keep their snapshots apart."""
    if not includes:
        raise ValueError("a backup needs at least one include path")
    args = [RESTIC, "backup", "--json"]
    if host:
        args += ["--host", host]
    if tag:
        args += ["--tag", tag]
    for pattern in excludes:
        args += ["--exclude", pattern]
    # "--" so that an include path starting with "-" is never read as a flag
    return (*args, "--", *includes)


def _no_lock(no_lock: bool) -> tuple[str, ...]:
    # read-only commands may skip the lock: then they never keep a job waiting
    return ("--no-lock",) if no_lock else ()


def snapshots(no_lock: bool = False, hosts: Sequence[str] = ()) -> Command:
    """hosts: only the snapshots recorded under these names (none: all)."""
    return (RESTIC, "snapshots", "--json", *_no_lock(no_lock), *_hosts(hosts))


def stats(mode: str = "restore-size", no_lock: bool = False) -> Command:
    return (RESTIC, "stats", "--json", "--mode", mode, *_no_lock(no_lock))


def forget(tag: str, policy: dict, hosts: Sequence[str] = ()) -> Command:
    """hosts: only this host's snapshots of the group (a shared repository
    holds other hosts' groups of the same name)."""
    flags = retention.forget_args(retention.normalize(policy))
    if not flags:
        raise ValueError(f"group {tag!r} has no retention rules; forget would keep everything")
    # with hosts named, they are one host (its Fleet name and the machine's
    # older one): the policy counts their snapshots together
    group_by = "tags" if hosts else "host,tags"
    return (
        RESTIC,
        "forget",
        "--json",
        "--tag",
        tag,
        *_hosts(hosts),
        "--group-by",
        group_by,
        *flags,
    )


_SNAPSHOT_ID = re.compile(r"^[0-9a-f]{8,64}\Z")


def copy(snapshots: Sequence[str] = (), tag: str = "", hosts: Sequence[str] = ()) -> Command:
    """restic copy into the repository (RESTIC_REPOSITORY) from the source
    one (RESTIC_FROM_REPOSITORY): these snapshots by id, else every snapshot
    of these hosts with this tag that the destination lacks (restic skips
    those copied before)."""
    if snapshots:
        return (RESTIC, "copy", "--", *(snapshot_id(s) for s in snapshots))
    if not tag:
        raise ValueError("a copy names a snapshot or a group")
    return (RESTIC, "copy", "--tag", tag, *_hosts(hosts))


def snapshot_id(value: str) -> str:
    """A snapshot's id (8 to 64 hex digits); raises ValueError."""
    if not _SNAPSHOT_ID.match(value):
        raise ValueError(f"{value!r} is not a snapshot id")
    return value


def restore(
    snapshot: str,
    target: str,
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    verify: bool = False,
) -> Command:
    """restic restore of one snapshot (by id: what is restored is decided
    by fleetd, never "latest" at run time) into `target`, only what the
    include patterns match (none: everything), and with --verify the
    restored files read back and checked against the snapshot."""
    if not target.startswith("/"):
        raise ValueError(f"restore target {target!r} is not an absolute path")
    # --json: restic 0.16+ prints its progress (0.14 takes the flag, prints none)
    args = [RESTIC, "restore", "--json", "--target", target]
    for pattern in includes:
        args += ["--include", pattern]
    for pattern in excludes:
        args += ["--exclude", pattern]
    if verify:
        args.append("--verify")
    return (*args, "--", snapshot_id(snapshot))


# -- browsing: read-only, without a lock (they never wait for a job) ----------


def ls(snapshot: str, directory: str) -> Command:
    """One directory of a snapshot: restic lists it and its entries (not
    deeper)."""
    if not directory.startswith("/"):
        raise ValueError(f"{directory!r} is not an absolute path")
    return (RESTIC, "ls", "--json", "--no-lock", "--", snapshot_id(snapshot), directory)


def ls_all(snapshot: str) -> Command:
    """Every node of a snapshot, recursively (a drill's sample is drawn from them)."""
    return (RESTIC, "ls", "--json", "--no-lock", "--", snapshot_id(snapshot))


def find(patterns: Sequence[str], hosts: Sequence[str] = (), tag: str = "") -> Command:
    """The paths matching any of the patterns in every snapshot of these
    hosts (and tag)."""
    if not patterns or any(not p for p in patterns):
        raise ValueError("find needs a pattern")
    args = [RESTIC, "find", "--no-lock", *_hosts(hosts)]
    if tag:
        args += ["--tag", tag]
    return (*args, "--", *patterns)


def dump(snapshot: str, path: str) -> Command:
    """One file of a snapshot, its bytes on standard output."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return (RESTIC, "dump", "--no-lock", "--", snapshot_id(snapshot), path)


def diff(first: str, second: str) -> Command:
    return (RESTIC, "diff", "--json", "--no-lock", "--", snapshot_id(first), snapshot_id(second))


def prune() -> Command:
    return (RESTIC, "prune")


# restic check --read-data-subset: n/t, a percentage, or a size (K, M, G, T)
_FRACTION = re.compile(r"^([1-9]\d{0,8})/([1-9]\d{0,8})\Z")
_PERCENT = re.compile(r"^(\d{1,3}(?:\.\d{1,6})?)%\Z")
_SIZE = re.compile(r"^[1-9]\d{0,15}[KMGTkmgt]?\Z")


def read_data_subset(value: str) -> str:
    """Validate a `--read-data-subset` value such as 5%, 1/10 or 100M. Raises ValueError."""
    match = _FRACTION.match(value)
    if match:
        n, t = int(match.group(1)), int(match.group(2))
        if n > t:
            raise ValueError(f"read_data_subset {value!r}: {n} is more than {t}")
        return value
    match = _PERCENT.match(value)
    if match:
        if not 0 < float(match.group(1)) <= 100:
            raise ValueError(f"read_data_subset {value!r}: a percentage is above 0 and at most 100")
        return value
    if _SIZE.match(value):
        return value
    raise ValueError(f"read_data_subset {value!r} is not n/t, a percentage (5%) or a size (100M)")


def check(read_data_subset: str = "") -> Command:
    args = [RESTIC, "check"]
    if read_data_subset:
        args += ["--read-data-subset", read_data_subset]
    return tuple(args)


def unlock() -> Command:
    # stale locks only: a live restic's lock stays (--remove-all would break it)
    return (RESTIC, "unlock")


def list_locks() -> Command:
    # --no-lock: looking at the locks must not add one
    return (RESTIC, "list", "locks", "--no-lock")


def cat_config() -> Command:
    # the cheapest command that needs the password: it decrypts the config
    return (RESTIC, "cat", "config", "--no-lock")


def version() -> Command:
    return (RESTIC, "version")
