"""The wire protocol: one envelope, every message type, one validating decoder.

Pure: no I/O, stdlib only, importable on Python 3.9 (the agent runs it).

Agent channel frames are JSON text:

    {"v": 1, "type": "job.log", "id": "...", "seq": 12, "data": {...}}

`id` is optional and echoed as `re` in an error frame. `seq` is the per-agent
delivery sequence number carried by every frame the agent must not lose (see
RELIABLE); fleetd answers with a cumulative `ack` once that seq is stored.
Operator (`/ctl`) frames are request/response pairs, validated by
`decode_request`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # a frame larger than this is refused unread
MAX_STR = 4096  # default bound on a string field
MAX_LINE = 64 * 1024  # a job log line
MAX_ITEMS = 10_000  # default bound on a list field
SNAPSHOT_PAGE = 500  # snapshots in one snapshots.report frame (~150 KB)
LOG_PACK = 500  # job log lines in one job.logs frame
LOG_PACK_BYTES = 256 * 1024  # and their spooled size at most (a line may be 64 KiB)
MAX_ID = 128  # a frame id, echoed back as `re`
MAX_DEPTH = 32  # arrays and objects nested deeper than this are refused unparsed
INT_MAX = (1 << 63) - 1  # every integer fits SQLite's signed 64 bits (|n| < 2**63)
INT_MIN = -INT_MAX
MAX_SEQ = 1 << 62  # delivery and log seqs: room left for arithmetic on them
MAX_COALESCED = 20  # fire times a waiting scheduled backup remembers having absorbed
MAX_UNAUTH_FRAME_BYTES = 64 * 1024  # /login and /enroll frames (fleetd's websockets limit)
MAX_AGENT_BYTES = 64 << 20  # an agent file fleetd serves, and an agent downloads, at most
MAX_UPGRADE_DEADLINE = 3600  # seconds a new agent may take to get its hello accepted
# why an agent did not upgrade: it was busy with a job, it cannot replace its
# own file, the download or its checksum failed, the new file failed its
# self-check, or something else went wrong before the swap
UPGRADE_CODES = ("busy", "unsupported", "download", "checksum", "self_check", "failed")
MAX_PINS = 8  # key pins an agent holds (fleet.common.tlspins): served, staged, room to spare
# fleetd replicas' URLs an enrollment string or a welcome names, at most, and
# the length of each (ws:// or wss:// only)
MAX_URLS = 16
MAX_URL = 2048

JOB_KINDS = (
    "init",
    "backup",
    "forget",
    "prune",
    "check",
    "unlock",
    "copy",
    "restore",
    "snapshots",
    "stats",
    "drill",
)
JOB_STATUSES = (
    "queued",
    "dispatched",
    "running",
    "succeeded",
    "warning",
    "failed",
    "cancelled",
    "lost",
)
FINAL_STATUSES = ("succeeded", "warning", "failed", "cancelled", "lost")
LOG_STREAMS = ("stdout", "stderr", "event")


class ProtocolError(ValueError):
    """A frame or request that does not follow the protocol.

    `code` goes into the error frame; `re` is the id of the offending frame
    when it could be read.
    """

    def __init__(self, message: str, code: str = "bad_frame", re: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.re = re
        # the frame's delivery seq when it could be read: fleetd then records
        # the frame as refused in seq order, so one bad frame cannot wedge
        # the agent's stream (it would otherwise resend it for ever)
        self.seq: Optional[int] = None


class Field(NamedTuple):
    """One field of a message: its JSON type and bounds.

    kind: "str", "int", "float" (an int is accepted), "bool", "dict",
    "list[str]", "list[int]", "list[dict]", "dict[str,str]".
    For strings `limit` bounds the length; for lists the item count; for
    ints it is not used (`minimum` and `maximum` bound them, and every int
    fits a signed 64-bit integer whatever they say).
    """

    name: str
    kind: str
    required: bool = True
    limit: int = 0
    choices: tuple[str, ...] = ()
    minimum: Optional[int] = None
    # fields of each dict in a list[dict]; for a list[str], one Field bounding each item
    item: Optional[tuple[Field, ...]] = None
    maximum: Optional[int] = None


def F(name: str, kind: str, required: bool = True, **kw: Any) -> Field:
    return Field(name, kind, required, **kw)


def _opt(name: str, kind: str, **kw: Any) -> Field:
    return Field(name, kind, False, **kw)


_TS = "str"  # timestamps travel as RFC 3339 strings

MAX_TIMEOUT = 30 * 86400  # seconds: a hook's or a job's time limit, at most
SOURCE_GROUP = (
    F("id", "int"),
    F("name", "str", limit=64),
    F("includes", "list[str]", limit=1000),
    F("excludes", "list[str]", limit=1000),
    _opt("retention", "dict"),
    _opt("pre_hook", "str"),
    _opt("post_hook", "str"),
    _opt("repository_id", "int"),  # where its backups go; none: the host's default
    # seconds a hook may run (none: the agent's default), and a backup
    _opt("hook_timeout", "int", minimum=0, maximum=MAX_TIMEOUT),
    _opt("timeout", "int", minimum=0, maximum=MAX_TIMEOUT),
)
# a repository an agent holds; its id is what jobs and reports name
REPOSITORY = (
    F("id", "int"),
    F("name", "str", limit=64),
    F("url", "str", limit=2048),
    F("password", "str", limit=4096),
    _opt("env", "dict[str,str]", limit=100),
)
MAX_REPOSITORIES = 32  # a host's repositories
MAX_COPY_SNAPSHOTS = 1000  # snapshots one copy job names

SCHEDULE = (
    F("id", "int"),
    F("cron", "str", limit=256),
    F("enabled", "bool"),
    F("source_groups", "list[dict]", limit=1000, item=SOURCE_GROUP),
    _opt("name", "str", limit=64),
    # the IANA zone its cron is read in, as fleetd resolved it (the
    # schedule's own, or the host's as its agent reported it); none: UTC
    _opt("timezone", "str", limit=64),
)
# a job an agent runs on its own from a fire (fleetd unreachable): its id is
# the agent's (negative, so it never meets one of fleetd's), its uid the one
# fleetd gives a job of that fire and group, so either side may make it
LOCAL_JOB = (
    F("group_id", "int"),
    F("job_id", "int", maximum=-1),
    F("uid", "str", limit=128),
)

LOG_LINE = (
    F("seq", "int", minimum=1, maximum=MAX_SEQ),  # the line's place in its job's log
    F("ts", _TS),
    F("stream", "str", choices=LOG_STREAMS),
    F("payload", "str", limit=MAX_LINE),
)
SNAPSHOT = (
    F("id", "str", limit=128),
    F("short_id", "str", limit=64),
    F("time", _TS),
    F("hostname", "str", limit=255),
    F("paths", "list[str]"),
    _opt("tags", "list[str]"),
    _opt("size_bytes", "int", minimum=0),
    _opt("file_count", "int", minimum=0),
)


# Browsing a repository (ls, find, diff): queries beside the jobs, answered
# in pages of at most QUERY_PAGE items; each kind's items as fleetd checks them
QUERY_KINDS = ("ls", "find", "diff", "dump")
QUERY_PAGE = 500
QUERY_WINDOW = 16  # pages an agent sends ahead of fleetd's query.more
QUERY_CHUNK = 192 * 1024  # bytes of a dumped file in one page (base64: 256 KiB)
QUERY_CODES = ("busy", "unknown_kind", "bad_params", "no_repo", "failed")
LS_ENTRY = (
    F("self", "bool"),  # the listed path's own node (a file listed is itself)
    F("name", "str", limit=MAX_STR),
    F("type", "str", limit=16),
    _opt("size", "int", minimum=0),
    _opt("mode", "str", limit=16),
    _opt("mtime", _TS),
    _opt("uid", "int", minimum=0),
    _opt("gid", "int", minimum=0),
)
FIND_MATCH = (F("snapshot", "str", limit=64), F("path", "str", limit=MAX_STR))
DIFF_ITEM = (
    _opt("path", "str", limit=MAX_STR),
    _opt("change", "str", limit=16),
    _opt("statistics", "dict"),
)
DUMP_CHUNK = (F("data", "str", limit=QUERY_CHUNK * 4 // 3 + 4),)  # base64
QUERY_ITEMS = {"ls": LS_ENTRY, "find": FIND_MATCH, "diff": DIFF_ITEM, "dump": DUMP_CHUNK}
# what query.result's items may hold: every kind's fields, none required
# (fleetd then checks each item against its query's kind)
_ANY_ITEM = tuple(
    {f.name: f._replace(required=False) for spec in QUERY_ITEMS.values() for f in spec}.values()
)


def printable(text: str) -> str:
    """A peer's label with its control characters (an escape sequence, a
    line break) as '?': what an agent says of itself reaches operators'
    terminals and fleetd's log."""
    return "".join(c if c.isprintable() else "?" for c in text)


class MessageSpec(NamedTuple):
    direction: str  # "agent" (agent -> fleetd), "server" (fleetd -> agent), "both"
    fields: tuple[Field, ...]


MESSAGES: dict[str, MessageSpec] = {
    # /enroll, before the agent has a token
    "enroll": MessageSpec(
        "agent", (F("token", "str", limit=1024), F("hostname", "str", limit=255))
    ),
    "enrolled": MessageSpec(
        "server",
        (F("host_id", "int"), F("host_name", "str", limit=255), F("agent_token", "str", limit=256)),
    ),
    # /agent session
    "hello": MessageSpec(
        "agent",
        (
            F("protocol_version", "int", maximum=1 << 16),
            F("agent_version", "str", limit=64),
            F("restic_version", "str", limit=128),
            F("hostname", "str", limit=255),
            F("os", "str", limit=64),
            F("arch", "str", limit=64),
            _opt("timezone", "str", limit=128),
            _opt("boot_time", _TS),
            _opt("running_job", "int"),  # the job the agent is still running, if any
            # the agent's last spooled seq (fleetd is caught up past it) and its
            # oldest unacknowledged one (0: none)
            _opt("spool_seq", "int", minimum=0, maximum=MAX_SEQ),
            _opt("spool_pending", "int", minimum=0, maximum=MAX_SEQ),
            # the version of the schedule set the agent holds (fleetd pushes
            # schedule.set after welcome when it has another)
            _opt("schedule_version", "int", minimum=0, maximum=MAX_SEQ),
            # what the agent can do beyond protocol 1's first frames:
            # "repositories" (it holds and tells apart several per host)
            _opt("features", "list[str]", limit=32),
            # the version it was upgraded to and rolled back from, and why
            # (sent until fleetd has welcomed that hello once)
            _opt("upgrade_failed", "str", limit=64),
            _opt("upgrade_error", "str", limit=MAX_STR),
            # the key pins it trusts fleetd by (fleet.common.tlspins); [] when it
            # pins a certificate (enrolled before key pins), absent when it pins
            # nothing (plain ws://, or the system's CAs)
            _opt("tls_pins", "list[str]", limit=MAX_PINS),
        ),
    ),
    "welcome": MessageSpec(
        "server",
        (
            F("server_version", "str", limit=64),
            F("heartbeat_interval", "int", minimum=1),
            F("host_id", "int"),
            F("host_name", "str", limit=255),
            # what this fleetd accepts beyond protocol 1's first frames: "job.logs"
            _opt("features", "list[str]", limit=32),
            # every replica's URL (this one first), when fleetd was told them
            # (--public-url): the agent fails over along them
            _opt("urls", "list[str]", limit=MAX_URLS, item=(F("url", "str", limit=MAX_URL),)),
        ),
    ),
    "heartbeat": MessageSpec("agent", (F("sent_at", _TS),)),
    "config.update": MessageSpec(
        "server",
        (
            F("repo_url", "str", limit=2048),
            F("repo_password", "str", limit=4096),
            _opt("repo_env", "dict[str,str]", limit=100),
            # every repository the host uses, its default (the repo_* above) first
            _opt("repositories", "list[dict]", limit=MAX_REPOSITORIES, item=REPOSITORY),
        ),
    ),
    "schedule.set": MessageSpec(
        "server",
        (
            F("version", "int", minimum=0, maximum=MAX_SEQ),
            F("schedules", "list[dict]", limit=1000, item=SCHEDULE),
        ),
    ),
    # the key pins the agent is to trust fleetd by from now on (replacing
    # what it held): the key fleetd serves and the one staged next
    "tls.pins": MessageSpec("server", (F("pins", "list[str]", limit=MAX_PINS),)),
    # what the agent holds now (stored atomically before it says so); `error`
    # when it kept its old set (a set without the key it is connected to)
    "tls.ack": MessageSpec(
        "agent",
        (
            F("pins", "list[str]", limit=MAX_PINS),
            F("applied_at", _TS),
            _opt("error", "str", limit=MAX_STR),
        ),
    ),
    "schedule.ack": MessageSpec(
        "agent", (F("version", "int", minimum=0, maximum=MAX_SEQ), F("applied_at", _TS))
    ),
    "schedule.fire": MessageSpec(
        "agent",
        (
            F("schedule_id", "int"),
            F("scheduled_at", _TS),  # the cron time it fires for (UTC)
            _opt("catch_up", "bool"),  # a window missed while the agent was down or asleep
            # present when the agent runs the fire's backups itself, having
            # waited for fleetd in vain
            _opt("jobs", "list[dict]", limit=1000, item=LOCAL_JOB),
        ),
    ),
    "command.run": MessageSpec(
        "server",
        (
            F("job_id", "int"),
            F("kind", "str", choices=JOB_KINDS),
            _opt(
                "uid", "str", limit=128
            ),  # the job's global id: a scheduled one may be the agent's too
            _opt("group", "str", limit=64),
            _opt("includes", "list[str]", limit=1000),
            _opt("excludes", "list[str]", limit=1000),
            _opt("tag", "str", limit=64),
            _opt("retention", "dict"),
            _opt("pre_hook", "str"),
            _opt("post_hook", "str"),
            _opt("read_data_subset", "str", limit=32),  # check: "5%", "1/10", "100M"
            _opt("args", "list[str]", limit=100),  # an older fleetd's check subset
            # a backup a schedule fired: for what time, whether it catches up
            # a window missed while the agent was down, and the later fires
            # folded into it while it waited (each said in the job's log)
            _opt("scheduled_at", _TS),
            _opt("catch_up", "bool"),
            _opt("coalesced", "list[str]", limit=MAX_COALESCED),
            # forget: the hosts whose snapshots it selects (another host's,
            # when this one does its repository's maintenance)
            _opt("hosts", "list[str]", limit=100),
            # which of its repositories the job works on (none: its default),
            # and the one a copy reads from
            _opt("repository_id", "int"),
            _opt("from_repository_id", "int"),
            # copy: these snapshots (none: every one of the group the copy lacks)
            _opt("snapshots", "list[str]", limit=MAX_COPY_SNAPSHOTS),
            # restore: one snapshot by id, where to, read back and checked
            _opt("snapshot", "str", limit=64),
            _opt("target", "str", limit=4096),
            _opt("verify", "bool"),
            # drill: how much of the snapshot it restores ("20" files or "1%")
            _opt("sample", "str", limit=16),
            # restore: say what it would write, write nothing
            _opt("dry_run", "bool"),
            # backup: seconds each hook may run (none: the agent's default),
            # and the whole job (none: no limit)
            _opt("hook_timeout", "int", minimum=1, maximum=MAX_TIMEOUT),
            _opt("timeout", "int", minimum=1, maximum=MAX_TIMEOUT),
        ),
    ),
    "command.result": MessageSpec(
        "agent",
        (
            F("job_id", "int"),
            F("accepted", "bool"),
            _opt("error", "str"),
            # why a job was refused, for machines (`error` says it for people)
            _opt("code", "str", choices=("busy", "unknown_kind", "bad_params", "no_repo")),
        ),
    ),
    "command.cancel": MessageSpec(
        "server",
        # uid: a job the agent made itself from a fire, which it knows by that
        (F("job_id", "int"), _opt("uid", "str", limit=128)),
    ),
    "job.started": MessageSpec(
        "agent",
        (
            F("job_id", "int"),
            F("kind", "str", choices=JOB_KINDS),
            F("started_at", _TS),
            # a job the agent made itself from a fire (negative job_id): what
            # fleetd needs to record it, or to find the job it made of the fire
            _opt("uid", "str", limit=128),
            _opt("group_id", "int"),
            _opt("group", "str", limit=64),
            _opt("schedule_id", "int"),
            _opt("scheduled_at", _TS),
            _opt("catch_up", "bool"),
            _opt("coalesced", "list[str]", limit=MAX_COALESCED),  # later fires it also covers
        ),
    ),
    "job.progress": MessageSpec(
        "agent",
        (
            F("job_id", "int"),
            F("percent_done", "float"),
            F("files_done", "int", minimum=0),
            F("total_files", "int", minimum=0),
            F("bytes_done", "int", minimum=0),
            F("total_bytes", "int", minimum=0),
            F("eta_seconds", "int", minimum=0),
            F("throughput_bps", "int", minimum=0),
        ),
    ),
    "job.log": MessageSpec("agent", (F("job_id", "int"), *LOG_LINE)),
    # consecutive job.log frames of one job in one frame (an agent streaming
    # fast pays one frame, not one per line): line i was spooled under seq
    # first + i, and the frame's own seq is the last of them
    "job.logs": MessageSpec(
        "agent",
        (
            F("job_id", "int"),
            F("first", "int", minimum=1, maximum=MAX_SEQ),
            F("lines", "list[dict]", limit=LOG_PACK, item=LOG_LINE),
        ),
    ),
    "job.finished": MessageSpec(
        "agent",
        (
            F("job_id", "int"),
            F("status", "str", choices=FINAL_STATUSES),
            F("exit_code", "int", minimum=-(1 << 31), maximum=(1 << 31) - 1),
            F("finished_at", _TS),
            _opt("summary", "dict"),
            _opt("error", "str", limit=MAX_LINE),
        ),
    ),
    # a repository's snapshot list, in pages so that no frame grows with it:
    # every page of one report carries its report_at; the last one says so,
    # and fleetd then forgets snapshots no page of that report named
    "snapshots.report": MessageSpec(
        "agent",
        (
            F("snapshots", "list[dict]", limit=SNAPSHOT_PAGE, item=SNAPSHOT),
            _opt("report_at", _TS),
            _opt("last", "bool"),
            _opt("repository_id", "int"),  # none: the host's default (an older agent)
        ),
    ),
    "repo.stats": MessageSpec(
        "agent",
        (
            F("size_bytes", "int", minimum=0),
            F("snapshot_count", "int", minimum=0),
            _opt("file_count", "int", minimum=0),
            _opt("raw_size_bytes", "int", minimum=0),
            _opt("lock_state", "str", choices=("locked", "unlocked")),
            # when restic stats last measured the sizes; since then each
            # backup's summary added to them
            _opt("measured_at", _TS),
            _opt("repository_id", "int"),
        ),
    ),
    "query.run": MessageSpec(
        "server",
        (
            F("query_id", "int", minimum=1),
            F("kind", "str", choices=QUERY_KINDS),
            _opt("repository_id", "int"),
            # pages it may send before a query.more (none: no bound)
            _opt("window", "int", minimum=1, maximum=64),
            _opt("snapshot", "str", limit=64),  # ls, dump; diff's first
            _opt("snapshot2", "str", limit=64),  # diff's second
            _opt("path", "str", limit=MAX_STR),  # ls: the directory; dump: the file
            _opt("patterns", "list[str]", limit=16),  # find
            _opt("hosts", "list[str]", limit=100),  # find: whose snapshots
            _opt("tag", "str", limit=64),  # find: one group's
        ),
    ),
    "query.result": MessageSpec(
        "agent",
        (
            F("query_id", "int", minimum=1),
            # the kind's items (QUERY_ITEMS), checked by fleetd per kind
            F("items", "list[dict]", limit=QUERY_PAGE, item=_ANY_ITEM),
            F("done", "bool"),
            _opt("error", "str", limit=MAX_STR),
            _opt("code", "str", choices=QUERY_CODES),
        ),
    ),
    "query.cancel": MessageSpec("server", (F("query_id", "int", minimum=1),)),
    # fleetd took `pages` pages: the agent may send that many more
    "query.more": MessageSpec(
        "server", (F("query_id", "int", minimum=1), F("pages", "int", minimum=1, maximum=64))
    ),
    "repo.locks": MessageSpec(
        "agent", (F("count", "int", minimum=0), _opt("repository_id", "int"))
    ),
    # replace yourself with the agent fleetd serves (GET /agent.pyz): its
    # version, SHA-256 and size, and the seconds the new agent has to get a
    # hello accepted before the old one is put back
    "agent.upgrade": MessageSpec(
        "server",
        (
            F("version", "str", limit=64),
            F("sha256", "str", limit=64),
            F("size", "int", minimum=1, maximum=MAX_AGENT_BYTES),
            F("deadline", "int", minimum=1, maximum=MAX_UPGRADE_DEADLINE),
        ),
    ),
    # the agent's answer: accepted (it restarts into `version` now), or
    # not, with why (its old self keeps running)
    "upgrade.result": MessageSpec(
        "agent",
        (
            F("version", "str", limit=64),
            F("accepted", "bool"),
            _opt("code", "str", choices=UPGRADE_CODES),
            _opt("error", "str", limit=MAX_STR),
        ),
    ),
    "ack": MessageSpec("server", (F("seq", "int", minimum=0, maximum=MAX_SEQ),)),
    "error": MessageSpec(
        "both", (F("code", "str", limit=64), F("message", "str", limit=MAX_STR), _opt("re", "str"))
    ),
}

# Frames the agent spools and numbers with `seq`; fleetd acks them.
RELIABLE = frozenset(
    {
        "schedule.fire",
        "job.started",
        "job.log",
        "job.logs",
        "job.finished",
        "snapshots.report",
        "repo.stats",
        "repo.locks",
    }
)


FIRE_UID_PREFIX = "fire-"


def fire_uid(host_id: int, schedule_id: int, scheduled_at: str, group_id: int) -> str:
    """The uid of the backup of one group that one schedule fire makes,
    whoever makes it: fleetd from the fire, or the agent on its own while
    fleetd is out of reach. Both then name the same job."""
    return f"{FIRE_UID_PREFIX}{host_id}-{schedule_id}-{scheduled_at}-{group_id}"


def fire_uid_of(uid: Optional[str]) -> Optional[str]:
    """The uid when it names a schedule fire's backup (the agent may know
    that job by it alone, having made it itself), else None."""
    return uid if uid and uid.startswith(FIRE_UID_PREFIX) else None


def backup_params(
    group: str,
    includes: Sequence[str],
    excludes: Sequence[str],
    pre_hook: Optional[str] = None,
    post_hook: Optional[str] = None,
    hook_timeout: Optional[int] = None,
    timeout: Optional[int] = None,
) -> dict[str, Any]:
    """What command.run carries for a backup of a source group: the same
    whether fleetd sends it or an agent runs a scheduled one on its own."""
    params: dict[str, Any] = {
        "group": group,
        "includes": list(includes),
        "excludes": list(excludes),
        "tag": group,
        "pre_hook": pre_hook,
        "post_hook": post_hook,
    }
    if hook_timeout:
        params["hook_timeout"] = hook_timeout
    if timeout:
        params["timeout"] = timeout
    return params


class Envelope(NamedTuple):
    type: str
    data: dict[str, Any]
    id: Optional[str] = None
    seq: Optional[int] = None
    v: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        frame: dict[str, Any] = {"v": self.v, "type": self.type}
        if self.id is not None:
            frame["id"] = self.id
        if self.seq is not None:
            frame["seq"] = self.seq
        frame["data"] = self.data
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(value: Any, field: Field, where: str) -> Any:
    kind, name = field.kind, f"{where}{field.name}"
    if kind == "str":
        if not isinstance(value, str):
            raise ProtocolError(f"{name}: expected a string")
        limit = field.limit or MAX_STR
        if len(value) > limit:
            raise ProtocolError(f"{name}: longer than {limit} characters")
        if field.choices and value not in field.choices:
            raise ProtocolError(f"{name}: {value!r} is not one of {', '.join(field.choices)}")
    elif kind == "int":
        if not _is_int(value):
            raise ProtocolError(f"{name}: expected an integer")
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"{name}: out of range")
        if field.minimum is not None and value < field.minimum:
            raise ProtocolError(f"{name}: must be at least {field.minimum}")
        if field.maximum is not None and value > field.maximum:
            raise ProtocolError(f"{name}: must be at most {field.maximum}")
    elif kind == "float":
        if not (_is_int(value) or (isinstance(value, float) and math.isfinite(value))):
            raise ProtocolError(f"{name}: expected a finite number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(f"{name}: expected true or false")
    elif kind in ("dict", "dict[str,str]"):
        if not isinstance(value, dict):
            raise ProtocolError(f"{name}: expected an object")
        if kind == "dict[str,str]":
            if len(value) > (field.limit or MAX_ITEMS):
                raise ProtocolError(f"{name}: too many entries")
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ProtocolError(f"{name}.{k}: expected a string")
                if len(k) > MAX_STR or len(v) > MAX_STR:
                    raise ProtocolError(f"{name}.{k}: longer than {MAX_STR} characters")
    elif kind.startswith("list["):
        if not isinstance(value, list):
            raise ProtocolError(f"{name}: expected a list")
        limit = field.limit or MAX_ITEMS
        if len(value) > limit:
            raise ProtocolError(f"{name}: more than {limit} items")
        item_kind = kind[5:-1]
        if item_kind == "dict":
            sub = field.item or ()
            return [check_fields(v, sub, f"{name}[{i}].") for i, v in enumerate(value)]
        each = field.item[0] if field.item else Field("", item_kind)
        for i, v in enumerate(value):
            _check(v, each._replace(name=f"{field.name}[{i}]"), where)
    else:  # pragma: no cover - a typo in a spec above
        raise AssertionError(f"unknown field kind {kind}")
    return value


def check_fields(data: Any, fields: Sequence[Field], where: str = "") -> dict[str, Any]:
    """Validate `data` against `fields`; return it with unknown keys dropped.

    Raises ProtocolError naming the first field that is missing or wrong.
    Unknown keys are ignored so that a newer peer may add optional fields.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"{where.rstrip('.') or 'data'}: expected an object")
    out: dict[str, Any] = {}
    for field in fields:
        if field.name not in data or data[field.name] is None:
            if field.required:
                raise ProtocolError(f"{where}{field.name}: required")
            continue
        out[field.name] = _check(data[field.name], field, where)
    return out


def encode(
    type: str, data: Mapping[str, Any], id: Optional[str] = None, seq: Optional[int] = None
) -> str:
    """Build a frame; validates `data` so a sender cannot emit a bad frame."""
    spec = MESSAGES.get(type)
    if spec is None:
        raise ProtocolError(f"unknown message type {type!r}")
    return Envelope(type, check_fields(dict(data), spec.fields), id, seq).to_json()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal, escapes included
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SQUARE = str.maketrans("{}", "[]")
# an escape that may decode to a lone surrogate (\uD800-\uDFFF)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _too_deep(raw: str) -> bool:
    """Whether arrays/objects nest deeper than MAX_DEPTH, without parsing.

    The usual frame has few brackets and costs two counts. Otherwise strings
    are cut out and only brackets kept; then each pass removes the innermost
    pairs (one level), and a run of opening brackets long enough to exceed
    the bound with the levels already removed ends it early. At most
    MAX_DEPTH passes of str.replace: O(n), in C. Unbalanced text is not
    "too deep": json.loads refuses it next.
    """
    if raw.count("[") + raw.count("{") <= MAX_DEPTH:
        return False
    # without escapes every other piece between quotes is a string
    outside = _STRING.sub("", raw) if "\\" in raw else "".join(raw.split('"')[::2])
    brackets = _NOT_BRACKET.sub("", outside).translate(_SQUARE)
    for removed in range(MAX_DEPTH):
        if not brackets:
            return False
        if "[" * (MAX_DEPTH + 1 - removed) in brackets:
            return True
        shorter = brackets.replace("[]", "")
        if shorter == brackets:
            return False
        brackets = shorter
    return bool(brackets)


def _check_values(value: Any, path: str = "") -> None:
    """Refuse, anywhere in a parsed frame, strings (keys too) holding a lone
    surrogate (UTF-8 cannot carry one, so no reply or row could), integers
    beyond 64 bits and infinite numbers. The walk is only taken when the
    text hints at one of them; depth is already bounded."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ProtocolError(f"{path or 'frame'}: holds a lone surrogate")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"{path or 'frame'}: out of range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{path or 'frame'}: out of range")
    elif isinstance(value, dict):
        for k, v in value.items():
            if _SURROGATE.search(k):
                raise ProtocolError(f"{path or 'frame'}: a key holds a lone surrogate")
            _check_values(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(v, f"{path}[{i}]")


def _load(raw: Union[str, bytes], limit: int) -> tuple[Any, bool]:
    """Parse one frame within `limit` bytes and MAX_DEPTH levels.

    Returns the value and whether it must go through _check_values (the
    caller runs it, once it knows which id an error answers)."""
    if isinstance(raw, bytes):
        raise ProtocolError("binary frames are not accepted; send JSON text")
    if not isinstance(raw, str):
        raise ProtocolError("a frame is JSON text")
    # cheap character count first; the UTF-8 size only when it could matter
    if len(raw) > limit:
        raise ProtocolError(f"frame larger than {limit} bytes")
    if not raw.isascii():
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:  # only from a caller: websockets decodes strict UTF-8
            raise ProtocolError("the frame holds a lone surrogate") from None
        if size > limit:
            raise ProtocolError(f"frame larger than {limit} bytes")
    if _too_deep(raw):
        raise ProtocolError(f"JSON nested deeper than {MAX_DEPTH} levels")
    odd: list[str] = []  # numbers that do not fit: checked by the walk, with a path

    def parse_int(text: str) -> int:
        value = int(text)
        if len(text) > 18 and not INT_MIN <= value <= INT_MAX:
            odd.append(text)
        return value

    def parse_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            odd.append(text)
        return value

    try:
        value = json.loads(
            raw, parse_constant=_no_constant, parse_int=parse_int, parse_float=parse_float
        )
    except RecursionError:  # pragma: no cover - _too_deep refuses these first
        raise ProtocolError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    escapes = "\\" in raw and "\\u" in raw  # one memchr first: most frames have no backslash
    return value, bool(odd) or (escapes and _SURROGATE_ESCAPE.search(raw) is not None)


def _safe_re(re: Any) -> Any:
    """An id that an error frame can echo (no surrogate, in range), else None."""
    if isinstance(re, str):
        return None if _SURROGATE.search(re) or len(re) > MAX_ID else re
    if _is_int(re):
        return re if 0 <= re <= INT_MAX else None
    return None


def decode(raw: Union[str, bytes], expect: str = "", limit: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse and validate one agent-channel frame.

    `expect` is "agent" or "server": the side that is allowed to send it; a
    frame of the other direction is refused. Raises ProtocolError.
    """
    frame, suspect = _load(raw, limit)
    if not isinstance(frame, dict):
        raise ProtocolError("frame must be a JSON object")
    try:
        return _decode_frame(frame, suspect, expect)
    except ProtocolError as exc:
        seq = frame.get("seq")
        if _is_int(seq) and 1 <= seq <= MAX_SEQ:
            exc.seq = seq
        raise


def _decode_frame(frame: dict, suspect: bool, expect: str) -> Envelope:
    frame_id = _safe_re(frame.get("id"))
    re = None if frame_id is None else str(frame_id)
    if suspect:
        try:
            _check_values(frame)
        except ProtocolError as exc:
            exc.re = re
            raise
    raw_id = frame.get("id")
    if isinstance(raw_id, str) and len(raw_id) > MAX_ID:
        raise ProtocolError(f"id: longer than {MAX_ID} characters")
    version = frame.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})",
            code="unsupported_version",
            re=re,
        )
    type_ = frame.get("type")
    if not isinstance(type_, str) or type_ not in MESSAGES:
        raise ProtocolError(f"unknown message type {type_!r}", re=re)
    spec = MESSAGES[type_]
    if expect and spec.direction not in (expect, "both"):
        raise ProtocolError(f"{type_} is not sent by the {expect}", re=re)
    seq = frame.get("seq")
    if seq is not None and (not _is_int(seq) or seq < 1):
        raise ProtocolError("seq: expected a positive integer", re=re)
    if seq is not None and seq > MAX_SEQ:
        raise ProtocolError(f"seq: must be at most {MAX_SEQ}", re=re)
    if type_ in RELIABLE and expect == "agent" and seq is None:
        raise ProtocolError(f"{type_} must carry a seq", re=re)
    try:
        data = check_fields(frame.get("data", {}), spec.fields, "data.")
    except ProtocolError as exc:
        exc.re = re
        raise
    return Envelope(type_, data, re, seq)


def error_frame(code: str, message: str, re: Optional[str] = None) -> str:
    data = {"code": code, "message": message[:MAX_STR]}
    if re is not None:
        data["re"] = re
    return Envelope("error", data).to_json()


# -- operator channel (/ctl) -----------------------------------------------


class Request(NamedTuple):
    id: Union[int, str]
    method: str
    params: dict[str, Any]


def decode_request(raw: Union[str, bytes], limit: int = MAX_FRAME_BYTES) -> Request:
    """Parse `{"id": 7, "method": "hosts.list", "params": {}}`. Raises ProtocolError."""
    frame, suspect = _load(raw, limit)
    if not isinstance(frame, dict):
        raise ProtocolError("request must be a JSON object")
    req_id = _safe_re(frame.get("id"))
    if suspect:
        try:
            _check_values(frame)
        except ProtocolError as exc:
            exc.re = req_id
            raise
    if req_id is None:
        raw_id = frame.get("id")
        if isinstance(raw_id, str) or _is_int(raw_id):
            raise ProtocolError(
                f"id: expected an integer from 0 to 2**63-1 or a string of at most {MAX_ID} characters"
            )
        raise ProtocolError("id: expected an integer or a string")
    method = frame.get("method")
    if not isinstance(method, str) or not method or len(method) > 64:
        raise ProtocolError("method: expected a method name", re=req_id)
    params = frame.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("params: expected an object", re=req_id)
    return Request(req_id, method, params)


class Encoded(str):
    """A result already encoded as JSON text (a listing built page by page):
    result_frame splices it in as it is. Encoding 10,000 hosts in one
    json.dumps held the GIL, and every other request, for tens of ms."""


def result_frame(req_id: Any, result: Any) -> str:
    if isinstance(result, Encoded):
        return f'{{"id": {json.dumps(req_id, ensure_ascii=False)}, "result": {result}}}'
    return json.dumps({"id": req_id, "result": result}, ensure_ascii=False)


def event_frame(req_id: Any, event: Any) -> str:
    return json.dumps({"id": req_id, "event": event}, ensure_ascii=False)


def request_error_frame(req_id: Any, code: str, message: str) -> str:
    return json.dumps(
        {"id": req_id, "error": {"code": code, "message": message}}, ensure_ascii=False
    )


# -- enrollment strings ------------------------------------------------------

ENROLL_PREFIX = "fleet1:"
# the decoded document: room for MAX_URLS URLs of MAX_URL characters, the
# token and the pins (its base64 still fits one command-line argument)
ENROLL_MAX_BYTES = 48 * 1024


def check_server_urls(urls: Sequence[str]) -> list[str]:
    """fleetd replicas' URLs as an agent dials them: each ws:// or wss:// with
    a host, at most MAX_URL characters, without a trailing slash; the first
    of duplicates kept; at most MAX_URLS. Raises ProtocolError naming the
    first that is not one."""
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise ProtocolError(f"a server URL is not a string of at most {MAX_URL} characters")
        scheme, sep, rest = url.partition("://")
        rest = rest.rstrip("/")
        if not sep or scheme not in ("ws", "wss") or not rest or rest.startswith("/"):
            raise ProtocolError(f"{printable(url)[:200]!r} is not a ws:// or wss:// URL")
        if any(c.isspace() or not c.isprintable() or c == "," for c in rest):
            raise ProtocolError(f"{printable(url)[:200]!r} is not a ws:// or wss:// URL")
        url = f"{scheme}://{rest}"
        if url not in out:
            out.append(url)
    if len(out) > MAX_URLS:
        raise ProtocolError(f"more than {MAX_URLS} server URLs")
    return out


def url_scheme(url: str) -> str:
    """ "ws" or "wss" (or whatever precedes "://")."""
    return url.partition("://")[0]


def format_enrollment(
    server_url: str,
    token: str,
    fingerprint: Optional[str] = None,
    pins: Optional[Sequence[str]] = None,
    urls: Optional[Sequence[str]] = None,
) -> str:
    """The one string an operator pastes: server URL, token and, with TLS,
    the pins of fleetd's keys (served and staged) and the SHA-256 of its
    certificate (what agents from before key pins check). With replicas,
    `urls` names every one (`server_url` first: an agent from before
    replicas reads that alone); one URL makes the string it always was."""
    doc: dict[str, Any] = {"url": server_url, "token": token}
    if fingerprint:
        doc["sha256"] = fingerprint
    if pins:
        doc["pins"] = list(pins)
    if urls and list(urls) != [server_url]:
        doc["urls"] = list(urls)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return ENROLL_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def agent_file_url(server_url: str) -> str:
    """GET /agent.pyz on the fleetd an agent dials at `server_url` (ws:// or
    wss://, perhaps with a path): the same place in http(s)://."""
    scheme, sep, rest = server_url.partition("://")
    if not sep or scheme not in ("ws", "wss"):
        raise ProtocolError(f"{server_url!r} is not a ws:// or wss:// URL")
    return ("https" if scheme == "wss" else "http") + "://" + rest.rstrip("/") + "/agent.pyz"


def parse_enrollment(value: str) -> dict[str, Any]:
    """Inverse of format_enrollment; raises ProtocolError on anything else
    (a `urls` entry that is not a ws:// or wss:// URL too). See
    enrollment_urls for the URLs to dial."""
    value = value.strip()
    if not value.startswith(ENROLL_PREFIX):
        raise ProtocolError(f"an enrollment string starts with {ENROLL_PREFIX!r}")
    body = value[len(ENROLL_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        doc, suspect = _load(raw, ENROLL_MAX_BYTES)
        if suspect:
            _check_values(doc)
    except (ValueError, TypeError):  # ProtocolError is a ValueError too
        raise ProtocolError("the enrollment string is damaged (copy it again)") from None
    fields = (
        Field("url", "str", limit=2048),
        Field("token", "str", limit=1024),
        Field("sha256", "str", False, limit=128),
        Field("pins", "list[str]", False, limit=MAX_PINS),
        Field(
            "urls", "list[str]", False, limit=MAX_URLS, item=(Field("url", "str", limit=MAX_URL),)
        ),
    )
    doc = check_fields(doc, fields, "enrollment.")
    if "urls" in doc:
        try:
            doc["urls"] = check_server_urls(doc["urls"])
        except ProtocolError as exc:
            raise ProtocolError(f"enrollment.urls: {exc}") from None
    return doc


def enrollment_urls(doc: Mapping[str, Any]) -> list[str]:
    """The URLs a parsed enrollment string names, in the order to try them:
    its `url` first (what an agent from before replicas dials), then the
    other replicas' of `urls` (none in a string of before them)."""
    first = doc["url"].rstrip("/")
    return [first] + [u for u in doc.get("urls") or () if u != first]
