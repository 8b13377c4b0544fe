"""fleet.common.restic: command builders and output parsers, from fixtures of
restic 0.14 (Debian 12) and of newer releases."""

from __future__ import annotations

import pytest

from fleet.common.restic import commands, parse


def test_cat_config_needs_the_password_and_takes_no_lock() -> None:
    assert commands.cat_config() == ("restic", "cat", "config", "--no-lock")


@pytest.mark.parametrize(
    "stderr",
    [
        "Fatal: wrong password or no key found\n",  # 0.14 .. 0.18
        "Fatal: Wrong password or no key found\n",
    ],
)
def test_wrong_password_is_recognised(stderr: str) -> None:
    assert parse.wrong_password(stderr)


@pytest.mark.parametrize(
    "stderr",
    [
        "Fatal: unable to open config file: stat /r/config: no such file or directory\n"
        "Is there a repository at the following location?\n/r",
        "Fatal: create repository at /r failed: config file already exists\n",
        "",
    ],
)
def test_other_failures_are_not_a_wrong_password(stderr: str) -> None:
    assert not parse.wrong_password(stderr)


@pytest.mark.parametrize(
    "stderr,expected",
    [
        ("Fatal: create repository at /r failed: config file already exists\n", True),  # 0.14
        ("Fatal: create repository at s3:x failed: repository already initialized\n", True),
        ("Fatal: wrong password or no key found\n", False),
    ],
)
def test_already_initialized(stderr: str, expected: bool) -> None:
    assert parse.already_initialized(stderr) is expected
