"""Idle cost of fleet-agent: CPU seconds and resident memory over a quiet minute.

Starts a real fleetd (SQLite in a temp dir) and one enrolled agent holding
a nightly schedule (its scheduler sleeps until the fire, reading the clock
once a minute), waits until the agent is online, its repository
initialised and its schedule applied, then samples
/proc for SECONDS of idleness. A bare `python3 -c 'sleep'` is measured in
the same run as the baseline, so the figures print as ratios too.

    .venv/bin/python bench/agent_idle.py [--seconds 60] [--pyz dist/fleet-agent.pyz] [--python python3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise SystemExit(f"no '{prefix}' line from {proc.args[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--pyz", help="run the agent from this zipapp instead of the checkout")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the agent")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(work / "config"),
        "FLEET_ADMIN_PASSWORD": "bench-password-1",
    }
    env.pop("FLEET_SERVER", None)
    env.pop("FLEET_TOKEN", None)
    py = sys.executable
    subprocess.run(
        [py, "-m", "fleet.server.cli", "init", "--data-dir", str(work / "fleetd")],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    fleetd = subprocess.Popen(
        [
            py,
            "-m",
            "fleet.server.cli",
            "serve",
            "--data-dir",
            str(work / "fleetd"),
            "--listen",
            "127.0.0.1:0",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    agent = baseline = None
    try:
        url = wait_line(fleetd, "fleetd listening on ").rsplit(" ", 1)[1]
        ctl = [py, "-m", "fleet.ctl.main", "--server", url]
        subprocess.run(
            [*ctl, "login", "--password-stdin"],
            input="bench-password-1\n",
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        enrollment = json.loads(
            subprocess.run(
                [*ctl, "enroll", "bench", "--json"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )["enrollment"]
        (work / "pass").write_text("bench-repo-pass\n")
        subprocess.run(
            [
                *ctl,
                "repo",
                "set",
                "bench",
                "--url",
                str(work / "repo"),
                "--password-file",
                str(work / "pass"),
            ],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        for step in (
            ["groups", "create", "bench", "etc", "--include", str(work)],
            ["schedules", "create", "bench", "--cron", "30 2 * * *", "--group", "etc"],
        ):
            subprocess.run([*ctl, *step], env=env, cwd=ROOT, check=True, capture_output=True)
        agent_cmd = [args.python, args.pyz] if args.pyz else [args.python, "-m", "fleet.agent.cli"]
        agent_env = {**env, "SHIV_ROOT": str(work / "shiv")}
        subprocess.run(
            [*agent_cmd, "enroll", enrollment, "--state-dir", str(work / "agent")],
            env=agent_env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        agent = subprocess.Popen(
            [*agent_cmd, "run", "--state-dir", str(work / "agent")],
            env=agent_env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # online and its repository initialised: now it is idle
            out = subprocess.run(
                [*ctl, "jobs", "list", "--kind", "init", "--status", "succeeded", "--json"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout
            host = subprocess.run(
                [*ctl, "hosts", "show", "bench", "--json"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout
            if out.strip() not in ("", "[]") and not json.loads(host)["schedule_lagging"]:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the agent never became idle")
        baseline = subprocess.Popen([args.python, "-c", "import time; time.sleep(1e6)"])
        time.sleep(1.0)  # let both settle after start-up work
        a0, b0, t0 = cpu_seconds(agent.pid), cpu_seconds(baseline.pid), time.monotonic()
        peak = 0
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            peak = max(peak, rss_kib(agent.pid))
        wall = time.monotonic() - t0
        a_cpu, b_cpu = cpu_seconds(agent.pid) - a0, cpu_seconds(baseline.pid) - b0
        a_rss, b_rss = rss_kib(agent.pid), rss_kib(baseline.pid)
        version = subprocess.run(
            [args.python, "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(
            f"fleet-agent idle for {wall:.0f} s ({version}, {'zipapp' if args.pyz else 'checkout'}, heartbeat every 30 s, one schedule)"
        )
        print(
            f"  CPU: {a_cpu:.3f} s  = {100 * a_cpu / wall:.3f}% of one core   (bare interpreter: {b_cpu:.3f} s)"
        )
        print(
            f"  RSS: {a_rss / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB) = {a_rss / max(b_rss, 1):.1f}x a bare interpreter ({b_rss / 1024:.1f} MiB)"
        )
    finally:
        for proc in (baseline, agent, fleetd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
