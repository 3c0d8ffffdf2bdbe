"""Lifeguard's health score (memberlist awareness_test.go) and how it scales probing."""

from __future__ import annotations

import random

import pytest

from vxnet.gossip.awareness import Awareness
from vxnet.gossip.config import Config
from vxnet.gossip.messages import Suspect
from vxnet.gossip.swim import Memberlist

# (delta, score, scaled 1 s timeout), applied in order to one Awareness(8).
CASES = [
    (0, 0, 1.0),
    (-1, 0, 1.0),
    (-10, 0, 1.0),
    (1, 1, 2.0),
    (-1, 0, 1.0),
    (10, 7, 8.0),
    (-1, 6, 7.0),
    (-1, 5, 6.0),
    (-1, 4, 5.0),
    (-1, 3, 4.0),
    (-1, 2, 3.0),
    (-1, 1, 2.0),
    (-1, 0, 1.0),
    (-1, 0, 1.0),
]


def test_awareness_sequence() -> None:
    a = Awareness(8)
    for delta, score, timeout in CASES:
        assert a.apply_delta(delta) == score
        assert a.score == score
        assert a.scale_timeout(1.0) == pytest.approx(timeout)


def test_max_multiplier_one_disables_lifeguard() -> None:
    a = Awareness(1)
    a.apply_delta(5)
    assert a.score == 0
    assert a.scale_timeout(0.5) == 0.5


def test_refutations_raise_the_score_and_stretch_the_probe_window() -> None:
    ml = Memberlist(Config(), "me", "10.0.0.1", 7946, random.Random(1), 0.0)
    for i in range(3):
        ml.receive([Suspect(ml.incarnation, "me", f"accuser-{i}")], ("10.0.0.2", 7946), 1.0)
    assert ml.awareness_score == 3
    assert ml.counters["refutations"] == 3
    # Up to awareness_max_multiplier - 1.
    for i in range(10):
        ml.receive([Suspect(ml.incarnation, "me", f"more-{i}")], ("10.0.0.2", 7946), 2.0)
    assert ml.awareness_score == 7
