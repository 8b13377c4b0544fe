"""End-to-end harness: real fleetd, real fleet-agent processes, real restic.

On top of tests/conftest.py (fleetd subprocess, fleetctl via CliRunner):

- `Agent`: one `fleet-agent` process (`python -m fleet.agent.cli`) with its
  own state dir; stderr goes to a log file the tests read. At teardown every
  agent still running gets SIGTERM and must exit 0.
- `e2e.host(fleet, ...)`: enroll a fresh host, set its repository (a
  directory in tmp_path) and start its agent; by default also wait until the
  host is online and fleetd's auto-init job has succeeded.
- helpers to wait for jobs and host states by polling `fleetctl ... --json`
  against a deadline, and to ask restic itself what the repository holds.

Nothing sleeps to synchronise: every wait polls a condition with a deadline.
Long-running jobs are made with a pre-hook (`sleep N`), which costs no I/O.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

RESTIC = shutil.which("restic") or "/usr/bin/restic"
REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_STOP_TIMEOUT = 20.0
FINAL = ("succeeded", "warning", "failed", "cancelled", "lost")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def agent_env(**extra: Optional[str]) -> dict[str, str]:
    """The environment of an agent: nothing of Fleet's or restic's own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "FLEETD_", "RESTIC_")) and k != "XDG_CONFIG_HOME"
    }
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


MODULE_AGENT = (sys.executable, "-m", "fleet.agent.cli")


def agent_argv(*args: Any, prefix: tuple[str, ...] = MODULE_AGENT) -> list[str]:
    """fleet-agent's command line: from the checkout, or `prefix` = (python, pyz)."""
    return [*prefix, *map(str, args)]


class Agent:
    """One fleet-agent state dir, and the `fleet-agent run` process on it."""

    def __init__(
        self, state_dir: Path, log_path: Path, prefix: tuple[str, ...] = MODULE_AGENT
    ) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.prefix = prefix
        # a zipapp unpacks its dependencies here, not in $HOME
        self.env = agent_env(SHIV_ROOT=str(state_dir.parent / "shiv"))
        self.proc: Optional[subprocess.Popen] = None
        self._log: Any = None

    # -- one-shot commands ---------------------------------------------------

    def cli(self, *args: Any, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            agent_argv(*args, prefix=self.prefix),
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def enroll(
        self, enrollment: str, hostname: Optional[str] = None
    ) -> subprocess.CompletedProcess:
        extra = ("--hostname", hostname) if hostname else ()
        return self.cli("enroll", enrollment, "--state-dir", self.state_dir, *extra)

    @property
    def identity(self) -> dict:
        return json.loads((self.state_dir / "agent.json").read_text())

    # -- the long-running agent -------------------------------------------------

    def start(self, *extra: str) -> Agent:
        assert not self.running(), "agent already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            agent_argv(
                "run",
                "--state-dir",
                self.state_dir,
                "--cancel-grace",
                "2",
                "--restic",
                RESTIC,
                *extra,
                prefix=self.prefix,
            ),
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, text: str) -> int:
        return self.log().count(text)

    def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until the agent's log holds `text` at least `count` times."""
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode} before logging {text!r}:\n{self.log()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"agent did not log {text!r} within {timeout} s:\n{self.log()}"
                )
            time.sleep(0.05)  # polling interval; the deadline decides

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = AGENT_STOP_TIMEOUT) -> int:
        """SIGTERM (after SIGCONT, in case it is frozen); returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = AGENT_STOP_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"agent did not exit within {timeout} s; log:\n{self.log()}"
            ) from None
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return root


def restic_cmd(
    repo: Path, password: str, *args: Any, timeout: float = 60
) -> subprocess.CompletedProcess:
    """restic itself on a test repository (the password via the environment)."""
    env = agent_env(RESTIC_PASSWORD=password, RESTIC_REPOSITORY=str(repo))
    return subprocess.run(
        [RESTIC, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


class E2E:
    """Per-test helpers; remembers the agents it started, for teardown."""

    def __init__(
        self,
        tmp_path: Path,
        fx: types.SimpleNamespace,
        template: types.SimpleNamespace,
        prefix: tuple[str, ...] = MODULE_AGENT,
    ) -> None:
        self.prefix = prefix  # how this test's agents run: the zipapp under some Python
        self.tmp_path = tmp_path
        self.fx = fx
        self.template = template
        self.agents: list[Agent] = []
        self.RESTIC = RESTIC
        self.FINAL = FINAL
        self.restic = restic_cmd
        self.write_tree = write_tree
        self.timed = timed_wait

    # -- hosts and agents ----------------------------------------------------------

    def agent(self, name: str, prefix: Optional[tuple[str, ...]] = None) -> Agent:
        base = self.tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        agent = Agent(base / "state", base / "agent.log", prefix or self.prefix)
        self.agents.append(agent)
        return agent

    def host(
        self,
        fleet: Any,
        *,
        password: Optional[str] = None,
        repo: Optional[Path] = None,
        fresh: bool = False,
        set_repo: bool = True,
        start: bool = True,
        wait_init: bool = True,
        agent_prefix: Optional[tuple[str, ...]] = None,
    ) -> types.SimpleNamespace:
        """A freshly enrolled host with its own repository, source dir and agent.

        The repository is a copy of one initialised for the session (restic
        init spends ~2 s deriving a key; fleetd's auto-init then finds the
        repository and counts that as success), unless `fresh`, `repo` or
        `password` is given: then fleetd's auto-init really creates it.
        """
        name = self.fx.uniq("e2e")
        base = self.tmp_path / name
        base.mkdir()
        if repo is None and password is None and not fresh:
            repo = base / "repo"
            shutil.copytree(self.template.repo, repo)
            password = self.template.password
        h = types.SimpleNamespace(
            name=name,
            base=base,
            repo=repo or base / "repo",
            password=password or f"repo-pw-{name}-S3cret",
            password_file=base / "repo-password",
            src=base / "src",
            agent=self.agent(name, agent_prefix),
        )
        h.password_file.write_text(h.password + "\n")
        h.src.mkdir()
        h.enrollment = fleet.ctl_json("enroll", name)["enrollment"]
        proc = h.agent.enroll(h.enrollment, hostname=name)
        assert proc.returncode == 0, f"enroll failed: {proc.stdout}{proc.stderr}"
        if set_repo:
            fleet.ctl("repo", "set", name, "--url", h.repo, "--password-file", h.password_file)
        if start:
            self.start(fleet, h, wait_init=set_repo and wait_init)
        return h

    def start(self, fleet: Any, h: types.SimpleNamespace, wait_init: bool = False) -> None:
        connected = h.agent.count("connected to")
        h.agent.start()
        h.agent.wait_log("connected to", connected + 1)
        self.wait_host(fleet, h.name, "online")
        if wait_init:
            job = self.fx.wait_until(
                lambda: self.jobs(fleet, h.name, kind="init"), timeout=20, what="an init job"
            )[-1]
            done = self.wait_job(fleet, job["id"], timeout=60)
            assert done["status"] == "succeeded", done

    def group(self, fleet: Any, h: types.SimpleNamespace, *args: Any, name: str = "") -> str:
        """A source group on h (default: include h.src)."""
        group = name or self.fx.uniq("g")
        if not any(a == "--include" for a in args):
            args = ("--include", h.src, *args)
        fleet.ctl("groups", "create", h.name, group, *args)
        return group

    # -- jobs and hosts through fleetctl --json -----------------------------------------

    @staticmethod
    def gated_hook(gate: Path, half: int) -> str:
        """A pre-hook: `line 1`..`line HALF`, wait (60 s at most) for
        `gate`, then `line HALF+1`..`line 2*HALF`."""
        return (
            f"for i in $(seq 1 {half}); do echo line $i; done; "
            f"n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done; "
            f"for i in $(seq {half + 1} {2 * half}); do echo line $i; done"
        )

    @staticmethod
    def agent_status(h: types.SimpleNamespace) -> dict:
        """`fleet-agent status --json` of h's agent."""
        proc = h.agent.cli("status", "--state-dir", h.agent.state_dir, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def jobs(self, fleet: Any, host: str, **filters: Any) -> list[dict]:
        args: list[Any] = ["jobs", "list", "--host", host, "--limit", "1000"]
        for key, value in filters.items():
            args += [f"--{key}", value]
        return sorted(fleet.ctl_json(*args), key=lambda j: j["id"])

    def show(self, fleet: Any, job_id: int) -> dict:
        return fleet.ctl_json("jobs", "show", job_id)

    def run(self, fleet: Any, host: str, group: str) -> dict:
        """`fleetctl run HOST GROUP --json` (no follow): the queued job."""
        return fleet.ctl_json("run", host, group)

    def wait_job(
        self,
        fleet: Any,
        job_id: int,
        statuses: tuple[str, ...] = FINAL,
        timeout: float = 60,
    ) -> dict:
        return self.fx.wait_until(
            lambda: (j := self.show(fleet, job_id))["status"] in statuses and j,
            timeout=timeout,
            interval=0.1,
            what=f"job {job_id} to be {'/'.join(statuses)}",
        )

    def host_info(self, fleet: Any, host: str) -> dict:
        return fleet.ctl_json("hosts", "show", host)

    def wait_host(self, fleet: Any, host: str, status: str, timeout: float = 20) -> dict:
        return self.fx.wait_until(
            lambda: (h := self.host_info(fleet, host))["status"] == status and h,
            timeout=timeout,
            interval=0.1,
            what=f"host {host} to be {status}",
        )

    def log_lines(self, fleet: Any, job_id: int) -> list[dict]:
        out = fleet.ctl("jobs", "log", job_id, "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def fleetctl(self, fleet: Any, *args: str, timeout: float = 90) -> tuple[int, str, str]:
        """The ./fleetctl launcher as a real process (for commands that may block)."""
        proc = self.fx.run_fleetctl_proc(
            *map(str, args),
            server=fleet.url,
            token=fleet.admin_token,
            config_dir=fleet.config_dir,
        )
        try:
            return self.fx.finish(proc, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"fleetctl {' '.join(args)} still running after {timeout} s\n{out}\n{err}"
            ) from None

    def popen_fleetctl(self, fleet: Any, *args: str) -> subprocess.Popen:
        return self.fx.run_fleetctl_proc(
            *map(str, args),
            server=fleet.url,
            token=fleet.admin_token,
            config_dir=fleet.config_dir,
        )

    # -- teardown ---------------------------------------------------------------

    def stop_agents(self) -> list[str]:
        problems = []
        for agent in self.agents:
            if agent.proc is None or agent.proc.returncode is not None:
                continue
            if agent.proc.poll() is not None:
                continue  # exited by itself; the test checked (or not) how
            try:
                code = agent.stop()
            except AssertionError as exc:
                problems.append(str(exc))
                continue
            if code != 0:
                problems.append(f"agent {agent.state_dir} exited {code} on SIGTERM:\n{agent.log()}")
            elif "Traceback" in agent.log():
                problems.append(f"agent {agent.state_dir} logged a traceback:\n{agent.log()}")
        return problems


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """One restic repository initialised per session, copied for each host."""
    template = types.SimpleNamespace(
        repo=tmp_path_factory.mktemp("template") / "repo", password="template-repo-pw-4e1d"
    )
    proc = restic_cmd(template.repo, template.password, "init")
    assert proc.returncode == 0, proc.stderr
    return template


def pyenv_python(version: str) -> Optional[str]:
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    found = sorted(glob.glob(f"{root}/versions/{version}*/bin/python{version}"))
    return found[-1] if found else None


def interpreter(name: str) -> str:
    """A Python to run the zipapp under: "3.9", "3.13" (pyenv) or "system"."""
    path = "/usr/bin/python3" if name == "system" else pyenv_python(name)
    if not path or not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"Python {name} is missing: the agent must be tested under it in CI")
        pytest.skip(f"Python {name} is not installed here")
    return path


def build_pyz(out: Path, version: Optional[str] = None) -> Path:
    """The agent zipapp, as `make agent` builds it; `version` stamps another
    version into it (FLEET_AGENT_VERSION), for an upgrade to go to."""
    extra = {"FLEET_AGENT_VERSION": version} if version else {}
    proc = subprocess.run(
        ["bash", "build/build-agent.sh", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000", **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/fleet-agent.pyz as `make agent` builds it, once per session."""
    return build_pyz(tmp_path_factory.mktemp("pyz") / "fleet-agent.pyz")


@pytest.fixture(scope="session")
def zipapp() -> types.SimpleNamespace:
    """The zipapp helpers, for test modules (which import nothing from here)."""
    return types.SimpleNamespace(build=build_pyz, interpreter=interpreter)


@pytest.fixture
def agent_prefix(request: pytest.FixtureRequest, pyz: Path) -> tuple[str, ...]:
    """The end-to-end suite runs its agents from the zipapp: under CPython 3.9
    unless the module sets AGENT_PYTHON (the failure tests use 3.13)."""
    return (interpreter(getattr(request.module, "AGENT_PYTHON", "3.9")), str(pyz))


@pytest.fixture
def e2e(
    tmp_path: Path,
    fx: types.SimpleNamespace,
    repo_template: types.SimpleNamespace,
    agent_prefix: tuple[str, ...],
) -> Iterator[E2E]:
    helper = E2E(tmp_path, fx, repo_template, agent_prefix)
    yield helper
    problems = helper.stop_agents()
    assert not problems, "\n\n".join(problems)


@pytest.fixture(scope="module")
def fleet_hb1(tmp_path_factory: pytest.TempPathFactory, fx) -> Iterator[Any]:
    """A fleetd with one-second heartbeats (offline after 3 s of silence)."""
    env = fx.start_fleet(tmp_path_factory.mktemp("fleet-hb1"), "--heartbeat-interval", "1")
    yield env
    fx.stop_and_check(env.fleetd)


def timed_wait(
    condition: Callable[[], Any], timeout: float, interval: float = 0.05
) -> tuple[Any, float]:
    """Poll like wait_until; returns (value, seconds it took)."""
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(interval)  # polling interval; the deadline decides


def _load_relay_class() -> Any:
    """tests/e2e/relay.py's Relay (tests/ is no package: loaded from its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fleet_e2e_relay", Path(__file__).with_name("relay.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Relay


@pytest.fixture
def relay() -> Iterator[Any]:
    """A TCP relay (tests/e2e/relay.py) listening before fleetd exists, closed at
    teardown: start fleetd with `--public-url relay.url`, then
    `relay.retarget(fleetd.port)`; agents enrolled there dial the relay."""
    r = _load_relay_class()()
    yield r
    r.close()


@pytest.fixture
def subreaper() -> Iterator[Any]:
    """For one test, this process adopts the orphans of what it started
    (PR_SET_CHILD_SUBREAPER), so `subreaper.reap(pid)` can wait for a restic
    orphaned by a SIGKILLed agent and collect its exit status.

    Without it the orphan goes to PID 1, and a PID 1 that reaps late (or never,
    in a container) leaves a zombie: restic's own stale-lock test (kill(pid, 0))
    takes a zombie for a live process and `restic unlock` keeps its lock.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not sys.platform.startswith("linux") or libc.prctl(36, 1, 0, 0, 0) != 0:
        pytest.skip("needs Linux's PR_SET_CHILD_SUBREAPER")

    def reap(pid: int, timeout: float = 10.0) -> Optional[int]:
        """Wait for `pid` to end; its wait status if it was adopted, else None."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return status
            except ChildProcessError:  # not ours: ended once /proc no longer has it
                if not Path(f"/proc/{pid}").exists():
                    return None
            if time.monotonic() >= deadline:
                raise AssertionError(f"process {pid} still there after {timeout} s")
            time.sleep(0.02)  # polling interval; the deadline decides

    yield types.SimpleNamespace(reap=reap)
    libc.prctl(36, 0, 0, 0, 0)
