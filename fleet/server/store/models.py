"""The store's tables as peewee models.

The schema itself is created by the numbered migrations in migrations.py;
these models describe it, and a test checks that the two agree. Times are
naive UTC datetimes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import peewee as pw

from ...common.timefmt import utcnow

db = pw.DatabaseProxy()


def new_uid() -> str:
    """A job's globally unique id (fleetd or an agent may mint one)."""
    return uuid.uuid4().hex


class JSONField(pw.TextField):
    """A JSON document in a text column (portable to PostgreSQL as text)."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class Base(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class SchemaVersion(Base):
    version = pw.IntegerField(primary_key=True)
    name = pw.TextField()
    applied_at = pw.DateTimeField(default=utcnow)


class User(Base):
    name = pw.TextField(unique=True)
    password_hash = pw.TextField()
    role = pw.TextField()  # viewer | operator | admin
    created_at = pw.DateTimeField(default=utcnow)


class ApiToken(Base):
    user = pw.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    name = pw.TextField()
    token_hash = pw.TextField(unique=True)  # SHA-256 hex; the token itself is never stored
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(null=True)
    revoked_at = pw.DateTimeField(null=True)
    last_used_at = pw.DateTimeField(null=True)


class Host(Base):
    name = pw.TextField(unique=True)
    created_at = pw.DateTimeField(default=utcnow)
    agent_token_hash = pw.TextField(null=True, unique=True)
    enrolled_at = pw.DateTimeField(null=True)
    online = pw.BooleanField(default=False)
    last_seen_at = pw.DateTimeField(null=True)
    hostname = pw.TextField(null=True)  # what the agent reports, may differ from name
    agent_version = pw.TextField(null=True)
    restic_version = pw.TextField(null=True)
    os = pw.TextField(null=True)
    arch = pw.TextField(null=True)
    timezone = pw.TextField(null=True)
    schedule_version = pw.IntegerField(default=0)  # bumped on every schedule change
    applied_schedule_version = pw.IntegerField(default=0)  # what the agent acknowledged
    last_seq = pw.IntegerField(default=0)  # highest delivery seq applied from the agent
    repo_locks = pw.IntegerField(null=True)  # restic locks in the repository, as last reported
    repo_locks_at = pw.DateTimeField(null=True)
    labels = JSONField(default=dict)  # key -> value (fleet.common.selectors)
    # how its agent trusts fleetd's certificate, as it last said: "pins" (the
    # key pins in tls_pins), "certificate" (one certificate's SHA-256, from
    # before key pins), "unpinned" (the system's CAs, or plain ws://); NULL:
    # it never said (an agent older than key pins, or never connected)
    tls_trust = pw.TextField(null=True)
    tls_pins = JSONField(null=True)
    tls_pins_at = pw.DateTimeField(null=True)  # when it last said (hello, or tls.ack)
    # why the templates its labels pick could not be applied (None: they were)
    template_error = pw.TextField(null=True)
    # set while templates are to be applied to it (fleet.server.api.templates):
    # a mark a request left behind (fleetd stopped midway) is the ticker's
    templates_due_at = pw.DateTimeField(null=True, index=True)
    # the replica its agent is connected through (None: offline, or one
    # fleetd alone), and that connection's number: a newer link bumps it, so
    # the end of an older one (on another replica) leaves the host online
    session_replica = pw.TextField(null=True, index=True)
    session_epoch = pw.IntegerField(default=0)
    agent_features = JSONField(null=True)  # the features its agent's hello listed, last


class Template(Base):
    """Settings defined once for every host a label selector picks
    (fleet.server.api.templates): repositories, source groups, schedules
    and repositories' maintenance. What it made on a host names it
    (`template`); the fields an operator changed there are that row's
    `overrides`, which the template no longer touches."""

    name = pw.TextField(unique=True)
    selector = pw.TextField()
    priority = pw.IntegerField(default=100)  # lower first: wins a name two templates define
    spec = JSONField()
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)


class EnrollmentToken(Base):
    host = pw.ForeignKeyField(Host, backref="enrollment_tokens", on_delete="CASCADE")
    token_hash = pw.TextField(unique=True)
    created_by = pw.ForeignKeyField(User, null=True, on_delete="SET NULL")
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)


class Repository(Base):
    """A named restic repository, which several hosts may share."""

    name = pw.TextField(unique=True)
    url_enc = pw.BlobField()  # encrypted too: a URL may carry credentials
    password_enc = pw.BlobField()
    env_names = JSONField(default=list)  # names only; values are in env_enc
    env_enc = pw.BlobField(null=True)
    # what its ciphertexts are bound to (associated data): "repository:<id>",
    # or "repo:<host id>" for one migrated from a host's own repository,
    # until it is next written
    aad = pw.TextField()
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    locks = pw.IntegerField(null=True)  # restic locks in it, as a host last reported
    locks_at = pw.DateTimeField(null=True)


class HostRepository(Base):
    """The repositories a host uses; the first (position 0) is its default."""

    host = pw.ForeignKeyField(Host, backref="repositories", on_delete="CASCADE")
    # a repository in use cannot be deleted (repos delete says by whom)
    repository = pw.ForeignKeyField(Repository, backref="hosts")
    position = pw.IntegerField(default=0)
    attached_at = pw.DateTimeField(default=utcnow)  # a new one is initialised from then
    template = pw.TextField(null=True)  # the template that attached it (None: by hand)

    class Meta:
        primary_key = pw.CompositeKey("host", "repository")


class SourceGroup(Base):
    host = pw.ForeignKeyField(Host, backref="groups", on_delete="CASCADE")
    name = pw.TextField()
    includes = JSONField()
    excludes = JSONField(default=list)
    retention = JSONField(default=dict)
    pre_hook = pw.TextField(null=True)
    post_hook = pw.TextField(null=True)
    retries = pw.IntegerField(default=0)
    retry_delay = pw.IntegerField(default=300)  # seconds
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    # where its backups go; NULL: the host's default repository (its first).
    # A repository a group names is one its host uses (attached with it).
    repository = pw.ForeignKeyField(Repository, null=True, backref="groups")
    # a second repository each new snapshot is copied into (3-2-1), kept
    # there by copy_retention (NULL: the group's own retention)
    copy_to = pw.ForeignKeyField(Repository, null=True, backref="copy_groups")
    copy_retention = JSONField(null=True)
    # when copies run (cron, UTC); NULL: after each backup. On a schedule, a
    # copy takes the group's snapshots newer than copied_until (fleetd's
    # list of the first repository), so one the copy's retention forgot is
    # not copied again
    copy_cron = pw.TextField(null=True)
    next_copy_at = pw.DateTimeField(null=True)
    copied_until = pw.DateTimeField(null=True)
    # seconds between backups expected of a group no schedule backs up (run
    # by hand or from the host's own cron): past 1.5 times that it is overdue
    expect_every = pw.IntegerField(null=True)
    # a Healthchecks-style URL pinged as its backups start, succeed and fail
    # (fleet.server.notify.Pings): a secret, encrypted and bound to the row;
    # shown as its scheme and host only
    ping_url_enc = pw.BlobField(null=True)
    ping_url_shown = pw.TextField(null=True)
    ping_sent_at = pw.DateTimeField(null=True)
    ping_error = pw.TextField(null=True)  # the last ping's failure; NULL: it worked
    # restore drills (scheduling/drills.py): when (cron, UTC; NULL: none on a
    # schedule), how much of the latest snapshot ("20" files, "1%"; NULL: 20)
    # seconds a hook may run (NULL: the agent's default, 30 minutes), and a
    # backup (NULL: no limit); past it the job is stopped and fails
    hook_timeout = pw.IntegerField(null=True)
    timeout = pw.IntegerField(null=True)
    drill_cron = pw.TextField(null=True)
    drill_sample = pw.TextField(null=True)
    next_drill_at = pw.DateTimeField(null=True)
    template = pw.TextField(null=True)  # the template that made it (None: by hand)
    overrides = JSONField(default=list)  # its fields changed here, which the template leaves

    class Meta:
        indexes = ((("host", "name"), True),)


class Schedule(Base):
    host = pw.ForeignKeyField(Host, backref="schedules", on_delete="CASCADE")
    name = pw.TextField()
    cron = pw.TextField()  # as fleet.common.cron.normalize left it
    timezone = pw.TextField(null=True)  # an IANA name; NULL: the host's own zone
    enabled = pw.BooleanField(default=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    template = pw.TextField(null=True)
    overrides = JSONField(default=list)

    class Meta:
        indexes = ((("host", "name"), True),)


class ScheduleGroup(Base):
    schedule = pw.ForeignKeyField(Schedule, backref="links", on_delete="CASCADE")
    group = pw.ForeignKeyField(SourceGroup, backref="schedule_links", on_delete="CASCADE")

    class Meta:
        primary_key = pw.CompositeKey("schedule", "group")


class Maintenance(Base):
    """When a repository is forgotten (each group's retention), pruned and
    checked; a cron expression (UTC) per action, none: never. The next due
    time of each is a row, so fleetd's ticker (or another replica's) knows
    it; NULL: computed from now at the next look."""

    repository = pw.ForeignKeyField(
        Repository, primary_key=True, backref="maintenance", on_delete="CASCADE"
    )
    forget_cron = pw.TextField(null=True)
    prune_cron = pw.TextField(null=True)
    check_cron = pw.TextField(null=True)
    check_subset = pw.TextField(default="5%")  # restic check --read-data-subset
    next_forget_at = pw.DateTimeField(null=True)
    next_prune_at = pw.DateTimeField(null=True)
    next_check_at = pw.DateTimeField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)
    template = pw.TextField(null=True)
    overrides = JSONField(default=list)


class Job(Base):
    # AUTOINCREMENT: an id is never handed out twice, even after its job is deleted
    id = pw.AutoField()
    # globally unique, so that fleetd or an agent (a run it starts on its own)
    # may mint it; the id is fleetd's short handle for operators
    uid = pw.TextField(unique=True, default=new_uid)
    host = pw.ForeignKeyField(Host, backref="jobs", on_delete="CASCADE")
    kind = pw.TextField()
    status = pw.TextField(default="queued")
    actor_kind = pw.TextField()  # user | schedule | system
    actor_user = pw.ForeignKeyField(User, null=True, on_delete="SET NULL")
    schedule = pw.ForeignKeyField(Schedule, null=True, on_delete="SET NULL")
    group = pw.ForeignKeyField(SourceGroup, null=True, on_delete="SET NULL")
    group_name = pw.TextField(null=True)  # kept when the group is deleted
    params = JSONField(default=dict)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    not_before = pw.DateTimeField(null=True)  # due time of a retry
    dispatched_at = pw.DateTimeField(null=True)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)
    cancel_requested_at = pw.DateTimeField(null=True)
    exit_code = pw.IntegerField(null=True)
    summary = JSONField(null=True)
    error = pw.TextField(null=True)
    # the agent's own (negative) id of a job it made from a fire while fleetd
    # was out of reach; such a job is the agent's to run, never dispatched
    agent_job = pw.IntegerField(null=True)
    # the repository it works on (a copy's destination), and the one a copy
    # reads from: a job waits for what holds either (see queries.hot.claim)
    repository = pw.ForeignKeyField(Repository, null=True, on_delete="SET NULL")
    from_repository = pw.ForeignKeyField(
        Repository, null=True, on_delete="SET NULL", backref="copies_from"
    )

    class Meta:
        indexes = (
            (("repository", "status"), False),
            (("from_repository", "status"), False),
            (("host", "status"), False),
            (("status", "not_before"), False),
            (("host", "agent_job"), True),
            # the latest job of a kind per group or repository (status,
            # /metrics, alerts): MAX(id) from the index alone
            (("kind", "group", "status"), False),
            (("kind", "repository", "status"), False),
        )


class JobLog(Base):
    job = pw.ForeignKeyField(Job, backref="log", on_delete="CASCADE")
    seq = pw.IntegerField()
    ts = pw.DateTimeField()
    stream = pw.TextField()
    payload = pw.TextField()

    class Meta:
        primary_key = pw.CompositeKey("job", "seq")


class Snapshot(Base):
    host = pw.ForeignKeyField(Host, backref="snapshots", on_delete="CASCADE")
    snapshot_id = pw.TextField()
    short_id = pw.TextField()
    time = pw.DateTimeField()
    hostname = pw.TextField()
    paths = JSONField()
    tags = JSONField(default=list)
    size_bytes = pw.BigIntegerField(null=True)
    file_count = pw.BigIntegerField(null=True)
    reported_at = pw.DateTimeField(null=True)  # the report that last named it
    repository = pw.ForeignKeyField(Repository, null=True, backref="snapshots", on_delete="CASCADE")

    class Meta:
        indexes = ((("host", "snapshot_id"), True),)


class RepoStats(Base):
    """A repository's sizes as one host using it last reported them."""

    host = pw.ForeignKeyField(Host, backref="repo_stats", on_delete="CASCADE")
    repository = pw.ForeignKeyField(Repository, backref="stats", on_delete="CASCADE")
    size_bytes = pw.BigIntegerField()
    raw_size_bytes = pw.BigIntegerField(null=True)
    snapshot_count = pw.IntegerField()
    file_count = pw.BigIntegerField(null=True)
    lock_state = pw.TextField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)
    # sizes are measured by restic stats now and then, and grown from each
    # backup's summary in between (see the agent's runner.Sizes)
    measured_at = pw.DateTimeField(null=True)

    class Meta:
        primary_key = pw.CompositeKey("host", "repository")


class Alert(Base):
    """A problem fleetd found (fleet.server.health), from when it was raised
    until its condition cleared; one open per key (kind, host, group,
    repository), so a host failing every hour is one alert, not 24."""

    id = pw.AutoField()
    key = pw.TextField()
    kind = pw.TextField()  # backup_failed, overdue, offline, check_failed ...
    severity = pw.TextField()  # warning | critical
    host = pw.TextField(null=True)
    group_name = pw.TextField(null=True)
    repository = pw.TextField(null=True)
    message = pw.TextField()  # the latest word on it
    raised_at = pw.DateTimeField()
    updated_at = pw.DateTimeField()
    acknowledged_at = pw.DateTimeField(null=True)
    acknowledged_by = pw.TextField(null=True)
    resolved_at = pw.DateTimeField(null=True)  # NULL: open

    class Meta:
        indexes = ((("key", "resolved_at"), False), (("resolved_at",), False))


class Notifier(Base):
    """An Apprise URL told of alerts raised and resolved; the URL is a
    secret (tokens in it), encrypted and bound to the row."""

    name = pw.TextField(unique=True)
    url_enc = pw.BlobField()
    kinds = JSONField(default=list)  # alert kinds it is told of; []: all
    hosts = JSONField(default=list)  # only these hosts' alerts; []: any
    groups = JSONField(default=list)  # only these groups'; []: any
    created_at = pw.DateTimeField(default=utcnow)
    last_sent_at = pw.DateTimeField(null=True)
    last_error = pw.TextField(null=True)  # the last delivery's failure, if it failed


class Listing(Base):
    """A directory of a snapshot as `restic ls` listed it, kept so that the
    next look answers at once (a snapshot never changes); its entries in
    pages. Dropped with its repository, when its snapshot is forgotten, and
    least recently used first past the cache's bound."""

    repository = pw.ForeignKeyField(Repository, on_delete="CASCADE")
    snapshot_id = pw.TextField()
    path = pw.TextField()
    entries = pw.IntegerField()  # how many, over all its pages
    node = JSONField(null=True)  # the path's own entry (a file listed is itself)
    created_at = pw.DateTimeField(default=utcnow)
    used_at = pw.DateTimeField(default=utcnow, index=True)

    class Meta:
        indexes = ((("repository", "snapshot_id", "path"), True),)


class ListingPage(Base):
    listing = pw.ForeignKeyField(Listing, backref="pages", on_delete="CASCADE")
    page = pw.IntegerField()
    items = JSONField()

    class Meta:
        primary_key = pw.CompositeKey("listing", "page")


class TlsKey(Base):
    """fleetd's TLS keys by pin (fleet.common.tlspins): the one it served
    last, and the one staged next, whose pin agents get before it is served."""

    pin = pw.TextField(primary_key=True)
    state = pw.TextField()  # served | staged
    since = pw.DateTimeField(default=utcnow)
    actor = pw.TextField(null=True)  # who staged it


class AuditLog(Base):
    at = pw.DateTimeField(default=utcnow, index=True)
    actor = pw.TextField()  # user name, "agent:<host>" or "system"
    action = pw.TextField()  # e.g. "user.add", "repo.set"
    target = pw.TextField(null=True)
    detail = JSONField(null=True)  # never holds a secret
    address = pw.TextField(null=True)


class Rollout(Base):
    """An agent upgrade across hosts (fleetctl agents upgrade). The store is
    its truth: it goes on when the operator's connection drops, and after
    a fleetd restart."""

    created_at = pw.DateTimeField(default=utcnow)
    created_by = pw.TextField()  # the user's name
    selector = pw.TextField(null=True)  # None: every host
    batch = pw.IntegerField()  # hosts upgraded at once
    timeout = pw.IntegerField()  # seconds a host has to come back with the new version
    version = pw.TextField()  # of the agent file, when the rollout began
    sha256 = pw.TextField()
    size = pw.IntegerField()
    status = pw.TextField(default="running")  # running | succeeded | halted
    reason = pw.TextField(null=True)  # why it halted
    finished_at = pw.DateTimeField(null=True)


class RolloutHost(Base):
    """One host of a rollout, in the order it goes."""

    rollout = pw.ForeignKeyField(Rollout, backref="hosts", on_delete="CASCADE")
    host = pw.ForeignKeyField(Host, null=True, on_delete="SET NULL")
    host_name = pw.TextField()  # kept when the host is removed
    position = pw.IntegerField()
    batch = pw.IntegerField()  # 1, 2, ...; 0: nothing to do (at the version already)
    from_version = pw.TextField(null=True)
    # pending | sent | upgraded | current | skipped | failed
    status = pw.TextField(default="pending")
    detail = pw.TextField(null=True)  # why skipped or failed
    sent_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("rollout", "position"), True),)


class Replica(Base):
    """A fleetd process serving the database (several on one PostgreSQL),
    alive while seen_at moves (fleet.server.replicas)."""

    id = pw.TextField(primary_key=True)
    url = pw.TextField(null=True)  # what agents dial to reach it
    hostname = pw.TextField()
    pid = pw.IntegerField()
    started_at = pw.DateTimeField(default=utcnow)
    seen_at = pw.DateTimeField(default=utcnow)


class StoredEvent(Base):
    """An event committed by one replica, for the others to publish too
    (fleet.server.replicas): written in the transaction that made it, read
    in id order after a NOTIFY, kept for a few minutes."""

    # drawn in order (a sequence of CACHE 1, as created): the replicas'
    # reading of a missing id relies on it (fleet.server.replicas.Gaps)
    id = pw.AutoField()
    at = pw.DateTimeField(default=utcnow, index=True)
    origin = pw.TextField()  # the replica's id
    kind = pw.TextField()  # the event's class name
    body = pw.TextField()  # its fields, JSON (fleet.server.events.encode)

    class Meta:
        table_name = "event"


MODELS: list[type[Base]] = [
    SchemaVersion,
    User,
    ApiToken,
    Host,
    Template,
    EnrollmentToken,
    Repository,
    HostRepository,
    SourceGroup,
    Schedule,
    ScheduleGroup,
    Maintenance,
    Job,
    JobLog,
    Snapshot,
    RepoStats,
    Alert,
    Notifier,
    Listing,
    ListingPage,
    TlsKey,
    AuditLog,
    Rollout,
    RolloutHost,
    Replica,
    StoredEvent,
]
