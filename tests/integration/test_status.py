"""`fleetctl status` on a real fleetd with raw sockets standing in for the
agents: exit 0 for a healthy fleet, 2 for a failed, an overdue and an
offline host's backups, 1 for a warning; the JSON names each problem."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time

from rawagent import RawAgent  # tests/ is on sys.path (rootdir conftest)

from fleet.common import protocol
from fleet.ctl.status import WatchView, progress_line


def stamp(delta: dt.timedelta = dt.timedelta()) -> str:
    now = dt.datetime.now(dt.timezone.utc) + delta
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


class Agent(RawAgent):
    """A hand-made agent (tests/rawagent.py) whose reports wait for their ack."""

    def report(self, kind, data, seq=None):
        return self.acked(super().report(kind, data, seq))

    def backup(self, status="succeeded", ago=dt.timedelta(), error=None):
        """Take the next command.run (a backup) and end it as told, at `ago` before now."""
        data = self.next_of("command.run")["data"]
        assert data["kind"] == "backup", data
        job_id = data["job_id"]
        self.ws.send(protocol.encode("command.result", {"job_id": job_id, "accepted": True}))
        self.report("job.started", {"job_id": job_id, "kind": "backup", "started_at": stamp(-ago)})
        done = {"job_id": job_id, "status": status, "exit_code": 0, "finished_at": stamp(-ago)}
        if status == "succeeded":
            done["summary"] = {"snapshot_id": "4f2a9c1e", "data_added": 4096}
        else:
            done.update(exit_code=1, error=error or "restic failed")
        self.report("job.finished", done)
        return job_id


@contextlib.contextmanager
def connected(fleet, fx, token):
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        agent = Agent(ws)
        ws.send(fx.agent_hello())
        agent.next_of("welcome")
        yield agent


def host(fleet, fx, cron="0 * * * *"):
    """An enrolled host with group etc on an hourly schedule: (name, token)."""
    name = fx.uniq("st")
    token = fx.enroll_agent(fleet, name, hostname=name)["agent_token"]
    fleet.rpc("groups.create", host=name, name="etc", includes=["/etc"])
    fleet.rpc("schedules.create", host=name, name="hourly", cron=cron, groups=["etc"])
    return name, token


def status(fleet, *args, expect):
    result = fleet.ctl("status", "--json", *args, expect=expect)
    return json.loads(result.stdout)


def mine(s, name):
    (h,) = [h for h in s["hosts"] if h["name"] == name]
    return h


def kinds(s, name):
    return sorted(p["kind"] for p in s["problems"] if p.get("host") == name)


def test_status_follows_the_fleet_from_healthy_to_critical(fleetd_factory, fx):
    fleet = fleetd_factory()  # its own: the whole fleet's status is asserted
    name, token = host(fleet, fx)
    with connected(fleet, fx, token) as agent:
        fleet.rpc("jobs.run", host=name, group="etc")
        job = agent.backup()
        s = status(fleet, expect=0)
        assert (s["status"], s["exit_code"]) == ("ok", 0)
        (g,) = mine(s, name)["groups"]
        assert g["last_success_job"] == job and g["last_success_added_bytes"] == 4096
        assert g["last_status"] == "succeeded" and g["overdue"] is False
        assert g["scheduled"] is True and g["next_run_at"].endswith(":00:00Z")
        table = fleet.ctl("status").stdout
        assert "OK" in table and name in table and "LAST SUCCESS" in table

        # a failed backup: critical, with the job and its error
        fleet.rpc("jobs.run", host=name, group="etc")
        failed = agent.backup("failed", error="Fatal: unable to open repository")
        s = status(fleet, expect=2)
        (p,) = [p for p in s["problems"] if p.get("host") == name]
        assert (p["kind"], p["severity"], p["job"]) == ("backup_failed", "critical", failed)
        assert "unable to open repository" in p["message"]
        assert mine(s, name)["groups"][0]["last_success_job"] == job  # the success, not the last
        result = fleet.ctl("status", expect=2)
        assert "CRITICAL" in result.stdout and "unable to open repository" in result.stdout
        # fleetd's log says it too, one line
        logged = fx.wait_until(
            lambda: [
                line
                for line in fleet.fleetd.log().splitlines()
                if f"job {failed} (backup of group etc) on host {name} failed" in line
            ],
            timeout=10,
            what="the failure in fleetd's log",
        )
        assert "unable to open repository" in logged[0]


def test_a_backup_that_never_came_is_overdue(fleet, fx):
    """The last success 3 h ago on an hourly schedule (1.5 h at most)."""
    name, token = host(fleet, fx)
    with connected(fleet, fx, token) as agent:
        fleet.rpc("jobs.run", host=name, group="etc")
        agent.backup(ago=dt.timedelta(hours=3))
        s = status(fleet, expect=2)
        assert kinds(s, name) == ["overdue"]
        assert mine(s, name)["groups"][0]["overdue"] is True
        (p,) = [p for p in s["problems"] if p.get("host") == name]
        assert "every 1h" in p["message"] and p["group"] == "etc"
        # a success now clears it
        fleet.rpc("jobs.run", host=name, group="etc")
        agent.backup()
        assert kinds(status(fleet, expect=None), name) == []


def test_a_new_group_is_not_overdue_before_its_schedule_had_its_chance(fleet, fx):
    name, token = host(fleet, fx, cron="0 3 * * *")
    s = status(fleet, "--offline-after", "1d", expect=None)
    assert kinds(s, name) == []
    assert mine(s, name)["groups"][0]["last_success_at"] is None


def test_an_offline_host_is_critical_past_the_threshold_only(fleet, fx):
    name, token = host(fleet, fx)
    with connected(fleet, fx, token):
        pass
    fx.wait_until(
        lambda: fleet.rpc("hosts.show", host=name)["status"] != "online",
        timeout=10,
        what="the host to go offline",
    )
    s = status(fleet, expect=None)
    assert "offline" not in kinds(s, name)  # gone for seconds, the threshold is 1 h
    s = status(fleet, "--offline-after", "0", expect=2)
    assert kinds(s, name) == ["offline"] and mine(s, name)["online"] is False
    assert mine(s, name)["offline_seconds"] >= 0


def test_a_repository_never_checked_is_a_warning(fleet, fx):
    repo = fx.uniq("r")
    fleet.rpc("repos.create", name=repo, url=f"/srv/{repo}", password="pw", env={})
    s = status(fleet, "--unchecked-after", "0", "--offline-after", "100w", expect=None)
    (p,) = [p for p in s["problems"] if p.get("repository") == repo]
    assert (p["kind"], p["severity"]) == ("unchecked", "warning")
    assert s["exit_code"] >= 1
    (r,) = [r for r in s["repositories"] if r["name"] == repo]
    assert r["unchecked"] is True and r["last_check_status"] is None


def test_status_exit_codes_on_a_fleet_of_its_own(fleetd_factory, fx):
    """Exactly 0, 1 and 2 on a fleetd nothing else shares."""
    own = fleetd_factory()
    assert status(own, expect=0)["status"] == "ok"
    own.rpc("repos.create", name="lonely", url="/srv/lonely", password="pw", env={})
    assert status(own, "--unchecked-after", "0", expect=1)["status"] == "warning"
    name, token = host(own, fx)
    with connected(own, fx, token) as agent:
        own.rpc("jobs.run", host=name, group="etc")
        agent.backup("failed")
        assert status(own, expect=2)["status"] == "critical"


def test_a_group_without_a_schedule_is_overdue_by_what_it_expects(fleet, fx):
    name = fx.uniq("st")
    token = fx.enroll_agent(fleet, name, hostname=name)["agent_token"]
    fleet.ctl("groups", "create", name, "manual", "--include", "/srv", "--expect-every", "1h")
    fleet.rpc("groups.create", host=name, name="adhoc", includes=["/tmp"])
    assert fleet.rpc("groups.show", host=name, name="manual")["expect_every"] == 3600
    with connected(fleet, fx, token) as agent:
        fleet.rpc("jobs.run", host=name, group="manual")
        agent.backup(ago=dt.timedelta(hours=2))
        s = status(fleet, expect=None)
        (p,) = [p for p in s["problems"] if p.get("host") == name]
        assert (p["kind"], p["group"]) == ("overdue", "manual")
        assert "one expected every 1h" in p["message"]
        groups = {g["name"]: g for g in mine(s, name)["groups"]}
        assert groups["manual"]["overdue"] and not groups["adhoc"]["overdue"]
        # unset: no schedule, no expectation, never overdue
        fleet.ctl("groups", "edit", name, "manual", "--expect-every", "0")
        assert kinds(status(fleet, expect=None), name) == []


def scrape(fleet, token):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(fleet.url.replace("ws", "http", 1) + "/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers.get("Content-Type"), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None, exc.read().decode()


def test_metrics_are_off_unless_asked_for(fleet):
    code, _, body = scrape(fleet, fleet.admin_token)
    assert code == 404 and "--metrics" in body


def test_metrics_carry_the_last_success_and_need_a_token(fleetd_factory, fx):
    from prometheus_client.parser import text_string_to_metric_families

    own = fleetd_factory("--metrics")
    assert scrape(own, None)[0] == 401
    assert scrape(own, "not-a-token")[0] == 401
    name, token = host(own, fx)
    own.rpc("repos.create", name="m-repo", url="/srv/m", password="pw", env={})
    with connected(own, fx, token) as agent:
        own.rpc("jobs.run", host=name, group="etc")
        agent.backup(ago=dt.timedelta(minutes=5))
        own.rpc("jobs.run", host=name, group="etc")
        agent.backup("failed")
        code, ctype, body = scrape(own, own.admin_token)
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    where = (("group", "etc"), ("host", name))
    last = samples[("fleet_group_last_success_timestamp_seconds", where)]
    assert abs(last - (dt.datetime.now(dt.timezone.utc).timestamp() - 300)) < 120
    assert samples[("fleet_group_last_success_added_bytes", where)] == 4096
    assert (
        samples[("fleet_group_last_backup_status", (*where[:1], *where[1:], ("status", "failed")))]
        == 1
    )
    assert samples[("fleet_group_overdue", where)] == 0
    assert samples[("fleet_host_online", (("host", name),))] == 1
    assert samples[("fleet_problems", (("kind", "backup_failed"), ("severity", "critical")))] == 1
    assert samples[("fleet_jobs", (("status", "failed"),))] == 1
    # fleetd's own counters: the agent was connected at the scrape, two bad
    # tokens were refused, two jobs were dispatched and ended
    assert samples[("fleetd_connections_open", (("endpoint", "agent"),))] == 1
    assert samples[("fleetd_connections_open", (("endpoint", "all"),))] >= 2
    assert samples[("fleetd_connections_accepted_total", (("endpoint", "agent"),))] == 1
    assert samples[("fleetd_connections_refused_total", (("reason", "bad_token"),))] == 1
    assert samples[("fleetd_connections_refused_total", (("reason", "no_token"),))] == 1
    assert samples[("fleetd_jobs_dispatched_total", ())] == 2
    assert samples[("fleetd_jobs_ended_total", (("status", "failed"),))] == 1
    assert samples[("fleetd_jobs_ended_total", (("status", "succeeded"),))] == 1
    assert abs(samples[("fleetd_start_time_seconds", ())] - time.time()) < 600

    # an overdue group (its last success 3 h ago on an hourly schedule) and an
    # offline host (the first, its agent gone) are in the next scrape
    late, late_token = host(own, fx)
    with connected(own, fx, late_token) as agent:
        own.rpc("jobs.run", host=late, group="etc")
        agent.backup(ago=dt.timedelta(hours=3))
    fx.wait_until(
        lambda: own.rpc("hosts.show", host=late)["status"] == "offline", timeout=10, what="offline"
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape(own, own.admin_token)[2])
        for s in family.samples
    }
    assert samples[("fleet_group_overdue", (("group", "etc"), ("host", late)))] == 1
    assert samples[("fleet_group_overdue", where)] == 0
    assert samples[("fleet_host_online", (("host", name),))] == 0
    assert samples[("fleet_host_online", (("host", late),))] == 0
    assert samples[("fleet_problems", (("kind", "overdue"), ("severity", "critical")))] == 1


def test_alerts_are_raised_once_acknowledged_and_resolve_themselves(fleetd_factory, fx):
    own = fleetd_factory("--alert-interval", "0.2")
    name, token = host(own, fx)

    def open_alerts():
        return [a for a in own.rpc("alerts.list") if a["host"] == name]

    with connected(own, fx, token) as agent:
        own.rpc("jobs.run", host=name, group="etc")
        first = agent.backup("failed", error="Fatal: first")
        (alert,) = fx.wait_until(open_alerts, timeout=10, what="an alert for the failure")
        assert (alert["kind"], alert["severity"], alert["group"]) == (
            "backup_failed",
            "critical",
            "etc",
        )
        assert f"job {first}" in alert["message"]
        # failing again: the same alert, its message the latest
        own.rpc("jobs.run", host=name, group="etc")
        again = agent.backup("failed", error="Fatal: second")
        fx.wait_until(
            lambda: [a for a in open_alerts() if f"job {again}" in a["message"]],
            timeout=10,
            what="the alert to tell the second failure",
        )
        assert [a["id"] for a in open_alerts()] == [alert["id"]]  # one, not two
        acked = own.ctl_json("alerts", "ack", alert["id"])
        fx.check_json(acked, "alert")  # man/fleetctl.1's JSON OUTPUT
        assert acked["acknowledged_by"] == "admin" and acked["open"] is True
        listing = own.ctl("alerts", "list").stdout
        assert "acknowledged by admin" in listing and "backup_failed" in listing
        # a success clears the condition: resolved by itself
        own.rpc("jobs.run", host=name, group="etc")
        agent.backup()
        fx.wait_until(lambda: not open_alerts(), timeout=10, what="the alert to resolve")
    (done,) = [a for a in own.ctl_json("alerts", "list", "--all") if a["id"] == alert["id"]]
    assert done["open"] is False and done["resolved_at"]
    assert "alert raised (critical)" in own.fleetd.log()
    own.ctl("alerts", "ack", "999999", expect=4)


def test_a_notification_reaches_a_real_receiver_through_apprise(fleetd_factory, fx, tmp_path):
    receiver = fx.Receiver()
    try:
        own = fleetd_factory("--alert-interval", "0.2")
        url_file = tmp_path / "url"
        url_file.write_text(f"json://127.0.0.1:{receiver.port}/hook?secret=s3cr3t\n")
        added = own.ctl_json(
            "notify", "add", "ops", "--url-file", str(url_file), "--on", "backup_failed"
        )
        assert added["url"] == "json://********" and added["on"] == ["backup_failed"]
        listed = own.ctl("notify", "list").stdout
        assert "ops" in listed and "s3cr3t" not in listed
        own.ctl("notify", "add", "bad", "not a url", expect=2)
        own.ctl("notify", "test", "ops")
        assert receiver.next()["title"] == "Fleet: test notification"

        name, token = host(own, fx)
        with connected(own, fx, token) as agent:
            own.rpc("jobs.run", host=name, group="etc")
            job = agent.backup("failed", error="Fatal: disk on fire")
            raised = receiver.next()
            assert "backup_failed raised" in raised["title"] and name in raised["title"]
            assert f"job {job}" in raised["message"] and "disk on fire" in raised["message"]
            own.rpc("jobs.run", host=name, group="etc")
            agent.backup()
            resolved = receiver.next()
            assert "backup_failed resolved" in resolved["title"]
        (n,) = own.ctl_json("notify", "list")
        assert n["last_sent_at"] and n["last_error"] is None
        assert "s3cr3t" not in own.fleetd.log()
        own.ctl("notify", "remove", "ops", "--yes")
        assert own.ctl_json("notify", "list") == []
    finally:
        receiver.close()


def test_a_failed_prune_and_an_old_agent_are_reported(fleet, fx):
    name, token = host(fleet, fx)
    repo = fx.uniq("r")
    fleet.rpc("repos.create", name=repo, url=f"/srv/{repo}", password="pw", env={})
    fleet.rpc("repos.use", name=repo, hosts=[name])
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        agent = Agent(ws)
        ws.send(fx.agent_hello(agent_version="0.0.1"))
        agent.next_of("welcome")

        def run(kind, status):
            data = agent.next_of("command.run")["data"]
            assert data["kind"] == kind, data
            ws.send(protocol.encode("command.result", {"job_id": data["job_id"], "accepted": True}))
            agent.report(
                "job.started", {"job_id": data["job_id"], "kind": kind, "started_at": stamp()}
            )
            done = {
                "job_id": data["job_id"],
                "status": status,
                "exit_code": 0,
                "finished_at": stamp(),
            }
            if status == "failed":
                done.update(exit_code=1, error="Fatal: repository is already locked")
            agent.report("job.finished", done)
            return data["job_id"]

        run("init", "succeeded")
        fleet.rpc("jobs.run", host=name, kind="prune")
        prune = run("prune", "failed")
        s = status(fleet, expect=None)
        mine_ = {
            p["kind"]: p
            for p in s["problems"]
            if p.get("host") == name or p.get("repository") == repo
        }
        assert mine_["maintenance_failed"]["job"] == prune
        assert "already locked" in mine_["maintenance_failed"]["message"]
        assert mine_["agent_behind"]["severity"] == "warning"
        assert "0.0.1" in mine_["agent_behind"]["message"]


def test_a_group_pings_its_url_as_backups_start_succeed_and_fail(fleet, fx, tmp_path):
    """Healthchecks' convention: URL/start, URL, URL/fail; the URL a secret."""
    receiver = fx.Receiver()
    try:
        name, token = host(fleet, fx)
        url = f"http://127.0.0.1:{receiver.port}/ping/0f1e2d3c-secret-key?create=1"
        url_file = tmp_path / "ping"
        url_file.write_text(url + "\n")
        g = fleet.ctl_json("groups", "edit", name, "etc", "--ping-url-file", str(url_file))
        assert g["ping_url"] == f"http://127.0.0.1:{receiver.port}/********"
        shown = fleet.ctl("groups", "show", name, "etc").stdout
        assert "not pinged yet" in shown and "secret-key" not in shown
        with connected(fleet, fx, token) as agent:
            fleet.rpc("jobs.run", host=name, group="etc")
            job = agent.backup()
            path, body = receiver.next_raw()
            assert path == "/ping/0f1e2d3c-secret-key/start?create=1"
            assert body == f"backup of {name}/etc (job {job}) started"
            path, body = receiver.next_raw()
            assert path == "/ping/0f1e2d3c-secret-key?create=1"
            assert f"(job {job}) succeeded" in body and "snapshot 4f2a9c1e" in body

            fleet.rpc("jobs.run", host=name, group="etc")
            failed = agent.backup("failed", error="Fatal: wrong password")
            assert receiver.next_raw()[0].endswith("/start?create=1")
            path, body = receiver.next_raw()
            assert path == "/ping/0f1e2d3c-secret-key/fail?create=1"
            assert f"(job {failed}) failed" in body and "Fatal: wrong password" in body
            g = fx.wait_until(
                lambda: (g := fleet.ctl_json("groups", "show", name, "etc"))["ping_sent_at"] and g,
                timeout=10,
                what="the ping recorded",
            )
            assert g["ping_error"] is None

            # removed: the next backup pings nothing; set again, the one after does
            fleet.ctl("groups", "edit", name, "etc", "--ping-url", "")
            assert fleet.ctl_json("groups", "show", name, "etc")["ping_url"] is None
            fleet.rpc("jobs.run", host=name, group="etc")
            agent.backup()
            fleet.ctl("groups", "edit", name, "etc", "--ping-url", url)
            fleet.rpc("jobs.run", host=name, group="etc")
            again = agent.backup()
            path, body = receiver.next_raw()
            assert path.endswith("/start?create=1") and f"(job {again})" in body
        for bad in ("ftp://127.0.0.1/x", "not a url", "http://h:99999/x"):
            fleet.ctl("groups", "edit", name, "etc", "--ping-url", bad, expect=2)
        fleet.ctl(
            "groups", "edit", name, "etc", "--ping-url", url, "--ping-url-file", "-", expect=2
        )
        assert "secret-key" not in fleet.fleetd.log()
        stored = fx.store_bytes(fleet.data_dir)  # the WAL too
        assert name.encode() in stored and b"secret-key" not in stored
    finally:
        receiver.close()


class Lines:
    """A process's stdout lines, read on a thread, waited for with a timeout."""

    def __init__(self, proc):
        import queue
        import threading

        self.proc = proc
        self.got: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.got.put(line.rstrip("\n"))
        self.got.put(None)

    def until(self, match, timeout=20):
        """The first line `match` accepts (earlier ones are dropped)."""
        import queue

        seen = []
        while True:
            try:
                line = self.got.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout} s; saw {seen}") from None
            assert line is not None, f"fleetctl ended: {seen} {self.proc.stderr.read()}"
            seen.append(line)
            if match(line):
                return line


class Terminal:
    """fleetctl status --watch on a pseudo-terminal: what it drew so far."""

    def __init__(self, fx, fleet):
        import os
        import subprocess
        import threading

        master, slave = os.openpty()
        env = fx.clean_env(
            FLEET_SERVER=fleet.url,
            FLEET_TOKEN=fleet.admin_token,
            XDG_CONFIG_HOME=str(fleet.config_dir),
            COLUMNS="200",
            LINES="50",
            TERM="xterm",
        )
        self.proc = subprocess.Popen(
            [str(fx.REPO_ROOT / "fleetctl"), "status", "--watch"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=fx.REPO_ROOT,
        )
        os.close(slave)
        self.text = ""
        self.changed = threading.Condition()

        def read():
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the process ended: EIO
                    chunk = b""
                if not chunk:
                    os.close(master)
                    return
                with self.changed:
                    self.text += chunk.decode(errors="replace")
                    self.changed.notify_all()

        threading.Thread(target=read, daemon=True).start()

    def until(self, match, timeout=20):
        with self.changed:
            assert self.changed.wait_for(lambda: match(self.text), timeout), self.text[-3000:]


def test_status_watch_streams_jobs_starting_progressing_and_ending(fleetd_factory, fx):
    import signal

    own = fleetd_factory()  # its own: the watch sees the whole fleet
    name, token = host(own, fx)
    kw = {"server": own.url, "token": own.admin_token, "config_dir": own.config_dir}
    as_json = fx.run_fleetctl_proc("status", "--watch", "--json", **kw)
    plain = fx.run_fleetctl_proc("status", "--watch", **kw)
    frames, lines = Lines(as_json), Lines(plain)
    screen = Terminal(fx, own)  # and on a terminal: the live table
    try:
        with connected(own, fx, token) as agent:
            first = json.loads(frames.until(lambda line: '"snapshot"' in line))
            assert first["running"] == [] and first["hosts"] == 1 and first["hosts_online"] == 1
            lines.until(lambda line: "1/1 hosts online, 0 job(s) running" in line)

            job = own.rpc("jobs.run", host=name, group="etc")["id"]
            data = agent.next_of("command.run")["data"]
            agent.ws.send(protocol.encode("command.result", {"job_id": job, "accepted": True}))
            agent.report("job.started", {"job_id": job, "kind": "backup", "started_at": stamp()})
            progress = {
                "job_id": job,
                "percent_done": 0.5,
                "files_done": 5,
                "total_files": 10,
                "bytes_done": 500,
                "total_bytes": 1000,
                "eta_seconds": 3,
                "throughput_bps": 100,
            }
            agent.ws.send(protocol.encode("job.progress", progress))
            # the frames, applied as fleetctl's own view applies them, show the
            # job running with its progress
            view = WatchView()
            view.apply(first)

            def shows_progress(line):
                view.apply(json.loads(line))
                r = view.running.get(job)
                return r is not None and (r["progress"] or {}).get("percent_done") == 0.5

            frames.until(shows_progress)
            screen.until(lambda text: "1 job(s) running" in text and "50% 500 B/1000 B" in text)
            assert data["job_id"] == job and view.running[job]["status"] == "running"
            assert "50% 500 B/1000 B, 5/10 files, ETA 3 s" in progress_line(
                view.running[job]["progress"]
            )
            lines.until(lambda line: line == f"job {job} backup of {name}/etc started")

            agent.report(
                "job.finished",
                {
                    "job_id": job,
                    "status": "failed",
                    "exit_code": 1,
                    "finished_at": stamp(),
                    "error": "Fatal: disk on fire",
                },
            )
            ended = json.loads(
                frames.until(lambda line: f'"id": {job},' in line and "ended" in line)
            )
            (e,) = [e for e in ended["ended"] if e["id"] == job]
            assert e["status"] == "failed" and e["host"] == name
            lines.until(
                lambda line: line == f"job {job} backup of {name}/etc failed: Fatal: disk on fire"
            )
            # redrawn after the end: no job running, the job among those that ended
            screen.until(
                lambda text: (
                    "recently ended"
                    in text[text.rfind("1 job(s) running") :].split("0 job(s) running", 1)[-1]
                    and text.rfind("0 job(s) running") > text.rfind("1 job(s) running")
                )
            )
        # Ctrl-C is the way out of a live view: exit 0
        for proc in (as_json, plain, screen.proc):
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0, screen.text
    finally:
        for proc in (as_json, plain, screen.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_what_an_agent_says_of_itself_reaches_operators_without_escapes(fleet, fx):
    name, token = host(fleet, fx)
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        agent = Agent(ws)
        ws.send(fx.agent_hello(hostname="\x1b[2Jevil\nline", os="li\x07nux", agent_version="1\r2"))
        agent.next_of("welcome")
        shown = fleet.ctl_json("hosts", "show", name)
    assert (shown["hostname"], shown["os"], shown["agent_version"]) == (
        "?[2Jevil?line",
        "li?nux",
        "1?2",
    )
    assert "\x1b" not in fleet.ctl("hosts", "show", name).stdout
    assert "\x1b[2J" not in fleet.fleetd.log()
