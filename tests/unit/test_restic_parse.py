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


RAW_014 = '{"total_size":300575,"total_file_count":0,"total_blob_count":3,"snapshots_count":2}'
RAW_017 = (
    '{"total_size":1048576,"total_uncompressed_size":3145728,"compression_ratio":3,'
    '"compression_progress":100,"compression_space_saving":66.67,"total_blob_count":12,'
    '"snapshots_count":4}'
)


@pytest.mark.parametrize(
    "text,expected",
    [
        (RAW_014, {"raw_size_bytes": 300575, "snapshot_count": 2}),
        (RAW_017, {"raw_size_bytes": 1048576, "snapshot_count": 4}),
    ],
)
def test_raw_stats_of_restic_0_14_and_0_17(text: str, expected: dict) -> None:
    assert parse.raw_stats(text) == expected


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"snapshots_count": 1}'])
def test_raw_stats_refuses_what_is_not_a_raw_data_report(text: str) -> None:
    with pytest.raises(parse.ParseError):
        parse.raw_stats(text)


def test_growth_of_a_backup_from_its_summary() -> None:
    # restic 0.14: no packed size
    summary_014 = {
        "message_type": "summary",
        "total_bytes_processed": 1000,
        "total_files_processed": 3,
        "data_added": 400,
    }
    assert parse.growth(summary_014) == {"size_bytes": 1000, "file_count": 3, "raw_size_bytes": 400}
    # restic 0.17+: what was stored after compression
    summary_017 = {**summary_014, "data_added_packed": 150}
    assert parse.growth(summary_017)["raw_size_bytes"] == 150
    assert parse.growth({}) == {"size_bytes": 0, "file_count": 0, "raw_size_bytes": 0}


def test_a_backup_is_recorded_under_the_host_given() -> None:
    assert commands.backup(["/etc"], (), "etc", host="web-01") == (
        "restic",
        "backup",
        "--json",
        "--host",
        "web-01",
        "--tag",
        "etc",
        "--",
        "/etc",
    )
    assert "--host" not in commands.backup(["/etc"])


def test_listing_and_forget_select_the_hosts_given() -> None:
    assert commands.snapshots(True, ("web-01", "vm7")) == (
        "restic",
        "snapshots",
        "--json",
        "--no-lock",
        "--host",
        "web-01",
        "--host",
        "vm7",
    )
    argv = commands.forget("etc", {"keep_daily": 7}, ("web-01",))
    assert argv[argv.index("--host") + 1] == "web-01" and "--group-by" in argv


def test_the_agent_records_and_reads_its_own_snapshots_in_a_shared_repository() -> None:
    from fleet.agent import kinds

    where = kinds.Where("web-01", ("vm7",))
    _, _, argv = kinds.prepare(
        {"job_id": 1, "kind": "backup", "includes": ["/etc"], "tag": "etc"}, where
    )
    assert argv[argv.index("--host") + 1] == "web-01"
    _, _, argv = kinds.prepare(
        {"job_id": 2, "kind": "forget", "tag": "etc", "retention": {"keep_last": 3}}, where
    )
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--host"] == ["web-01", "vm7"]
    _, _, argv = kinds.prepare({"job_id": 3, "kind": "snapshots"}, where)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--host"] == ["web-01", "vm7"]


def test_copy_names_snapshots_or_selects_the_groups():
    ids = ["4bc19f3f", "b" * 64]
    assert commands.copy(ids) == ("restic", "copy", "--", *ids)
    assert commands.copy(tag="www", hosts=("web-01", "web-01.local")) == (
        "restic",
        "copy",
        "--tag",
        "www",
        "--host",
        "web-01",
        "--host",
        "web-01.local",
    )
    for bad in (["--delete"], ["4bc1"], ["xyz12345"]):  # never a flag, always an id
        with pytest.raises(ValueError, match="not a snapshot id"):
            commands.copy(bad)
    with pytest.raises(ValueError, match="names a snapshot or a group"):
        commands.copy()
