"""fleetd at scale: every figure beside a bare websockets server measured in the same run.

    .venv/bin/python bench/fleet_scale.py [--agents 10000] [--workers 4]
        [--only scale|status|templates|backups|all] [--json OUT] [--quick] [--backup-mib 200]
        [--repositories N] [--replicas N]

Scale part (`--only scale`):

- A bare server (`websockets.asyncio.server.serve`, the websockets fleetd
  uses, an echo handler) is started in its own process and the N simulated
  agents connect to it; then the same for a real `fleetd serve` (SQLite in a
  temp dir). Both are measured from /proc (utime+stime, VmRSS) so the CPU the
  simulated agents burn on the same cores is not counted against the server.
- Hosts are seeded straight into fleetd's SQLite database after
  `fleetd init` and before `serve` (rows with agent_token_hash = sha256 of
  a generated token, as /enroll would leave them): enrolling 10,000 hosts
  over /enroll costs minutes and is not what is measured here.
- The agents are simulated in --workers processes, each an asyncio loop of
  lean websocket clients (bench/simws.py: a real RFC 6455 client without
  websockets' per-connection machinery, so the load generator does not eat
  the cores the servers are measured on) speaking the real agent protocol:
  hello -> welcome, heartbeats, command.run -> command.result, reliable
  job.started / job.log / job.finished with seq and cumulative acks, and
  redial with fleet-agent's own backoff (fleet.agent.link.backoff); log
  lines packed into job.logs as fleet-agent packs them (pack_logs) when
  fleetd's welcome offers it. Workers report when each command.run arrived
  (time.time()) to the parent. Once connected, a worker freezes its heap
  (gc.freeze): a real agent holds one connection, not 2,500, and the
  simulator's own collection pauses would count as fleetd's latency.

With `--replicas N` the scale part then runs again on N `fleetd serve`
replicas sharing one PostgreSQL that the bench starts in a temp dir
(tests/postgres.py, as nobody when root; stopped at the end, whatever
happens): `fleetd init --database postgresql:///...`, the same host rows
seeded by COPY, agent i connected through replica i % N, and every
operator request sent through replica 0 for hosts whose agents are on the
others first, so a run-now crosses replicas (JobQueued through the event
table and NOTIFY to the replica holding the link, which claims and sends
command.run). Beside the same latencies: run-now through replica 0 for an
agent on it and for one on another, alternately; the replicas' CPU and RSS
(sum, max) and PostgreSQL's (utime+stime of the postmaster, its reaped
children and its live ones; PSS, shared buffers counted once); the
warnings and tracebacks in the replicas' logs. Then the figures side by
side with the single SQLite fleetd's. (`--only replicas`: that run alone.)
No restart figure for the replicas.

Status part (`--only status`): N hosts, each with a source group on a
nightly schedule and three backups behind it, seeded the same way; the
median of `status.show` and of a `/metrics` scrape beside a whole-fleet
`hosts.list`, and the operator's round trip while status.show loops.

Templates part (`--only templates`): N hosts seeded the same way, half of
them labelled role=web; one `templates.set` gives those a repository, a
group and a schedule, beside the same made by hand (repos.use,
groups.create, schedules.create: one call each per host) on a sample,
scaled to as many hosts; then `templates.apply` with nothing to change, and
the operator's round trip while the template is applied.

Backups part (`--only backups`): raw `restic backup` vs a real fleet-agent
(`fleet-agent enroll` + `fleet-agent run` from the checkout) driven by
`fleetctl run HOST GROUP --follow`, first and incremental backups of the
same tree into fresh repositories.

Every figure prints as: name, fleetd value, bare value or reference, ratio,
target, MET/MISSED. Exit status 0 whatever the figures; non-zero only when
the harness itself fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TICKS = os.sysconf("SC_CLK_TCK")
ADMIN_PASSWORD = "bench-admin-password-1"
LISTEN_RE = re.compile(r"listening on (wss?)://(.+):(\d+)")
MAX_SIZE = 1 << 26  # a full hosts.list of 10,000 hosts is several MB


# -- small helpers -------------------------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def pct(values: list[float], p: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def clean_env(**extra: Optional[str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "FLEETD_", "RESTIC_")) and k != "XDG_CONFIG_HOME"
    }
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# the servers run under this wrapper: their soft RLIMIT_NOFILE raised to the hard limit
NOFILE_WRAPPER = (
    "import os, resource, sys; "
    "s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (h, h)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


STARTED: list[Server] = []  # every server started, so that main() ends them whatever happens


class Server:
    """A server subprocess (fleetd or the bare one) whose first stdout line names its port."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.spawned_at = 0.0
        self.listening_at = 0.0

    def start(self, timeout: float = 60) -> Server:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.spawned_at = time.time()
        STARTED.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NOFILE_WRAPPER, *self.argv],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in self.proc.stdout] and None, daemon=True
        ).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = LISTEN_RE.search(line)
            if match:
                self.port = int(match.group(3))
                self.listening_at = time.time()
                return self
        self.kill()
        raise RuntimeError(f"{self.name} did not report its address; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sigterm(self, timeout: float = 60) -> tuple[float, Optional[int]]:
        """SIGTERM; seconds until the process exited (killed after `timeout`) and its status."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        elapsed = time.monotonic() - t0
        self._log.close()
        return elapsed, code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def end(self) -> None:
        """After a failure: SIGTERM if still running, SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self._log.closed:
            self._log.close()


# -- the bare baseline server ------------------------------------------------------


async def bare_server_main() -> None:
    """An echo server: what any websockets server with N connections costs."""
    from websockets.asyncio.server import serve

    async def echo(ws) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except Exception:  # noqa: BLE001 - a dropped client is not the baseline's business
            pass

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    port = int(os.environ.get("BARE_PORT", "0"))
    async with serve(echo, "127.0.0.1", port, server_header=None) as server:
        print(f"bare listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop


# -- simulated agents (worker processes) ---------------------------------------------


class SimAgent:
    __slots__ = (
        "idx",
        "token",
        "name",
        "seq",
        "acked",
        "ack_event",
        "plan",
        "ws",
        "busy",
        "packs",
    )

    def __init__(self, idx: int, token: str, name: str) -> None:
        self.idx = idx
        self.token = token
        self.name = name
        self.seq = 0  # last delivery seq sent
        self.acked = 0
        self.ack_event = asyncio.Event()
        self.plan: Optional[dict] = None  # what to do with the next command.run
        self.ws = None
        self.busy = False
        self.packs = False  # fleetd takes job.logs (as fleet-agent, from welcome's features)


class Worker:
    """One process: a few thousand agents on one event loop."""

    def __init__(self, wid: int, agents: list[tuple[int, str, str]], out_q: mp.Queue) -> None:
        self.wid = wid
        self.agents = {idx: SimAgent(idx, tok, name) for idx, tok, name in agents}
        self.out_q = out_q
        self.runs: list[tuple[int, int, float]] = []
        self.ups: list[tuple[int, float]] = []
        self.tasks: list[asyncio.Task] = []
        self.closing = False
        self.stop_streams = asyncio.Event()
        self.go = asyncio.Event()

    def report(self, *msg: Any) -> None:
        self.out_q.put(msg)

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            if self.runs:
                runs, self.runs = self.runs, []
                self.report("runs", runs)
            if self.ups:
                ups, self.ups = self.ups, []
                self.report("ups", ups)

    async def main(self, in_q: mp.Queue) -> None:
        loop = asyncio.get_running_loop()
        cmds: asyncio.Queue = asyncio.Queue()

        def reader() -> None:
            while True:
                cmd = in_q.get()
                loop.call_soon_threadsafe(cmds.put_nowait, cmd)
                if cmd[0] == "quit":
                    return

        threading.Thread(target=reader, daemon=True).start()
        flusher = asyncio.ensure_future(self.flush_loop())
        while True:
            cmd = await cmds.get()
            op = cmd[0]
            try:
                if op == "connect":
                    asyncio.ensure_future(self.connect_all(*cmd[1:]))
                elif op == "disconnect":
                    await self.disconnect_all()
                    self.report("disconnected", self.wid)
                elif op == "plan":
                    _, idx, plan = cmd
                    self.agents[idx].plan = plan
                elif op == "streams":
                    if cmd[1] == "stop":
                        self.stop_streams.set()
                    elif cmd[1] == "go":
                        self.go.set()
                    else:
                        self.stop_streams = asyncio.Event()
                        self.go = asyncio.Event()
                elif op == "quit":
                    await self.disconnect_all()
                    break
            except Exception as exc:  # noqa: BLE001 - reported, the parent decides
                self.report("error", self.wid, f"{op}: {exc!r}")
        await asyncio.sleep(0.05)
        flusher.cancel()
        self.report("quit", self.wid)

    async def connect_all(self, url: str | list[str], concurrency: int, heartbeat: int) -> None:
        """Every agent dials `url`; given a list of N (replicas), agent i dials url i % N."""
        urls = [url] if isinstance(url, str) else url
        self.closing = False
        sem = asyncio.Semaphore(concurrency)
        first: dict[int, Optional[float]] = {}
        done = asyncio.Event()
        t0 = time.time()

        def first_result(idx: int, ok: bool) -> None:
            if idx in first:
                return
            first[idx] = time.time() if ok else None
            if len(first) == len(self.agents):
                done.set()

        self.tasks = [
            asyncio.ensure_future(
                self.session(a, urls[a.idx % len(urls)], sem, first_result, heartbeat)
            )
            for a in self.agents.values()
        ]
        try:
            await asyncio.wait_for(done.wait(), 300)
        except asyncio.TimeoutError:
            pass
        ok = [t for t in first.values() if t is not None]
        # a real agent is a process with one connection: the pauses of a full
        # collection over 2,500 connections are this simulator's, and would
        # show up as fleetd's latency (the same for the bare server)
        gc.collect()
        gc.freeze()
        self.report(
            "connected", self.wid, len(ok), len(self.agents) - len(ok), t0, max(ok, default=t0)
        )

    async def disconnect_all(self) -> None:
        self.closing = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    def hello(self, a: SimAgent) -> str:
        data = {
            "protocol_version": 1,
            "agent_version": "bench-sim",
            "restic_version": "restic 0.14.0",
            "hostname": a.name,
            "os": "linux",
            "arch": "amd64",
            "spool_seq": a.seq,
            "spool_pending": 0,  # the simulated spool keeps nothing unacked across links
            "features": ["repositories"],  # as fleet-agent says it
        }
        return json.dumps({"v": 1, "type": "hello", "id": "hello", "data": data})

    async def session(self, a: SimAgent, url: str, sem, first_result, heartbeat: int) -> None:
        from simws import connect

        from fleet.agent.link import backoff

        attempt = 0
        headers = {"Authorization": f"Bearer {a.token}"}
        while not self.closing:
            ws = None
            hb = None
            try:
                async with sem:
                    ws = await connect(url, headers, open_timeout=30, max_size=1 << 22)
                    await ws.send(self.hello(a))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if reply.get("type") == "error":
                    raise RuntimeError(f"refused: {reply['data']}")
                interval = (reply.get("data") or {}).get("heartbeat_interval") or heartbeat
                a.packs = "job.logs" in ((reply.get("data") or {}).get("features") or ())
                now = time.time()
                first_result(a.idx, True)
                self.ups.append((a.idx, now))
                attempt = 0
                a.ws = ws
                hb = asyncio.ensure_future(self.heartbeats(ws, interval))
                async for raw in ws:
                    frame = json.loads(raw)
                    kind = frame.get("type")
                    if kind == "ack":
                        a.acked = max(a.acked, frame["data"]["seq"])
                        a.ack_event.set()
                    elif kind == "command.run":
                        self.runs.append((a.idx, frame["data"]["job_id"], time.time()))
                        asyncio.ensure_future(self.run_job(a, ws, frame["data"]))
            except asyncio.CancelledError:
                if ws is not None:
                    ws.transport.abort()
                raise
            except Exception:  # noqa: BLE001 - any failure: redial like fleet-agent
                first_result(a.idx, False)
            finally:
                if hb is not None:
                    hb.cancel()
                if ws is not None:
                    ws.transport.abort()  # a no-op when the link is already gone
                a.ws = None
            if self.closing:
                break
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def heartbeats(self, ws, interval: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))  # agents connected at random times
        while True:
            sent_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            await ws.send(json.dumps({"v": 1, "type": "heartbeat", "data": {"sent_at": sent_at}}))
            await asyncio.sleep(interval)

    async def reliable(self, a: SimAgent, ws, type_: str, data: dict) -> None:
        a.seq += 1
        await ws.send(
            json.dumps({"v": 1, "type": type_, "seq": a.seq, "data": data}, separators=(",", ":"))
        )

    async def run_job(self, a: SimAgent, ws, cmd: dict) -> None:
        job_id = cmd["job_id"]
        plan, a.plan = a.plan, None
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            await ws.send(
                json.dumps(
                    {"v": 1, "type": "command.result", "data": {"job_id": job_id, "accepted": True}}
                )
            )
            await self.reliable(
                a, ws, "job.started", {"job_id": job_id, "kind": cmd["kind"], "started_at": ts}
            )
            stats = None
            if plan is not None:
                stats = await self.stream(a, ws, job_id, plan)
            ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            await self.reliable(
                a,
                ws,
                "job.finished",
                {"job_id": job_id, "status": "succeeded", "exit_code": 0, "finished_at": ts},
            )
            if stats is not None:
                last = a.seq
                deadline = time.monotonic() + 30
                while a.acked < last and time.monotonic() < deadline:
                    a.ack_event.clear()
                    try:
                        await asyncio.wait_for(a.ack_event.wait(), 1)
                    except asyncio.TimeoutError:
                        pass
                stats["all_acked"] = a.acked >= last
                stats["t_all_acked"] = time.time()
                self.report("stream_done", a.idx, job_id, stats)
        except Exception as exc:  # noqa: BLE001 - a dropped link mid-job
            if plan is not None:
                self.report("stream_done", a.idx, job_id, {"error": repr(exc)})

    async def stream(self, a: SimAgent, ws, job_id: int, plan: dict) -> dict:
        """job.log lines for `duration` s: as fast as `window` unacked frames allow,
        or at `rate` lines/s (still within the window). With `gate`, the lines
        start when the parent says go, so that every stream covers one window."""
        from fleet.agent.link import pack_logs

        window = plan.get("window", 1000)
        rate = plan.get("rate")
        stop = self.stop_streams
        if plan.get("gate"):
            try:
                await asyncio.wait_for(self.go.wait(), 120)
            except asyncio.TimeoutError:
                pass
        deadline = time.monotonic() + plan["duration"]
        line = 0
        first_seq = a.seq + 1
        t_start = time.time()
        m0 = time.monotonic()
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        pad = "x" * 60
        while time.monotonic() < deadline and not stop.is_set():
            if a.seq - a.acked >= window:
                a.ack_event.clear()
                try:
                    await asyncio.wait_for(a.ack_event.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            room = window - (a.seq - a.acked)
            if rate:
                due = int(rate * (time.monotonic() - m0)) - line
                if due <= 0:
                    await asyncio.sleep(min(0.01, 1.0 / rate))
                    continue
                room = min(room, due)
            # the lines restic printed since the last send: what fleet-agent's
            # sender finds in its spool, and frames as it does (pack_logs)
            spooled = []
            for _ in range(min(room, 200)):
                line += 1
                a.seq += 1
                data = {
                    "job_id": job_id,
                    "seq": line,
                    "ts": ts,
                    "stream": "stdout",
                    "payload": f"{time.time():.6f} line {line} {pad}",
                }
                spooled.append((a.seq, "job.log", data))
            for seq, type_, data in pack_logs(spooled) if a.packs else spooled:
                await ws.send(
                    json.dumps(
                        {"v": 1, "type": type_, "seq": seq, "data": data}, separators=(",", ":")
                    )
                )
        t_end = time.time()
        return {
            "lines": line,
            "first_seq": first_seq,
            "last_seq": a.seq,
            "acked_at_end": max(0, min(a.acked, a.seq) - first_seq + 1),
            "t_start": t_start,
            "t_end": t_end,
        }


def worker_main(wid: int, agents: list, in_q: mp.Queue, out_q: mp.Queue) -> None:
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's clean-up handler
    asyncio.run(Worker(wid, agents, out_q).main(in_q))


class Fleet:
    """The parent's view of the worker processes."""

    def __init__(self, agents: list[tuple[int, str, str]], workers: int) -> None:
        self.n = len(agents)
        self.nworkers = workers
        self.out_q: mp.Queue = mp.Queue()
        self.in_qs = [mp.Queue() for _ in range(workers)]
        self.procs = []
        for w in range(workers):
            mine = [a for a in agents if a[0] % workers == w]
            p = mp.Process(
                target=worker_main, args=(w, mine, self.in_qs[w], self.out_q), daemon=True
            )
            p.start()
            self.procs.append(p)
        self.lock = threading.Lock()
        self.run_by_job: dict[int, float] = {}
        self.runs_by_host: dict[int, list[tuple[int, float]]] = {}
        self.ups: list[tuple[int, float]] = []
        self.streams: dict[int, dict] = {}
        self.control: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.unreached: list[int] = []  # jobs whose command.run never came (looked into at the end)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            msg = self.out_q.get()
            kind = msg[0]
            with self.lock:
                if kind == "runs":
                    for idx, job_id, t in msg[1]:
                        self.run_by_job[job_id] = t
                        self.runs_by_host.setdefault(idx, []).append((job_id, t))
                elif kind == "ups":
                    self.ups.extend(msg[1])
                elif kind == "stream_done":
                    self.streams[msg[2]] = {"host": msg[1], **msg[3]}
                elif kind == "error":
                    self.errors.append(f"worker {msg[1]}: {msg[2]}")
                else:
                    self.control.put(msg)

    def to_host(self, idx: int, *cmd: Any) -> None:
        self.in_qs[idx % self.nworkers].put(cmd)

    def broadcast(self, *cmd: Any) -> None:
        for q in self.in_qs:
            q.put(cmd)

    def collect(self, kind: str, timeout: float) -> list[tuple]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < self.nworkers and time.monotonic() < deadline:
            try:
                msg = self.control.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg[0] == kind:
                out.append(msg)
        return out

    def connect(self, url: str | list[str], concurrency: int, heartbeat: int = 30) -> dict:
        with self.lock:
            self.ups.clear()
        self.broadcast("connect", url, concurrency, heartbeat)
        msgs = self.collect("connected", 330)
        ok = sum(m[2] for m in msgs)
        t0 = min((m[4] for m in msgs), default=0.0)
        t1 = max((m[5] for m in msgs), default=0.0)
        return {
            "ok": ok,
            "failed": self.n - ok,
            "seconds": t1 - t0,
            "rate": ok / max(t1 - t0, 1e-9),
        }

    def disconnect(self) -> None:
        self.broadcast("disconnect")
        self.collect("disconnected", 120)

    def arrived(self, job_ids: Any) -> dict[int, float]:
        """When each job's command.run reached its agent; the jobs whose
        has not (yet) are noted in `unreached`, looked into at the end."""
        with self.lock:
            got = {j: self.run_by_job[j] for j in job_ids if j in self.run_by_job}
            self.unreached.extend(j for j in job_ids if j not in got)
        return got

    def ups_since(self, t: float) -> set[int]:
        with self.lock:
            return {idx for idx, at in self.ups if at >= t}

    def last_up_time(self, t: float) -> float:
        with self.lock:
            return max((at for _idx, at in self.ups if at >= t), default=t)

    def quit(self) -> None:
        self.broadcast("quit")
        self.collect("quit", 60)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()

    def worker_cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.is_alive())


# -- /ctl client ------------------------------------------------------------------


class Ctl:
    """One /ctl (or bare) connection with pipelined requests matched by id."""

    def __init__(self, url: str, token: Optional[str]) -> None:
        self.url = url
        self.token = token
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: dict[int, Any] = {}

    async def __aenter__(self) -> Ctl:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.ws = await connect(
            self.url,
            additional_headers=headers,
            compression=None,
            max_size=MAX_SIZE,
            open_timeout=30,
        )
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.reader.cancel()
        await self.ws.close()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                rid = msg.get("id")
                if "event" in msg:
                    handler = self.events.get(rid)
                    if handler is not None:
                        handler(msg["event"])
                    continue
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except Exception as exc:  # noqa: BLE001 - fail every waiting request
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(repr(exc)))

    async def send(self, method: str, on_event=None, **params: Any) -> asyncio.Future:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        if on_event is not None:
            self.events[rid] = on_event
        await self.ws.send(json.dumps({"id": rid, "method": method, "params": params}))
        return fut

    async def call(self, method: str, timeout: float = 120, **params: Any) -> dict:
        fut = await self.send(method, **params)
        return await asyncio.wait_for(fut, timeout)


async def bare_roundtrip(url: str, count: int) -> list[float]:
    from websockets.asyncio.client import connect

    out = []
    async with connect(url, compression=None) as ws:
        msg = json.dumps({"id": 1, "method": "auth.whoami", "params": {}})
        for _ in range(count):
            t0 = time.perf_counter()
            await ws.send(msg)
            await ws.recv()
            out.append(time.perf_counter() - t0)
    return out


# -- figures ---------------------------------------------------------------------


class Figures:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        value: Optional[float],
        unit: str,
        *,
        bare: Optional[float] = None,
        ref: str = "",
        target: str = "",
        met: Optional[bool] = None,
        note: str = "",
        ratio: Optional[float] = None,
    ) -> None:
        if ratio is None and bare is not None and value is not None and bare > 0:
            ratio = value / bare
        row = {
            "name": name,
            "fleetd": value,
            "unit": unit,
            "bare": bare,
            "reference": ref,
            "ratio": ratio,
            "target": target,
            "verdict": "" if met is None else ("MET" if met else "MISSED"),
            "note": note,
        }
        self.rows.append(row)
        self.print_row(row)

    @staticmethod
    def fmt(v: Optional[float], unit: str) -> str:
        if v is None:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f} {unit}"
        return f"{v:.3g} {unit}"

    def print_row(self, r: dict) -> None:
        base = self.fmt(r["bare"], r["unit"]) if r["bare"] is not None else (r["reference"] or "-")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(
            f"  {r['name']:<44} {self.fmt(r['fleetd'], r['unit']):>16}  bare/ref: {base:>16}"
            f"  ratio: {ratio:>8}  target: {r['target']:<18} {r['verdict']:<7}"
            + (f" ({r['note']})" if r["note"] else ""),
            flush=True,
        )


# -- the scale part ----------------------------------------------------------------


def seed_hosts(data_dir: Path, n: int) -> list[tuple[int, str, str]]:
    """N enrolled hosts written straight into fleetd's database (before serve)."""
    from fleet.server.security.auth import token_hash

    agents = []
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows = []
    for i in range(n):
        token = f"agent_{secrets.token_urlsafe(32)}"
        name = f"bench-{i:05d}"
        agents.append((i, token, name))
        rows.append((name, now, token_hash(token), now))
    con = sqlite3.connect(data_dir / "fleet.db")
    with con:
        con.executemany(
            "INSERT INTO host (name, created_at, agent_token_hash, enrolled_at, online,"
            " schedule_version, applied_schedule_version, last_seq) VALUES (?, ?, ?, ?, 0, 0, 0, 0)",
            rows,
        )
    con.close()
    return agents


def seed_repositories(data_dir: Path, n_hosts: int, n_repos: int) -> None:
    """N repositories (encrypted with fleetd's key, as `repos create` makes
    them), host i using repository i % N, each already initialised for it
    (a succeeded init job), so every claim reads a real repository and the
    exclusive jobs of hosts sharing one wait for each other."""
    from fleet.server.app import KEY_NAME
    from fleet.server.security.secrets import load_key_file, repository_aad

    box = load_key_file(data_dir / KEY_NAME)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    con = sqlite3.connect(data_dir / "fleet.db")
    with con:
        for r in range(1, n_repos + 1):
            aad = f"repository:{r}"
            con.execute(
                "INSERT INTO repository (id, name, url_enc, password_enc, env_names, aad,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, '[]', ?, ?, ?)",
                (
                    r,
                    f"bench-repo-{r:05d}",
                    box.encrypt(f"/srv/restic/bench-{r}", repository_aad(aad, "url")),
                    box.encrypt(f"bench-pw-{r}", repository_aad(aad, "password")),
                    aad,
                    now,
                    now,
                ),
            )
        con.executemany(
            "INSERT INTO host_repository (host_id, repository_id, position, attached_at)"
            " VALUES (?, ?, 0, ?)",
            [(h, (h - 1) % n_repos + 1, now) for h in range(1, n_hosts + 1)],
        )
        con.executemany(
            "INSERT INTO job (uid, host_id, kind, status, actor_kind, params, created_at,"
            " repository_id) VALUES (?, ?, 'init', 'succeeded', 'system', '{}', ?, ?)",
            [(secrets.token_hex(16), h, now, (h - 1) % n_repos + 1) for h in range(1, n_hosts + 1)],
        )
    con.close()


def idle_window(pid: int, seconds: float) -> tuple[float, int]:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return (cpu_seconds(pid) - c0) / wall, rss_kib(pid)


def wait_all_up(fleet: Fleet, since: float, n: int, timeout: float) -> tuple[int, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(fleet.ups_since(since)) >= n:
            break
        time.sleep(0.1)
    return len(fleet.ups_since(since)), fleet.last_up_time(since)


async def send_runs(
    ctl: Ctl, hosts: list[int], names: list[str], deadline: float
) -> dict[int, tuple[int, float]]:
    """jobs.run (kind check) on each host, one after the other, until the
    deadline: job id -> (host index, time sent)."""
    sent: dict[int, tuple[int, float]] = {}
    for idx in hosts:
        if time.monotonic() > deadline:
            break
        t0 = time.time()
        try:
            reply = await ctl.call(
                "jobs.run",
                timeout=max(1.0, deadline - time.monotonic()),
                host=names[idx],
                kind="check",
            )
        except asyncio.TimeoutError:
            break
        if "result" in reply:
            sent[reply["result"]["id"]] = (idx, t0)
    return sent


async def dispatch_round(
    ctl: Ctl, fleet: Fleet, hosts: list[int], names: list[str], budget: float
) -> tuple[list[float], int]:
    """jobs.run (kind check) on each host, one after the other; latency to command.run."""
    deadline = time.monotonic() + budget
    sent = {j: t0 for j, (_idx, t0) in (await send_runs(ctl, hosts, names, deadline)).items()}
    await wait_runs(fleet, list(sent), min(30.0, max(5.0, deadline - time.monotonic())))
    got = fleet.arrived(sent)
    return [t - sent[j] for j, t in got.items()], len(sent)


async def scale_async(
    args,
    figs: Figures,
    url: str,
    token: str,
    fleet: Fleet,
    names: list[str],
    fleetd: Server,
    notes: list[str],
    order: Optional[list[int]] = None,
) -> None:
    """The latencies with N connected, every request through `url`; the
    hosts picked in `order` (default 0, 1, 2...: with replicas, the agents
    connected through the others first, so that what is measured crosses)."""
    n = len(names)
    order = list(range(n)) if order is None else order
    quick = args.quick
    # 3. ctl round trip
    async with Ctl(url + "/ctl", token) as ctl:
        rtts = []
        for _ in range(args.rtt_count):
            t0 = time.perf_counter()
            await ctl.call("auth.whoami")
            rtts.append(time.perf_counter() - t0)
    bare_rtt = args._bare_rtt
    med, p99 = statistics.median(rtts) * 1000, pct(rtts, 99) * 1000
    bmed, bp99 = statistics.median(bare_rtt) * 1000, pct(bare_rtt, 99) * 1000
    figs.add(
        "ctl round trip auth.whoami, median",
        med,
        "ms",
        bare=bmed,
        target="<= 3x bare",
        met=med <= 3 * bmed,
    )
    figs.add(
        "ctl round trip auth.whoami, p99",
        p99,
        "ms",
        bare=bp99,
        target="<= 3x bare",
        met=p99 <= 3 * bp99,
    )

    # 4. hosts.list
    async with Ctl(url + "/ctl", token) as ctl:
        t0 = time.perf_counter()
        reply = page_reply = await ctl.call("hosts.list", limit=500)
        page_s = time.perf_counter() - t0
        paged = "result" in reply
        if paged:
            got = reply["result"]
            count = len(got if isinstance(got, list) else got.get("hosts", got.get("items", [])))
            figs.add(
                "hosts.list, one page of 500",
                page_s * 1000,
                "ms",
                ref="-",
                target="<= 100 ms",
                met=page_s <= 0.1,
                note=f"{count} hosts returned",
            )
        t0 = time.perf_counter()
        reply = await ctl.call("hosts.list", timeout=300)
        full_s = time.perf_counter() - t0
        full_n = len(reply.get("result") or []) if isinstance(reply.get("result"), list) else None
        if not paged:
            msg = (page_reply.get("error") or {}).get("message", "")
            notes.append(
                f"hosts.list refused 'limit' ({msg or 'error'}): the page figure is the full, unpaged list"
            )
            figs.add(
                "hosts.list, one page of 500",
                full_s * 1000,
                "ms",
                ref="-",
                target="<= 100 ms, paged",
                met=False,
                note=f"UNPAGED: whole list of {full_n} hosts",
            )
        figs.add(
            f"hosts.list, whole fleet ({n})",
            full_s * 1000,
            "ms",
            ref="-",
            note=f"{(full_s * 1000 / max(n, 1)):.3f} ms per host",
        )

    # 5. dispatch latency: idle, with a lister, with 20 log streams
    k = min(200, n // 5)
    sets = [order[0:k], order[k : 2 * k], order[2 * k : 3 * k]]
    budget = 60.0 if not quick else 30.0
    async with Ctl(url + "/ctl", token) as ctl:
        lat, sent = await dispatch_round(ctl, fleet, sets[0], names, budget)
        add_dispatch(figs, "run-now dispatch, idle fleet", lat, sent, k)

        # while another operator loops hosts.list
        stop = asyncio.Event()
        lists = [0]

        async def lister() -> None:
            async with Ctl(url + "/ctl", token) as other:
                end = time.monotonic() + budget + 60
                while not stop.is_set() and time.monotonic() < end:
                    await other.call("hosts.list", timeout=300)
                    lists[0] += 1

        task = asyncio.ensure_future(lister())
        await asyncio.sleep(0.2)
        lat, sent = await dispatch_round(ctl, fleet, sets[1], names, budget)
        stop.set()
        add_dispatch(
            figs,
            "run-now dispatch, while hosts.list loops",
            lat,
            sent,
            k,
            note=f"{lists[0]} lists meanwhile",
        )
        try:
            await asyncio.wait_for(task, 300)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"the hosts.list loop ended with {exc!r}")

        # while 20 agents stream logs
        streamers = order[3 * k : 3 * k + min(20, n - 3 * k)]
        fleet.broadcast("streams", "reset")
        plan = {"duration": budget + 30, "window": 1000, "rate": args.stream_rate, "gate": True}
        for idx in streamers:
            fleet.to_host(idx, "plan", idx, plan)
        job_ids = []
        for idx in streamers:
            r = await ctl.call("jobs.run", host=names[idx], kind="check")
            job_ids.append(r["result"]["id"])
        await wait_runs(fleet, job_ids, 60)
        fleet.broadcast("streams", "go")
        await asyncio.sleep(1.0)  # the streams are flowing
        pre = [idx for idx in sets[2] if idx not in streamers]
        lat, sent = await dispatch_round(ctl, fleet, pre, names, budget)
        fleet.broadcast("streams", "stop")
        add_dispatch(
            figs,
            f"run-now dispatch, while {len(streamers)} agents stream",
            lat,
            sent,
            len(pre),
            note=f"each stream {args.stream_rate} lines/s, window 1000",
        )
        await asyncio.get_running_loop().run_in_executor(None, wait_streams, fleet, job_ids, 60)

    # 6. log ingest + a follower at restic's pace
    await log_ingest(args, figs, url, token, fleet, names, 3 * k + 20, notes, order)

    # 7. burst of run-nows on distinct hosts
    b = min(3000, n)
    conns = 4
    async with (
        Ctl(url + "/ctl", token) as c0,
        Ctl(url + "/ctl", token) as c1,
        Ctl(url + "/ctl", token) as c2,
        Ctl(url + "/ctl", token) as c3,
    ):
        ctls = [c0, c1, c2, c3]
        t0 = time.time()
        futs = []
        for i in range(b):
            futs.append(await ctls[i % conns].send("jobs.run", host=names[order[i]], kind="check"))
        done, pending = await asyncio.wait(futs, timeout=180)
        t_replies = time.time()
        job_ids = [
            f.result()["result"]["id"] for f in done if not f.exception() and "result" in f.result()
        ]
        await wait_runs(fleet, job_ids, 120)
        got = list(fleet.arrived(job_ids).values())
    total = (max(got) - t0) if got else None
    complete = len(got) == b
    figs.add(
        f"burst of {b} run-nows, all dispatched",
        total,
        "s",
        ref="-",
        target="<= 5 s (3,000)",
        met=complete and total is not None and total <= 5.0,
        note=f"{len(got)}/{b} command.run received; replies after {t_replies - t0:.2f} s; {conns} ctl connections pipelined",
    )


def add_dispatch(
    figs: Figures, name: str, lat: list[float], sent: int, wanted: int, note: str = ""
) -> None:
    lat_ms = [x * 1000 for x in lat]
    p50, p99 = pct(lat_ms, 50), pct(lat_ms, 99)
    extra = f"{len(lat)}/{wanted} dispatched" + (f"; {note}" if note else "")
    if sent < wanted:
        extra += f"; only {sent} sent within the time budget"
    figs.add(name + ", p50", p50, "ms", ref="-", note=extra)
    figs.add(
        name + ", p99",
        p99,
        "ms",
        ref="-",
        target="<= 50 ms",
        met=p99 is not None and p99 <= 50 and len(lat) == wanted,
    )


async def wait_runs(fleet: Fleet, job_ids: list[int], timeout: float) -> None:
    """Until every job's command.run has reached its agent (or the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with fleet.lock:
            if all(j in fleet.run_by_job for j in job_ids):
                return
        await asyncio.sleep(0.05)


def wait_streams(fleet: Fleet, job_ids: list[int], timeout: float) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with fleet.lock:
            if all(j in fleet.streams for j in job_ids):
                break
        time.sleep(0.1)
    with fleet.lock:
        return {j: fleet.streams[j] for j in job_ids if j in fleet.streams}


async def log_ingest(
    args,
    figs: Figures,
    url: str,
    token: str,
    fleet: Fleet,
    names: list[str],
    first: int,
    notes: list[str],
    order: Optional[list[int]] = None,
) -> None:
    n = len(names)
    order = list(range(n)) if order is None else order
    duration = args.ingest_seconds
    flooders = [order[i] for i in range(first, first + 20) if i < n - 1]
    paced = order[first + 20 if first + 20 < n else n - 1]
    fleet.broadcast("streams", "reset")
    for idx in flooders:
        fleet.to_host(idx, "plan", idx, {"duration": duration, "window": 1000, "gate": True})
    fleet.to_host(paced, "plan", paced, {"duration": duration, "rate": 50, "gate": True})
    lags: list[float] = []
    lines_seen = [0]

    def on_event(ev: dict) -> None:
        if ev.get("type") == "log":
            now = time.time()
            try:
                sent = float(ev["line"]["payload"].split(" ", 1)[0])
            except (KeyError, ValueError):
                return
            lags.append(now - sent)
            lines_seen[0] += 1

    async with Ctl(url + "/ctl", token) as ctl, Ctl(url + "/ctl", token) as follower:
        r = await ctl.call("jobs.run", host=names[paced], kind="check")
        paced_job = r["result"]["id"]
        tail = await follower.send("jobs.tail", on_event=on_event, id=paced_job)
        job_ids = []
        for idx in flooders:
            r = await ctl.call("jobs.run", host=names[idx], kind="check")
            job_ids.append(r["result"]["id"])
        await wait_runs(fleet, job_ids + [paced_job], 60)
        fleet.broadcast("streams", "go")  # every stream starts now, for the same window
        done = await asyncio.get_running_loop().run_in_executor(
            None, wait_streams, fleet, job_ids + [paced_job], duration + 90
        )
        try:
            await asyncio.wait_for(tail, 60)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"jobs.tail did not end cleanly: {exc!r}")
        stored = 0
        for j in job_ids:
            r = await ctl.call("jobs.show", id=j)
            stored += (r.get("result") or {}).get("log_lines", 0)
    flood = [done[j] for j in job_ids if j in done and "error" not in done[j]]
    if not flood:
        figs.add(
            "log ingest, stored lines/s",
            None,
            "lines/s",
            ref="-",
            target=">= 20,000/s",
            met=False,
            note="no stream finished",
        )
        return
    t0 = min(s["t_start"] for s in flood)
    t_end = max(s["t_end"] for s in flood)
    t_acked = max(s["t_all_acked"] for s in flood)
    sent = sum(s["lines"] for s in flood)
    acked_in_window = sum(s["acked_at_end"] for s in flood)
    rate = acked_in_window / max(t_end - t0, 1e-9)
    figs.add(
        f"log ingest, {len(flood)} agents, stored lines/s",
        rate,
        "lines/s",
        ref="-",
        target=">= 20,000/s",
        met=rate >= 20000,
        note=f"{acked_in_window} acked within {t_end - t0:.1f} s of {sent} sent; all acked {t_acked - t_end:.2f} s after; jobs.show counts {stored} stored",
    )
    p50, p99 = pct([x * 1000 for x in lags], 50), pct([x * 1000 for x in lags], 99)
    figs.add(
        "follower lag at 50 lines/s, p50",
        p50,
        "ms",
        ref="-",
        note=f"{lines_seen[0]} lines followed",
    )
    figs.add(
        "follower lag at 50 lines/s, p99",
        p99,
        "ms",
        ref="-",
        target="<= 250 ms",
        met=p99 is not None and p99 <= 250,
    )


def connect_fleet(fleet: Fleet, server: Server, url: str, concurrency: int) -> dict:
    """Connect every simulated agent; say how long, and the CPU the server
    and the simulators spent on it (they share the cores)."""
    c0, w0 = cpu_seconds(server.pid), fleet.worker_cpu()
    conn = fleet.connect(url, concurrency)
    print(
        f"{server.name}: {conn['ok']}/{fleet.n} connected in {conn['seconds']:.2f} s"
        f" (server {cpu_seconds(server.pid) - c0:.2f} s CPU,"
        f" simulators {fleet.worker_cpu() - w0:.2f} s)",
        flush=True,
    )
    return conn


def run_scale(args, figs: Figures, work: Path) -> None:
    n = args.agents
    notes: list[str] = []
    env = clean_env(FLEET_ADMIN_PASSWORD=ADMIN_PASSWORD)
    data = work / "fleetd"
    subprocess.run(
        [sys.executable, "-m", "fleet.server.cli", "init", "--data-dir", str(data)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    t0 = time.monotonic()
    agents = seed_hosts(data, n)
    names = [a[2] for a in agents]
    shared = ""
    if args.repositories:
        seed_repositories(data, n, args.repositories)
        shared = f", sharing {args.repositories} repositories"
    print(
        f"seeded {n} hosts{shared} into {data / 'fleet.db'} in {time.monotonic() - t0:.1f} s (direct SQLite insert, not /enroll)",
        flush=True,
    )
    fleet = Fleet(agents, args.workers)
    conc = args.concurrency
    try:
        # -- the bare baseline
        bare = Server(
            "bare", [str(Path(__file__).resolve()), "_bare"], work / "bare.log", clean_env()
        ).start()
        burl = f"ws://127.0.0.1:{bare.port}"
        bconn = connect_fleet(fleet, bare, burl + "/agent", conc)
        time.sleep(1.0)
        b_cpu, b_rss = idle_window(bare.pid, args.idle_seconds)
        args._bare_rtt = asyncio.run(bare_roundtrip(burl, args.rtt_count))
        b_term, _ = bare.sigterm()
        t_kill = time.time()
        bare2 = Server(
            "bare",
            [str(Path(__file__).resolve()), "_bare"],
            work / "bare.log",
            clean_env(BARE_PORT=str(bare.port)),
        ).start()
        b_up, b_last = wait_all_up(fleet, t_kill, n, args.restart_timeout)
        b_restart = b_last - bare2.spawned_at
        fleet.disconnect()
        bare2.sigterm()

        # -- fleetd (FLEET_BENCH_PROFILE=FILE: under cProfile, for finding where time goes)
        profile = os.environ.get("FLEET_BENCH_PROFILE")
        fleetd = Server(
            "fleetd",
            [
                *(["-m", "cProfile", "-o", profile] if profile else []),
                "-m",
                "fleet.server.cli",
                "serve",
                "--data-dir",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warning",
            ],
            work / "fleetd.log",
            clean_env(),
        ).start()
        url = f"ws://127.0.0.1:{fleetd.port}"
        token = asyncio.run(login(url))
        conn = connect_fleet(fleet, fleetd, url + "/agent", conc)
        args._sqlite_connect = conn  # for the replicas' side-by-side table (--replicas)
        print(
            "\nfigures (fleetd | bare websockets server or reference | ratio | target):", flush=True
        )
        figs.add(
            f"connects/s ({n} agents to welcome)",
            conn["rate"],
            "/s",
            bare=bconn["rate"],
            target=">= 1,000/s",
            met=conn["rate"] >= 1000 and conn["failed"] == 0,
            note=f"{conn['failed']} failed first attempts; bare {bconn['failed']}; {conc} in flight per worker",
        )
        time.sleep(1.0)
        f_cpu, f_rss = idle_window(fleetd.pid, args.idle_seconds)
        figs.add(
            f"idle CPU, {n} connected, {args.idle_seconds:.0f} s",
            f_cpu * 100,
            "% core",
            bare=b_cpu * 100,
            target="<= 2x bare",
            met=f_cpu <= 2 * b_cpu,
            ratio=(f_cpu / b_cpu) if b_cpu > 0 else None,
            note="utime+stime from /proc" + ("" if b_cpu > 0 else "; bare used no measurable CPU"),
        )
        figs.add(
            f"RSS, {n} connected",
            f_rss / 1024,
            "MiB",
            bare=b_rss / 1024,
            target="<= 1.3x bare",
            met=f_rss <= 1.3 * b_rss,
        )
        asyncio.run(scale_async(args, figs, url, token, fleet, names, fleetd, notes))

        # 8. SIGTERM with N connected
        args._sqlite_cpu = cpu_seconds(fleetd.pid)  # the whole run's, for --replicas
        f_term, code = fleetd.sigterm()
        t_kill = time.time()
        figs.add(
            f"SIGTERM with {n} connected -> exit",
            f_term,
            "s",
            bare=b_term,
            target="<= 2 s",
            met=f_term <= 2.0 and code == 0,
            note=f"exit status {code}",
        )
        # 9. restart on the same port; agents redial with fleet-agent's backoff
        fleetd2 = Server(
            "fleetd",
            [
                "-m",
                "fleet.server.cli",
                "serve",
                "--data-dir",
                str(data),
                "--listen",
                f"127.0.0.1:{fleetd.port}",
                "--log-level",
                "warning",
            ],
            work / "fleetd.log",
            clean_env(),
        ).start()
        f_up, f_last = wait_all_up(fleet, t_kill, n, args.restart_timeout)
        f_restart = f_last - fleetd2.spawned_at
        figs.add(
            f"restart: all {n} back (from spawn)",
            f_restart,
            "s",
            bare=b_restart,
            target="<= 20 s",
            met=f_up == n and f_restart <= 20,
            note=f"{f_up}/{n} back; listening {fleetd2.listening_at - fleetd2.spawned_at:.2f} s after spawn; bare {b_up}/{n}",
        )
        fleet.disconnect()
        fleetd2.sigterm()
    finally:
        try:
            fleet.quit()
        except Exception:  # noqa: BLE001
            pass
    if fleet.errors:
        notes.extend(fleet.errors[:10])
    for note in notes:
        print(f"  note: {note}", flush=True)


# -- the scale part on N replicas on PostgreSQL (--replicas N) ------------------------


def load_postgres() -> Any:
    """tests/postgres.py's Postgres (a real server in a temp dir, as nobody
    when root), imported by path: the tests use it unchanged."""
    spec = importlib.util.spec_from_file_location(
        "fleet_tests_postgres", ROOT / "tests" / "postgres.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Postgres


def seed_hosts_postgresql(pg: Any, dbname: str, n: int) -> list[tuple[int, str, str]]:
    """seed_hosts for PostgreSQL: the same rows, by COPY (after `fleetd
    init --database`, before serve); booleans are booleans, ids BIGSERIAL."""
    from fleet.server.security.auth import token_hash

    agents = []
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    with (
        pg.connect(dbname) as con,
        con.cursor() as cur,
        cur.copy(
            "COPY host (name, created_at, agent_token_hash, enrolled_at, online,"
            " schedule_version, applied_schedule_version, last_seq, labels) FROM STDIN"
        ) as copy,
    ):
        for i in range(n):
            token = f"agent_{secrets.token_urlsafe(32)}"
            name = f"bench-{i:05d}"
            agents.append((i, token, name))
            copy.write_row((name, now, token_hash(token), now, False, 0, 0, 0, "{}"))
    return agents


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (index 0 is field 3, state)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def postgres_usage(postmaster: int) -> dict[str, float]:
    """PostgreSQL's own CPU seconds (the postmaster's utime+stime, its reaped
    children's cutime+cstime, and every live child's utime+stime), and the
    sum of RSS (counting shared buffers once per process) and of PSS (shared
    pages split between the processes: the honest sum) over its processes."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(proc_stat(int(entry.name))[1]) == postmaster:
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    f = proc_stat(postmaster)
    cpu = sum(int(x) for x in f[11:15]) / TICKS
    rss, pss = rss_kib(postmaster), pss_kib(postmaster)
    for pid in children:
        try:
            cpu += cpu_seconds(pid)
            rss += rss_kib(pid)
            pss += pss_kib(pid)
        except OSError:
            continue
    return {"cpu": cpu, "rss": rss, "pss": pss, "procs": 1 + len(children)}


def fleetd_log_findings(paths: list[Path]) -> list[str]:
    """What the replicas logged at WARNING and above, counted by message
    (before the temp dir goes): the first lines of each kind."""
    found: dict[str, int] = {}
    tracebacks = 0
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tracebacks += text.count("Traceback")
        for line in text.splitlines():
            m = re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)", line)
            if m:
                key = f"{m.group(1)} {m.group(2)}: {re.sub(r'[0-9]+', 'N', m.group(3))[:150]}"
                found[key] = found.get(key, 0) + 1
    out = [f"fleetd logs: {tracebacks} tracebacks"]
    out += [
        f"fleetd logs: {count}x {key}"
        for key, count in sorted(found.items(), key=lambda kv: -kv[1])[:12]
    ]
    return out


async def dispatch_split(
    ctl: Ctl, fleet: Fleet, same: list[int], cross: list[int], names: list[str], budget: float
) -> tuple[list[float], list[float], int]:
    """run-now through one replica for agents on it and on others, alternately
    (the same conditions for both): latencies to command.run, same and cross."""
    hosts = [h for pair in zip(same, cross) for h in pair]
    mine = set(same)
    sent = await send_runs(ctl, hosts, names, time.monotonic() + budget)
    await wait_runs(fleet, list(sent), 30)
    got = {j: t - sent[j][1] for j, t in fleet.arrived(sent).items()}
    lat_same = [v for j, v in got.items() if sent[j][0] in mine]
    lat_cross = [v for j, v in got.items() if sent[j][0] not in mine]
    return lat_same, lat_cross, len(sent), {sent[j][0]: v for j, v in got.items()}


def unreached_findings(pg: Any, dbname: str, job_ids: list[int]) -> list[str]:
    """What the store says of run-nows whose command.run never reached the
    agent: the job's state, where its host's link was, and whether the
    event that should have woken that replica is in the event table."""
    out = [f"{len(job_ids)} run-now(s) have not reached their agent: {sorted(job_ids)[:20]}"]
    with pg.connect(dbname) as con:
        for job_id in sorted(job_ids)[:20]:
            row = con.execute(
                "SELECT j.status, j.dispatched_at, j.error, h.name, h.online, h.session_replica "
                "FROM job j JOIN host h ON h.id = j.host_id WHERE j.id = %s",
                (job_id,),
            ).fetchone()
            events = con.execute(
                "SELECT id, origin, kind FROM event WHERE body LIKE %s ORDER BY id",
                (f'%"job_id":{job_id},%',),
            ).fetchall()
            out.append(f"job {job_id}: {row}; events {events}")
    return out


def run_replicas(args, figs: Figures, work: Path) -> Figures:
    """The scale part again on `--replicas N` fleetd replicas sharing one
    PostgreSQL started here: agent i connects through replica i % N, and
    every operator request goes through replica 0, for hosts whose agents
    are on the others first (the run-now crosses: JobQueued through the
    event table and NOTIFY to the replica holding the link)."""
    n, r = args.agents, args.replicas
    label = f"{r} replica{'s' if r > 1 else ''} on PostgreSQL"
    print(f"\n-- the same on {label} --", flush=True)
    rfigs = Figures()
    notes: list[str] = []
    conc = args.concurrency
    servers: list[Server] = []
    fleet: Optional[Fleet] = None
    pg = None
    logs = [work / f"replica-{i}.log" for i in range(r)]
    try:
        if not hasattr(args, "_bare_rtt"):  # --only replicas: the whoami figures' baseline
            bare = Server(
                "bare", [str(Path(__file__).resolve()), "_bare"], work / "bare.log", clean_env()
            ).start()
            try:
                args._bare_rtt = asyncio.run(
                    bare_roundtrip(f"ws://127.0.0.1:{bare.port}", args.rtt_count)
                )
            finally:
                bare.sigterm()
        pg = load_postgres()().start()
        pg_base = postgres_usage(pg.proc.pid)
        dbname = pg.create_database()
        database = f"postgresql:///{dbname}?host={pg.root}&user=fleet"
        env = clean_env(FLEETD_DATABASE_PASSWORD=pg.password)
        data = work / "replicas"
        subprocess.run(
            [sys.executable, "-m", "fleet.server.cli", "init", "--data-dir", str(data),
             "--database", database],
            env=clean_env(FLEET_ADMIN_PASSWORD=ADMIN_PASSWORD, FLEETD_DATABASE_PASSWORD=pg.password),
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        t0 = time.monotonic()
        agents = seed_hosts_postgresql(pg, dbname, n)
        names = [a[2] for a in agents]
        print(
            f"seeded {n} hosts into PostgreSQL {dbname} in {time.monotonic() - t0:.1f} s (COPY, not /enroll)",
            flush=True,
        )
        if args.repositories:
            notes.append("--repositories is not seeded into PostgreSQL: its hosts have none")
        for i in range(r):
            servers.append(
                Server(
                    f"replica {i}",
                    [
                        "-m",
                        "fleet.server.cli",
                        "serve",
                        "--data-dir",
                        str(data),
                        "--listen",
                        "127.0.0.1:0",
                        "--log-level",
                        "warning",
                    ],
                    logs[i],
                    env,
                ).start()  # fmt: skip
            )
        pids = [s.pid for s in servers]
        urls = [f"ws://127.0.0.1:{s.port}" for s in servers]
        url = urls[0]
        token = asyncio.run(login(url))
        fleet = Fleet(agents, args.workers)
        # -- connect, each agent to replica i % N
        c0, w0, p0 = [cpu_seconds(p) for p in pids], fleet.worker_cpu(), postgres_usage(pg.proc.pid)
        conn = fleet.connect([u + "/agent" for u in urls], conc)
        c1, p1 = [cpu_seconds(p) for p in pids], postgres_usage(pg.proc.pid)
        conn_cpu = [b - a for a, b in zip(c0, c1)]
        print(
            f"{label}: {conn['ok']}/{n} connected in {conn['seconds']:.2f} s"
            f" (replicas {sum(conn_cpu):.2f} s CPU, max {max(conn_cpu):.2f} s;"
            f" postgres {p1['cpu'] - p0['cpu']:.2f} s; simulators {fleet.worker_cpu() - w0:.2f} s)",
            flush=True,
        )
        print(
            f"\nfigures ({label}, requests through replica 0 | reference | ratio | target):",
            flush=True,
        )
        sq = getattr(args, "_sqlite_connect", None)
        rfigs.add(
            f"connects/s ({n} agents to welcome)",
            conn["rate"],
            "/s",
            bare=sq["rate"] if sq else None,
            ref="SQLite fleetd" if sq else "",
            target=">= 1,000/s",
            met=conn["rate"] >= 1000 and conn["failed"] == 0,
            note=f"{conn['failed']} failed first attempts; {conc} in flight per worker; ref: the single SQLite fleetd",
        )
        rfigs.add(
            f"connect time, all {n} agents",
            conn["seconds"],
            "s",
            bare=sq["seconds"] if sq else None,
            ref="SQLite fleetd" if sq else "",
            note=f"replicas' CPU {sum(conn_cpu):.1f} s (max {max(conn_cpu):.1f}), postgres {p1['cpu'] - p0['cpu']:.1f} s",
        )
        time.sleep(1.0)
        # -- idle: every replica and PostgreSQL over one window
        c0, p0, t0 = [cpu_seconds(p) for p in pids], postgres_usage(pg.proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        wall = time.monotonic() - t0
        c1, p1 = [cpu_seconds(p) for p in pids], postgres_usage(pg.proc.pid)
        idle = [(b - a) / wall * 100 for a, b in zip(c0, c1)]
        rss = [rss_kib(p) / 1024 for p in pids]
        pg_idle = (p1["cpu"] - p0["cpu"]) / wall * 100
        sqlite_idle = next(
            (x["fleetd"] for x in figs.rows if x["name"].startswith("idle CPU")), None
        )
        sqlite_rss = next((x["fleetd"] for x in figs.rows if x["name"].startswith("RSS,")), None)
        rfigs.add(
            f"idle CPU, {n} connected, {args.idle_seconds:.0f} s, replicas' sum",
            sum(idle),
            "% core",
            bare=sqlite_idle,
            ref="SQLite fleetd" if sqlite_idle is not None else "",
            note="per replica: " + ", ".join(f"{x:.1f}" for x in idle) + f"; max {max(idle):.1f}",
        )
        rfigs.add(
            f"idle CPU, {args.idle_seconds:.0f} s, PostgreSQL",
            pg_idle,
            "% core",
            note=f"{p1['procs']} postgres processes; replicas + postgres {sum(idle) + pg_idle:.1f} % core",
        )
        rfigs.add(
            f"RSS, {n} connected, replicas' sum",
            sum(rss),
            "MiB",
            bare=sqlite_rss,
            ref="SQLite fleetd" if sqlite_rss is not None else "",
            note="per replica: " + ", ".join(f"{x:.0f}" for x in rss) + f"; max {max(rss):.0f}",
        )
        rfigs.add(
            "RSS, PostgreSQL (PSS sum)",
            p1["pss"] / 1024,
            "MiB",
            note=f"RSS sum {p1['rss'] / 1024:.0f} MiB counts shared buffers once per process; at start {pg_base['pss'] / 1024:.0f} MiB",
        )
        # -- the new cost: a run-now crossing replicas vs one staying on replica 0
        k = min(200, n // (2 * r))
        on_first = [i for i in range(n) if i % r == 0]
        elsewhere = [i for i in range(n) if i % r != 0]
        order = elsewhere + on_first
        if r > 1:

            async def split() -> tuple[list[float], list[float], int, dict[int, float]]:
                async with Ctl(url + "/ctl", token) as ctl:
                    return await dispatch_split(
                        ctl, fleet, on_first[-k:], elsewhere[-k:], names, 60.0
                    )

            lat_same, lat_cross, sent, by_host = asyncio.run(split())
            per = []
            for i in range(r):  # by the replica holding the link: is one slower?
                ms = [v * 1000 for h, v in by_host.items() if h % r == i]
                per.append(f"replica {i} {pct(ms, 50):.1f}/{pct(ms, 99):.1f}" if ms else "")
            notes.append(
                "run-now via replica 0 by the agent's replica, p50/p99 ms: " + ", ".join(per)
            )
            for what, lat in (
                ("agent on replica 0 (same)", lat_same),
                ("agent on another (cross)", lat_cross),
            ):
                ms = [x * 1000 for x in lat]
                rfigs.add(
                    f"run-now via replica 0, {what}, p50",
                    pct(ms, 50),
                    "ms",
                    ref="-",
                    note=f"{len(lat)}/{k} dispatched; same and cross alternated, {sent} sent",
                )
                rfigs.add(
                    f"run-now via replica 0, {what}, p99",
                    pct(ms, 99),
                    "ms",
                    ref="-",
                    target="<= 50 ms",
                    met=bool(ms) and pct(ms, 99) <= 50 and len(lat) == k,
                )
        # -- the SQLite part's latencies, every request through replica 0
        cpu_before = [cpu_seconds(p) for p in pids]
        pg_before = postgres_usage(pg.proc.pid)
        asyncio.run(scale_async(args, rfigs, url, token, fleet, names, servers[0], notes, order))
        with fleet.lock:  # while the replicas and their links are up
            late = [j for j in fleet.unreached if j in fleet.run_by_job]
            unreached = [j for j in fleet.unreached if j not in fleet.run_by_job]
        if late:
            notes.append(f"{len(late)} run-now(s) reached their agent after their round's wait")
        if unreached:
            try:
                notes.extend(unreached_findings(pg, dbname, unreached))
            except Exception as exc:  # noqa: BLE001 - a diagnosis, not a figure
                notes.append(f"could not look into the unreached jobs: {exc!r}")
        cpu_after = [cpu_seconds(p) for p in pids]
        pg_after = postgres_usage(pg.proc.pid)
        used = [b - a for a, b in zip(cpu_before, cpu_after)]
        rfigs.add(
            "CPU over the latency figures, replicas' sum",
            sum(used),
            "s",
            ref="-",
            note="per replica: "
            + ", ".join(f"{x:.1f}" for x in used)
            + f"; postgres {pg_after['cpu'] - pg_before['cpu']:.1f} s",
        )
        total = sum(cpu_seconds(p) for p in pids)
        sqlite_cpu = getattr(args, "_sqlite_cpu", None)
        rfigs.add(
            "CPU, whole run, replicas' sum",
            total,
            "s",
            bare=sqlite_cpu,
            ref="SQLite fleetd" if sqlite_cpu is not None else "",
            note=f"from spawn to SIGTERM, as the SQLite fleetd's; postgres {pg_after['cpu'] - pg_base['cpu']:.1f} s more",
        )
        # -- SIGTERM every replica at once with N connected
        t0 = time.monotonic()
        for s in servers:
            s.proc.send_signal(signal.SIGTERM)
        codes = []
        for s in servers:
            try:
                codes.append(s.proc.wait(max(1.0, 60 - (time.monotonic() - t0))))
            except subprocess.TimeoutExpired:
                s.kill()
                codes.append(None)
        term = time.monotonic() - t0
        rfigs.add(
            f"SIGTERM with {n} connected -> exit (all replicas)",
            term,
            "s",
            ref="-",
            target="<= 2 s",
            met=term <= 2.0 and all(c == 0 for c in codes),
            note=f"exit statuses {codes}",
        )
    finally:
        for s in servers:
            try:
                s.end()
            except Exception:  # noqa: BLE001 - cleaning up whatever happened
                pass
        if fleet is not None:
            try:
                fleet.disconnect()
                fleet.quit()
            except Exception:  # noqa: BLE001
                pass
        if pg is not None:
            pg.stop()
    if fleet is not None and fleet.errors:
        notes.extend(fleet.errors[:10])
    notes.extend(fleetd_log_findings(logs))
    for note in notes:
        print(f"  note: {note}", flush=True)
    return rfigs


def print_side_by_side(figs: Figures, rfigs: Figures, label: str) -> None:
    """Every figure of the replicas' run beside the single SQLite fleetd's of the same name."""
    sqlite = {x["name"]: x for x in figs.rows}
    print(f"\nside by side (single SQLite fleetd | {label}):", flush=True)
    for row in rfigs.rows:
        name = row["name"].removesuffix(", replicas' sum").removesuffix(" (all replicas)")
        other = sqlite.get(row["name"]) or sqlite.get(name)
        left = (
            Figures.fmt(other["fleetd"], other["unit"])
            if other
            else (
                Figures.fmt(row["bare"], row["unit"])
                if row["reference"] == "SQLite fleetd"
                else "-"
            )
        )
        print(
            f"  {row['name']:<58} {left:>16} | {Figures.fmt(row['fleetd'], row['unit']):>16}"
            f"  target: {row['target']:<18} {(other or {}).get('verdict', ''):<7}| {row['verdict']:<7}",
            flush=True,
        )


async def login(url: str) -> str:
    async with Ctl(url + "/login", None) as c:
        r = await c.call("auth.login", user="admin", password=ADMIN_PASSWORD, token_name="bench")
    if "result" not in r:
        raise RuntimeError(f"login failed: {r}")
    return r["result"]["token"]


# -- the status part ----------------------------------------------------------------


def seed_history(data_dir: Path, n_hosts: int) -> None:
    """For each seeded host a source group on a nightly schedule (60
    distinct cron lines, as staggered start minutes give) and three backups
    behind it, one in seven of them failed: what `fleetctl status`, /metrics
    and the alerts read."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    ts = now.strftime("%Y-%m-%d %H:%M:%S.%f")
    ended = (now - dt.timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
    ids = range(1, n_hosts + 1)
    con = sqlite3.connect(data_dir / "fleet.db")
    with con:
        con.executemany(
            "INSERT INTO source_group (id, host_id, name, includes, excludes, retention, retries,"
            " retry_delay, created_at, updated_at) VALUES (?, ?, 'etc', '[\"/etc\"]', '[]', '{}',"
            " 0, 300, ?, ?)",
            [(i, i, ts, ts) for i in ids],
        )
        con.executemany(
            "INSERT INTO schedule (id, host_id, name, cron, enabled, created_at, updated_at)"
            " VALUES (?, ?, 'nightly', ?, 1, ?, ?)",
            [(i, i, f"{i % 60} 2 * * *", ts, ts) for i in ids],
        )
        con.executemany(
            "INSERT INTO schedule_group (schedule_id, group_id) VALUES (?, ?)",
            [(i, i) for i in ids],
        )
        con.executemany(
            "INSERT INTO job (uid, host_id, kind, status, actor_kind, params, created_at,"
            " started_at, finished_at, group_id, group_name, summary, error) VALUES"
            " (?, ?, 'backup', ?, 'schedule', '{}', ?, ?, ?, ?, 'etc', ?, ?)",
            [
                (
                    secrets.token_hex(16),
                    i,
                    "failed" if (i + k) % 7 == 0 else "succeeded",
                    ts,
                    ended,
                    ended,
                    i,
                    None if (i + k) % 7 == 0 else '{"data_added": 4096}',
                    "Fatal: unable to open repository" if (i + k) % 7 == 0 else None,
                )
                for k in range(3)
                for i in ids
            ],
        )
    con.close()


def scrape_metrics(url: str, token: str) -> tuple[float, int]:
    import urllib.request

    request = urllib.request.Request(url.replace("ws", "http", 1) + "/metrics")
    request.add_header("Authorization", f"Bearer {token}")
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as reply:
        body = reply.read()
    return time.perf_counter() - t0, body.count(b"\n")


def init_fleetd(data: Path) -> None:
    """`fleetd init` of a fresh data dir, with the bench's admin password."""
    subprocess.run(
        [sys.executable, "-m", "fleet.server.cli", "init", "--data-dir", str(data)],
        env=clean_env(FLEET_ADMIN_PASSWORD=ADMIN_PASSWORD),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def serve_fleetd(data: Path, log: Path, *extra: str) -> Server:
    """A `fleetd serve` of `data` on a port the OS picks, started."""
    argv = ["-m", "fleet.server.cli", "serve", "--data-dir", str(data)]
    argv += ["--listen", "127.0.0.1:0", "--log-level", "warning", *extra]
    return Server("fleetd", argv, log, clean_env()).start()


def run_status(args, figs: Figures, work: Path) -> None:
    """status.show and /metrics over N hosts with groups, schedules and
    backups (no agents connected), beside the plain whole-fleet hosts.list;
    and the operator's round trip while status.show loops (the health read
    runs on the store's reader thread, not the loop)."""
    n = args.agents
    data = work / "status-fleetd"
    init_fleetd(data)
    t0 = time.monotonic()
    seed_hosts(data, n)
    seed_history(data, n)
    print(
        f"seeded {n} hosts, each with a group, a nightly schedule and 3 backups, "
        f"in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    fleetd = serve_fleetd(data, work / "status-fleetd.log", "--metrics")
    url = f"ws://127.0.0.1:{fleetd.port}"
    try:

        async def measure() -> dict[str, Any]:
            token = await login(url)
            out: dict[str, Any] = {"token": token}
            async with Ctl(url + "/ctl", token) as c:
                for name, method, params in (
                    ("list", "hosts.list", {}),
                    ("status", "status.show", {}),
                ):
                    times = []
                    for _ in range(5):
                        t = time.perf_counter()
                        reply = await c.call(method, **params)
                        times.append(time.perf_counter() - t)
                        assert "result" in reply, reply
                    out[name] = times
                    out[name + "_reply"] = reply["result"]
                # the loop stays free while status.show reads: whoami round trips meanwhile
                rtts: list[float] = []
                busy = asyncio.ensure_future(
                    asyncio.gather(*(c.call("status.show") for _ in range(3)))
                )
                while not busy.done():
                    t = time.perf_counter()
                    await c.call("auth.whoami")
                    rtts.append(time.perf_counter() - t)
                    await asyncio.sleep(0.005)
                await busy
                out["rtts"] = rtts
                out["alerts"] = (await c.call("alerts.list"))["result"]
            return out

        got = asyncio.run(measure())
        scrapes = [scrape_metrics(url, got["token"]) for _ in range(3)]
    finally:
        fleetd.sigterm()
    status_s = statistics.median(got["status"])
    list_s = statistics.median(got["list"])
    problems = len(got["status_reply"]["problems"])
    figs.add(
        f"status.show, {n} hosts with schedules, median",
        status_s * 1000,
        "ms",
        bare=list_s * 1000,
        ref="hosts.list",
        target="<= 2000 ms",
        met=status_s <= 2.0,
        note=f"{problems} problems found; max {max(got['status']) * 1000:.0f} ms of 5",
    )
    scrape_s = statistics.median(s for s, _ in scrapes)
    figs.add(
        f"GET /metrics, {n} hosts, median",
        scrape_s * 1000,
        "ms",
        bare=list_s * 1000,
        ref="hosts.list",
        target="<= 2000 ms",
        met=scrape_s <= 2.0,
        note=f"{scrapes[0][1]} lines",
    )
    rtts = sorted(got["rtts"])
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else None
    figs.add(
        "ctl round trip while status.show loops, p99",
        None if p99 is None else p99 * 1000,
        "ms",
        target="<= 50 ms",
        met=p99 is not None and p99 <= 0.05,
        note=f"{len(rtts)} round trips; {len(got['alerts'])} alerts open after fleetd's first look",
    )


# -- the templates part ------------------------------------------------------------


def run_templates(args, figs: Figures, work: Path) -> None:
    """One template over N/2 hosts beside the same settings made by hand,
    and the operator's round trip while it is applied."""
    n = args.agents
    data = work / "templates-fleetd"
    init_fleetd(data)
    seed_hosts(data, n)
    con = sqlite3.connect(data / "fleet.db")
    with con:  # every other host is a web server
        con.execute(
            """UPDATE host SET labels = '{"role":"web"}' WHERE id % 2 = 1"""
        )  # names bench-00000, -00002 ...
    con.close()
    picked = n // 2
    fleetd = serve_fleetd(data, work / "templates-fleetd.log")
    url = f"ws://127.0.0.1:{fleetd.port}"
    spec = {
        "repositories": ["bench-repo"],
        "groups": {"www": {"includes": ["/etc", "/var/www"], "retention": {"keep_daily": 7}}},
        "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["www"]}},
    }
    sample = min(200, picked)
    try:

        async def measure() -> dict[str, Any]:
            token = await login(url)
            out: dict[str, Any] = {}
            async with Ctl(url + "/ctl", token) as c:

                async def ok(method: str, **params: Any) -> Any:
                    reply = await c.call(method, timeout=600, **params)
                    assert "result" in reply, reply
                    return reply["result"]

                await ok("repos.create", name="bench-repo", url="/srv/bench", password="pw")
                # by hand, on hosts the template does not pick: three calls a host
                odd = [f"bench-{i:05d}" for i in range(n) if i % 2 == 1][:sample]
                t = time.perf_counter()
                for h in odd:
                    await ok("repos.use", name="bench-repo", hosts=[h])
                    await ok("groups.create", host=h, name="www", includes=["/etc", "/var/www"])
                    await ok(
                        "schedules.create", host=h, name="nightly", cron="0 2 * * *", groups=["www"]
                    )
                out["by_hand"] = (time.perf_counter() - t) / len(odd)
                rtts: list[float] = []
                t = time.perf_counter()
                busy = asyncio.ensure_future(
                    ok("templates.set", name="web", selector="role=web", spec=spec)
                )
                writes: list[float] = []
                flip = itertools.count()
                while not busy.done():
                    t1 = time.perf_counter()
                    await c.call("hosts.show", host="bench-00001")
                    rtts.append(time.perf_counter() - t1)
                    t1 = time.perf_counter()  # a write waits for the chunk in hand
                    await ok("hosts.label", host="bench-00003", set={"n": str(next(flip) % 2)})
                    writes.append(time.perf_counter() - t1)
                    await asyncio.sleep(0.01)
                result = await busy
                out["set"] = time.perf_counter() - t
                out["result"] = result
                out["rtts"] = rtts
                out["writes"] = writes
                t = time.perf_counter()
                out["again"] = await ok("templates.apply", name="web")
                out["apply"] = time.perf_counter() - t
            return out

        got = asyncio.run(measure())
    finally:
        fleetd.sigterm()
    result = got["result"]
    assert (result["picked"], result["changed"], result["failed"]) == (picked, picked, 0), {
        k: result[k] for k in ("picked", "changed", "failed")
    }
    by_hand = got["by_hand"] * picked
    figs.add(
        f"templates.set, {picked} of {n} hosts",
        got["set"],
        "s",
        bare=by_hand,
        ref="by hand",
        target="<= by hand",
        met=got["set"] <= by_hand,
        note=f"by hand: 3 calls a host, {got['by_hand'] * 1000:.1f} ms a host over {sample}",
    )
    again = got["again"]
    figs.add(
        f"templates.apply, nothing to change, {picked} hosts",
        got["apply"],
        "s",
        bare=got["set"],
        ref="templates.set",
        target="<= templates.set",
        met=got["apply"] <= got["set"] and again["changed"] == 0,
        note=f"{again['changed']} changed",
    )
    rtts = sorted(got["rtts"])
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else None
    figs.add(
        "ctl round trip (hosts.show) while it applies, p99",
        None if p99 is None else p99 * 1000,
        "ms",
        target="<= 50 ms",
        met=p99 is not None and p99 <= 0.05,
        note=f"{len(rtts)} round trips",
    )
    writes = sorted(got["writes"])
    p99 = writes[min(len(writes) - 1, int(len(writes) * 0.99))] if writes else None
    figs.add(
        "a write (hosts.label) while it applies, p99",
        None if p99 is None else p99 * 1000,
        "ms",
        target="<= 500 ms",
        met=p99 is not None and p99 <= 0.5,
        note=f"{len(writes)} writes; it waits for the chunk of 25 hosts in hand",
    )


# -- the backups part --------------------------------------------------------------


def make_tree(root: Path, mib: int, seed: int = 1) -> None:
    """~mib MiB: a few large incompressible files, many small text-ish files."""
    rng = random.Random(seed)
    big = max(1, mib * 3 // 4)
    nbig = max(1, big // 8)
    for i in range(nbig):
        p = root / "big" / f"blob{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom((big << 20) // nbig))
    small_bytes = (mib - big) << 20
    count = max(1, small_bytes // 16384)
    words = [secrets.token_hex(4) for _ in range(512)]
    for i in range(count):
        p = root / "small" / f"d{i // 200:03d}" / f"f{i:05d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            " ".join(rng.choice(words) for _ in range(1800)) + f"\n{os.urandom(512).hex()}\n"
        )


def mutate_tree(root: Path) -> None:
    """An incremental's worth of change: ~5% of files rewritten, some new ones."""
    rng = random.Random(2)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in rng.sample(files, max(1, len(files) // 20)):
        with open(p, "ab") as f:
            f.write(os.urandom(4096))
    (root / "new").mkdir(exist_ok=True)
    for i in range(20):
        (root / "new" / f"n{i}.bin").write_bytes(os.urandom(64 << 10))


def run_backups(args, figs: Figures, work: Path) -> None:
    restic = shutil.which("restic")
    if restic is None:
        raise RuntimeError("restic not found on PATH (make restic)")
    base = work / "backups"
    src = base / "src"
    src.mkdir(parents=True)
    t0 = time.monotonic()
    make_tree(src, args.backup_mib)
    print(
        f"\nbackups: source tree of {args.backup_mib} MiB written in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    subprocess.run(
        ["cat", *map(str, sorted(p for p in src.rglob("*") if p.is_file()))],
        stdout=subprocess.DEVNULL,
    )  # warm the page cache
    password = "bench-repo-password"
    (base / "pass").write_text(password + "\n")
    renv = clean_env(
        RESTIC_PASSWORD=password,
        RESTIC_REPOSITORY=str(base / "raw-repo"),
        RESTIC_CACHE_DIR=str(base / "cache-raw"),
    )
    subprocess.run([restic, "init"], env=renv, check=True, capture_output=True)

    def raw_backup() -> float:
        t = time.monotonic()
        subprocess.run(
            [restic, "backup", "--json", "--tag", "g", "--", str(src)],
            env=renv,
            check=True,
            capture_output=True,
            timeout=1800,
        )
        return time.monotonic() - t

    # a fleetd and one real agent
    env = clean_env(FLEET_ADMIN_PASSWORD=ADMIN_PASSWORD)
    data = base / "fleetd"
    subprocess.run(
        [sys.executable, "-m", "fleet.server.cli", "init", "--data-dir", str(data)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    fleetd = Server(
        "fleetd",
        ["-m", "fleet.server.cli", "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"],
        base / "fleetd.log",
        clean_env(),
    ).start()
    agent = None
    agent_log = open(base / "agent.log", "ab")  # noqa: SIM115 - closed below
    try:
        url = f"ws://127.0.0.1:{fleetd.port}"
        token = asyncio.run(login(url))
        cenv = clean_env(
            FLEET_SERVER=url,
            FLEET_TOKEN=token,
            XDG_CONFIG_HOME=str(base / "xdg"),
            COLUMNS="200",
            NO_COLOR="1",
        )

        def ctl(*a: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(ROOT / "fleetctl"), *a],
                env=cenv,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=check,
                timeout=timeout,
            )

        enrollment = json.loads(ctl("enroll", "bench-backup", "--json").stdout)["enrollment"]
        aenv = clean_env(RESTIC_CACHE_DIR=str(base / "cache-fleet"))
        state = base / "agent"
        subprocess.run(
            [str(ROOT / "fleet-agent"), "enroll", enrollment, "--state-dir", str(state)],
            env=aenv,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        ctl(
            "repo",
            "set",
            "bench-backup",
            "--url",
            str(base / "fleet-repo"),
            "--password-file",
            str(base / "pass"),
        )
        agent = subprocess.Popen(
            [str(ROOT / "fleet-agent"), "run", "--state-dir", str(state), "--restic", restic],
            env=aenv,
            cwd=ROOT,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # fleetd's auto-init has made the repository
            out = ctl(
                "jobs", "list", "--kind", "init", "--status", "succeeded", "--json", check=False
            ).stdout
            if out.strip() not in ("", "[]"):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("the agent's repository was never initialised")
        ctl("groups", "create", "bench-backup", "g", "--include", str(src))

        def fleet_backup() -> tuple[float, Optional[float], str]:
            t = time.monotonic()
            proc = ctl("run", "bench-backup", "g", "--follow", check=False)
            wall = time.monotonic() - t
            m = re.search(r"job (\d+) queued", proc.stderr)
            job = json.loads(ctl("jobs", "show", m.group(1), "--json").stdout) if m else {}
            inner = None
            if job.get("started_at") and job.get("finished_at"):
                parse = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
                inner = (parse(job["finished_at"]) - parse(job["started_at"])).total_seconds()
            return wall, inner, job.get("status", f"exit {proc.returncode}")

        raw1 = raw_backup()
        f1, f1_inner, s1 = fleet_backup()
        mutate_tree(src)
        subprocess.run(
            ["cat", *map(str, sorted(p for p in src.rglob("*") if p.is_file()))],
            stdout=subprocess.DEVNULL,
        )
        raw2 = raw_backup()
        f2, f2_inner, s2 = fleet_backup()
        starts = []
        for _ in range(3):  # what a fleetctl process costs before it says anything
            t = time.monotonic()
            ctl("--version")
            starts.append(time.monotonic() - t)
        startup = statistics.median(starts)
        figs.add(
            "fleetctl start-up (fleetctl --version)", startup, "s", ref="-", note="median of 3"
        )
        for label, wall, inner, status, raw, limit in (
            (f"first backup, {args.backup_mib} MiB", f1, f1_inner, s1, raw1, 1.05),
            ("incremental backup", f2, f2_inner, s2, raw2, 1.3),
        ):
            figs.add(
                f"{label} (fleetctl run --follow)",
                wall,
                "s",
                bare=raw,
                target=f"<= {limit}x raw restic",
                met=wall <= limit * raw and status == "succeeded",
                note=(
                    f"job {status}; {(wall - startup) / raw:.2f}x without fleetctl's start-up; "
                    f"job started_at..finished_at {inner} s (whole seconds); "
                    "bare = raw restic backup --json"
                ),
            )
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
        agent_log.close()
        fleetd.sigterm()


# -- main --------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["_bare"]:
        raise_nofile()
        asyncio.run(bare_server_main())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=4, help="agent simulator processes")
    ap.add_argument("--concurrency", type=int, default=200, help="connects in flight per worker")
    ap.add_argument(
        "--only",
        choices=("scale", "status", "templates", "backups", "all", "replicas"),
        default="all",
        help="replicas: only the scale part's run on --replicas N (default 3), no single fleetd",
    )
    ap.add_argument("--json", dest="json_out", help="also write the figures here as JSON")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 500 agents, short windows, 20 MiB backups"
    )
    ap.add_argument(
        "--repositories",
        type=int,
        default=0,
        help="seed this many repositories, host i using repository i %% N (0: hosts have none)",
    )
    ap.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="the scale part also on N fleetd replicas on a PostgreSQL started here (0: not)",
    )
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--ingest-seconds", type=float, default=10.0)
    ap.add_argument(
        "--stream-rate",
        type=int,
        default=1000,
        help="lines/s of each of the 20 streams during the dispatch-while-streaming figure",
    )
    ap.add_argument("--rtt-count", type=int, default=500)
    ap.add_argument("--restart-timeout", type=float, default=120.0)
    ap.add_argument("--backup-mib", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    args = ap.parse_args()
    if args.quick:
        args.agents = min(args.agents, 500) if "--agents" in sys.argv else 500
        args.idle_seconds = min(args.idle_seconds, 5.0)
        args.ingest_seconds = min(args.ingest_seconds, 5.0)
        args.backup_mib = min(args.backup_mib, 20)
        args.restart_timeout = min(args.restart_timeout, 60.0)
    if args.agents < 50:
        ap.error("--agents: at least 50")
    hard = raise_nofile()
    if args.agents + 1000 > hard:
        print(
            f"warning: RLIMIT_NOFILE hard limit {hard} is tight for {args.agents} agents",
            file=sys.stderr,
        )
    if not 0 <= args.replicas <= 10:
        ap.error("--replicas: 0 to 10 (each holds up to 8 of PostgreSQL's 100 connections)")
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    figs = Figures()
    rfigs: Optional[Figures] = None
    import websockets

    load = os.getloadavg()
    print(
        f"fleet_scale: {args.agents} agents in {args.workers} worker processes; websockets {websockets.__version__}; "
        f"{os.cpu_count()} CPUs; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; work dir {work}",
        flush=True,
    )
    started = time.monotonic()

    def terminated(signum: int, _frame: Any) -> None:
        raise SystemExit(f"fleet_scale: {signal.Signals(signum).name}, cleaning up")

    signal.signal(signal.SIGTERM, terminated)  # the finally blocks below end what was started
    try:
        if args.only in ("scale", "all"):
            run_scale(args, figs, work)
            if args.replicas:
                rfigs = run_replicas(args, figs, work)
                label = f"{args.replicas} replicas on PostgreSQL"
                print_side_by_side(figs, rfigs, label)
        if args.only == "replicas":
            args.replicas = args.replicas or 3
            rfigs = run_replicas(args, figs, work)
        if args.only in ("status", "all"):
            run_status(args, figs, work)
        if args.only in ("templates", "all"):
            run_templates(args, figs, work)
        if args.only in ("backups", "all"):
            run_backups(args, figs, work)
    finally:
        for server in STARTED:  # left running by a failure
            try:
                server.end()
            except Exception:  # noqa: BLE001 - ending the others all the same
                pass
        if args.json_out:
            Path(args.json_out).write_text(
                json.dumps(
                    {
                        "agents": args.agents,
                        "workers": args.workers,
                        "quick": args.quick,
                        "websockets": websockets.__version__,
                        "cpus": os.cpu_count(),
                        "loadavg_at_start": load,
                        "figures": figs.rows,
                        **(
                            {"replicas": args.replicas, "replica_figures": rfigs.rows}
                            if rfigs is not None
                            else {}
                        ),
                    },
                    indent=2,
                )
                + "\n"
            )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    met = sum(r["verdict"] == "MET" for r in figs.rows)
    missed = sum(r["verdict"] == "MISSED" for r in figs.rows)
    replicas = ""
    if rfigs is not None:
        rmet = sum(r["verdict"] == "MET" for r in rfigs.rows)
        rmissed = sum(r["verdict"] == "MISSED" for r in rfigs.rows)
        replicas = f" (single fleetd); on {args.replicas} replicas {rmet} met, {rmissed} missed"
    print(
        f"\n{met} targets met, {missed} missed{replicas}; {time.monotonic() - started:.0f} s in all",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
