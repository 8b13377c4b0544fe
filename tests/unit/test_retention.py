"""Tests for fleet/common/retention.py: validating policies, restic forget
flags, the one-line description, and the buckets schedules cannot fill."""

from __future__ import annotations

import datetime as dt

import pytest

from fleet.common import cron
from fleet.common.retention import (
    COUNTS,
    KEYS,
    RetentionError,
    describe,
    forget_args,
    normalize,
    unfillable,
)

# --- normalize: what is accepted --------------------------------------------


def test_keys_are_in_canonical_order() -> None:
    assert KEYS == (
        "keep_last",
        "keep_hourly",
        "keep_daily",
        "keep_weekly",
        "keep_monthly",
        "keep_yearly",
        "keep_within",
    )


@pytest.mark.parametrize("key", COUNTS)
@pytest.mark.parametrize("value", [1, 7, 365, 10_000])
def test_each_count_is_accepted(key: str, value: int) -> None:
    assert normalize({key: value}) == {key: value}


@pytest.mark.parametrize(
    "duration", ["7d", "1y", "6m", "12h", "1y6m", "2d12h", "1y2m3d4h", "30d", "0d", "100y"]
)
def test_keep_within_durations_are_accepted(duration: str) -> None:
    assert normalize({"keep_within": duration}) == {"keep_within": duration}


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_policy(empty) -> None:
    assert normalize(empty) == {}


@pytest.mark.parametrize("unset", [0, None, ""])
@pytest.mark.parametrize("key", KEYS)
def test_unset_entries_are_dropped(key: str, unset) -> None:
    other = "keep_last" if key == "keep_daily" else "keep_daily"
    assert normalize({key: unset}) == {}
    assert normalize({key: unset, other: 3}) == {other: 3}


def test_keys_come_out_in_canonical_order() -> None:
    policy = {
        "keep_within": "30d",
        "keep_yearly": 2,
        "keep_last": 1,
        "keep_weekly": 4,
        "keep_daily": 7,
        "keep_monthly": 12,
        "keep_hourly": 24,
    }
    out = normalize(policy)
    assert list(out) == list(KEYS)
    assert out == policy


def test_normalize_does_not_modify_its_argument() -> None:
    policy = {"keep_weekly": 4, "keep_daily": 0, "keep_last": 2}
    normalize(policy)
    assert policy == {"keep_weekly": 4, "keep_daily": 0, "keep_last": 2}


def test_normalize_is_idempotent() -> None:
    once = normalize({"keep_weekly": 4, "keep_within": "1y6m", "keep_hourly": None})
    assert normalize(once) == once
    assert list(normalize(once)) == list(once)


# --- normalize: what is refused ---------------------------------------------


@pytest.mark.parametrize("policy", [[("keep_daily", 7)], "keep_daily=7", 7, ["keep_daily"]])
def test_policy_must_be_a_dict(policy) -> None:
    with pytest.raises(RetentionError, match="must be an object"):
        normalize(policy)


@pytest.mark.parametrize("key", ["keep_dayly", "daily", "keep-daily", "KEEP_DAILY", "keep_tag"])
def test_unknown_keys_are_refused(key: str) -> None:
    with pytest.raises(RetentionError, match="unknown retention rule") as info:
        normalize({"keep_daily": 7, key: 1})
    assert repr(key) in str(info.value)


def test_unknown_key_is_refused_even_when_unset() -> None:
    with pytest.raises(RetentionError, match="'keep_forever'"):
        normalize({"keep_forever": None})


@pytest.mark.parametrize("key", COUNTS)
@pytest.mark.parametrize("value", [-1, -7, True, "7", "seven", 7.0, 1.5, [7], {"n": 7}])
def test_bad_counts_are_refused(key: str, value) -> None:
    with pytest.raises(RetentionError, match=rf"^{key} must be a whole number") as info:
        normalize({key: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("key", COUNTS)
def test_false_count_is_refused(key: str) -> None:
    with pytest.raises(RetentionError, match=key):
        normalize({key: False})


@pytest.mark.parametrize(
    "duration",
    [
        "7x",
        "d7",
        "1h2d",  # out of order
        "2d1y",  # out of order
        "1d1d",  # repeated
        "7",  # no unit
        "d",
        " ",
        "7d ",
        " 7d",
        "7D",
        "1w",
        "-7d",
        "7.5d",
        "1y 6m",
    ],
)
def test_bad_durations_are_refused(duration: str) -> None:
    with pytest.raises(RetentionError, match=r"^keep_within ") as info:
        normalize({"keep_within": duration})
    assert repr(duration) in str(info.value)
    assert "restic duration" in str(info.value)


@pytest.mark.parametrize("value", [7, True, ["7d"], 7.5])
def test_keep_within_must_be_a_string(value) -> None:
    with pytest.raises(RetentionError, match=r"^keep_within "):
        normalize({"keep_within": value})


def test_retention_error_is_a_value_error() -> None:
    assert issubclass(RetentionError, ValueError)


# --- forget_args ------------------------------------------------------------


def test_forget_args_exact_flags() -> None:
    assert forget_args(normalize({"keep_within": "30d", "keep_daily": 7})) == (
        "--keep-daily",
        "7",
        "--keep-within",
        "30d",
    )


def test_forget_args_every_rule_in_canonical_order() -> None:
    policy = normalize(
        {
            "keep_within": "1y2m3d4h",
            "keep_yearly": 6,
            "keep_monthly": 5,
            "keep_weekly": 4,
            "keep_daily": 3,
            "keep_hourly": 2,
            "keep_last": 1,
        }
    )
    assert forget_args(policy) == (
        "--keep-last",
        "1",
        "--keep-hourly",
        "2",
        "--keep-daily",
        "3",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "5",
        "--keep-yearly",
        "6",
        "--keep-within",
        "1y2m3d4h",
    )


def test_forget_args_orders_even_an_unordered_dict() -> None:
    assert forget_args({"keep_weekly": 4, "keep_last": 2}) == (
        "--keep-last",
        "2",
        "--keep-weekly",
        "4",
    )


def test_forget_args_empty_policy() -> None:
    assert forget_args({}) == ()


def test_forget_args_are_all_strings() -> None:
    args = forget_args(normalize({"keep_hourly": 48, "keep_within": "2d12h"}))
    assert all(isinstance(a, str) for a in args)
    assert isinstance(args, tuple)


# --- describe ---------------------------------------------------------------


def test_describe_empty_is_keep_all() -> None:
    assert describe({}) == "keep all"
    assert describe(normalize({"keep_daily": 0, "keep_within": None})) == "keep all"


def test_describe() -> None:
    assert describe(normalize({"keep_weekly": 4, "keep_daily": 7})) == "daily 7, weekly 4"
    assert describe({"keep_last": 3}) == "last 3"
    assert describe({"keep_within": "30d", "keep_yearly": 2}) == "yearly 2, within 30d"


# -- the buckets a group's schedules cannot fill --------------------------------------------

UTC = dt.timezone.utc
MONDAY = dt.datetime(2026, 5, 4)


@pytest.mark.parametrize(
    "crons,gap",
    [
        (["0 3 * * *"], dt.timedelta(days=1)),
        (["0 * * * *"], dt.timedelta(hours=1)),
        (["0 3 * * 0"], dt.timedelta(days=7)),
        (["0 3 1 * *"], dt.timedelta(days=28)),  # February's
        (["*/15 9-17 * * 1-5"], dt.timedelta(minutes=15)),
        (["0 3 * * *", "0 15 * * *"], dt.timedelta(hours=12)),  # two schedules together
        ([], None),
    ],
)
def test_shortest_gap_between_fires(crons, gap) -> None:
    assert cron.shortest_gap([(c, UTC) for c in crons], MONDAY) == gap


def test_keep_hourly_on_a_daily_schedule_is_warned_about() -> None:
    policy = {"keep_hourly": 24, "keep_daily": 7, "keep_weekly": 4}
    assert unfillable(policy, dt.timedelta(days=1)) == [
        "keep-hourly 24: its schedules fire at most once every 1 day, so the 24 hourly "
        "snapshots it keeps span 24 days or more, not 24 hours"
    ]


def test_a_weekly_schedule_cannot_fill_hourly_or_daily_but_fills_weekly_and_monthly() -> None:
    policy = {"keep_hourly": 6, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12}
    warned = unfillable(policy, dt.timedelta(days=7))
    assert [w.split(":")[0] for w in warned] == ["keep-hourly 6", "keep-daily 7"]
    assert "span 49 days or more, not 7 days" in warned[1]


def test_a_monthly_schedule_fills_keep_monthly_and_yearly() -> None:
    assert unfillable({"keep_monthly": 12, "keep_yearly": 3}, dt.timedelta(days=28)) == []


def test_rules_without_a_period_are_never_warned_about() -> None:
    assert unfillable({"keep_last": 3, "keep_within": "30d"}, dt.timedelta(days=30)) == []
    assert unfillable({"keep_last": 3}, None) == []


def test_a_group_no_schedule_backs_up_is_told_so() -> None:
    assert unfillable({"keep_daily": 7}, None) == [
        "no enabled schedule backs this group up: its retention applies to backups run by hand only"
    ]
