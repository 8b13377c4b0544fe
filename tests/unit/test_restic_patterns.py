"""fleet.common.restic.patterns: restic's include and exclude patterns as
a dry run reads them."""

from __future__ import annotations

import pytest

from fleet.common.restic.patterns import matches, selected


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/etc/nginx", "/etc/nginx", True),
        ("/etc/nginx", "/etc/nginx/nginx.conf", True),  # under a directory matched
        ("/etc/nginx", "/etc/nginx2/x", False),
        ("/etc/ngin?", "/etc/nginx/x", True),
        ("*.log", "/var/log/a.log", True),  # no leading /: anywhere
        ("*.log", "/var/log/a.log.1", False),
        ("log", "/var/log/a", True),
        ("/var/**/x.txt", "/var/a/b/x.txt", True),
        ("/var/**/x.txt", "/var/x.txt", True),
        ("/var/*/x.txt", "/var/a/b/x.txt", False),
        ("/srv/a\\[1\\]", "/srv/a[1]", True),  # escaped: exact
        ("/srv/a[12]", "/srv/a1", True),
        ("/srv/a[!12]", "/srv/a1", True),  # as Go reads it: only ^ negates
        ("/srv/a[^12]", "/srv/a3", True),
        ("/srv/a[^12]", "/srv/a1", False),
        ("/etc/[z-a]", "/etc/x", False),  # a range restic takes and nothing matches
        ("/srv/a[", "/srv/a[", True),  # an unclosed class is literal
        ("/srv/a.b", "/srv/aXb", False),  # regex characters are literal
    ],
)
def test_matches(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_selected_takes_excludes_over_includes():
    assert selected("/a/b.bin")
    assert not selected("/a/b.bin", excludes=["*.bin"])
    assert selected("/a/c.txt", excludes=["*.bin"])
    assert selected("/etc/x", includes=["/etc"]) and not selected("/var/x", includes=["/etc"])
    assert not selected("/etc/x.bin", includes=["/etc"], excludes=["*.bin"])


def test_many_double_stars_over_a_deep_path():
    # each (pattern part, path part) pair is decided once: the exponential
    # search this replaced took 16 s here (the suite would show it)
    pattern = "/" + "/".join(["**"] * 10) + "/nothing"
    path = "/" + "/".join(f"d{i}" for i in range(30)) + "/file"
    assert matches(pattern, path) is False
    assert matches(pattern.replace("nothing", "file"), path) is True
