"""Numbered schema migrations, applied in order at start.

Each migration is a list of SQL statements, frozen when it was written: the
models may change later, a migration never does. A new change to the schema
is a new entry at the end. Applied versions are recorded in schema_version.

SQLite runs the whole history; PostgreSQL begins at a baseline (the
schema of version 22, POSTGRESQL_SCHEMA) and runs the migrations after it,
which give their statements for both.
"""

from __future__ import annotations

from typing import Union

import peewee as pw

from .models import SchemaVersion, utcnow

# one list of statements for both databases, or one each (see statements_for);
# PostgreSQL starts at POSTGRESQL_BASELINE and runs only what comes after it
Statements = Union[list[str], dict[str, list[str]]]

MIGRATIONS: list[tuple[int, str, Statements]] = [
    (
        1,
        "initial",
        [
            'CREATE TABLE "user" ("id" INTEGER NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "password_hash" TEXT NOT NULL, "role" TEXT NOT NULL, "created_at" DATETIME NOT NULL)',
            'CREATE UNIQUE INDEX "user_name" ON "user" ("name")',
            'CREATE TABLE "api_token" ("id" INTEGER NOT NULL PRIMARY KEY, "user_id" INTEGER NOT NULL, "name" TEXT NOT NULL, "token_hash" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "expires_at" DATETIME, "revoked_at" DATETIME, "last_used_at" DATETIME, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "api_token_user_id" ON "api_token" ("user_id")',
            'CREATE UNIQUE INDEX "api_token_token_hash" ON "api_token" ("token_hash")',
            'CREATE TABLE "host" ("id" INTEGER NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "agent_token_hash" TEXT, "enrolled_at" DATETIME, "online" INTEGER NOT NULL, "last_seen_at" DATETIME, "hostname" TEXT, "agent_version" TEXT, "restic_version" TEXT, "os" TEXT, "arch" TEXT, "timezone" TEXT, "schedule_version" INTEGER NOT NULL, "applied_schedule_version" INTEGER NOT NULL, "last_seq" INTEGER NOT NULL)',
            'CREATE UNIQUE INDEX "host_name" ON "host" ("name")',
            'CREATE UNIQUE INDEX "host_agent_token_hash" ON "host" ("agent_token_hash")',
            'CREATE TABLE "enrollment_token" ("id" INTEGER NOT NULL PRIMARY KEY, "host_id" INTEGER NOT NULL, "token_hash" TEXT NOT NULL, "created_by_id" INTEGER, "created_at" DATETIME NOT NULL, "expires_at" DATETIME NOT NULL, "used_at" DATETIME, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("created_by_id") REFERENCES "user" ("id") ON DELETE SET NULL)',
            'CREATE INDEX "enrollment_token_host_id" ON "enrollment_token" ("host_id")',
            'CREATE UNIQUE INDEX "enrollment_token_token_hash" ON "enrollment_token" ("token_hash")',
            'CREATE INDEX "enrollment_token_created_by_id" ON "enrollment_token" ("created_by_id")',
            'CREATE TABLE "repo" ("host_id" INTEGER NOT NULL PRIMARY KEY, "url_enc" BLOB NOT NULL, "password_enc" BLOB NOT NULL, "env_names" TEXT NOT NULL, "env_enc" BLOB, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE TABLE "source_group" ("id" INTEGER NOT NULL PRIMARY KEY, "host_id" INTEGER NOT NULL, "name" TEXT NOT NULL, "includes" TEXT NOT NULL, "excludes" TEXT NOT NULL, "retention" TEXT NOT NULL, "pre_hook" TEXT, "post_hook" TEXT, "retries" INTEGER NOT NULL, "retry_delay" INTEGER NOT NULL, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "source_group_host_id" ON "source_group" ("host_id")',
            'CREATE UNIQUE INDEX "source_group_host_id_name" ON "source_group" ("host_id", "name")',
            'CREATE TABLE "schedule" ("id" INTEGER NOT NULL PRIMARY KEY, "host_id" INTEGER NOT NULL, "cron" TEXT NOT NULL, "enabled" INTEGER NOT NULL, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "schedule_host_id" ON "schedule" ("host_id")',
            'CREATE TABLE "schedule_group" ("schedule_id" INTEGER NOT NULL, "group_id" INTEGER NOT NULL, PRIMARY KEY ("schedule_id", "group_id"), FOREIGN KEY ("schedule_id") REFERENCES "schedule" ("id") ON DELETE CASCADE, FOREIGN KEY ("group_id") REFERENCES "source_group" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "schedule_group_schedule_id" ON "schedule_group" ("schedule_id")',
            'CREATE INDEX "schedule_group_group_id" ON "schedule_group" ("group_id")',
            'CREATE TABLE "maintenance" ("host_id" INTEGER NOT NULL PRIMARY KEY, "forget_cron" TEXT, "prune_cron" TEXT, "check_cron" TEXT, "check_subset" TEXT NOT NULL, "last_forget_at" DATETIME, "last_prune_at" DATETIME, "last_check_at" DATETIME, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE TABLE "job" ("id" INTEGER NOT NULL PRIMARY KEY, "host_id" INTEGER NOT NULL, "kind" TEXT NOT NULL, "status" TEXT NOT NULL, "actor_kind" TEXT NOT NULL, "actor_user_id" INTEGER, "schedule_id" INTEGER, "group_id" INTEGER, "group_name" TEXT, "params" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "started_at" DATETIME, "finished_at" DATETIME, "exit_code" INTEGER, "summary" TEXT, "error" TEXT, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("actor_user_id") REFERENCES "user" ("id") ON DELETE SET NULL, FOREIGN KEY ("schedule_id") REFERENCES "schedule" ("id") ON DELETE SET NULL, FOREIGN KEY ("group_id") REFERENCES "source_group" ("id") ON DELETE SET NULL)',
            'CREATE INDEX "job_host_id" ON "job" ("host_id")',
            'CREATE INDEX "job_actor_user_id" ON "job" ("actor_user_id")',
            'CREATE INDEX "job_schedule_id" ON "job" ("schedule_id")',
            'CREATE INDEX "job_group_id" ON "job" ("group_id")',
            'CREATE INDEX "job_created_at" ON "job" ("created_at")',
            'CREATE INDEX "job_host_id_status" ON "job" ("host_id", "status")',
            'CREATE TABLE "job_log" ("job_id" INTEGER NOT NULL, "seq" INTEGER NOT NULL, "ts" DATETIME NOT NULL, "stream" TEXT NOT NULL, "payload" TEXT NOT NULL, PRIMARY KEY ("job_id", "seq"), FOREIGN KEY ("job_id") REFERENCES "job" ("id") ON DELETE CASCADE)',
            'CREATE TABLE "snapshot" ("id" INTEGER NOT NULL PRIMARY KEY, "host_id" INTEGER NOT NULL, "snapshot_id" TEXT NOT NULL, "short_id" TEXT NOT NULL, "time" DATETIME NOT NULL, "hostname" TEXT NOT NULL, "paths" TEXT NOT NULL, "tags" TEXT NOT NULL, "size_bytes" INTEGER, "file_count" INTEGER, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "snapshot_host_id" ON "snapshot" ("host_id")',
            'CREATE UNIQUE INDEX "snapshot_host_id_snapshot_id" ON "snapshot" ("host_id", "snapshot_id")',
            'CREATE TABLE "repo_stats" ("host_id" INTEGER NOT NULL PRIMARY KEY, "size_bytes" INTEGER NOT NULL, "raw_size_bytes" INTEGER, "snapshot_count" INTEGER NOT NULL, "file_count" INTEGER, "lock_state" TEXT, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
            'CREATE TABLE "audit_log" ("id" INTEGER NOT NULL PRIMARY KEY, "at" DATETIME NOT NULL, "actor" TEXT NOT NULL, "action" TEXT NOT NULL, "target" TEXT, "detail" TEXT, "address" TEXT)',
            'CREATE INDEX "audit_log_at" ON "audit_log" ("at")',
        ],
    ),
    (
        2,
        "host repository locks",
        [
            'ALTER TABLE "host" ADD COLUMN "repo_locks" INTEGER',
            'ALTER TABLE "host" ADD COLUMN "repo_locks_at" DATETIME',
        ],
    ),
    (
        3,
        "snapshot reports in pages",
        ['ALTER TABLE "snapshot" ADD COLUMN "reported_at" DATETIME'],
    ),
    (
        4,
        "jobs: ids never reused, a uid either side can mint, dispatch and due times as columns",
        [
            # SQLite's way to change a table: build the new one, copy, swap
            # (run with foreign keys off, checked before commit)
            'CREATE TABLE "job_new" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "uid" TEXT NOT NULL, "host_id" INTEGER NOT NULL, "kind" TEXT NOT NULL, "status" TEXT NOT NULL, "actor_kind" TEXT NOT NULL, "actor_user_id" INTEGER, "schedule_id" INTEGER, "group_id" INTEGER, "group_name" TEXT, "params" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "not_before" DATETIME, "dispatched_at" DATETIME, "started_at" DATETIME, "finished_at" DATETIME, "cancel_requested_at" DATETIME, "exit_code" INTEGER, "summary" TEXT, "error" TEXT, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("actor_user_id") REFERENCES "user" ("id") ON DELETE SET NULL, FOREIGN KEY ("schedule_id") REFERENCES "schedule" ("id") ON DELETE SET NULL, FOREIGN KEY ("group_id") REFERENCES "source_group" ("id") ON DELETE SET NULL)',
            """INSERT INTO "job_new" ("id", "uid", "host_id", "kind", "status", "actor_kind", "actor_user_id", "schedule_id", "group_id", "group_name", "params", "created_at", "not_before", "started_at", "finished_at", "exit_code", "summary", "error") SELECT "id", lower(hex(randomblob(16))), "host_id", "kind", "status", "actor_kind", "actor_user_id", "schedule_id", "group_id", "group_name", "params", "created_at", replace(replace(json_extract("params", '$.not_before'), 'T', ' '), 'Z', ''), "started_at", "finished_at", "exit_code", "summary", "error" FROM "job" """,
            'DROP TABLE "job"',
            'ALTER TABLE "job_new" RENAME TO "job"',
            'CREATE UNIQUE INDEX "job_uid" ON "job" ("uid")',
            'CREATE INDEX "job_host_id" ON "job" ("host_id")',
            'CREATE INDEX "job_actor_user_id" ON "job" ("actor_user_id")',
            'CREATE INDEX "job_schedule_id" ON "job" ("schedule_id")',
            'CREATE INDEX "job_group_id" ON "job" ("group_id")',
            'CREATE INDEX "job_created_at" ON "job" ("created_at")',
            'CREATE INDEX "job_host_id_status" ON "job" ("host_id", "status")',
            'CREATE INDEX "job_status_not_before" ON "job" ("status", "not_before")',
        ],
    ),
    (
        5,
        "schedules: a name per host and a time zone",
        [
            # NOT NULL needs a default to be added; every row gets its name next
            """ALTER TABLE "schedule" ADD COLUMN "name" TEXT NOT NULL DEFAULT ''""",
            'ALTER TABLE "schedule" ADD COLUMN "timezone" TEXT',
            """UPDATE "schedule" SET "name" = 'schedule-' || "id" WHERE "name" = ''""",
            'CREATE UNIQUE INDEX "schedule_host_id_name" ON "schedule" ("host_id", "name")',
        ],
    ),
    (
        6,
        "jobs an agent ran on its own: the agent's id for them",
        [
            'ALTER TABLE "job" ADD COLUMN "agent_job" INTEGER',
            'CREATE UNIQUE INDEX "job_host_id_agent_job" ON "job" ("host_id", "agent_job")',
        ],
    ),
    (
        7,
        "repository sizes: when restic stats last measured them",
        ['ALTER TABLE "repo_stats" ADD COLUMN "measured_at" DATETIME'],
    ),
    (
        8,
        "repositories are named objects hosts share; each host's own becomes one named after it",
        [
            'CREATE TABLE "repository" ("id" INTEGER NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "url_enc" BLOB NOT NULL, "password_enc" BLOB NOT NULL, "env_names" TEXT NOT NULL, "env_enc" BLOB, "aad" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL)',
            'CREATE UNIQUE INDEX "repository_name" ON "repository" ("name")',
            'CREATE TABLE "host_repository" ("host_id" INTEGER NOT NULL, "repository_id" INTEGER NOT NULL, "position" INTEGER NOT NULL, "attached_at" DATETIME NOT NULL, PRIMARY KEY ("host_id", "repository_id"), FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id"))',
            'CREATE INDEX "host_repository_host_id" ON "host_repository" ("host_id")',
            'CREATE INDEX "host_repository_repository_id" ON "host_repository" ("repository_id")',
            # the ciphertexts stay as they are: bound to "repo:<host id>"
            'INSERT INTO "repository" ("name", "url_enc", "password_enc", "env_names", "env_enc", "aad", "created_at", "updated_at") '
            'SELECT "h"."name", "r"."url_enc", "r"."password_enc", "r"."env_names", "r"."env_enc", '
            '\'repo:\' || "r"."host_id", "r"."updated_at", "r"."updated_at" '
            'FROM "repo" AS "r" JOIN "host" AS "h" ON "h"."id" = "r"."host_id"',
            'INSERT INTO "host_repository" ("host_id", "repository_id", "position", "attached_at") '
            'SELECT "r"."host_id", "n"."id", 0, "r"."updated_at" FROM "repo" AS "r" '
            'JOIN "repository" AS "n" ON "n"."aad" = \'repo:\' || "r"."host_id"',
            'DROP TABLE "repo"',
        ],
    ),
    (
        9,
        "maintenance per repository, with defaults (forget daily, prune and check weekly)",
        [
            'DROP TABLE "maintenance"',  # per host, never used
            'CREATE TABLE "maintenance" ("repository_id" INTEGER NOT NULL PRIMARY KEY, "forget_cron" TEXT, "prune_cron" TEXT, "check_cron" TEXT, "check_subset" TEXT NOT NULL, "next_forget_at" DATETIME, "next_prune_at" DATETIME, "next_check_at" DATETIME, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
            'INSERT INTO "maintenance" ("repository_id", "forget_cron", "prune_cron", "check_cron", "check_subset", "updated_at") '
            "SELECT \"id\", '30 4 * * *', '0 5 * * 0', '0 6 * * 3', '5%', \"updated_at\" FROM \"repository\"",
        ],
    ),
    (
        10,
        "a host uses several repositories: groups name theirs and a copy's; jobs, snapshots, sizes and locks are per repository",
        [
            'ALTER TABLE "source_group" ADD COLUMN "repository_id" INTEGER REFERENCES "repository" ("id")',
            'ALTER TABLE "source_group" ADD COLUMN "copy_to_id" INTEGER REFERENCES "repository" ("id")',
            'ALTER TABLE "source_group" ADD COLUMN "copy_retention" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "copy_cron" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "next_copy_at" DATETIME',
            'ALTER TABLE "source_group" ADD COLUMN "copied_until" DATETIME',
            'CREATE INDEX "source_group_repository_id" ON "source_group" ("repository_id")',
            'CREATE INDEX "source_group_copy_to_id" ON "source_group" ("copy_to_id")',
            'ALTER TABLE "job" ADD COLUMN "repository_id" INTEGER REFERENCES "repository" ("id") ON DELETE SET NULL',
            'ALTER TABLE "job" ADD COLUMN "from_repository_id" INTEGER REFERENCES "repository" ("id") ON DELETE SET NULL',
            'CREATE INDEX "job_repository_id_status" ON "job" ("repository_id", "status")',
            'CREATE INDEX "job_from_repository_id_status" ON "job" ("from_repository_id", "status")',
            'UPDATE "job" SET "repository_id" = COALESCE((SELECT "r"."id" FROM "repository" AS "r" WHERE "r"."name" = json_extract("job"."params", \'$.repository\')), (SELECT "hr"."repository_id" FROM "host_repository" AS "hr" WHERE "hr"."host_id" = "job"."host_id" ORDER BY "hr"."position", "hr"."attached_at" LIMIT 1))',
            'ALTER TABLE "snapshot" ADD COLUMN "repository_id" INTEGER REFERENCES "repository" ("id") ON DELETE CASCADE',
            'UPDATE "snapshot" SET "repository_id" = (SELECT "hr"."repository_id" FROM "host_repository" AS "hr" WHERE "hr"."host_id" = "snapshot"."host_id" ORDER BY "hr"."position", "hr"."attached_at" LIMIT 1)',
            'CREATE INDEX "snapshot_repository_id" ON "snapshot" ("repository_id")',
            'ALTER TABLE "repository" ADD COLUMN "locks" INTEGER',
            'ALTER TABLE "repository" ADD COLUMN "locks_at" DATETIME',
            'UPDATE "repository" SET ("locks", "locks_at") = (SELECT MAX("h"."repo_locks"), MAX("h"."repo_locks_at") FROM "host" AS "h" JOIN "host_repository" AS "hr" ON "hr"."host_id" = "h"."id" WHERE "hr"."repository_id" = "repository"."id")',
            # sizes per host and repository: the table is made anew
            'CREATE TABLE "repo_stats_new" ("host_id" INTEGER NOT NULL, "repository_id" INTEGER NOT NULL, "size_bytes" INTEGER NOT NULL, "raw_size_bytes" INTEGER, "snapshot_count" INTEGER NOT NULL, "file_count" INTEGER, "lock_state" TEXT, "updated_at" DATETIME NOT NULL, "measured_at" DATETIME, PRIMARY KEY ("host_id", "repository_id"), FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
            'INSERT INTO "repo_stats_new" SELECT "s"."host_id", (SELECT "hr"."repository_id" FROM "host_repository" AS "hr" WHERE "hr"."host_id" = "s"."host_id" ORDER BY "hr"."position", "hr"."attached_at" LIMIT 1) AS "rid", "s"."size_bytes", "s"."raw_size_bytes", "s"."snapshot_count", "s"."file_count", "s"."lock_state", "s"."updated_at", "s"."measured_at" FROM "repo_stats" AS "s" WHERE "rid" IS NOT NULL',
            'DROP TABLE "repo_stats"',
            'ALTER TABLE "repo_stats_new" RENAME TO "repo_stats"',
            'CREATE INDEX "repo_stats_repository_id" ON "repo_stats" ("repository_id")',
        ],
    ),
    (
        11,
        "a group may say how often a backup is expected without a schedule",
        ['ALTER TABLE "source_group" ADD COLUMN "expect_every" INTEGER'],
    ),
    (
        12,
        "alerts: raised, acknowledged, resolved; one open per key",
        [
            'CREATE TABLE "alert" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "key" TEXT NOT NULL, "kind" TEXT NOT NULL, "severity" TEXT NOT NULL, "host" TEXT, "group_name" TEXT, "repository" TEXT, "message" TEXT NOT NULL, "raised_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL, "acknowledged_at" DATETIME, "acknowledged_by" TEXT, "resolved_at" DATETIME)',
            'CREATE INDEX "alert_key_resolved_at" ON "alert" ("key", "resolved_at")',
            'CREATE INDEX "alert_resolved_at" ON "alert" ("resolved_at")',
        ],
    ),
    (
        13,
        "notifiers: Apprise URLs (encrypted) told of alerts",
        [
            'CREATE TABLE "notifier" ("id" INTEGER NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "url_enc" BLOB NOT NULL, "kinds" TEXT NOT NULL, "hosts" TEXT NOT NULL, "groups" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "last_sent_at" DATETIME, "last_error" TEXT)',
            'CREATE UNIQUE INDEX "notifier_name" ON "notifier" ("name")',
        ],
    ),
    (
        14,
        "a group may ping a Healthchecks-style URL (encrypted) as its backups start and end",
        [
            'ALTER TABLE "source_group" ADD COLUMN "ping_url_enc" BLOB',
            'ALTER TABLE "source_group" ADD COLUMN "ping_url_shown" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "ping_sent_at" DATETIME',
            'ALTER TABLE "source_group" ADD COLUMN "ping_error" TEXT',
        ],
    ),
    (
        15,
        "jobs by kind and group or repository: each group's and repository's latest by an index",
        [
            'CREATE INDEX "job_kind_group_id_status" ON "job" ("kind", "group_id", "status")',
            'CREATE INDEX "job_kind_repository_id_status" ON "job" ("kind", "repository_id", "status")',
        ],
    ),
    (
        16,
        "listings of snapshot directories, kept so the next look answers at once",
        [
            'CREATE TABLE "listing" ("id" INTEGER NOT NULL PRIMARY KEY, "repository_id" INTEGER NOT NULL, "snapshot_id" TEXT NOT NULL, "path" TEXT NOT NULL, "entries" INTEGER NOT NULL, "node" TEXT, "created_at" DATETIME NOT NULL, "used_at" DATETIME NOT NULL, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "listing_repository_id" ON "listing" ("repository_id")',
            'CREATE INDEX "listing_used_at" ON "listing" ("used_at")',
            'CREATE UNIQUE INDEX "listing_repository_id_snapshot_id_path" ON "listing" ("repository_id", "snapshot_id", "path")',
            'CREATE TABLE "listing_page" ("listing_id" INTEGER NOT NULL, "page" INTEGER NOT NULL, "items" TEXT NOT NULL, PRIMARY KEY ("listing_id", "page"), FOREIGN KEY ("listing_id") REFERENCES "listing" ("id") ON DELETE CASCADE)',
            'CREATE INDEX "listing_page_listing_id" ON "listing_page" ("listing_id")',
        ],
    ),
    (
        17,
        "restore drills: a group's cron and sample, and when its next one is due",
        [
            'ALTER TABLE "source_group" ADD COLUMN "drill_cron" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "drill_sample" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "next_drill_at" DATETIME',
        ],
    ),
    (
        18,
        "time limits: a group's hooks and its backups",
        [
            'ALTER TABLE "source_group" ADD COLUMN "hook_timeout" INTEGER',
            'ALTER TABLE "source_group" ADD COLUMN "timeout" INTEGER',
        ],
    ),
    (
        19,
        "host labels, for selectors",
        ['ALTER TABLE "host" ADD COLUMN "labels" TEXT NOT NULL DEFAULT \'{}\''],
    ),
    (
        20,
        "templates: settings defined once for the hosts a selector picks",
        [
            'CREATE TABLE "template" ("id" INTEGER NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "selector" TEXT NOT NULL, "priority" INTEGER NOT NULL, "spec" TEXT NOT NULL, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL)',
            'CREATE UNIQUE INDEX "template_name" ON "template" ("name")',
            'ALTER TABLE "host" ADD COLUMN "template_error" TEXT',
            'ALTER TABLE "host" ADD COLUMN "templates_due_at" DATETIME',
            'CREATE INDEX "host_templates_due_at" ON "host" ("templates_due_at")',
            'ALTER TABLE "host_repository" ADD COLUMN "template" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "template" TEXT',
            'ALTER TABLE "source_group" ADD COLUMN "overrides" TEXT NOT NULL DEFAULT \'[]\'',
            'ALTER TABLE "schedule" ADD COLUMN "template" TEXT',
            'ALTER TABLE "schedule" ADD COLUMN "overrides" TEXT NOT NULL DEFAULT \'[]\'',
            'ALTER TABLE "maintenance" ADD COLUMN "template" TEXT',
            'ALTER TABLE "maintenance" ADD COLUMN "overrides" TEXT NOT NULL DEFAULT \'[]\'',
        ],
    ),
    (
        21,
        "agent upgrades rolled out host by host",
        [
            'CREATE TABLE "rollout" ("id" INTEGER NOT NULL PRIMARY KEY, "created_at" DATETIME NOT NULL, "created_by" TEXT NOT NULL, "selector" TEXT, "batch" INTEGER NOT NULL, "timeout" INTEGER NOT NULL, "version" TEXT NOT NULL, "sha256" TEXT NOT NULL, "size" INTEGER NOT NULL, "status" TEXT NOT NULL, "reason" TEXT, "finished_at" DATETIME)',
            'CREATE TABLE "rollout_host" ("id" INTEGER NOT NULL PRIMARY KEY, "rollout_id" INTEGER NOT NULL, "host_id" INTEGER, "host_name" TEXT NOT NULL, "position" INTEGER NOT NULL, "batch" INTEGER NOT NULL, "from_version" TEXT, "status" TEXT NOT NULL, "detail" TEXT, "sent_at" DATETIME, "finished_at" DATETIME, FOREIGN KEY ("rollout_id") REFERENCES "rollout" ("id") ON DELETE CASCADE, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE SET NULL)',
            'CREATE INDEX "rollout_host_rollout_id" ON "rollout_host" ("rollout_id")',
            'CREATE INDEX "rollout_host_host_id" ON "rollout_host" ("host_id")',
            'CREATE UNIQUE INDEX "rollout_host_rollout_id_position" ON "rollout_host" ("rollout_id", "position")',
        ],
    ),
    (
        22,
        "TLS key pins: what each agent trusts fleetd by, fleetd's served and staged keys",
        [
            'ALTER TABLE "host" ADD COLUMN "tls_trust" TEXT',
            'ALTER TABLE "host" ADD COLUMN "tls_pins" TEXT',
            'ALTER TABLE "host" ADD COLUMN "tls_pins_at" DATETIME',
            'CREATE TABLE "tls_key" ("pin" TEXT NOT NULL PRIMARY KEY, "state" TEXT NOT NULL, "since" DATETIME NOT NULL, "actor" TEXT)',
        ],
    ),
    (
        23,
        "replicas: the fleetd processes serving one database, the events they pass on, agents' sessions",
        {
            "sqlite": [
                'CREATE TABLE "replica" ("id" TEXT NOT NULL PRIMARY KEY, "url" TEXT, "hostname" TEXT NOT NULL, "pid" INTEGER NOT NULL, "started_at" DATETIME NOT NULL, "seen_at" DATETIME NOT NULL)',
                'CREATE TABLE "event" ("id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "at" DATETIME NOT NULL, "origin" TEXT NOT NULL, "kind" TEXT NOT NULL, "body" TEXT NOT NULL)',
                'CREATE INDEX "event_at" ON "event" ("at")',
                'ALTER TABLE "host" ADD COLUMN "session_replica" TEXT',
                'ALTER TABLE "host" ADD COLUMN "session_epoch" INTEGER NOT NULL DEFAULT 0',
                'CREATE INDEX "host_session_replica" ON "host" ("session_replica")',
            ],
            "postgresql": [
                'CREATE TABLE "replica" ("id" TEXT NOT NULL PRIMARY KEY, "url" TEXT, "hostname" TEXT NOT NULL, "pid" BIGINT NOT NULL, "started_at" TIMESTAMP NOT NULL, "seen_at" TIMESTAMP NOT NULL)',
                'CREATE TABLE "event" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "at" TIMESTAMP NOT NULL, "origin" TEXT NOT NULL, "kind" TEXT NOT NULL, "body" TEXT NOT NULL)',
                'CREATE INDEX "event_at" ON "event" ("at")',
                'ALTER TABLE "host" ADD COLUMN "session_replica" TEXT',
                'ALTER TABLE "host" ADD COLUMN "session_epoch" BIGINT NOT NULL DEFAULT 0',
                'CREATE INDEX "host_session_replica" ON "host" ("session_replica")',
            ],
        },
    ),
    (
        24,
        "what each host's agent said it can do, for the replicas it is not connected to",
        ['ALTER TABLE "host" ADD COLUMN "agent_features" TEXT'],
    ),
]

# PostgreSQL starts where SQLite's history had got to: the schema of version
# 22, written for it once (generated from the models of that day, then
# frozen like any migration). Every integer is BIGINT, as SQLite's INTEGER is
# 64-bit; ids are BIGSERIAL, never reused like SQLite's AUTOINCREMENT.
POSTGRESQL_BASELINE = 22
POSTGRESQL_SCHEMA: list[str] = [
    'CREATE TABLE "user" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "password_hash" TEXT NOT NULL, "role" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL)',
    'CREATE UNIQUE INDEX "user_name" ON "user" ("name")',
    'CREATE TABLE "api_token" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "user_id" BIGINT NOT NULL, "name" TEXT NOT NULL, "token_hash" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "expires_at" TIMESTAMP, "revoked_at" TIMESTAMP, "last_used_at" TIMESTAMP, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "api_token_user_id" ON "api_token" ("user_id")',
    'CREATE UNIQUE INDEX "api_token_token_hash" ON "api_token" ("token_hash")',
    'CREATE TABLE "host" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "agent_token_hash" TEXT, "enrolled_at" TIMESTAMP, "online" BOOLEAN NOT NULL, "last_seen_at" TIMESTAMP, "hostname" TEXT, "agent_version" TEXT, "restic_version" TEXT, "os" TEXT, "arch" TEXT, "timezone" TEXT, "schedule_version" BIGINT NOT NULL, "applied_schedule_version" BIGINT NOT NULL, "last_seq" BIGINT NOT NULL, "repo_locks" BIGINT, "repo_locks_at" TIMESTAMP, "labels" TEXT NOT NULL, "tls_trust" TEXT, "tls_pins" TEXT, "tls_pins_at" TIMESTAMP, "template_error" TEXT, "templates_due_at" TIMESTAMP)',
    'CREATE UNIQUE INDEX "host_name" ON "host" ("name")',
    'CREATE UNIQUE INDEX "host_agent_token_hash" ON "host" ("agent_token_hash")',
    'CREATE INDEX "host_templates_due_at" ON "host" ("templates_due_at")',
    'CREATE TABLE "template" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "selector" TEXT NOT NULL, "priority" BIGINT NOT NULL, "spec" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL)',
    'CREATE UNIQUE INDEX "template_name" ON "template" ("name")',
    'CREATE TABLE "enrollment_token" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "host_id" BIGINT NOT NULL, "token_hash" TEXT NOT NULL, "created_by_id" BIGINT, "created_at" TIMESTAMP NOT NULL, "expires_at" TIMESTAMP NOT NULL, "used_at" TIMESTAMP, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("created_by_id") REFERENCES "user" ("id") ON DELETE SET NULL)',
    'CREATE INDEX "enrollment_token_host_id" ON "enrollment_token" ("host_id")',
    'CREATE UNIQUE INDEX "enrollment_token_token_hash" ON "enrollment_token" ("token_hash")',
    'CREATE INDEX "enrollment_token_created_by_id" ON "enrollment_token" ("created_by_id")',
    'CREATE TABLE "repository" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "url_enc" BYTEA NOT NULL, "password_enc" BYTEA NOT NULL, "env_names" TEXT NOT NULL, "env_enc" BYTEA, "aad" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "locks" BIGINT, "locks_at" TIMESTAMP)',
    'CREATE UNIQUE INDEX "repository_name" ON "repository" ("name")',
    'CREATE TABLE "host_repository" ("host_id" BIGINT NOT NULL, "repository_id" BIGINT NOT NULL, "position" BIGINT NOT NULL, "attached_at" TIMESTAMP NOT NULL, "template" TEXT, PRIMARY KEY ("host_id", "repository_id"), FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id"))',
    'CREATE INDEX "host_repository_host_id" ON "host_repository" ("host_id")',
    'CREATE INDEX "host_repository_repository_id" ON "host_repository" ("repository_id")',
    'CREATE TABLE "source_group" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "host_id" BIGINT NOT NULL, "name" TEXT NOT NULL, "includes" TEXT NOT NULL, "excludes" TEXT NOT NULL, "retention" TEXT NOT NULL, "pre_hook" TEXT, "post_hook" TEXT, "retries" BIGINT NOT NULL, "retry_delay" BIGINT NOT NULL, "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "repository_id" BIGINT, "copy_to_id" BIGINT, "copy_retention" TEXT, "copy_cron" TEXT, "next_copy_at" TIMESTAMP, "copied_until" TIMESTAMP, "expect_every" BIGINT, "ping_url_enc" BYTEA, "ping_url_shown" TEXT, "ping_sent_at" TIMESTAMP, "ping_error" TEXT, "hook_timeout" BIGINT, "timeout" BIGINT, "drill_cron" TEXT, "drill_sample" TEXT, "next_drill_at" TIMESTAMP, "template" TEXT, "overrides" TEXT NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id"), FOREIGN KEY ("copy_to_id") REFERENCES "repository" ("id"))',
    'CREATE INDEX "source_group_host_id" ON "source_group" ("host_id")',
    'CREATE INDEX "source_group_repository_id" ON "source_group" ("repository_id")',
    'CREATE INDEX "source_group_copy_to_id" ON "source_group" ("copy_to_id")',
    'CREATE UNIQUE INDEX "source_group_host_id_name" ON "source_group" ("host_id", "name")',
    'CREATE TABLE "schedule" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "host_id" BIGINT NOT NULL, "name" TEXT NOT NULL, "cron" TEXT NOT NULL, "timezone" TEXT, "enabled" BOOLEAN NOT NULL, "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "template" TEXT, "overrides" TEXT NOT NULL, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "schedule_host_id" ON "schedule" ("host_id")',
    'CREATE UNIQUE INDEX "schedule_host_id_name" ON "schedule" ("host_id", "name")',
    'CREATE TABLE "schedule_group" ("schedule_id" BIGINT NOT NULL, "group_id" BIGINT NOT NULL, PRIMARY KEY ("schedule_id", "group_id"), FOREIGN KEY ("schedule_id") REFERENCES "schedule" ("id") ON DELETE CASCADE, FOREIGN KEY ("group_id") REFERENCES "source_group" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "schedule_group_schedule_id" ON "schedule_group" ("schedule_id")',
    'CREATE INDEX "schedule_group_group_id" ON "schedule_group" ("group_id")',
    'CREATE TABLE "maintenance" ("repository_id" BIGINT NOT NULL PRIMARY KEY, "forget_cron" TEXT, "prune_cron" TEXT, "check_cron" TEXT, "check_subset" TEXT NOT NULL, "next_forget_at" TIMESTAMP, "next_prune_at" TIMESTAMP, "next_check_at" TIMESTAMP, "updated_at" TIMESTAMP NOT NULL, "template" TEXT, "overrides" TEXT NOT NULL, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
    'CREATE TABLE "job" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "uid" TEXT NOT NULL, "host_id" BIGINT NOT NULL, "kind" TEXT NOT NULL, "status" TEXT NOT NULL, "actor_kind" TEXT NOT NULL, "actor_user_id" BIGINT, "schedule_id" BIGINT, "group_id" BIGINT, "group_name" TEXT, "params" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "not_before" TIMESTAMP, "dispatched_at" TIMESTAMP, "started_at" TIMESTAMP, "finished_at" TIMESTAMP, "cancel_requested_at" TIMESTAMP, "exit_code" BIGINT, "summary" TEXT, "error" TEXT, "agent_job" BIGINT, "repository_id" BIGINT, "from_repository_id" BIGINT, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("actor_user_id") REFERENCES "user" ("id") ON DELETE SET NULL, FOREIGN KEY ("schedule_id") REFERENCES "schedule" ("id") ON DELETE SET NULL, FOREIGN KEY ("group_id") REFERENCES "source_group" ("id") ON DELETE SET NULL, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE SET NULL, FOREIGN KEY ("from_repository_id") REFERENCES "repository" ("id") ON DELETE SET NULL)',
    'CREATE UNIQUE INDEX "job_uid" ON "job" ("uid")',
    'CREATE INDEX "job_host_id" ON "job" ("host_id")',
    'CREATE INDEX "job_actor_user_id" ON "job" ("actor_user_id")',
    'CREATE INDEX "job_schedule_id" ON "job" ("schedule_id")',
    'CREATE INDEX "job_group_id" ON "job" ("group_id")',
    'CREATE INDEX "job_created_at" ON "job" ("created_at")',
    'CREATE INDEX "job_repository_id_status" ON "job" ("repository_id", "status")',
    'CREATE INDEX "job_from_repository_id_status" ON "job" ("from_repository_id", "status")',
    'CREATE INDEX "job_host_id_status" ON "job" ("host_id", "status")',
    'CREATE INDEX "job_status_not_before" ON "job" ("status", "not_before")',
    'CREATE UNIQUE INDEX "job_host_id_agent_job" ON "job" ("host_id", "agent_job")',
    'CREATE INDEX "job_kind_group_id_status" ON "job" ("kind", "group_id", "status")',
    'CREATE INDEX "job_kind_repository_id_status" ON "job" ("kind", "repository_id", "status")',
    'CREATE TABLE "job_log" ("job_id" BIGINT NOT NULL, "seq" BIGINT NOT NULL, "ts" TIMESTAMP NOT NULL, "stream" TEXT NOT NULL, "payload" TEXT NOT NULL, PRIMARY KEY ("job_id", "seq"), FOREIGN KEY ("job_id") REFERENCES "job" ("id") ON DELETE CASCADE)',
    'CREATE TABLE "snapshot" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "host_id" BIGINT NOT NULL, "snapshot_id" TEXT NOT NULL, "short_id" TEXT NOT NULL, "time" TIMESTAMP NOT NULL, "hostname" TEXT NOT NULL, "paths" TEXT NOT NULL, "tags" TEXT NOT NULL, "size_bytes" BIGINT, "file_count" BIGINT, "reported_at" TIMESTAMP, "repository_id" BIGINT, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "snapshot_host_id" ON "snapshot" ("host_id")',
    'CREATE INDEX "snapshot_repository_id" ON "snapshot" ("repository_id")',
    'CREATE UNIQUE INDEX "snapshot_host_id_snapshot_id" ON "snapshot" ("host_id", "snapshot_id")',
    'CREATE TABLE "repo_stats" ("host_id" BIGINT NOT NULL, "repository_id" BIGINT NOT NULL, "size_bytes" BIGINT NOT NULL, "raw_size_bytes" BIGINT, "snapshot_count" BIGINT NOT NULL, "file_count" BIGINT, "lock_state" TEXT, "updated_at" TIMESTAMP NOT NULL, "measured_at" TIMESTAMP, PRIMARY KEY ("host_id", "repository_id"), FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE CASCADE, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "repo_stats_repository_id" ON "repo_stats" ("repository_id")',
    'CREATE TABLE "alert" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "key" TEXT NOT NULL, "kind" TEXT NOT NULL, "severity" TEXT NOT NULL, "host" TEXT, "group_name" TEXT, "repository" TEXT, "message" TEXT NOT NULL, "raised_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "acknowledged_at" TIMESTAMP, "acknowledged_by" TEXT, "resolved_at" TIMESTAMP)',
    'CREATE INDEX "alert_key_resolved_at" ON "alert" ("key", "resolved_at")',
    'CREATE INDEX "alert_resolved_at" ON "alert" ("resolved_at")',
    'CREATE TABLE "notifier" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" TEXT NOT NULL, "url_enc" BYTEA NOT NULL, "kinds" TEXT NOT NULL, "hosts" TEXT NOT NULL, "groups" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, "last_sent_at" TIMESTAMP, "last_error" TEXT)',
    'CREATE UNIQUE INDEX "notifier_name" ON "notifier" ("name")',
    'CREATE TABLE "listing" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "repository_id" BIGINT NOT NULL, "snapshot_id" TEXT NOT NULL, "path" TEXT NOT NULL, "entries" BIGINT NOT NULL, "node" TEXT, "created_at" TIMESTAMP NOT NULL, "used_at" TIMESTAMP NOT NULL, FOREIGN KEY ("repository_id") REFERENCES "repository" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "listing_repository_id" ON "listing" ("repository_id")',
    'CREATE INDEX "listing_used_at" ON "listing" ("used_at")',
    'CREATE UNIQUE INDEX "listing_repository_id_snapshot_id_path" ON "listing" ("repository_id", "snapshot_id", "path")',
    'CREATE TABLE "listing_page" ("listing_id" BIGINT NOT NULL, "page" BIGINT NOT NULL, "items" TEXT NOT NULL, PRIMARY KEY ("listing_id", "page"), FOREIGN KEY ("listing_id") REFERENCES "listing" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "listing_page_listing_id" ON "listing_page" ("listing_id")',
    'CREATE TABLE "tls_key" ("pin" TEXT NOT NULL PRIMARY KEY, "state" TEXT NOT NULL, "since" TIMESTAMP NOT NULL, "actor" TEXT)',
    'CREATE TABLE "audit_log" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "at" TIMESTAMP NOT NULL, "actor" TEXT NOT NULL, "action" TEXT NOT NULL, "target" TEXT, "detail" TEXT, "address" TEXT)',
    'CREATE INDEX "audit_log_at" ON "audit_log" ("at")',
    'CREATE TABLE "rollout" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "created_at" TIMESTAMP NOT NULL, "created_by" TEXT NOT NULL, "selector" TEXT, "batch" BIGINT NOT NULL, "timeout" BIGINT NOT NULL, "version" TEXT NOT NULL, "sha256" TEXT NOT NULL, "size" BIGINT NOT NULL, "status" TEXT NOT NULL, "reason" TEXT, "finished_at" TIMESTAMP)',
    'CREATE TABLE "rollout_host" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "rollout_id" BIGINT NOT NULL, "host_id" BIGINT, "host_name" TEXT NOT NULL, "position" BIGINT NOT NULL, "batch" BIGINT NOT NULL, "from_version" TEXT, "status" TEXT NOT NULL, "detail" TEXT, "sent_at" TIMESTAMP, "finished_at" TIMESTAMP, FOREIGN KEY ("rollout_id") REFERENCES "rollout" ("id") ON DELETE CASCADE, FOREIGN KEY ("host_id") REFERENCES "host" ("id") ON DELETE SET NULL)',
    'CREATE INDEX "rollout_host_rollout_id" ON "rollout_host" ("rollout_id")',
    'CREATE INDEX "rollout_host_host_id" ON "rollout_host" ("host_id")',
    'CREATE UNIQUE INDEX "rollout_host_rollout_id_position" ON "rollout_host" ("rollout_id", "position")',
]

# migrations that rebuild a table: foreign keys are off while they run (a
# DROP would otherwise cascade), and checked before they commit
REBUILDS = {4, 10}


def current_version(database: pw.Database) -> int:
    if not database.table_exists("schema_version"):
        return 0
    return SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar() or 0


def is_postgresql(database: pw.Database) -> bool:
    return isinstance(database, pw.PostgresqlDatabase)


def statements_for(statements: Statements, database: pw.Database) -> list[str]:
    """A migration's statements for this database: one list for both, or
    one list each ({"sqlite": [...], "postgresql": [...]})."""
    if isinstance(statements, dict):
        return statements["postgresql" if is_postgresql(database) else "sqlite"]
    return statements


# fleetd replicas starting together on one empty PostgreSQL: one migrates,
# the others wait for it under this advisory lock, then find nothing to do
MIGRATION_LOCK = 0x666C656574  # "fleet"


def migrate(database: pw.Database) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied.

    Each one runs in its own transaction together with its version row, so
    a crash leaves the schema at a recorded version.
    """
    if not is_postgresql(database):
        return _migrate(database)
    database.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        return _migrate(database)
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _migrate(database: pw.Database) -> list[int]:
    postgresql = is_postgresql(database)
    database.create_tables([SchemaVersion], safe=True)
    done = current_version(database)
    latest = MIGRATIONS[-1][0]
    if done > latest:
        raise RuntimeError(
            f"the database is at schema version {done}, newer than this fleetd knows "
            f"({latest}); run a newer fleetd"
        )
    applied = []
    if postgresql and done == 0:
        with database.atomic():
            for sql in POSTGRESQL_SCHEMA:
                database.execute_sql(sql)
            for version, name, _ in MIGRATIONS[:POSTGRESQL_BASELINE]:
                SchemaVersion.create(version=version, name=name, applied_at=utcnow())
                applied.append(version)
        done = POSTGRESQL_BASELINE
    for version, name, statements in MIGRATIONS:
        if version <= done:
            continue
        rebuild = version in REBUILDS and not postgresql
        if rebuild:
            database.execute_sql("PRAGMA foreign_keys = OFF")
        try:
            with database.atomic():
                for sql in statements_for(statements, database):
                    database.execute_sql(sql)
                if rebuild and database.execute_sql("PRAGMA foreign_key_check").fetchall():
                    raise RuntimeError(f"migration {version} ({name}) broke a foreign key")
                SchemaVersion.create(version=version, name=name, applied_at=utcnow())
        finally:
            if rebuild:
                database.execute_sql("PRAGMA foreign_keys = ON")
        applied.append(version)
    return applied
