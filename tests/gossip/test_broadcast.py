"""The transmit-limited broadcast queue (memberlist queue_test.go) and how gossip uses it."""

from __future__ import annotations

import pytest

from vxnet.gossip.broadcast import TransmitLimitedQueue, retransmit_limit


def _q(mult: int, nodes: int) -> TransmitLimitedQueue:
    return TransmitLimitedQueue(mult, lambda: nodes)


@pytest.mark.parametrize(
    ("mult", "n", "limit"), [(3, 0, 0), (3, 1, 3), (3, 99, 6), (4, 100, 12), (4, 9, 4)]
)
def test_retransmit_limit(mult: int, n: int, limit: int) -> None:
    assert retransmit_limit(mult, n) == limit


def test_named_broadcast_replaces_the_older_one() -> None:
    q = _q(1, 1)
    for name in ("test", "foo", "bar"):
        q.queue(name.encode() + b"-1", name=name)
    assert len(q) == 3
    q.queue(b"test-2", name="test")
    assert len(q) == 3
    # Same transmit count, same length: newest first.
    assert [m for _, m in q.transmits()] == [b"test-2", b"bar-1", b"foo-1"]


def test_unnamed_broadcasts_are_never_invalidated() -> None:
    q = _q(1, 1)
    q.queue(b"a")
    q.queue(b"a")
    assert len(q) == 2


def test_get_broadcasts_respects_the_budget() -> None:
    q = _q(3, 10)
    for i, name in enumerate(("test", "foo", "bar", "baz")):
        q.queue(f"{i + 1}. this is a test.".encode(), name=name)  # 18 bytes each
    assert len(q.get_broadcasts(2, 80)) == 4  # 4 x (18 + 2) = 80
    assert len(q.get_broadcasts(3, 80)) == 3  # 4 x 21 = 84 does not fit


def test_get_broadcasts_stops_at_the_transmit_limit() -> None:
    q = _q(1, 10)  # limit 2
    for i, name in enumerate(("test", "foo", "bar", "baz")):
        q.queue(f"{i + 1}. this is a test.".encode(), name=name)
    assert len(q.get_broadcasts(3, 80)) == 3
    assert len(q.get_broadcasts(3, 80)) == 3
    assert len(q.get_broadcasts(3, 80)) == 2  # only two left under the limit
    assert q.get_broadcasts(3, 80) == []
    assert len(q) == 0


def test_fewest_transmits_first_then_largest_then_newest() -> None:
    q = _q(10, 10)
    q.queue(b"old", name="a")
    q.queue(b"longer", name="b")
    q.queue(b"new", name="c")
    q.queue(b"sent", name="d", transmits=1)
    # The budget fits exactly one 6-byte message: the largest fresh one wins.
    assert q.get_broadcasts(0, 6) == [b"longer"]
    # Then equal lengths: newest first; "sent" has been sent once already.
    assert q.get_broadcasts(0, 3) == [b"new"]
    assert q.get_broadcasts(0, 3) == [b"old"]
    assert q.get_broadcasts(0, 4) == [b"sent"]


def test_ordering_by_transmits() -> None:
    q = _q(1, 10)
    for name, transmits in (("node0", 0), ("node1", 10), ("node2", 3), ("node3", 4)):
        q.queue(name.encode(), name=name, transmits=transmits)
    assert [t for t, _ in q.transmits()] == [0, 3, 4, 10]


def test_a_message_too_big_for_the_budget_is_skipped_not_blocking() -> None:
    q = _q(4, 10)
    q.queue(b"x" * 100, name="big")
    q.queue(b"small", name="small")
    assert q.get_broadcasts(2, 50) == [b"small"]
    assert len(q) == 2


def test_prune_drops_the_most_sent_and_oldest() -> None:
    q = _q(1, 10)
    for i, name in enumerate(("test", "foo", "bar", "baz")):
        q.queue(f"{i + 1}. this is a test.".encode(), name=name, token=name)
    q.prune(2)
    assert len(q) == 2
    assert sorted(q.take_finished(), key=str) == ["foo", "test"]
    assert {m[:1] for _, m in q.transmits()} == {b"3", b"4"}


def test_finished_tokens_report_last_transmission_and_invalidation() -> None:
    q = _q(1, 1)  # limit 1
    q.queue(b"first", name="n", token="t1")
    q.queue(b"second", name="n", token="t2")
    assert q.take_finished() == ["t1"]
    assert q.get_broadcasts(0, 100) == [b"second"]
    assert q.take_finished() == ["t2"]
    assert len(q) == 0
