"""fleetctl's --json output against man/fleetctl.1's JSON OUTPUT section:
each command runs once against a real fleetd holding a little of
everything (a raw socket stands in for the agent), and every object it
prints must have exactly the documented fields, of the documented types. A
new field, a rename or a type change fails here until the man page says it.
(ls, find and diff need a real restic: tests/e2e/test_browse.py checks them.)"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import zipfile

import pytest

from fleet.common import protocol

HOST, OTHER, GROUP, REPO, SECOND = "jweb", "jdb", "etc", "jmain", "jsecond"


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Agent:
    """Just enough of an agent: takes commands, reports, waits for acks."""

    def __init__(self, ws):
        self.ws = ws
        self.seq = itertools.count(1)
        self.pending = []

    def next_of(self, kind, timeout=10):
        for i, frame in enumerate(self.pending):
            if frame["type"] == kind:
                return self.pending.pop(i)
        while True:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if frame["type"] == kind:
                return frame
            self.pending.append(frame)

    def report(self, kind, data):
        seq = next(self.seq)
        self.ws.send(protocol.encode(kind, data, seq=seq))
        while self.next_of("ack")["data"]["seq"] < seq:
            pass

    def backup(self, end=None):
        """Take the next backup command and start it; end it as `end` says
        (None: leave it running)."""
        job_id = self.next_of("command.run")["data"]["job_id"]
        self.ws.send(protocol.encode("command.result", {"job_id": job_id, "accepted": True}))
        self.report("job.started", {"job_id": job_id, "kind": "backup", "started_at": stamp()})
        line = {"job_id": job_id, "seq": 1, "ts": stamp(), "stream": "stdout", "payload": "hi"}
        self.report("job.log", line)
        if end == "succeeded":
            summary = {"snapshot_id": "a" * 64, "data_added": 4096}
            done = {"status": "succeeded", "exit_code": 0, "summary": summary}
        elif end == "failed":
            done = {"status": "failed", "exit_code": 1, "error": "Fatal: wrong password"}
        else:
            return job_id
        self.report("job.finished", {"job_id": job_id, "finished_at": stamp(), **done})
        return job_id


@pytest.fixture(scope="module")
def printed(fx, tmp_path_factory):
    """What each command printed with --json, by its arguments."""
    # its own fleetd: alerts looked for every 0.2 s, not a minute, and an
    # agent file to serve (enroll --install)
    pyz = tmp_path_factory.mktemp("pyz") / "fleet-agent.pyz"
    with zipfile.ZipFile(pyz, "w") as zf:
        zf.writestr("__main__.py", "print('not a real agent')\n")
        zf.writestr("site-packages/fleet/__init__.py", '__version__ = "9.9.9"\n')
    fleet = fx.start_fleet(
        tmp_path_factory.mktemp("fleet"), "--alert-interval", "0.2", "--agent-pyz", str(pyz)
    )
    try:
        yield collect(fleet, fx, tmp_path_factory.mktemp("json") / "pw")
    finally:
        fx.stop_and_check(fleet.fleetd)


def collect(fleet, fx, pw):
    out = {}

    def j(*args, expect=0, ndjson=False):
        text = fleet.ctl(*args, "--json", expect=expect).stdout
        out[args] = [json.loads(x) for x in text.splitlines()] if ndjson else json.loads(text)
        return out[args]

    pw.write_text("a repository password")
    j("repos", "create", REPO, "--url", f"/srv/{REPO}", "--password-file", pw)
    j("repos", "create", SECOND, "--url", f"/srv/{SECOND}", "--password-file", pw)
    j("enroll", OTHER)
    j("enroll", fx.uniq("inst"), "--install")
    token = fx.enroll_agent(fleet, HOST, hostname=HOST)["agent_token"]
    j("repos", "use", REPO, HOST)
    j("repos", "attach", SECOND, HOST)
    j("repos", "detach", SECOND, HOST)
    j("repo", "set", OTHER, "--url", "/srv/other", "--password-file", pw)
    j("groups", "create", HOST, GROUP, "--include", "/etc", "--keep-daily", "7")
    j("groups", "edit", HOST, GROUP, "--keep-daily", "8")
    j("schedules", "create", HOST, "--cron", "0 * * * *", "--group", GROUP, "--name", "hourly")
    j("schedules", "disable", HOST, "hourly")
    j("schedules", "enable", HOST, "hourly")
    j("hosts", "label", HOST, "env=json")
    spec = pw.parent / "spec.json"
    spec.write_text(json.dumps({"groups": {"tg": {"includes": ["/srv"]}}}))
    j("templates", "set", "jt", "--selector", "env=json", "-f", spec)
    j("templates", "apply", "jt")
    j("maintenance", "set", REPO, "--prune", "0 3 * * 0")
    j("tokens", "create", fx.uniq("t"))
    j("notify", "add", "jnote", "json://localhost/hook")
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        agent = Agent(ws)
        ws.send(fx.agent_hello(hostname=HOST))
        agent.next_of("welcome")
        ok = j("run", HOST, GROUP)["id"]
        agent.backup("succeeded")
        fleet.ctl("run", HOST, GROUP)
        agent.backup("failed")
        snap = {"id": "a" * 64, "short_id": "a" * 8, "time": stamp(), "hostname": HOST}
        snap.update(paths=["/etc"], tags=[GROUP], size_bytes=1234, file_count=5)
        agent.report("snapshots.report", {"snapshots": [snap], "report_at": stamp(), "last": True})
        agent.report("repo.stats", {"size_bytes": 1234, "snapshot_count": 1, "raw_size_bytes": 600})
        fleet.ctl("run", HOST, GROUP)
        agent.backup()  # left running
        j("run", "--selector", "env=json", GROUP)  # queued behind it
        fx.wait_until(lambda: fleet.rpc("alerts.list"), timeout=10, what="the failure's alert")
        for args in (
            ("whoami",),
            ("hosts", "list"),
            ("hosts", "show", HOST),
            ("repos", "list"),
            ("repos", "show", REPO),
            ("repo", "show", HOST),
            ("groups", "list", HOST),
            ("groups", "show", HOST, GROUP),
            ("schedules", "list", HOST),
            ("schedules", "show", HOST, "hourly"),
            ("jobs", "list"),
            ("jobs", "show", ok),
            ("snapshots", HOST),
            ("maintenance", "show", REPO),
            ("users", "list"),
            ("tokens", "list"),
            ("audit",),
            ("alerts", "list"),
            ("notify", "list"),
            ("templates", "list"),
            ("templates", "show", "jt"),
            ("agents", "list"),
        ):
            j(*args)
        j("jobs", "log", ok, ndjson=True)
        j("status", expect=2)
        j("maintenance", "run", REPO, "prune")
        j("hosts", "show", "no-such-host", expect=4)
        j("templates", "delete", "jt")
    return out


# (arguments, documented object, where in what they printed: a path of keys)
CHECKS = [
    (("whoami",), "whoami", ()),
    (("enroll", OTHER), "enrollment", ()),
    (("enroll", "--install"), "enrollment", ()),
    (("hosts", "list"), "host", ()),
    (("hosts", "show", HOST), "host", ()),
    (("hosts", "show", HOST), "repository stats", ("repo_stats",)),
    (("hosts", "label", HOST, "env=json"), "labels", ()),
    (("hosts", "label", HOST, "env=json"), "template outcome", ("templates",)),
    (("templates", "set", "jt"), "template change", ()),
    (("templates", "set", "jt"), "template outcome", ("hosts",)),
    (("templates", "apply", "jt"), "template change", ()),
    (("templates", "delete", "jt"), "template change", ()),
    (("templates", "list"), "template", ()),
    (("agents", "list"), "agent versions", ()),
    (("agents", "list"), "agent version", ("agents",)),
    (("templates", "show", "jt"), "template", ()),
    (("repos", "create", REPO, "--url", f"/srv/{REPO}"), "repository", ()),
    (("repos", "list"), "repository", ()),
    (("repos", "show", REPO), "repository", ()),
    (("repos", "use", REPO, HOST), "repository", ()),
    (("repos", "attach", SECOND, HOST), "repository", ()),
    (("repos", "detach", SECOND, HOST), "repository", ()),
    (("repo", "show", HOST), "repository", ()),
    (("repo", "set", OTHER, "--url", "/srv/other"), "repository", ()),
    (("groups", "create", HOST, GROUP), "group", ()),
    (("groups", "edit", HOST, GROUP), "group", ()),
    (("groups", "list", HOST), "group", ()),
    (("groups", "show", HOST, GROUP), "group", ()),
    (("schedules", "create", HOST), "schedule", ()),
    (("schedules", "disable", HOST, "hourly"), "schedule", ()),
    (("schedules", "enable", HOST, "hourly"), "schedule", ()),
    (("schedules", "list", HOST), "schedule", ()),
    (("schedules", "show", HOST, "hourly"), "schedule", ()),
    (("run", HOST, GROUP), "job", ()),
    (("run", "--selector", "env=json", GROUP), "selected run", ()),
    (("run", "--selector", "env=json", GROUP), "job", ("jobs",)),
    (("jobs", "list"), "job", ()),
    (("jobs", "show"), "job", ()),
    (("jobs", "log"), "log line", ()),
    (("snapshots", HOST), "snapshot", ()),
    (("maintenance", "show", REPO), "maintenance", ()),
    (("maintenance", "set", REPO), "maintenance", ()),
    (("maintenance", "run", REPO, "prune"), "maintenance run", ()),
    (("users", "list"), "user", ()),
    (("tokens", "create"), "new token", ()),
    (("tokens", "list"), "token", ()),
    (("audit",), "audit entry", ()),
    (("alerts", "list"), "alert", ()),
    (("notify", "add", "jnote"), "notification target", ()),
    (("notify", "list"), "notification target", ()),
    (("status",), "status", ()),
    (("status",), "status host", ("hosts",)),
    (("status",), "status group", ("hosts", "groups")),
    (("status",), "status repository", ("repositories",)),
    (("status",), "running job", ("running",)),
    (("status",), "problem", ("problems",)),
    (("hosts", "show", "no-such-host"), "error", ()),
]


def found(printed, args):
    """What the one command whose arguments hold `args`, in order, printed."""

    def holds(command):
        rest = iter(map(str, command))
        return all(arg in rest for arg in args)

    (value,) = [v for k, v in printed.items() if holds(k)]
    return value


def dig(value, path):
    """The objects at `path` (lists are walked through)."""
    if not path:
        return value
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        inner = dig(item[path[0]], path[1:])
        out.extend(inner if isinstance(inner, list) else [inner])
    return out


@pytest.mark.parametrize(
    ("args", "kind", "path"), CHECKS, ids=[" ".join(a[:3]) + f" {k}" for a, k, _ in CHECKS]
)
def test_json_fields_are_the_documented_ones(printed, fx, args, kind, path):
    fx.check_json(dig(found(printed, args), path), kind)


def test_every_documented_object_is_checked(fx):
    elsewhere = {"listing", "find result", "diff"}  # tests/e2e/test_browse.py
    elsewhere |= {"rollout plan", "rollout host", "rollout"}  # test_agent_delivery, e2e upgrade
    elsewhere |= {"tls status", "host trust", "tls change"}  # e2e test_tls_rotation
    assert {kind for _, kind, _ in CHECKS} | elsewhere == set(fx.documented_json())


def test_a_failure_under_json_names_its_exit_status(printed):
    error = found(printed, ("hosts", "show", "no-such-host"))["error"]
    assert (error["code"], error["exit"]) == ("not_found", 4)
    assert "no-such-host" in error["message"]
