"""fleet.agent.handlers and fleet.agent.kinds: the two tables of the agent
(frame type -> handler; job kind -> schema, restic command, runner)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from fleet.agent import handlers, kinds
from fleet.agent.kinds import Refused
from fleet.agent.link import Agent
from fleet.agent.runner import JobRunner
from fleet.agent.state import Identity, RepoConfig, State
from fleet.common import protocol
from fleet.common.restic import commands


class FakeWS:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


class FakeRunner:
    def __init__(self, refuse: Refused | None = None) -> None:
        self.refuse = refuse
        self.submitted: list[dict] = []
        self.cancelled: list[int] = []
        self.current = None

    def submit(self, command: dict) -> None:
        self.submitted.append(command)
        if self.refuse is not None:
            raise self.refuse

    def cancel(self, job_id: int) -> bool:
        self.cancelled.append(job_id)
        return True


@pytest.fixture
def agent(tmp_path):
    state = State(tmp_path)
    a = Agent(state, Identity("ws://127.0.0.1:1", 1, "h1", "tok"))
    a.ws = FakeWS()
    yield a
    a.spool.close()


def frame(type_: str, data: dict, **extra) -> tuple[protocol.Envelope, str]:
    raw = json.dumps({"v": 1, "type": type_, "data": {**data, **extra}})
    return protocol.decode(raw, expect="server"), raw


def deliver(agent: Agent, type_: str, data: dict, **extra) -> None:
    env, _ = frame(type_, data, **extra)
    asyncio.run(handlers.dispatch(agent, env))


# -- the handler table ------------------------------------------------------------


def test_the_table_covers_what_fleetd_sends_a_session():
    assert set(handlers.HANDLERS) == {
        "ack",
        "config.update",
        "command.run",
        "command.cancel",
        "schedule.set",
        "tls.pins",
        "query.run",
        "query.cancel",
        "query.more",
        "agent.upgrade",
        "error",
    }
    for type_ in handlers.HANDLERS:
        assert protocol.MESSAGES[type_].direction in ("server", "both")


def test_unknown_type_is_ignored_at_debug(agent, caplog):
    caplog.set_level(logging.DEBUG, logger="fleet-agent")
    # a welcome in the middle of a session has no handler
    welcome = {"server_version": "9", "heartbeat_interval": 30, "host_id": 1, "host_name": "h"}
    deliver(agent, "welcome", welcome)
    assert agent.ws.sent == []
    assert any("ignoring welcome" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "ignoring" in r.getMessage())


UPGRADE = {"version": "9.9.9", "sha256": "0" * 64, "size": 100, "deadline": 60}


def upgrade_answer(agent: Agent) -> dict:
    async def deliver_and_wait() -> None:
        env, _ = frame("agent.upgrade", UPGRADE)
        await handlers.dispatch(agent, env)
        await agent.upgrade_task

    asyncio.run(deliver_and_wait())
    (sent,) = agent.ws.sent
    assert sent["type"] == "upgrade.result"
    return sent["data"]


def test_an_agent_not_running_from_a_pyz_refuses_to_upgrade(agent):
    answer = upgrade_answer(agent)  # pytest's argv[0] is no .pyz
    assert answer["accepted"] is False and answer["code"] == "unsupported"
    assert "does not run from a fleet-agent .pyz" in answer["error"]
    assert agent.after_stop is None and not agent.upgrading  # it goes on, and may try again


def test_a_busy_agent_refuses_to_upgrade(agent):
    agent.runner.current = 7
    answer = upgrade_answer(agent)
    assert (answer["accepted"], answer["code"]) == (False, "busy")
    assert "job 7 is running" in answer["error"]


def test_ack_drops_the_spool_up_to_seq_and_ignores_an_older_one(agent):
    for i in range(3):
        agent.spool.append("repo.locks", {"count": i})
    deliver(agent, "ack", {"seq": 2})
    assert agent.acked == 2 and agent.spool.count() == 1
    deliver(agent, "ack", {"seq": 1})
    assert agent.acked == 2 and agent.spool.count() == 1


def test_config_update_saves_the_repository(agent):
    deliver(
        agent, "config.update", {"repo_url": "/r", "repo_password": "pw", "repo_env": {"A": "1"}}
    )
    repo = agent.state.load_repo()
    assert (repo.url, repo.password, repo.env) == ("/r", "pw", {"A": "1"})


def test_another_repository_has_its_sizes_measured_anew(agent):
    config = {"repo_url": "/r", "repo_password": "pw"}
    deliver(agent, "config.update", config)
    sizes = agent.runner.sizes_of(agent.state.load_repo())
    sizes.measured({"size_bytes": 1, "raw_size_bytes": 1}, 0.0)
    deliver(agent, "config.update", config)  # the same again (every reconnect)
    assert sizes.stale is False
    deliver(agent, "config.update", {**config, "repo_url": "/other"})
    assert sizes.stale is True


def test_config_update_saves_every_repository_of_the_host(agent):
    repos = [
        {"id": 3, "name": "main", "url": "/main", "password": "pw1", "env": {}},
        {"id": 9, "name": "offsite", "url": "/off", "password": "pw2", "env": {"B": "2"}},
    ]
    config = {"repo_url": "/main", "repo_password": "pw1", "repositories": repos}
    deliver(agent, "config.update", config)
    assert [(r.id, r.name, r.url) for r in agent.state.load_repos()] == [
        (3, "main", "/main"),
        (9, "offsite", "/off"),
    ]
    assert agent.state.load_repo().name == "main"  # none named: the default
    on_disk = json.loads(agent.state.repo_path.read_text())
    assert (on_disk["url"], on_disk["password"]) == ("/main", "pw1")  # an older agent's read
    assert agent.state.load_repo(9).env == {"B": "2"}
    assert agent.state.load_repo(4) is None
    main, off = (agent.runner.sizes_of(r) for r in agent.state.load_repos())
    main.measured({"size_bytes": 1}, 0.0)
    off.measured({"size_bytes": 2}, 0.0)
    repos[1] = {**repos[1], "password": "changed"}
    deliver(agent, "config.update", {**config, "repositories": repos})
    assert main.stale is False and off.stale is True  # only the one that changed


def test_command_run_accepted(agent):
    agent.runner = FakeRunner()
    deliver(agent, "command.run", {"job_id": 7, "kind": "check"}, read_data_subset="5%")
    # the kind's own parameters reach the runner, even those the protocol's spec lacks
    assert agent.runner.submitted == [{"job_id": 7, "kind": "check", "read_data_subset": "5%"}]
    assert agent.ws.sent == [
        {"v": 1, "type": "command.result", "data": {"job_id": 7, "accepted": True}}
    ]


def test_command_run_refused_carries_a_code_and_a_message(agent):
    agent.runner = FakeRunner(Refused("busy", "busy with job 6"))
    deliver(agent, "command.run", {"job_id": 7, "kind": "prune"})
    (sent,) = agent.ws.sent
    assert sent["data"] == {
        "job_id": 7,
        "accepted": False,
        "error": "busy with job 6",
        "code": "busy",
    }
    protocol.decode(json.dumps(sent), expect="agent")  # a valid frame for fleetd


def test_command_cancel_goes_to_the_runner(agent):
    agent.runner = FakeRunner()
    deliver(agent, "command.cancel", {"job_id": 9})
    assert agent.runner.cancelled == [9]


def test_error_is_logged(agent, caplog):
    deliver(agent, "error", {"code": "bad_frame", "message": "nope"})
    assert any("nope (bad_frame)" in r.getMessage() for r in caplog.records)


def test_a_restore_without_its_snapshot_is_refused(agent):
    agent.state.save_repo(RepoConfig("/r", "pw"))
    deliver(agent, "command.run", {"job_id": 3, "kind": "restore"})
    (sent,) = agent.ws.sent
    assert sent["data"]["accepted"] is False and sent["data"]["code"] == "bad_params"
    assert agent.runner.current is None


# -- the kinds table --------------------------------------------------------------


def test_the_kinds():
    assert set(kinds.KINDS) == {
        "init",
        "backup",
        "forget",
        "prune",
        "check",
        "unlock",
        "copy",
        "snapshots",
        "stats",
        "restore",
        "drill",
    }
    assert set(kinds.KINDS) <= set(protocol.JOB_KINDS)
    for kind in kinds.KINDS.values():
        assert all(isinstance(f, protocol.Field) for f in kind.params)


def refusal(command: dict) -> Refused:
    with pytest.raises(Refused) as info:
        kinds.prepare({"job_id": 1, **command})
    return info.value


def test_unknown_kind():
    assert refusal({"kind": "dance"}).code == "unknown_kind"
    assert refusal({"kind": 7}).code == "unknown_kind"


def test_restore_params_and_command():
    snap = "4f2a9c1e" * 8
    _, params, argv = kinds.prepare(
        {
            "job_id": 1,
            "kind": "restore",
            "snapshot": snap,
            "target": "/srv/r",
            "includes": ["/etc/nginx"],
            "excludes": ["*.log"],
            "verify": True,
        }
    )
    assert argv == (
        "restic",
        "restore",
        "--json",
        "--target",
        "/srv/r",
        "--include",
        "/etc/nginx",
        "--exclude",
        "*.log",
        "--verify",
        "--",
        snap,
    )
    assert argv == commands.restore(snap, "/srv/r", ["/etc/nginx"], ["*.log"], True)
    _, _, plain = kinds.prepare(
        {"job_id": 1, "kind": "restore", "snapshot": snap[:8], "target": "/"}
    )
    assert plain == ("restic", "restore", "--json", "--target", "/", "--", snap[:8])


@pytest.mark.parametrize(
    "command",
    [
        {"kind": "backup"},
        {"kind": "backup", "includes": []},
        {"kind": "backup", "includes": "/etc"},
        {"kind": "backup", "includes": ["/etc"], "tag": 3},
        {"kind": "forget", "tag": "g"},
        {"kind": "forget", "tag": "g", "retention": {}},
        {"kind": "forget", "tag": "g", "retention": {"keep_daily": -1}},
        {"kind": "check", "read_data_subset": "0%"},
        {"kind": "check", "read_data_subset": "101%"},
        {"kind": "check", "read_data_subset": "11/10"},
        {"kind": "check", "read_data_subset": "0/10"},
        {"kind": "check", "read_data_subset": "--help"},
        {"kind": "check", "read_data_subset": "lots"},
        {"kind": "check", "read_data_subset": 5},
        {"kind": "check", "args": ["--verbose"]},
        {"kind": "restore", "target": "/srv"},
        {"kind": "restore", "snapshot": "4f2a9c1e"},
        {"kind": "restore", "snapshot": "latest", "target": "/srv"},
        {"kind": "restore", "snapshot": "--help", "target": "/srv"},
        {"kind": "restore", "snapshot": "4f2a9c1e", "target": "relative"},
        {"kind": "restore", "snapshot": "4f2a9c1e", "target": "/srv", "includes": "/etc"},
    ],
)
def test_bad_params_are_refused(command):
    refused = refusal(command)
    assert refused.code == "bad_params", refused.message


def test_backup_params_and_command():
    kind, params, argv = kinds.prepare(
        {
            "job_id": 1,
            "kind": "backup",
            "includes": ["/etc"],
            "excludes": ["*.tmp"],
            "tag": "g",
            "surprise": 1,
        }
    )
    assert kind is kinds.KINDS["backup"] and "surprise" not in params
    assert argv == commands.backup(["/etc"], ["*.tmp"], "g")


@pytest.mark.parametrize("subset", ["5%", "2.5%", "100%", "1/10", "10/10", "100M", "2G", "512"])
def test_check_read_data_subset(subset):
    _, _, argv = kinds.prepare({"job_id": 1, "kind": "check", "read_data_subset": subset})
    assert argv == commands.check(subset)


def test_check_accepts_the_legacy_args_of_an_older_fleetd():
    _, _, argv = kinds.prepare({"job_id": 1, "kind": "check", "args": ["1/10", "ignored"]})
    assert argv == commands.check("1/10")
    _, _, argv = kinds.prepare(
        {"job_id": 1, "kind": "check", "args": ["1/10"], "read_data_subset": "5%"}
    )
    assert argv == commands.check("5%")
    _, _, argv = kinds.prepare({"job_id": 1, "kind": "check"})
    assert argv == commands.check()


def test_runner_refuses_without_a_repository_and_when_busy(tmp_path):
    state = State(tmp_path)

    async def main():
        runner = JobRunner(state, None, "/bin/true")  # type: ignore[arg-type]
        with pytest.raises(Refused) as info:
            runner.submit({"job_id": 1, "kind": "prune"})
        assert info.value.code == "no_repo"
        state.save_repo(RepoConfig("/r", "pw"))
        runner.current = 5  # a job is running
        with pytest.raises(Refused) as info:
            runner.submit({"job_id": 2, "kind": "prune"})
        # the message still starts with "busy" for a fleetd that reads no code
        assert info.value.code == "busy" and info.value.message.startswith("busy")
        # a bad command is refused for what it is, even while busy
        with pytest.raises(Refused) as info:
            runner.submit({"job_id": 3, "kind": "backup"})
        assert info.value.code == "bad_params"

    asyncio.run(main())


def test_a_repo_json_written_before_several_repositories_still_reads(agent):
    """An agent upgraded in place keeps the one repository it had until
    fleetd sends the list."""
    agent.state.repo_path.write_text('{"url": "/old", "password": "pw", "env": {"A": "1"}}\n')
    (repo,) = agent.state.load_repos()
    assert (repo.url, repo.password, repo.env, repo.id) == ("/old", "pw", {"A": "1"}, None)
    assert agent.state.load_repo() == repo
    assert agent.state.load_repo(3) is None  # a job naming another waits for the list


def test_a_restore_target_the_agent_cannot_write_is_refused_with_the_way_out(tmp_path):
    assert kinds.unwritable(str(tmp_path / "new" / "dir")) is None  # made by restic
    # a directory nobody may write in, even root (a /proc/<pid> directory)
    why = kinds.unwritable("/proc/1/restored")
    assert why is not None and "cannot write into /proc/1/restored" in why
    assert "/var/lib/fleet-agent/restore" in why and "ReadWritePaths" in why
