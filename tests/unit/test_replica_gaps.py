"""fleet.server.replicas.Gaps: each event id published once, a missing one
waited for while a transaction that may hold it is running, not after."""

from __future__ import annotations

from fleet.server.replicas import GAP_CAP, Gaps


def read(gaps: Gaps, *ids: int) -> list[int]:
    return [i for i in ids if gaps.fresh(i)]


def test_ids_are_read_once_and_done_moves_past_them() -> None:
    gaps = Gaps(10)
    assert read(gaps, 9, 10, 11, 12) == [11, 12]
    gaps.advance(0.0, xmin=50, bound=60)
    assert gaps.done == 12 and read(gaps, 11, 12) == []


def test_a_missing_id_is_waited_for_while_a_transaction_may_hold_it() -> None:
    gaps = Gaps(0)
    assert read(gaps, 1, 2, 4, 5) == [1, 2, 4, 5]
    gaps.advance(0.0, xmin=100, bound=105)  # 3 is missing: noticed with bound 105
    assert gaps.done == 2 and gaps.top() == 5
    gaps.advance(1.0, xmin=104, bound=110)  # a transaction from before is still running
    assert gaps.done == 2
    assert read(gaps, 3) == [3]  # it committed: read now, once
    gaps.advance(2.0, xmin=104, bound=110)
    assert gaps.done == 5 and read(gaps, 3, 4, 5) == []


def test_a_missing_id_is_passed_once_every_older_transaction_ended() -> None:
    gaps = Gaps(0)
    read(gaps, 1, 3)
    gaps.advance(0.0, xmin=100, bound=105)
    assert gaps.done == 1
    gaps.advance(0.5, xmin=105, bound=107)  # every transaction of then has ended
    assert gaps.done == 3 and not gaps.since


def test_a_missing_id_is_passed_after_the_cap_whatever_the_snapshot() -> None:
    gaps = Gaps(0)
    read(gaps, 2)
    gaps.advance(0.0, xmin=100, bound=105)
    gaps.advance(GAP_CAP - 1, xmin=101, bound=120)
    assert gaps.done == 0
    gaps.advance(GAP_CAP, xmin=101, bound=120)
    assert gaps.done == 2


def test_a_bound_is_asked_for_only_when_an_id_is_newly_missing() -> None:
    gaps = Gaps(0)
    read(gaps, 1, 2)
    assert not gaps.unnoticed()
    gaps.advance(0.0, xmin=10, bound=0)  # no gap: the bound is not used
    assert gaps.done == 2 and not gaps.since
    read(gaps, 4)
    assert gaps.unnoticed()  # 3 is missing
    gaps.advance(0.0, xmin=10, bound=12)
    assert not gaps.unnoticed() and gaps.since[3] == (0.0, 12)
    read(gaps, 5)
    assert not gaps.unnoticed()  # 3 noticed already, nothing new missing
