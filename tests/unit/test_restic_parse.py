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


# -- browsing: ls, find, diff (0.14 as Debian ships it; 0.17's extra fields) ----

LS_014 = [
    '{"time":"2026-12-03T13:45:07.18194973Z","tree":"71f2","paths":["/srv"],"hostname":"vm",'
    '"username":"root","id":"8501f70d9495","short_id":"8501f70d","struct_type":"snapshot"}',
    '{"name":"a","type":"dir","path":"/srv/a","uid":0,"gid":0,"mode":2147484141,'
    '"permissions":"drwxr-xr-x","mtime":"2026-12-03T13:45:03.80663851Z",'
    '"atime":"2026-12-03T13:45:03.80663851Z","ctime":"2026-12-03T13:45:03.80663851Z",'
    '"struct_type":"node"}',
    '{"name":"x.txt","type":"file","path":"/srv/a/x.txt","uid":1000,"gid":100,"size":3,'
    '"mode":420,"permissions":"-rw-r--r--","mtime":"2026-12-03T14:45:03.8+01:00",'
    '"struct_type":"node"}',
    '{"name":"link","type":"symlink","path":"/srv/a/link","uid":0,"gid":0,"mode":134218239,'
    '"permissions":"Lrwxrwxrwx","mtime":"2026-12-03T14:00:42.906832308Z","struct_type":"node"}',
]
# restic 0.17 adds message_type, inode and more; the parser takes what it knows
LS_017_NODE = (
    '{"name":"x.txt","type":"file","path":"/srv/a/x.txt","uid":0,"gid":0,"size":3,'
    '"mode":420,"permissions":"-rw-r--r--","mtime":"2026-12-03T13:45:03.8Z",'
    '"inode":1234,"message_type":"node","struct_type":"node"}'
)


def test_ls_lines_become_entries_of_the_directory() -> None:
    got = [parse.ls_node(line, "/srv/a") for line in LS_014]
    assert got[0] is None  # the snapshot line
    assert got[1] == {
        "self": True,
        "name": "a",
        "type": "dir",
        "size": None,
        "mode": "drwxr-xr-x",
        "mtime": "2026-12-03T13:45:03Z",
        "uid": 0,
        "gid": 0,
    }
    assert got[2]["self"] is False and got[2]["size"] == 3
    assert got[2]["mtime"] == "2026-12-03T13:45:03Z"  # +01:00 converted
    assert (got[2]["uid"], got[2]["gid"]) == (1000, 100)
    assert got[3]["type"] == "symlink" and got[3]["size"] is None
    assert parse.ls_node(LS_017_NODE, "/srv/a")["size"] == 3
    assert parse.ls_node("not json", "/srv") is None
    assert parse.ls_node('{"name": 3, "path": "/x"}', "/") is None
    assert parse.ls_node('{"name":"w","type":"whiteout","path":"/w"}', "/")["type"] == "other"


def test_find_text_gives_each_match_with_its_snapshot() -> None:
    state = parse.FindState()
    text = (
        "Found matching entries in snapshot e29a45b8 from 2026-12-03 14:00:42\n"
        "/tmp/src/a/b/y.txt\n"
        "/tmp/src/a/x.txt\n"
        "\n"
        "Found matching entries in snapshot 8501f70d from 2026-12-03 13:45:07\n"
        "/tmp/src/c/z.txt\n"
    )
    got = [m for m in (state.line(line) for line in text.splitlines()) if m]
    assert got == [
        {"snapshot": "e29a45b8", "path": "/tmp/src/a/b/y.txt"},
        {"snapshot": "e29a45b8", "path": "/tmp/src/a/x.txt"},
        {"snapshot": "8501f70d", "path": "/tmp/src/c/z.txt"},
    ]
    assert parse.FindState().line("/before/any/header") is None


def test_diff_lines_give_changes_and_statistics() -> None:
    assert parse.diff_line('{"message_type":"change","path":"/srv/a/x.txt","modifier":"M"}') == {
        "path": "/srv/a/x.txt",
        "change": "modified",
    }
    assert parse.diff_line('{"message_type":"change","path":"/n","modifier":"+"}')["change"] == (
        "added"
    )
    assert parse.diff_line('{"message_type":"change","path":"/n","modifier":"-"}')["change"] == (
        "removed"
    )
    stats = parse.diff_line(
        '{"message_type":"statistics","source_snapshot":"8501f70d","target_snapshot":"e29a45b8",'
        '"changed_files":1,"added":{"files":0,"dirs":0,"others":1,"data_blobs":1,'
        '"tree_blobs":6,"bytes":2749},"removed":{"files":1,"dirs":0,"others":0,'
        '"data_blobs":2,"tree_blobs":6,"bytes":2778}}'
    )
    assert stats == {
        "statistics": {
            "changed_files": 1,
            "added": {"files": 0, "dirs": 0, "others": 1, "bytes": 2749},
            "removed": {"files": 1, "dirs": 0, "others": 0, "bytes": 2778},
        }
    }
    assert parse.diff_line("comparing snapshot a to b:") is None


def test_browse_commands_take_no_lock_and_check_their_input() -> None:
    assert commands.ls("8501f70d", "/srv") == (
        "restic",
        "ls",
        "--json",
        "--no-lock",
        "--",
        "8501f70d",
        "/srv",
    )
    assert commands.find(["*.conf"], ("web-01",), "etc") == (
        "restic",
        "find",
        "--no-lock",
        "--host",
        "web-01",
        "--tag",
        "etc",
        "--",
        "*.conf",
    )
    assert commands.diff("8501f70d", "e29a45b8")[-3:] == ("--", "8501f70d", "e29a45b8")
    for bad in (
        lambda: commands.ls("latest", "/"),
        lambda: commands.ls("8501f70d", "srv"),
        lambda: commands.find([]),
        lambda: commands.diff("8501f70d", "--help"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_a_restores_progress_in_restic_0_17() -> None:
    status = parse.json_line(
        '{"message_type":"status","seconds_elapsed":4,"percent_done":0.5,"total_files":10,'
        '"files_restored":5,"total_bytes":2000,"bytes_restored":1000}'
    )
    got = parse.progress(status)
    assert (got["percent_done"], got["files_done"], got["total_files"]) == (0.5, 5, 10)
    assert (got["bytes_done"], got["total_bytes"], got["throughput_bps"]) == (1000, 2000, 250)
    assert commands.restore("4f2a9c1e", "/srv")[:3] == ("restic", "restore", "--json")
