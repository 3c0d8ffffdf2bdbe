"""Suspicion timeout arithmetic, against memberlist's own test vectors (suspicion_test.go,
util_test.go)."""

from __future__ import annotations

import pytest

from vxnet.gossip.suspicion import Suspicion, remaining_suspicion_time, suspicion_timeout


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 1.0), (5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_scales_with_log10_n(n: int, expected: float) -> None:
    # TestSuspicionTimeout: suspicionTimeout(3, n, 1 s) / 3, truncated to whole milliseconds.
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected, abs=1e-9)


def test_suspicion_timeout_lan_defaults() -> None:
    assert suspicion_timeout(4, 100, 1.0) == pytest.approx(8.0)
    assert suspicion_timeout(4, 3, 1.0) == pytest.approx(4.0)
    assert suspicion_timeout(4, 0, 1.0) == pytest.approx(4.0)  # n is floored at 1
    assert suspicion_timeout(4, 50, 1.0) == pytest.approx(6.792)


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.810),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_suspicion_time(n: int, k: int, elapsed: float, expected: float) -> None:
    # TestSuspicion_remainingSuspicionTime, min 2 s, max 30 s.
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected)


LO, HI = 0.5, 2.0


@pytest.mark.parametrize(
    ("confirmations", "expected_n", "expected_timeout"),
    [
        ([], 0, HI),
        ([("me", False), ("foo", True)], 1, 1.25),
        ([("me", False), ("foo", True), ("foo", False), ("foo", False)], 1, 1.25),
        ([("me", False), ("foo", True), ("bar", True)], 2, 0.811),  # Go test: ~810 ms
        ([("me", False), ("foo", True), ("bar", True), ("baz", True)], 3, LO),
        ([("me", False), ("foo", True), ("bar", True), ("baz", True), ("zoo", False)], 3, LO),
    ],
)
def test_confirmations_shorten_the_timer(
    confirmations: list[tuple[str, bool]], expected_n: int, expected_timeout: float
) -> None:
    # TestSuspicion_Timer: k = 3, confirmations 25 ms apart; the deadline is absolute.
    s = Suspicion("me", 3, LO, HI, now=100.0)
    now = 100.0
    for who, new in confirmations:
        now += 0.025
        assert s.confirm(who, now) is new
    assert s.n == expected_n
    assert s.deadline == pytest.approx(100.0 + expected_timeout)
    assert not s.expired(100.0 + expected_timeout - 0.001)
    assert s.expired(100.0 + expected_timeout)


def test_zero_k_runs_for_min_and_takes_no_confirmations() -> None:
    s = Suspicion("me", 0, 0.025, 30.0, now=0.0)
    assert s.deadline == pytest.approx(0.025)
    assert not s.confirm("foo", 0.01)
    assert s.deadline == pytest.approx(0.025)


def test_late_confirmation_fires_immediately() -> None:
    # TestSuspicion_Timer_Immediate: the remaining time underflows.
    s = Suspicion("me", 1, 0.1, 30.0, now=0.0)
    assert s.confirm("foo", 0.2)
    assert s.deadline == pytest.approx(0.2)
    assert s.expired(0.2)


def test_confirmation_after_expiry_does_not_move_the_deadline_later() -> None:
    s = Suspicion("me", 3, LO, HI, now=0.0)
    assert s.expired(HI)
    s.confirm("late", HI + 1.0)
    assert s.deadline <= HI + 1.0
