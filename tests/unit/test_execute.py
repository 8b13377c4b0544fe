"""fleet.common.restic.execute: the one place commands run (real subprocesses)."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from fleet.common.restic import execute

ENV = {"PATH": "/usr/bin:/bin"}


def collect(argv, mask=(), cancel_after=None, grace=5.0):
    lines: list[tuple[str, str]] = []
    problems: list[dict] = []

    async def on_line(stream: str, line: str) -> None:
        lines.append((stream, line))

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
        cancel = asyncio.Event()
        if cancel_after is not None:
            asyncio.get_running_loop().call_later(cancel_after, cancel.set)
        return await execute.run(argv, ENV, on_line, execute.Masker(list(mask)), cancel, grace)

    result = asyncio.run(main())
    gc.collect()
    return result, lines, problems


@pytest.mark.parametrize(
    ("code", "status"), [(0, "succeeded"), (3, "warning"), (1, "failed"), (12, "failed")]
)
def test_exit_codes_map_to_statuses(code: int, status: str) -> None:
    result, _, _ = collect(["sh", "-c", f"exit {code}"])
    assert result.exit_code == code and result.status == status


def test_lines_stream_in_order_masked_and_stripped_of_terminal_escapes() -> None:
    script = "echo one; echo 'pw=hunter22 here' >&2; printf '\\033[2Kcleared\\n'; echo two"
    result, lines, _ = collect(["sh", "-c", script], mask=["hunter22"])
    assert ("stdout", "one") in lines and ("stdout", "two") in lines
    assert ("stderr", "pw=******** here") in lines
    assert ("stdout", "cleared") in lines
    assert [line for s, line in lines if s == "stdout"] == ["one", "cleared", "two"]
    assert result.error == "pw=******** here"


def test_a_missing_binary_is_127_with_a_message() -> None:
    result, lines, _ = collect(["/nonexistent/restic", "version"])
    assert result.exit_code == 127 and result.status == "failed"
    assert "command not found" in lines[0][1]


def test_cancel_sends_sigint_and_the_job_is_cancelled() -> None:
    started = time.monotonic()
    result, lines, _ = collect(
        ["sh", "-c", "trap 'echo got-int; exit 130' INT; sleep 30 & wait"], cancel_after=0.3
    )
    assert result.cancelled and result.status == "cancelled"
    assert ("stdout", "got-int") in lines
    assert time.monotonic() - started < 5


def test_cancel_escalates_to_sigterm_and_reaches_the_process_group() -> None:
    # ignores SIGINT; its child `sleep` must not outlive the cancellation
    script = "trap '' INT; sleep 30 & echo child=$!; wait"
    started = time.monotonic()
    result, lines, _ = collect(["sh", "-c", script], cancel_after=0.3, grace=0.5)
    assert result.cancelled
    assert time.monotonic() - started < 5
    child = int(next(line for _, line in lines if line.startswith("child=")).split("=")[1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as fh:
                if fh.read().split(") ", 1)[1].startswith("Z"):
                    break  # a zombie is dead
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the hook's child survived the cancellation")


def test_cancelling_the_caller_leaves_no_orphan_task_or_process() -> None:
    problems: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))

        async def on_line(stream: str, line: str) -> None:
            pass

        task = asyncio.ensure_future(execute.run(["sleep", "30"], ENV, on_line, execute.Masker([])))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(main())
    gc.collect()
    assert time.monotonic() - started < 5
    assert problems == []


def test_environment_carries_the_repository_and_drops_the_agents_own() -> None:
    base = {
        "PATH": "/bin",
        "RESTIC_PASSWORD": "agent-own",
        "RESTIC_REPOSITORY": "/elsewhere",
        "HOME": "/root",
    }
    env = execute.environment("/srv/repo", "s3cret", {"AWS_ACCESS_KEY_ID": "k"}, base)
    assert env["RESTIC_REPOSITORY"] == "/srv/repo" and env["RESTIC_PASSWORD"] == "s3cret"
    assert env["AWS_ACCESS_KEY_ID"] == "k" and env["HOME"] == "/root"
    assert env["RESTIC_PROGRESS_FPS"] == "1"
    # a copy's source is fleetd's alone too
    base["RESTIC_FROM_PASSWORD_FILE"] = "/root/other.pw"
    base["RESTIC_FROM_REPOSITORY"] = "/other"
    env = execute.environment("/srv/repo", "s3cret", {}, base)
    assert "RESTIC_FROM_PASSWORD_FILE" not in env and "RESTIC_FROM_REPOSITORY" not in env


def test_a_copys_environment_names_both_repositories_and_masks_both_passwords() -> None:
    from fleet.agent.runner import restic_env
    from fleet.agent.state import RepoConfig

    dest = RepoConfig("/srv/offsite", "dest-pw-1", {"AWS_REGION": "eu"}, 2, "offsite")
    source = RepoConfig("/srv/main", "source-pw-2", {"AWS_REGION": "eu", "B2_X": "bbbb"}, 1)
    env, mask = restic_env(dest, source)
    assert (env["RESTIC_REPOSITORY"], env["RESTIC_PASSWORD"]) == ("/srv/offsite", "dest-pw-1")
    assert (env["RESTIC_FROM_REPOSITORY"], env["RESTIC_FROM_PASSWORD"]) == (
        "/srv/main",
        "source-pw-2",
    )
    assert env["B2_X"] == "bbbb"
    assert mask("dest-pw-1 source-pw-2 bbbb") == "******** ******** ********"
    clash = RepoConfig("/srv/main", "pw", {"AWS_REGION": "us"}, 1)
    with pytest.raises(ValueError, match="AWS_REGION"):
        restic_env(dest, clash)


def test_masker_masks_longest_first_and_ignores_tiny_values() -> None:
    mask = execute.Masker(["abcd", "abcdefgh", "", "ab"])
    assert mask("x abcdefgh y abcd z ab") == "x ******** y ******** z ab"
