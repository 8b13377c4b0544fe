"""fleet.common.selectors: host labels and the selectors picking hosts."""

from __future__ import annotations

import pytest

from fleet.common.selectors import SelectorError, matches, parse, parse_label

WEB = {"role": "web", "env": "prod", "dc": "fra1"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("role=web", True),
        ("role=web,env=prod", True),
        ("role=web, env=test", False),
        ("env!=test", True),
        ("env!=prod", False),
        ("dc", True),
        ("rack", False),
        ("!rack", True),
        ("!dc", False),
        ("role=web,!rack,env!=test", True),
    ],
)
def test_a_selector_picks_by_every_requirement(selector, expected):
    assert matches(parse(selector), WEB) is expected


@pytest.mark.parametrize(
    "bad", ["Role=web", "role=we b", "=web", "-x", "a" * 64, ",".join(["k"] * 17)]
)
def test_a_bad_selector_says_what(bad):
    with pytest.raises(SelectorError):
        parse(bad)


def test_labels():
    assert parse_label("role=web") == ("role", "web")
    assert parse_label("team/owner=ops-1") == ("team/owner", "ops-1")
    assert parse_label("empty=") == ("empty", "")
    for bad in ("novalue", "k=v v", "K=v"):
        with pytest.raises(SelectorError):
            parse_label(bad)
