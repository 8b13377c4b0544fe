"""Fifty hosts from fleetctl, for real: enrolled with a label, configured by
one template, upgraded in batches.

    .venv/bin/python bench/fifty_hosts.py [--hosts 50] [--batch 10] [--python python3.9]

Builds the agent zipapp twice (the checkout's version, and one stamped
VERSION+1 as `make agent` does with FLEET_AGENT_VERSION), starts a fleetd on
SQLite serving the second, enrolls N hosts with `fleetctl enroll --label
role=web` and runs a real `fleet-agent` for each from its own copy of the
first file, sets one template (a repository, a group, a nightly schedule)
on role=web, waits until every agent holds the template's schedule, and
rolls the new agent out with `fleetctl agents upgrade --batch B`. Prints
how long each step took, beside what it would take by hand where there is
such a thing, and checks that every host ended with the template and the
new version. Exit status 0 when all of that held, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def env_clean(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "RESTIC_"))}
    env.update(extra)
    return env


def build(out: Path, version: str = "") -> Path:
    extra = {"FLEET_AGENT_VERSION": version} if version else {}
    subprocess.run(
        ["bash", "build/build-agent.sh", str(out)],
        cwd=ROOT,
        env={**os.environ, **extra},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def wait_for(what: str, ok: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(0.5)
    raise SystemExit(f"fifty_hosts: timed out waiting for {what}")


def oldest_python() -> str:
    """CPython 3.9 from pyenv (the oldest the agent runs on), else this Python."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = sorted(root.glob("versions/3.9*/bin/python3.9"))
    return str(found[-1]) if found else sys.executable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument(
        "--python",
        default=oldest_python(),
        help="the agents' interpreter (default: pyenv's CPython 3.9, else this one)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-fifty-"))
    procs: list[subprocess.Popen] = []
    fig: dict[str, float] = {}
    ok = True
    sys.path.insert(0, str(ROOT))
    from fleet import __version__

    major, minor, patch = (__version__.split(".") + ["0", "0"])[:3]
    new_version = f"{major}.{minor}.{int(patch.split('+')[0]) + 1}"
    try:
        t = time.monotonic()
        old = build(work / "old" / "fleet-agent.pyz")
        new = build(work / "new" / "fleet-agent.pyz", new_version)
        fig["build two agent files"] = time.monotonic() - t
        password = "fifty-" + os.urandom(6).hex()
        data = work / "fleetd"
        ctl_env = env_clean(XDG_CONFIG_HOME=str(work / "xdg"))
        subprocess.run(
            [str(BIN / "fleetd"), "init", "--data-dir", str(data)],
            env=env_clean(FLEET_ADMIN_PASSWORD=password),
            check=True,
            capture_output=True,
        )
        fleetd = subprocess.Popen(
            [str(BIN / "fleetd"), "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"]
            + ["--agent-pyz", str(new), "--log-level", "warning"],
            env=env_clean(),
            stdout=subprocess.PIPE,
            stderr=open(work / "fleetd.log", "wb"),  # noqa: SIM115 - for the process' life
            text=True,
        )
        procs.append(fleetd)
        url = fleetd.stdout.readline().strip().removeprefix("fleetd listening on ")  # type: ignore[union-attr]

        def ctl(*cmd: str, expect: int = 0) -> subprocess.CompletedProcess:
            proc = subprocess.run(
                [str(BIN / "fleetctl"), *cmd], env=ctl_env, capture_output=True, text=True
            )
            if proc.returncode != expect:
                raise SystemExit(f"fleetctl {' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}")
            return proc

        def ctl_json(*cmd: str, expect: int = 0) -> Any:
            return json.loads(ctl(*cmd, "--json", expect=expect).stdout)

        subprocess.run(
            [str(BIN / "fleetctl"), "login", "--server", url, "--password-stdin"],
            input=password + "\n",
            env=ctl_env,
            check=True,
            capture_output=True,
            text=True,
        )
        print(
            f"fifty_hosts: fleetd {url}; agents {__version__} -> {new_version} under {args.python}"
        )

        # enroll: one fleetctl command a host, then each agent enrolls itself
        names = [f"web-{i:02d}" for i in range(args.hosts)]
        t = time.monotonic()
        agent_env = env_clean(SHIV_ROOT=str(work / "shiv"))
        for name in names:
            enrollment = ctl_json("enroll", name, "--label", "role=web")["enrollment"]
            home = work / name
            home.mkdir()
            shutil.copy(old, home / "fleet-agent.pyz")
            subprocess.run(
                [args.python, str(home / "fleet-agent.pyz"), "enroll", enrollment]
                + ["--state-dir", str(home / "state"), "--hostname", name],
                env=agent_env,
                check=True,
                capture_output=True,
            )
            procs.append(
                subprocess.Popen(
                    [args.python, str(home / "fleet-agent.pyz"), "run"]
                    + ["--state-dir", str(home / "state")],
                    env=agent_env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(home / "agent.log", "wb"),  # noqa: SIM115
                )
            )
        wait_for(
            "every agent online",
            lambda: sum(h["status"] == "online" for h in ctl_json("hosts", "list")) == args.hosts,
            120,
        )
        fig[f"enroll {args.hosts} hosts and see every agent online"] = time.monotonic() - t

        # one template for all of them
        pw = work / "repo-password"
        pw.write_text("fifty-repo\n")
        ctl("repos", "create", "web", "--url", str(work / "repo"), "--password-file", str(pw))
        spec = work / "web.json"
        spec.write_text(
            json.dumps(
                {
                    "repositories": ["web"],
                    "groups": {"www": {"includes": ["/etc"], "retention": {"keep_daily": 7}}},
                    "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["www"]}},
                }
            )
        )
        t = time.monotonic()
        done = ctl_json("templates", "set", "web", "--selector", "role=web", "-f", str(spec))
        fig["templates set (fleetd's side)"] = time.monotonic() - t

        def applied() -> bool:
            hosts = ctl_json("hosts", "list")
            return all(not h["schedule_lagging"] for h in hosts)

        wait_for("every agent to hold the template's schedule", applied, 120)
        fig[f"template held by all {args.hosts} agents"] = time.monotonic() - t
        ok &= done["picked"] == args.hosts and done["failed"] == 0
        shown = ctl_json("hosts", "show", names[-1])
        ok &= {(s["kind"], s["name"], s["template"]) for s in shown["settings"]} == {
            ("repository", "web", "web"),
            ("group", "www", "web"),
            ("schedule", "nightly", "web"),
        }

        # upgrade in batches
        t = time.monotonic()
        rollout = ctl_json("agents", "upgrade", "--batch", str(args.batch), "--timeout", "2m")
        fig[f"agents upgrade, {args.hosts} hosts, {args.batch} at a time"] = time.monotonic() - t
        listed = ctl_json("agents", "list")["agents"]
        at_new = sum(a["agent_version"] == new_version for a in listed)
        ok &= rollout["outcome"] == "ok" and at_new == args.hosts
        batches = max(h["batch"] for h in rollout["hosts"])
        for name, seconds in fig.items():
            print(f"  {name:<52} {seconds:8.1f} s")
        print(
            f"  template: {done['picked']} picked, {done['changed']} changed, "
            f"{done['failed']} failed; rollout: {rollout['counts']} in {batches} batches; "
            f"{at_new}/{args.hosts} agents at {new_version}"
        )
        print("fifty_hosts: " + ("all held" if ok else "NOT ALL HELD"))
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
