"""Tests for fleet/protocol.py: the wire shape of every message, the decoder's
refusals, the /ctl request helpers, and that the module stays stdlib-only and
importable on Python 3.9 (the agent runs it there).

The literals below are the wire interface: if a test here fails after a change
to protocol.py, the change broke compatibility with deployed agents.
"""

import ast
import base64
import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.common import protocol
from fleet.common.protocol import (
    MAX_FRAME_BYTES,
    MAX_LINE,
    MAX_STR,
    MESSAGES,
    PROTOCOL_VERSION,
    RELIABLE,
    Envelope,
    ProtocolError,
    Request,
    decode,
    decode_request,
    encode,
    error_frame,
    event_frame,
    request_error_frame,
    result_frame,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# -- the wire interface, written out by hand ----------------------------------

ALL_TYPES = {
    "enroll",
    "enrolled",
    "hello",
    "welcome",
    "heartbeat",
    "config.update",
    "schedule.set",
    "schedule.ack",
    "schedule.fire",
    "tls.pins",
    "tls.ack",
    "command.run",
    "command.result",
    "command.cancel",
    "job.started",
    "job.progress",
    "job.log",
    "job.logs",
    "job.finished",
    "snapshots.report",
    "repo.stats",
    "repo.locks",
    "query.run",
    "query.result",
    "query.cancel",
    "query.more",
    "agent.upgrade",
    "upgrade.result",
    "ack",
    "error",
}

RELIABLE_TYPES = {
    "schedule.fire",
    "job.started",
    "job.log",
    "job.logs",
    "job.finished",
    "snapshots.report",
    "repo.stats",
    "repo.locks",
}

# type -> (direction, required field names, optional field names), in wire order
WIRE_FIELDS = {
    "enroll": ("agent", ("token", "hostname"), ()),
    "enrolled": ("server", ("host_id", "host_name", "agent_token"), ()),
    "hello": (
        "agent",
        ("protocol_version", "agent_version", "restic_version", "hostname", "os", "arch"),
        (
            "timezone",
            "boot_time",
            "running_job",
            "spool_seq",
            "spool_pending",
            "schedule_version",
            "features",
            "upgrade_failed",
            "upgrade_error",
            "tls_pins",
        ),
    ),
    "welcome": (
        "server",
        ("server_version", "heartbeat_interval", "host_id", "host_name"),
        ("features", "urls"),
    ),
    "heartbeat": ("agent", ("sent_at",), ()),
    "config.update": ("server", ("repo_url", "repo_password"), ("repo_env", "repositories")),
    "schedule.set": ("server", ("version", "schedules"), ()),
    "schedule.ack": ("agent", ("version", "applied_at"), ()),
    "tls.pins": ("server", ("pins",), ()),
    "tls.ack": ("agent", ("pins", "applied_at"), ("error",)),
    "schedule.fire": ("agent", ("schedule_id", "scheduled_at"), ("catch_up", "jobs")),
    "command.run": (
        "server",
        ("job_id", "kind"),
        (
            "uid",
            "group",
            "includes",
            "excludes",
            "tag",
            "retention",
            "pre_hook",
            "post_hook",
            "read_data_subset",
            "args",
            "scheduled_at",
            "catch_up",
            "coalesced",
            "hosts",
            "repository_id",
            "from_repository_id",
            "snapshots",
            "snapshot",
            "target",
            "verify",
            "sample",
            "dry_run",
            "hook_timeout",
            "timeout",
        ),
    ),
    "command.result": ("agent", ("job_id", "accepted"), ("error", "code")),
    "command.cancel": ("server", ("job_id",), ("uid",)),
    "job.started": (
        "agent",
        ("job_id", "kind", "started_at"),
        ("uid", "group_id", "group", "schedule_id", "scheduled_at", "catch_up", "coalesced"),
    ),
    "job.progress": (
        "agent",
        (
            "job_id",
            "percent_done",
            "files_done",
            "total_files",
            "bytes_done",
            "total_bytes",
            "eta_seconds",
            "throughput_bps",
        ),
        (),
    ),
    "job.log": ("agent", ("job_id", "seq", "ts", "stream", "payload"), ()),
    "job.logs": ("agent", ("job_id", "first", "lines"), ()),
    "job.finished": (
        "agent",
        ("job_id", "status", "exit_code", "finished_at"),
        ("summary", "error"),
    ),
    "snapshots.report": ("agent", ("snapshots",), ("report_at", "last", "repository_id")),
    "repo.stats": (
        "agent",
        ("size_bytes", "snapshot_count"),
        ("file_count", "raw_size_bytes", "lock_state", "measured_at", "repository_id"),
    ),
    "repo.locks": ("agent", ("count",), ("repository_id",)),
    "query.run": (
        "server",
        ("query_id", "kind"),
        ("repository_id", "window", "snapshot", "snapshot2", "path", "patterns", "hosts", "tag"),
    ),
    "query.result": ("agent", ("query_id", "items", "done"), ("error", "code")),
    "query.cancel": ("server", ("query_id",), ()),
    "query.more": ("server", ("query_id", "pages"), ()),
    "agent.upgrade": ("server", ("version", "sha256", "size", "deadline"), ()),
    "upgrade.result": ("agent", ("version", "accepted"), ("code", "error")),
    "ack": ("server", ("seq",), ()),
    "error": ("both", ("code", "message"), ("re",)),
}

# (type, list[dict] field) -> (required, optional) names of each item
WIRE_ITEM_FIELDS = {
    ("schedule.set", "schedules"): (
        ("id", "cron", "enabled", "source_groups"),
        ("name", "timezone"),
    ),
    ("schedule.fire", "jobs"): (("group_id", "job_id", "uid"), ()),
    ("snapshots.report", "snapshots"): (
        ("id", "short_id", "time", "hostname", "paths"),
        ("tags", "size_bytes", "file_count"),
    ),
}
WIRE_SOURCE_GROUP_FIELDS = (
    ("id", "name", "includes", "excludes"),
    ("retention", "pre_hook", "post_hook", "repository_id", "hook_timeout", "timeout"),
)

# type -> (data with every field, frame id, seq, the exact frame encode() gives)
EXAMPLES = {
    "enroll": (
        {"token": "enr-4f2a9c", "hostname": "web-01"},
        "e1",
        None,
        '{"v":1,"type":"enroll","id":"e1","data":{"token":"enr-4f2a9c","hostname":"web-01"}}',
    ),
    "enrolled": (
        {"host_id": 3, "host_name": "web-01", "agent_token": "agt-secret"},
        None,
        None,
        '{"v":1,"type":"enrolled","data":'
        '{"host_id":3,"host_name":"web-01","agent_token":"agt-secret"}}',
    ),
    "hello": (
        {
            "protocol_version": 1,
            "agent_version": "0.1.0",
            "restic_version": "0.17.3",
            "hostname": "web-01",
            "os": "linux",
            "arch": "amd64",
            "timezone": "Europe/Berlin",
            "boot_time": "2024-05-01T08:00:00Z",
            "running_job": 41,
            "spool_seq": 1200,
            "spool_pending": 1190,
            "schedule_version": 4,
            "features": ["repositories", "tls.pins"],
            "upgrade_failed": "0.2.0",
            "upgrade_error": "no hello accepted within 120 s",
            "tls_pins": ["c" * 64],
        },
        "h1",
        None,
        '{"v":1,"type":"hello","id":"h1","data":{"protocol_version":1,"agent_version":"0.1.0",'
        '"restic_version":"0.17.3","hostname":"web-01","os":"linux","arch":"amd64",'
        '"timezone":"Europe/Berlin","boot_time":"2024-05-01T08:00:00Z",'
        '"running_job":41,"spool_seq":1200,"spool_pending":1190,"schedule_version":4,'
        '"features":["repositories","tls.pins"],"upgrade_failed":"0.2.0",'
        '"upgrade_error":"no hello accepted within 120 s","tls_pins":["' + "c" * 64 + '"]}}',
    ),
    "welcome": (
        {
            "server_version": "0.1.0",
            "heartbeat_interval": 30,
            "host_id": 3,
            "host_name": "web-01",
            "features": ["job.logs"],
            "urls": ["wss://fleet-a:8433", "wss://fleet-b:8433"],
        },
        None,
        None,
        '{"v":1,"type":"welcome","data":{"server_version":"0.1.0","heartbeat_interval":30,'
        '"host_id":3,"host_name":"web-01","features":["job.logs"],'
        '"urls":["wss://fleet-a:8433","wss://fleet-b:8433"]}}',
    ),
    "heartbeat": (
        {"sent_at": "2024-05-01T12:00:00Z"},
        "hb7",
        None,
        '{"v":1,"type":"heartbeat","id":"hb7","data":{"sent_at":"2024-05-01T12:00:00Z"}}',
    ),
    "config.update": (
        {
            "repo_url": "s3:https://s3.example.com/backups/web-01",
            "repo_password": "hunter2",
            "repo_env": {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
            "repositories": [
                {"id": 4, "name": "main", "url": "/srv/main", "password": "pw", "env": {}}
            ],
        },
        "c1",
        None,
        '{"v":1,"type":"config.update","id":"c1","data":'
        '{"repo_url":"s3:https://s3.example.com/backups/web-01","repo_password":"hunter2",'
        '"repo_env":{"AWS_ACCESS_KEY_ID":"AKIA1","AWS_SECRET_ACCESS_KEY":"s3cr3t"},'
        '"repositories":[{"id":4,"name":"main","url":"/srv/main","password":"pw","env":{}}]}}',
    ),
    "schedule.set": (
        {
            "version": 4,
            "schedules": [
                {
                    "id": 1,
                    "cron": "0 3 * * *",
                    "enabled": True,
                    "source_groups": [
                        {
                            "id": 10,
                            "name": "etc",
                            "includes": ["/etc"],
                            "excludes": ["/etc/shadow"],
                            "retention": {"keep_daily": 7},
                            "pre_hook": "pg_dumpall -f /var/dump.sql",
                            "post_hook": "rm /var/dump.sql",
                        }
                    ],
                    "name": "nightly",
                    "timezone": "Europe/Berlin",
                }
            ],
        },
        "s1",
        None,
        '{"v":1,"type":"schedule.set","id":"s1","data":{"version":4,"schedules":[{"id":1,'
        '"cron":"0 3 * * *","enabled":true,"source_groups":[{"id":10,"name":"etc",'
        '"includes":["/etc"],"excludes":["/etc/shadow"],"retention":{"keep_daily":7},'
        '"pre_hook":"pg_dumpall -f /var/dump.sql","post_hook":"rm /var/dump.sql"}],'
        '"name":"nightly","timezone":"Europe/Berlin"}]}}',
    ),
    "tls.pins": (
        {"pins": ["a" * 64, "b" * 64]},
        None,
        None,
        '{"v":1,"type":"tls.pins","data":{"pins":["' + "a" * 64 + '","' + "b" * 64 + '"]}}',
    ),
    "tls.ack": (
        {"pins": ["a" * 64], "applied_at": "2024-05-01T12:00:01Z", "error": "kept"},
        None,
        None,
        '{"v":1,"type":"tls.ack","data":{"pins":["'
        + "a" * 64
        + '"],"applied_at":"2024-05-01T12:00:01Z","error":"kept"}}',
    ),
    "schedule.ack": (
        {"version": 4, "applied_at": "2024-05-01T12:00:01Z"},
        "sa1",
        None,
        '{"v":1,"type":"schedule.ack","id":"sa1","data":'
        '{"version":4,"applied_at":"2024-05-01T12:00:01Z"}}',
    ),
    "schedule.fire": (
        {
            "schedule_id": 1,
            "scheduled_at": "2024-05-02T03:00:00Z",
            "catch_up": True,
            "jobs": [{"group_id": 10, "job_id": -3, "uid": "fire-3-1-2024-05-02T03:00:00Z-10"}],
        },
        "sf1",
        1,
        '{"v":1,"type":"schedule.fire","id":"sf1","seq":1,"data":'
        '{"schedule_id":1,"scheduled_at":"2024-05-02T03:00:00Z","catch_up":true,'
        '"jobs":[{"group_id":10,"job_id":-3,"uid":"fire-3-1-2024-05-02T03:00:00Z-10"}]}}',
    ),
    "command.run": (
        {
            "job_id": 42,
            "kind": "backup",
            "uid": "fire-3-1-2024-05-02T03:00:00Z-10",
            "group": "etc",
            "includes": ["/etc"],
            "excludes": ["/etc/shadow"],
            "tag": "manual",
            "retention": {"keep_last": 3},
            "pre_hook": "sync",
            "post_hook": "true",
            "read_data_subset": "5%",
            "args": ["--verbose"],
            "scheduled_at": "2024-05-02T03:00:00Z",
            "catch_up": True,
            "coalesced": ["2024-05-02T04:00:00Z"],
            "hosts": ["web-01"],
            "repository_id": 4,
            "from_repository_id": 5,
            "snapshots": ["4f2a9c1e"],
            "snapshot": "4f2a9c1e",
            "target": "/srv/restored",
            "verify": True,
            "sample": "20",
            "dry_run": True,
            "hook_timeout": 600,
            "timeout": 21600,
        },
        "r42",
        None,
        '{"v":1,"type":"command.run","id":"r42","data":{"job_id":42,"kind":"backup",'
        '"uid":"fire-3-1-2024-05-02T03:00:00Z-10","group":"etc","includes":["/etc"],"excludes":["/etc/shadow"],"tag":"manual",'
        '"retention":{"keep_last":3},"pre_hook":"sync","post_hook":"true",'
        '"read_data_subset":"5%","args":["--verbose"],"scheduled_at":"2024-05-02T03:00:00Z",'
        '"catch_up":true,"coalesced":["2024-05-02T04:00:00Z"],"hosts":["web-01"],'
        '"repository_id":4,"from_repository_id":5,"snapshots":["4f2a9c1e"],'
        '"snapshot":"4f2a9c1e","target":"/srv/restored","verify":true,"sample":"20","dry_run":true,'
        '"hook_timeout":600,"timeout":21600}}',
    ),
    "command.result": (
        {"job_id": 42, "accepted": False, "error": "busy with job 41", "code": "busy"},
        "r42",
        None,
        '{"v":1,"type":"command.result","id":"r42","data":'
        '{"job_id":42,"accepted":false,"error":"busy with job 41","code":"busy"}}',
    ),
    "command.cancel": (
        {"job_id": 42, "uid": "fire-3-1-2024-05-02T03:00:00Z-10"},
        None,
        None,
        '{"v":1,"type":"command.cancel","data":{"job_id":42,'
        '"uid":"fire-3-1-2024-05-02T03:00:00Z-10"}}',
    ),
    "job.started": (
        {
            "job_id": -3,
            "kind": "backup",
            "started_at": "2024-05-02T03:00:01Z",
            "uid": "fire-3-1-2024-05-02T03:00:00Z-10",
            "group_id": 10,
            "group": "etc",
            "schedule_id": 1,
            "scheduled_at": "2024-05-02T03:00:00Z",
            "catch_up": True,
            "coalesced": ["2024-05-02T04:00:00Z"],
        },
        None,
        2,
        '{"v":1,"type":"job.started","seq":2,"data":'
        '{"job_id":-3,"kind":"backup","started_at":"2024-05-02T03:00:01Z",'
        '"uid":"fire-3-1-2024-05-02T03:00:00Z-10","group_id":10,"group":"etc",'
        '"schedule_id":1,"scheduled_at":"2024-05-02T03:00:00Z","catch_up":true,'
        '"coalesced":["2024-05-02T04:00:00Z"]}}',
    ),
    "job.progress": (
        {
            "job_id": 42,
            "percent_done": 0.5,
            "files_done": 10,
            "total_files": 20,
            "bytes_done": 1024,
            "total_bytes": 2048,
            "eta_seconds": 12,
            "throughput_bps": 4096,
        },
        "p1",
        None,
        '{"v":1,"type":"job.progress","id":"p1","data":{"job_id":42,"percent_done":0.5,'
        '"files_done":10,"total_files":20,"bytes_done":1024,"total_bytes":2048,'
        '"eta_seconds":12,"throughput_bps":4096}}',
    ),
    "job.log": (
        {
            "job_id": 42,
            "seq": 1,
            "ts": "2024-05-02T03:00:02Z",
            "stream": "stdout",
            "payload": "naïve café ✓",
        },
        "l1",
        3,
        '{"v":1,"type":"job.log","id":"l1","seq":3,"data":{"job_id":42,"seq":1,'
        '"ts":"2024-05-02T03:00:02Z","stream":"stdout","payload":"naïve café ✓"}}',
    ),
    "job.logs": (
        {
            "job_id": 42,
            "first": 4,
            "lines": [
                {"seq": 2, "ts": "2024-05-02T03:00:02Z", "stream": "stdout", "payload": "a"},
                {"seq": 3, "ts": "2024-05-02T03:00:03Z", "stream": "stderr", "payload": "b"},
            ],
        },
        None,
        5,
        '{"v":1,"type":"job.logs","seq":5,"data":{"job_id":42,"first":4,"lines":['
        '{"seq":2,"ts":"2024-05-02T03:00:02Z","stream":"stdout","payload":"a"},'
        '{"seq":3,"ts":"2024-05-02T03:00:03Z","stream":"stderr","payload":"b"}]}}',
    ),
    "job.finished": (
        {
            "job_id": 42,
            "status": "warning",
            "exit_code": 3,
            "finished_at": "2024-05-02T03:10:00Z",
            "summary": {"files_new": 2, "data_added": 4096},
            "error": "some files could not be read",
        },
        "f42",
        4,
        '{"v":1,"type":"job.finished","id":"f42","seq":4,"data":{"job_id":42,'
        '"status":"warning","exit_code":3,"finished_at":"2024-05-02T03:10:00Z",'
        '"summary":{"files_new":2,"data_added":4096},"error":"some files could not be read"}}',
    ),
    "snapshots.report": (
        {
            "snapshots": [
                {
                    "id": "4f2a9c1e77d0",
                    "short_id": "4f2a9c1e",
                    "time": "2024-05-02T03:09:59Z",
                    "hostname": "web-01",
                    "paths": ["/etc"],
                    "tags": ["daily"],
                    "size_bytes": 1048576,
                    "file_count": 12,
                }
            ],
            "report_at": "2024-05-02T03:10:04Z",
            "last": True,
            "repository_id": 4,
        },
        None,
        5,
        '{"v":1,"type":"snapshots.report","seq":5,"data":{"snapshots":[{"id":"4f2a9c1e77d0",'
        '"short_id":"4f2a9c1e","time":"2024-05-02T03:09:59Z","hostname":"web-01",'
        '"paths":["/etc"],"tags":["daily"],"size_bytes":1048576,"file_count":12}],'
        '"report_at":"2024-05-02T03:10:04Z","last":true,"repository_id":4}}',
    ),
    "repo.stats": (
        {
            "size_bytes": 1048576,
            "snapshot_count": 7,
            "file_count": 1234,
            "raw_size_bytes": 2097152,
            "lock_state": "unlocked",
            "measured_at": "2024-05-02T03:00:00Z",
            "repository_id": 4,
        },
        "st1",
        6,
        '{"v":1,"type":"repo.stats","id":"st1","seq":6,"data":{"size_bytes":1048576,'
        '"snapshot_count":7,"file_count":1234,"raw_size_bytes":2097152,'
        '"lock_state":"unlocked","measured_at":"2024-05-02T03:00:00Z","repository_id":4}}',
    ),
    "repo.locks": (
        {"count": 1, "repository_id": 4},
        None,
        9,
        '{"v":1,"type":"repo.locks","seq":9,"data":{"count":1,"repository_id":4}}',
    ),
    "query.run": (
        {
            "query_id": 3,
            "kind": "ls",
            "repository_id": 4,
            "window": 16,
            "snapshot": "4f2a9c1e",
            "snapshot2": "5e3b8d2f",
            "path": "/etc",
            "patterns": ["*.conf"],
            "hosts": ["web-01"],
            "tag": "etc",
        },
        None,
        None,
        '{"v":1,"type":"query.run","data":{"query_id":3,"kind":"ls","repository_id":4,'
        '"window":16,"snapshot":"4f2a9c1e","snapshot2":"5e3b8d2f","path":"/etc","patterns":["*.conf"],'
        '"hosts":["web-01"],"tag":"etc"}}',
    ),
    "query.result": (
        {"query_id": 3, "items": [{"name": "hosts"}], "done": True, "error": "x", "code": "failed"},
        None,
        None,
        '{"v":1,"type":"query.result","data":{"query_id":3,"items":[{"name":"hosts"}],'
        '"done":true,"error":"x","code":"failed"}}',
    ),
    "query.cancel": (
        {"query_id": 3},
        None,
        None,
        '{"v":1,"type":"query.cancel","data":{"query_id":3}}',
    ),
    "query.more": (
        {"query_id": 3, "pages": 8},
        None,
        None,
        '{"v":1,"type":"query.more","data":{"query_id":3,"pages":8}}',
    ),
    "agent.upgrade": (
        {"version": "0.2.0", "sha256": "ab" * 32, "size": 923881, "deadline": 120},
        None,
        None,
        '{"v":1,"type":"agent.upgrade","data":{"version":"0.2.0","sha256":"'
        + "ab" * 32
        + '","size":923881,"deadline":120}}',
    ),
    "upgrade.result": (
        {"version": "0.2.0", "accepted": False, "code": "busy", "error": "job 7 is running"},
        None,
        None,
        '{"v":1,"type":"upgrade.result","data":{"version":"0.2.0","accepted":false,'
        '"code":"busy","error":"job 7 is running"}}',
    ),
    "ack": (
        {"seq": 6},
        None,
        None,
        '{"v":1,"type":"ack","data":{"seq":6}}',
    ),
    "error": (
        {"code": "bad_frame", "message": "data.token: required", "re": "e1"},
        None,
        None,
        '{"v":1,"type":"error","data":'
        '{"code":"bad_frame","message":"data.token: required","re":"e1"}}',
    ),
}

EXAMPLE_TYPES = sorted(EXAMPLES)


def example(type_):
    """A fresh deep copy of the example data of `type_` (tests mutate it)."""
    return json.loads(json.dumps(EXAMPLES[type_][0]))


def directions(type_):
    direction = WIRE_FIELDS[type_][0]
    return ("agent", "server") if direction == "both" else (direction,)


def raw_frame(type_, data, id="f1", seq=None, **top):
    """A frame as a peer would send it, built without the encoder."""
    frame = {"v": PROTOCOL_VERSION, "type": type_}
    if id is not None:
        frame["id"] = id
    if seq is not None:
        frame["seq"] = seq
    frame.update(top)
    frame["data"] = data
    return json.dumps(frame)


def refused(raw, expect="agent", code="bad_frame", **kw):
    """decode(raw) must raise ProtocolError with `code`; return the error."""
    with pytest.raises(ProtocolError) as info:
        decode(raw, expect=expect, **kw)
    assert info.value.code == code
    return info.value


# -- 1. wire shape ------------------------------------------------------------


def test_message_types_are_exactly_the_known_set():
    assert set(MESSAGES) == ALL_TYPES
    assert set(EXAMPLES) == ALL_TYPES
    assert set(WIRE_FIELDS) == ALL_TYPES


def test_reliable_types_are_exactly_the_known_set():
    assert set(RELIABLE) == RELIABLE_TYPES
    # every reliable frame is something the agent sends
    assert all(MESSAGES[t].direction == "agent" for t in RELIABLE)


def test_protocol_constants():
    assert PROTOCOL_VERSION == 1
    assert MAX_FRAME_BYTES == 1024 * 1024
    assert MAX_STR == 4096
    assert MAX_LINE == 65536
    assert protocol.MAX_ITEMS == 10_000


def test_wire_enumerations():
    assert protocol.JOB_KINDS == (
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
    assert protocol.JOB_STATUSES == (
        "queued",
        "dispatched",
        "running",
        "succeeded",
        "warning",
        "failed",
        "cancelled",
        "lost",
    )
    assert protocol.FINAL_STATUSES == ("succeeded", "warning", "failed", "cancelled", "lost")
    assert protocol.LOG_STREAMS == ("stdout", "stderr", "event")


@pytest.mark.parametrize("type_", sorted(ALL_TYPES))
def test_direction_and_field_names(type_):
    direction, required, optional = WIRE_FIELDS[type_]
    spec = MESSAGES[type_]
    assert spec.direction == direction
    assert tuple(f.name for f in spec.fields if f.required) == required
    assert tuple(f.name for f in spec.fields if not f.required) == optional


@pytest.mark.parametrize("type_, field_name", sorted(WIRE_ITEM_FIELDS))
def test_list_item_field_names(type_, field_name):
    required, optional = WIRE_ITEM_FIELDS[(type_, field_name)]
    (field,) = [f for f in MESSAGES[type_].fields if f.name == field_name]
    assert field.kind == "list[dict]"
    assert tuple(f.name for f in field.item if f.required) == required
    assert tuple(f.name for f in field.item if not f.required) == optional


def test_source_group_field_names():
    (schedules,) = [f for f in MESSAGES["schedule.set"].fields if f.name == "schedules"]
    (groups,) = [f for f in schedules.item if f.name == "source_groups"]
    assert groups.kind == "list[dict]"
    required, optional = WIRE_SOURCE_GROUP_FIELDS
    assert tuple(f.name for f in groups.item if f.required) == required
    assert tuple(f.name for f in groups.item if not f.required) == optional


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_example_uses_every_field(type_):
    # guards the examples themselves: each one shows every required and optional field
    _, required, optional = WIRE_FIELDS[type_]
    assert tuple(EXAMPLES[type_][0]) == required + optional


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_encode_exact_frame(type_):
    data, id_, seq, expected = EXAMPLES[type_]
    assert encode(type_, data, id=id_, seq=seq) == expected


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_encode_parsed_json_shape(type_):
    data, id_, seq, expected = EXAMPLES[type_]
    frame = json.loads(encode(type_, data, id=id_, seq=seq))
    want = {"v": 1, "type": type_, "data": data}
    if id_ is not None:
        want["id"] = id_
    if seq is not None:
        want["seq"] = seq
    assert frame == want
    assert json.loads(expected) == want


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_encode_with_only_required_fields(type_):
    _, required, optional = WIRE_FIELDS[type_]
    data = {k: v for k, v in example(type_).items() if k in required}
    frame = json.loads(encode(type_, data))
    assert frame == {"v": 1, "type": type_, "data": data}
    assert tuple(frame["data"]) == required


@pytest.mark.parametrize("type_", [t for t in EXAMPLE_TYPES if WIRE_FIELDS[t][2]])
def test_encode_drops_optional_fields_set_to_none(type_):
    _, required, optional = WIRE_FIELDS[type_]
    data = example(type_)
    for name in optional:
        data[name] = None
    assert tuple(json.loads(encode(type_, data))["data"]) == required


def test_encode_orders_fields_by_spec_not_by_input():
    data = {"hostname": "web-01", "token": "t"}
    assert (
        encode("enroll", data) == '{"v":1,"type":"enroll","data":{"token":"t","hostname":"web-01"}}'
    )


def test_encode_keeps_non_ascii_text_as_is():
    frame = encode("heartbeat", {"sent_at": "é"})
    assert frame == '{"v":1,"type":"heartbeat","data":{"sent_at":"é"}}'


def test_encode_drops_unknown_keys():
    frame = encode("command.cancel", {"job_id": 1, "extra": "x"})
    assert frame == '{"v":1,"type":"command.cancel","data":{"job_id":1}}'


def test_encode_refuses_unknown_type():
    with pytest.raises(ProtocolError, match="unknown message type 'job.exploded'") as info:
        encode("job.exploded", {})
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize(
    "type_, data, message",
    [
        ("enroll", {"token": "t"}, "hostname: required"),
        ("command.cancel", {"job_id": "42"}, "job_id: expected an integer"),
        ("command.run", {"job_id": 1, "kind": "explode"}, "kind: 'explode' is not one of"),
    ],
)
def test_encode_validates_data(type_, data, message):
    with pytest.raises(ProtocolError, match=message):
        encode(type_, data)


def test_envelope_to_json_and_defaults():
    env = Envelope("ack", {"seq": 3})
    assert env.v == PROTOCOL_VERSION
    assert env.id is None and env.seq is None
    assert env.to_json() == '{"v":1,"type":"ack","data":{"seq":3}}'
    assert Envelope("ack", {"seq": 3}, "a", 9).to_json() == (
        '{"v":1,"type":"ack","id":"a","seq":9,"data":{"seq":3}}'
    )


# -- 2. round trip ------------------------------------------------------------


@pytest.mark.parametrize(
    "type_, expect",
    [(t, d) for t in EXAMPLE_TYPES for d in directions(t)],
)
def test_round_trip(type_, expect):
    data, id_, seq, _ = EXAMPLES[type_]
    env = decode(encode(type_, data, id=id_, seq=seq), expect=expect)
    assert env == Envelope(type_, data, id_, seq, 1)


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_decode_without_expect_accepts_either_direction(type_):
    data, id_, seq, _ = EXAMPLES[type_]
    assert decode(encode(type_, data, id=id_, seq=seq)).data == data


def test_round_trip_error_frame_in_both_directions():
    raw = error_frame("bad_frame", "nope", re="x1")
    for expect in ("agent", "server"):
        env = decode(raw, expect=expect)
        assert env.type == "error"
        assert env.data == {"code": "bad_frame", "message": "nope", "re": "x1"}


def test_decode_stringifies_integer_frame_id():
    env = decode(raw_frame("heartbeat", {"sent_at": "t"}, id=7), expect="agent")
    assert env.id == "7"


@pytest.mark.parametrize("frame_id", [True, None, {"a": 1}, [1], 1.5])
def test_decode_ignores_unusable_frame_id(frame_id):
    env = decode(raw_frame("heartbeat", {"sent_at": "t"}, id=frame_id), expect="agent")
    assert env.id is None
    err = refused(raw_frame("heartbeat", {}, id=frame_id))
    assert err.re is None


def test_decode_drops_unknown_keys_at_every_level():
    data = example("schedule.set")
    data["future_field"] = 1
    data["schedules"][0]["colour"] = "blue"
    data["schedules"][0]["source_groups"][0]["weight"] = 3
    raw = raw_frame("schedule.set", data, future_top_level_key={"x": 1})
    env = decode(raw, expect="server")
    assert env.data == EXAMPLES["schedule.set"][0]


def test_decode_drops_optional_fields_sent_as_null():
    data = {"job_id": 1, "accepted": True, "error": None}
    env = decode(raw_frame("command.result", data), expect="agent")
    assert env.data == {"job_id": 1, "accepted": True}


def test_decode_accepts_seq_on_non_reliable_frames():
    env = decode(raw_frame("heartbeat", {"sent_at": "t"}, seq=9), expect="agent")
    assert env.seq == 9


def test_decode_respects_boundaries():
    # exactly at a limit is fine
    env = decode(raw_frame("enroll", {"token": "t", "hostname": "h" * 255}), expect="agent")
    assert len(env.data["hostname"]) == 255
    data = example("command.run")
    data["args"] = ["-v"] * 100
    assert len(decode(raw_frame("command.run", data), expect="server").data["args"]) == 100
    log = example("job.log")
    log["payload"] = "x" * MAX_LINE
    assert len(decode(raw_frame("job.log", log, seq=1), expect="agent").data["payload"]) == MAX_LINE
    assert decode(raw_frame("ack", {"seq": 0}), expect="server").data == {"seq": 0}


@pytest.mark.parametrize("value", [50, 0, 100, 12.5])
def test_float_field_accepts_int_and_float(value):
    data = example("job.progress")
    data["percent_done"] = value
    env = decode(raw_frame("job.progress", data), expect="agent")
    assert env.data["percent_done"] == value
    assert type(env.data["percent_done"]) is type(value)


@pytest.mark.parametrize("kind", protocol.JOB_KINDS)
def test_every_job_kind_accepted(kind):
    data = {"job_id": 1, "kind": kind}
    assert decode(raw_frame("command.run", data), expect="server").data["kind"] == kind


@pytest.mark.parametrize("status", protocol.FINAL_STATUSES)
def test_every_final_status_accepted(status):
    data = example("job.finished")
    data["status"] = status
    env = decode(raw_frame("job.finished", data, seq=1), expect="agent")
    assert env.data["status"] == status


@pytest.mark.parametrize("stream", protocol.LOG_STREAMS)
def test_every_log_stream_accepted(stream):
    data = example("job.log")
    data["stream"] = stream
    assert decode(raw_frame("job.log", data, seq=1), expect="agent").data["stream"] == stream


# -- 3. decoder refusals ------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{nope", "not JSON"),
        ("", "not JSON"),
        ('{"v":1,"type":"heartbeat"', "not JSON"),
        (b'{"v":1,"type":"heartbeat","data":{"sent_at":"t"}}', "binary frames are not accepted"),
        ('[{"v":1,"type":"heartbeat"}]', "frame must be a JSON object"),
        ("42", "frame must be a JSON object"),
        ('"hello"', "frame must be a JSON object"),
        ("null", "frame must be a JSON object"),
    ],
)
def test_unreadable_frames(raw, message):
    err = refused(raw)
    assert message in str(err)
    assert err.re is None


@pytest.mark.parametrize("v", [2, 0, "1", None, [1]])
def test_wrong_version(v):
    raw = json.dumps({"v": v, "type": "heartbeat", "id": "f1", "data": {"sent_at": "t"}})
    err = refused(raw, code="unsupported_version")
    assert "unsupported protocol version" in str(err)
    assert repr(v) in str(err)
    assert err.re == "f1"


def test_missing_version():
    err = refused(
        '{"type":"heartbeat","id":"f1","data":{"sent_at":"t"}}', code="unsupported_version"
    )
    assert str(err) == "unsupported protocol version None (this side speaks 1)"
    assert err.re == "f1"


@pytest.mark.parametrize("type_", ["job.exploded", "", "HELLO", 5, None])
def test_unknown_type(type_):
    err = refused(raw_frame(type_, {}))
    assert str(err) == f"unknown message type {type_!r}"
    assert err.re == "f1"


def test_missing_type():
    err = refused('{"v":1,"id":"f1","data":{}}')
    assert str(err) == "unknown message type None"
    assert err.re == "f1"


@pytest.mark.parametrize(
    "type_, expect",
    [(t, "server") for t in sorted(ALL_TYPES) if WIRE_FIELDS[t][0] == "agent"]
    + [(t, "agent") for t in sorted(ALL_TYPES) if WIRE_FIELDS[t][0] == "server"],
)
def test_wrong_direction(type_, expect):
    data, _, seq, _ = EXAMPLES[type_]
    err = refused(raw_frame(type_, data, seq=seq or 1), expect=expect)
    assert str(err) == f"{type_} is not sent by the {expect}"
    assert err.re == "f1"


@pytest.mark.parametrize("type_", EXAMPLE_TYPES)
def test_each_required_field_is_required(type_):
    _, required, _ = WIRE_FIELDS[type_]
    for name in required:
        for missing in ("absent", "null"):
            data = example(type_)
            if missing == "absent":
                del data[name]
            else:
                data[name] = None
            err = refused(raw_frame(type_, data, seq=1), expect=directions(type_)[0])
            assert str(err) == f"data.{name}: required"
            assert err.re == "f1"


def test_missing_data_object():
    err = refused('{"v":1,"type":"heartbeat","id":"f1"}')
    assert str(err) == "data.sent_at: required"
    assert err.re == "f1"


@pytest.mark.parametrize("data", [[], "x", 1, True])
def test_data_must_be_an_object(data):
    err = refused(raw_frame("heartbeat", data))
    assert str(err) == "data: expected an object"
    assert err.re == "f1"


@pytest.mark.parametrize(
    "type_, name, value, message",
    [
        # int fields
        ("command.cancel", "job_id", "42", "expected an integer"),
        ("command.cancel", "job_id", True, "expected an integer"),
        ("command.cancel", "job_id", False, "expected an integer"),
        ("command.cancel", "job_id", 42.0, "expected an integer"),
        ("command.cancel", "job_id", [42], "expected an integer"),
        ("command.cancel", "job_id", 2**63, "out of range"),
        ("command.cancel", "job_id", -(2**63), "out of range"),
        ("welcome", "heartbeat_interval", 0, "must be at least 1"),
        ("job.progress", "files_done", -1, "must be at least 0"),
        ("ack", "seq", -1, "must be at least 0"),
        ("job.log", "seq", 0, "must be at least 1"),
        # float fields
        ("job.progress", "percent_done", "50", "expected a finite number"),
        ("job.progress", "percent_done", True, "expected a finite number"),
        ("job.progress", "percent_done", {}, "expected a finite number"),
        # bool fields
        ("command.result", "accepted", 1, "expected true or false"),
        ("command.result", "accepted", "true", "expected true or false"),
        # str fields
        ("heartbeat", "sent_at", 5, "expected a string"),
        ("heartbeat", "sent_at", ["t"], "expected a string"),
        ("command.result", "error", False, "expected a string"),
        ("command.result", "code", 7, "expected a string"),
        # dict fields
        ("command.run", "retention", "keep-last=3", "expected an object"),
        ("job.finished", "summary", [], "expected an object"),
        ("config.update", "repo_env", ["A=1"], "expected an object"),
        # list fields
        ("command.run", "includes", "/etc", "expected a list"),
        ("command.run", "args", {"-v": 1}, "expected a list"),
        ("schedule.set", "schedules", {}, "expected a list"),
        ("welcome", "urls", "ws://a:1", "expected a list"),
    ],
)
def test_wrong_field_type(type_, name, value, message):
    data = example(type_)
    data[name] = value
    err = refused(raw_frame(type_, data, seq=1), expect=directions(type_)[0])
    assert str(err) == f"data.{name}: {message}"
    assert err.re == "f1"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("includes", ["/etc", 5], "data.includes[1]: expected a string"),
        ("excludes", [None], "data.excludes[0]: expected a string"),
        ("args", ["x" * (MAX_STR + 1)], f"data.args[0]: longer than {MAX_STR} characters"),
    ],
)
def test_list_of_strings_items_checked(name, value, message):
    data = example("command.run")
    data[name] = value
    err = refused(raw_frame("command.run", data), expect="server")
    assert str(err) == message
    assert err.re == "f1"


@pytest.mark.parametrize(
    "value, message",
    [
        (["ws://a:1", 5], "data.urls[1]: expected a string"),
        (["ws://" + "a" * 2044], "data.urls[0]: longer than 2048 characters"),
        ([f"ws://h{i}:1" for i in range(17)], "data.urls: more than 16 items"),
    ],
)
def test_welcome_urls_are_bounded(value, message):
    data = example("welcome")
    data["urls"] = value
    err = refused(raw_frame("welcome", data), expect="server")
    assert str(err) == message
    data["urls"] = value[:16] if len(value) > 16 else ["ws://" + "a" * 2043]
    assert decode(raw_frame("welcome", data), expect="server").data["urls"] == data["urls"]


@pytest.mark.parametrize(
    "type_, name, limit",
    [
        ("enroll", "hostname", 255),
        ("enroll", "token", 1024),
        ("hello", "agent_version", 64),
        ("config.update", "repo_url", 2048),
        ("command.run", "group", 64),
        ("command.result", "error", MAX_STR),  # no explicit limit: the default
        ("job.log", "payload", MAX_LINE),
        ("job.finished", "error", MAX_LINE),
        ("error", "code", 64),
    ],
)
def test_string_over_its_limit(type_, name, limit):
    data = example(type_)
    data[name] = "x" * limit
    decode(raw_frame(type_, data, seq=1), expect=directions(type_)[0])  # at the limit: fine
    data[name] = "x" * (limit + 1)
    err = refused(raw_frame(type_, data, seq=1), expect=directions(type_)[0])
    assert str(err) == f"data.{name}: longer than {limit} characters"
    assert err.re == "f1"


def test_string_limit_counts_characters_not_bytes():
    data = {"token": "t", "hostname": "é" * 255}
    assert decode(raw_frame("enroll", data), expect="agent").data == data


@pytest.mark.parametrize(
    "type_, name, limit",
    [
        ("command.run", "args", 100),
        ("command.run", "includes", 1000),
        ("schedule.set", "schedules", 1000),
    ],
)
def test_list_over_its_limit(type_, name, limit):
    data = example(type_)
    item = data[name][0]
    data[name] = [item] * (limit + 1)
    err = refused(raw_frame(type_, data), expect="server")
    assert str(err) == f"data.{name}: more than {limit} items"
    assert err.re == "f1"


def test_list_default_limit_is_max_items():
    data = example("snapshots.report")
    data["snapshots"][0]["paths"] = ["/p"] * (protocol.MAX_ITEMS + 1)
    err = refused(raw_frame("snapshots.report", data, seq=1))
    assert str(err) == "data.snapshots[0].paths: more than 10000 items"
    data["snapshots"][0]["paths"] = ["/p"] * protocol.MAX_ITEMS
    env = decode(raw_frame("snapshots.report", data, seq=1), expect="agent")
    assert len(env.data["snapshots"][0]["paths"]) == protocol.MAX_ITEMS


@pytest.mark.parametrize(
    "type_, name, value, allowed",
    [
        ("command.run", "kind", "destroy", protocol.JOB_KINDS),
        ("command.run", "kind", "Backup", protocol.JOB_KINDS),
        ("job.started", "kind", "explode", protocol.JOB_KINDS),
        ("job.finished", "status", "running", protocol.FINAL_STATUSES),
        ("job.finished", "status", "queued", protocol.FINAL_STATUSES),
        ("job.log", "stream", "stdin", protocol.LOG_STREAMS),
        ("repo.stats", "lock_state", "maybe", ("locked", "unlocked")),
    ],
)
def test_choices_violated(type_, name, value, allowed):
    data = example(type_)
    data[name] = value
    err = refused(raw_frame(type_, data, seq=1), expect=directions(type_)[0])
    assert str(err) == f"data.{name}: {value!r} is not one of {', '.join(allowed)}"
    assert err.re == "f1"


def _schedule_set_with_two_groups():
    data = example("schedule.set")
    groups = data["schedules"][0]["source_groups"]
    groups.append(dict(groups[0], id=11, name="home"))
    return data


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["schedules"][0]["source_groups"][1].pop("name"),
            "data.schedules[0].source_groups[1].name: required",
        ),
        (
            lambda d: d["schedules"][0]["source_groups"][1].update(id="11"),
            "data.schedules[0].source_groups[1].id: expected an integer",
        ),
        (
            lambda d: d["schedules"][0]["source_groups"][0].update(includes=["/etc", 3]),
            "data.schedules[0].source_groups[0].includes[1]: expected a string",
        ),
        (
            lambda d: d["schedules"][0]["source_groups"][1].update(name="n" * 65),
            "data.schedules[0].source_groups[1].name: longer than 64 characters",
        ),
        (
            lambda d: d["schedules"][0]["source_groups"][0].update(retention=[7]),
            "data.schedules[0].source_groups[0].retention: expected an object",
        ),
        (
            lambda d: d["schedules"][0]["source_groups"].__setitem__(1, "home"),
            "data.schedules[0].source_groups[1]: expected an object",
        ),
        (
            lambda d: d["schedules"][0].update(enabled="yes"),
            "data.schedules[0].enabled: expected true or false",
        ),
        (
            lambda d: d["schedules"][0].update(cron="*" * 257),
            "data.schedules[0].cron: longer than 256 characters",
        ),
        (
            lambda d: d["schedules"].append(None),
            "data.schedules[1]: expected an object",
        ),
    ],
)
def test_nested_list_items_validated_with_path(mutate, message):
    data = _schedule_set_with_two_groups()
    decode(raw_frame("schedule.set", data), expect="server")  # valid before the change
    mutate(data)
    err = refused(raw_frame("schedule.set", data), expect="server")
    assert str(err) == message
    assert err.re == "f1"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("paths"), "data.snapshots[0].paths: required"),
        (lambda s: s.update(size_bytes=-1), "data.snapshots[0].size_bytes: must be at least 0"),
        (lambda s: s.update(tags="daily"), "data.snapshots[0].tags: expected a list"),
        (lambda s: s.update(id="i" * 129), "data.snapshots[0].id: longer than 128 characters"),
    ],
)
def test_snapshot_items_validated_with_path(mutate, message):
    data = example("snapshots.report")
    mutate(data["snapshots"][0])
    err = refused(raw_frame("snapshots.report", data, seq=1))
    assert str(err) == message
    assert err.re == "f1"


@pytest.mark.parametrize("value", [1, None, True, ["x"], {"a": "b"}])
def test_string_map_refuses_non_string_value(value):
    data = example("config.update")
    data["repo_env"] = {"GOOD": "ok", "BAD": value}
    err = refused(raw_frame("config.update", data), expect="server")
    assert str(err) == "data.repo_env.BAD: expected a string"
    assert err.re == "f1"


def test_string_map_refuses_overlong_value():
    data = example("config.update")
    data["repo_env"] = {"BIG": "x" * (MAX_STR + 1)}
    err = refused(raw_frame("config.update", data), expect="server")
    assert str(err).startswith("data.repo_env.BIG: ")


def test_string_map_entry_limit():
    data = example("config.update")
    data["repo_env"] = {f"K{i}": "v" for i in range(100)}
    assert len(decode(raw_frame("config.update", data), expect="server").data["repo_env"]) == 100
    data["repo_env"] = {f"K{i}": "v" for i in range(101)}
    err = refused(raw_frame("config.update", data), expect="server")
    assert str(err) == "data.repo_env: too many entries"


def test_frame_over_max_frame_bytes_refused_unread():
    # not even valid JSON: the size check comes first
    err = refused("{" * (MAX_FRAME_BYTES + 1))
    assert str(err) == f"frame larger than {MAX_FRAME_BYTES} bytes"
    assert err.re is None


def test_frame_at_max_frame_bytes_accepted():
    head = raw_frame("heartbeat", {"sent_at": "t"}, pad="")
    pad = "x" * (MAX_FRAME_BYTES - len(head))
    raw = raw_frame("heartbeat", {"sent_at": "t"}, pad=pad)
    assert len(raw) == MAX_FRAME_BYTES
    assert decode(raw, expect="agent").data == {"sent_at": "t"}
    err = refused(raw_frame("heartbeat", {"sent_at": "t"}, pad=pad + "x"))
    assert "larger than" in str(err)


def test_decode_custom_limit():
    raw = raw_frame("heartbeat", {"sent_at": "t"})
    assert decode(raw, limit=len(raw)).type == "heartbeat"
    err = refused(raw, limit=len(raw) - 1)
    assert str(err) == f"frame larger than {len(raw) - 1} bytes"


@pytest.mark.parametrize("type_", sorted(RELIABLE_TYPES))
def test_reliable_frame_from_agent_needs_seq(type_):
    data, id_, _, _ = EXAMPLES[type_]
    err = refused(encode(type_, data, id="f1"), expect="agent")
    assert str(err) == f"{type_} must carry a seq"
    assert err.re == "f1"
    # the same frame with a seq is fine
    assert decode(encode(type_, data, id="f1", seq=1), expect="agent").seq == 1


@pytest.mark.parametrize("seq", [0, -1, "3", 1.5, 2.0, True, False, [1], {}])
def test_bad_seq(seq):
    err = refused(raw_frame("job.log", example("job.log"), seq=seq))
    assert str(err) == "seq: expected a positive integer"
    assert err.re == "f1"


def test_null_seq_counts_as_absent():
    frame = {"v": 1, "type": "job.log", "id": "f1", "seq": None, "data": example("job.log")}
    err = refused(json.dumps(frame))
    assert str(err) == "job.log must carry a seq"


def test_protocol_error_defaults():
    err = ProtocolError("boom")
    assert isinstance(err, ValueError)
    assert err.code == "bad_frame"
    assert err.re is None
    assert str(err) == "boom"
    err = ProtocolError("old", code="unsupported_version", re="x")
    assert (err.code, err.re) == ("unsupported_version", "x")


# -- 4. operator channel -------------------------------------------------------


@pytest.mark.parametrize(
    "raw, want",
    [
        (
            '{"id": 7, "method": "hosts.list", "params": {"all": true}}',
            Request(7, "hosts.list", {"all": True}),
        ),
        ('{"id": "abc", "method": "jobs.tail", "params": {}}', Request("abc", "jobs.tail", {})),
        ('{"id": 0, "method": "hosts.list"}', Request(0, "hosts.list", {})),
        ('{"id": 1, "method": "hosts.list", "params": null}', Request(1, "hosts.list", {})),
        ('{"id": 1, "method": "' + "m" * 64 + '"}', Request(1, "m" * 64, {})),
        ('{"id": 1, "method": "x", "extra": 5}', Request(1, "x", {})),
    ],
)
def test_decode_request_valid(raw, want):
    req = decode_request(raw)
    assert req == want
    assert type(req.id) is type(want.id)


@pytest.mark.parametrize(
    "raw",
    [
        '{"method": "hosts.list"}',
        '{"id": null, "method": "hosts.list"}',
        '{"id": true, "method": "hosts.list"}',
        '{"id": 1.5, "method": "hosts.list"}',
        '{"id": [1], "method": "hosts.list"}',
        '{"id": {}, "method": "hosts.list"}',
    ],
)
def test_decode_request_bad_id(raw):
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert str(info.value) == "id: expected an integer or a string"
    assert info.value.code == "bad_frame"
    assert info.value.re is None


@pytest.mark.parametrize(
    "method",
    ["<absent>", None, "", 5, ["hosts.list"], "m" * 65],
)
def test_decode_request_bad_method(method):
    frame = {"id": 7}
    if method != "<absent>":
        frame["method"] = method
    with pytest.raises(ProtocolError) as info:
        decode_request(json.dumps(frame))
    assert str(info.value) == "method: expected a method name"
    assert info.value.code == "bad_frame"
    assert info.value.re == 7


@pytest.mark.parametrize("params", [[], "x", 1, True])
def test_decode_request_params_not_an_object(params):
    raw = json.dumps({"id": "r1", "method": "hosts.list", "params": params})
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert str(info.value) == "params: expected an object"
    assert info.value.code == "bad_frame"
    assert info.value.re == "r1"


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{nope", "not JSON"),
        (b'{"id": 1, "method": "x"}', "binary frames are not accepted"),
        ('[{"id": 1, "method": "x"}]', "request must be a JSON object"),
        ("7", "request must be a JSON object"),
    ],
)
def test_decode_request_unreadable(raw, message):
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert message in str(info.value)
    assert info.value.code == "bad_frame"
    assert info.value.re is None


def test_decode_request_size_limit():
    raw = '{"id": 1, "method": "hosts.list"}'
    assert decode_request(raw, limit=len(raw)).method == "hosts.list"
    with pytest.raises(ProtocolError, match=f"frame larger than {len(raw) - 1} bytes"):
        decode_request(raw, limit=len(raw) - 1)
    with pytest.raises(ProtocolError, match=f"frame larger than {MAX_FRAME_BYTES} bytes"):
        decode_request(" " * (MAX_FRAME_BYTES + 1))


def test_result_frame_shape():
    assert result_frame(7, {"hosts": [{"id": 1, "name": "web-01"}]}) == (
        '{"id": 7, "result": {"hosts": [{"id": 1, "name": "web-01"}]}}'
    )
    assert result_frame("r1", None) == '{"id": "r1", "result": null}'
    assert result_frame(1, "café") == '{"id": 1, "result": "café"}'


def test_event_frame_shape():
    assert event_frame(7, {"line": "naïve", "seq": 3}) == (
        '{"id": 7, "event": {"line": "naïve", "seq": 3}}'
    )
    assert event_frame("r1", []) == '{"id": "r1", "event": []}'


def test_request_error_frame_shape():
    assert request_error_frame(7, "not_found", "no host named web-09") == (
        '{"id": 7, "error": {"code": "not_found", "message": "no host named web-09"}}'
    )
    assert request_error_frame(None, "bad_frame", "é") == (
        '{"id": null, "error": {"code": "bad_frame", "message": "é"}}'
    )


def test_error_frame_shape():
    assert error_frame("bad_frame", "data.token: required", re="e1") == (
        '{"v":1,"type":"error","data":'
        '{"code":"bad_frame","message":"data.token: required","re":"e1"}}'
    )
    assert error_frame("unsupported_version", "speak v1") == (
        '{"v":1,"type":"error","data":{"code":"unsupported_version","message":"speak v1"}}'
    )


def test_error_frame_truncates_message():
    frame = json.loads(error_frame("bad_frame", "m" * (MAX_STR + 100)))
    assert frame["data"]["message"] == "m" * MAX_STR
    assert decode(error_frame("bad_frame", "m" * (MAX_STR + 100)), expect="agent").type == "error"


def test_error_frame_answers_a_refused_frame():
    # what fleetd does with a bad frame: decode, catch, answer with error_frame
    with pytest.raises(ProtocolError) as info:
        decode(raw_frame("enroll", {"token": "t"}, id="e1"), expect="agent")
    err = info.value
    env = decode(error_frame(err.code, str(err), err.re), expect="agent")
    assert env.data == {"code": "bad_frame", "message": "data.hostname: required", "re": "e1"}


# -- 5. stdlib only, Python 3.9 -----------------------------------------------


def test_protocol_imports_only_stdlib():
    source = Path(protocol.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "protocol.py must not import from its package"
            imported.add(node.module.split(".")[0])
    assert imported, "found no imports at all: the check is broken"
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


PY39 = sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"))


@pytest.mark.skipif(not PY39, reason="no Python 3.9 interpreter under /root/.pyenv")
def test_protocol_imports_and_works_on_bare_python39():
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fleet.common.protocol as p; "
        "assert sys.version_info[:2] == (3, 9), sys.version; "
        "raw = p.encode('job.log', {'job_id': 1, 'seq': 1, 'ts': 't', 'stream': 'stdout', "
        "'payload': 'x'}, seq=1); "
        "print(p.decode(raw, expect='agent').data['payload'])"
    )
    # -I: ignore PYTHON* variables and user site; -S: no site-packages at all
    proc = subprocess.run(
        [PY39[-1], "-I", "-S", "-c", script, str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "x\n"


# -- regressions: bugs the first version of protocol.py had -----------------------


@pytest.mark.parametrize("v", [True, 1.0])
def test_regression_version_must_be_the_integer_1(v):
    raw = json.dumps({"v": v, "type": "heartbeat", "id": "f1", "data": {"sent_at": "t"}})
    refused(raw, code="unsupported_version")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_regression_encode_emits_non_json_for_nan(value):
    data = example("job.progress")
    data["percent_done"] = value
    with pytest.raises(ProtocolError):
        encode("job.progress", data)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_regression_decode_accepts_nan_literals(literal):
    raw = raw_frame("job.progress", example("job.progress")).replace("0.5", literal)
    assert literal in raw
    refused(raw)


def test_regression_error_frame_for_long_frame_id_is_undecodable():
    with pytest.raises(ProtocolError) as info:
        decode(raw_frame("enroll", {"token": "t"}, id="i" * (MAX_STR + 1)), expect="agent")
    err = info.value
    env = decode(error_frame(err.code, str(err), err.re), expect="agent")
    assert env.type == "error"


def test_regression_encode_string_map_with_non_string_key():
    data = example("config.update")
    data["repo_env"] = {1: "x"}
    with pytest.raises(ProtocolError):
        encode("config.update", data)


def test_regression_frame_limit_counts_bytes():
    raw = json.dumps(
        {"v": 1, "type": "heartbeat", "data": {"sent_at": "é" * 50}}, ensure_ascii=False
    )
    limit = len(raw) + 10  # more characters than the frame has, fewer bytes
    assert len(raw.encode("utf-8")) > limit
    err = refused(raw, limit=limit)
    assert "larger than" in str(err)


def test_a_result_encoded_ahead_is_spliced_in_as_the_same_json():
    from fleet.common.protocol import Encoded, result_frame

    hosts = [{"name": "web-01", "status": "online"}, {"name": "café", "status": "pending"}]
    spliced = result_frame(7, Encoded(json.dumps(hosts, ensure_ascii=False)))
    assert spliced == result_frame(7, hosts)
    assert json.loads(result_frame("a-1", Encoded("[]"))) == {"id": "a-1", "result": []}


# -- enrollment strings ---------------------------------------------------------


ENROLLMENTS = [
    # (format_enrollment's arguments, the document parse_enrollment answers, URLs to dial)
    (("ws://f:8433", "tok"), {"url": "ws://f:8433", "token": "tok"}, ["ws://f:8433"]),
    (
        ("wss://f:8433", "tok", "ab" * 32, ["c" * 64]),
        {"url": "wss://f:8433", "token": "tok", "sha256": "ab" * 32, "pins": ["c" * 64]},
        ["wss://f:8433"],
    ),
    # one URL given as a list: the string is the one it always was
    (
        ("ws://f:8433", "tok", None, None, ["ws://f:8433"]),
        {"url": "ws://f:8433", "token": "tok"},
        ["ws://f:8433"],
    ),
    (
        ("wss://a:8433", "tok", None, ["c" * 64], ["wss://a:8433", "wss://b:8433", "wss://c/x/"]),
        {
            "url": "wss://a:8433",
            "token": "tok",
            "pins": ["c" * 64],
            "urls": ["wss://a:8433", "wss://b:8433", "wss://c/x"],
        },
        ["wss://a:8433", "wss://b:8433", "wss://c/x"],
    ),
    # `url` not among `urls` (a hand-made string): dialled first all the same
    (
        ("ws://lb:8433", "tok", None, None, ["ws://a:1", "ws://b:1", "ws://a:1"]),
        {"url": "ws://lb:8433", "token": "tok", "urls": ["ws://a:1", "ws://b:1"]},
        ["ws://lb:8433", "ws://a:1", "ws://b:1"],
    ),
]


@pytest.mark.parametrize("args, doc, dial", ENROLLMENTS)
def test_enrollment_round_trip(args, doc, dial):
    string = protocol.format_enrollment(*args)
    assert string.startswith("fleet1:")
    assert protocol.parse_enrollment(string) == doc
    assert protocol.enrollment_urls(protocol.parse_enrollment(string)) == dial


def test_an_enrollment_string_with_one_url_is_unchanged_by_replicas():
    # what fleetd printed before replicas, byte for byte
    old = base64.urlsafe_b64encode(b'{"url":"ws://f:8433","token":"tok"}').decode().rstrip("=")
    assert protocol.format_enrollment("ws://f:8433", "tok", urls=["ws://f:8433"]) == "fleet1:" + old
    assert protocol.format_enrollment("ws://f:8433", "tok") == "fleet1:" + old


def _enrollment_doc(doc: dict) -> str:
    raw = json.dumps(doc).encode()
    return "fleet1:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "urls, message",
    [
        (["http://a:1"], "is not a ws:// or wss:// URL"),
        (["ws://a:1", "https://b"], "is not a ws:// or wss:// URL"),
        (["ws://"], "is not a ws:// or wss:// URL"),
        (["ws:///path"], "is not a ws:// or wss:// URL"),
        (["a:8433"], "is not a ws:// or wss:// URL"),
        (["ws://a b"], "is not a ws:// or wss:// URL"),
        (["ws://a,ws://b"], "is not a ws:// or wss:// URL"),
        (["ws://a\n"], "is not a ws:// or wss:// URL"),
        ([5], "expected a string"),
        ("ws://a", "expected a list"),
        (["ws://" + "a" * 2044], "longer than 2048 characters"),
        ([f"ws://h{i}" for i in range(17)], "more than 16 items"),
    ],
)
def test_enrollment_urls_are_checked(urls, message):
    with pytest.raises(ProtocolError, match=message) as err:
        protocol.parse_enrollment(_enrollment_doc({"url": "ws://a", "token": "t", "urls": urls}))
    assert "enrollment.urls" in str(err.value)


def test_enrollment_with_every_url_at_its_bound_fits():
    urls = [f"wss://{i:02d}" + "a" * (2048 - 8) for i in range(16)]
    assert all(len(u) == 2048 for u in urls)
    string = protocol.format_enrollment(urls[0], "t" * 1024, "ab" * 32, ["c" * 64] * 8, urls)
    assert len(string) < 128 * 1024  # one command-line argument holds it
    assert protocol.parse_enrollment(string)["urls"] == urls


@pytest.mark.parametrize(
    "urls, kept",
    [
        (["ws://a/", "ws://a", "wss://a"], ["ws://a", "wss://a"]),
        ([], []),
    ],
)
def test_check_server_urls(urls, kept):
    assert protocol.check_server_urls(urls) == kept
