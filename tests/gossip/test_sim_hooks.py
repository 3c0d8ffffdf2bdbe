"""What simulators need from the core: warm start, suspect events, a plain-SWIM switch; and the
broadcast queue's fast path, which must pick what the general packing loop picks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gossip.test_swim import _fail_probe, _probe_first, decode, feed, make, run_to
from vxnet.errors import UsageError
from vxnet.gossip.broadcast import TransmitLimitedQueue
from vxnet.gossip.config import Config, push_pull_scale
from vxnet.gossip.messages import DEFAULT_VSN, NodeState, PushNodeState, Suspect
from vxnet.gossip.states import ip_bytes
from vxnet.gossip.swim import Memberlist, SuspectEvent

A = NodeState.ALIVE


def _members(count: int) -> list[PushNodeState]:
    return [
        PushNodeState(
            f"n{i}", ip_bytes(f"10.0.1.{i + 1}"), 7946, b"", 1, NodeState.ALIVE, DEFAULT_VSN
        )
        for i in range(count)
    ]


def test_warm_start_knows_everyone_without_events_or_broadcasts() -> None:
    ml = make()
    ml.warm_start(_members(40), now=5.0)
    assert len(ml.members()) == 41
    assert ml.take_events() == [] and ml.num_queued == 0
    assert ml.member("n3").state == NodeState.ALIVE  # type: ignore[union-attr]
    due = ml.next_timer()
    assert due is not None and due <= 5.0 + push_pull_scale(30.0, 41)


def test_warm_start_refuses_what_is_not_an_alive_member() -> None:
    ml = make()
    bad = PushNodeState("x", b"\x01", 7946, b"", 1, NodeState.ALIVE, DEFAULT_VSN)
    with pytest.raises(UsageError):
        ml.warm_start([bad], now=0.0)


def test_suspect_events_say_who_accused_and_why() -> None:
    ml = make()
    ml.warm_start(_members(5), now=0.0)
    feed(ml, Suspect(1, "n0", "n1"), now=0.5)
    assert ml.take_events() == []  # off by default: memberlist has no such event
    ml.report_suspicions = True
    feed(ml, Suspect(1, "n2", "n1"), now=0.6)
    assert ml.take_events() == [SuspectEvent("n2", "n1", 1, "message", 0.6)]
    ping, _, at = _fail_probe(ml)
    run_to(ml, at + 1.0)
    evs = [e for e in ml.take_events() if isinstance(e, SuspectEvent)]
    if ping.node not in ("n0", "n2"):
        assert evs and evs[-1].member == ping.node and evs[-1].cause == "probe"


def test_buddy_system_can_be_turned_off_for_plain_swim() -> None:
    ml = make(Config(disable_buddy_system=True))
    ml.warm_start(_members(1), now=0.0)
    feed(ml, Suspect(1, "n0", "x"), now=0.0)
    d, ping, _ = _probe_first(ml)
    assert decode(d)[0] == ping
    assert Suspect(1, "n0", "me") not in decode(d)  # no accusation with the ping


# ---------------------------------------------------------------------------- queue fast path


def _reference_take(queue: list[list[object]], overhead: int, limit: int, tl: int) -> list[bytes]:
    """memberlist's packing loop, written out plainly over [transmits, -len, -id, msg] rows."""
    out: list[bytes] = []
    used = 0
    taken: list[list[object]] = []
    for t in sorted({int(r[0]) for r in queue}):  # type: ignore[call-overload]
        while True:
            free = limit - used - overhead
            fits = [r for r in queue if r[0] == t and len(r[3]) <= free]  # type: ignore[arg-type]
            if free <= 0 or not fits:
                break
            best = min(fits, key=lambda r: (r[1], r[2]))  # type: ignore[arg-type,return-value]
            queue.remove(best)
            used += overhead + len(best[3])  # type: ignore[arg-type]
            out.append(best[3])  # type: ignore[arg-type]
            taken.append(best)
        if limit - used - overhead <= 0:
            break
    for r in taken:
        if int(r[0]) + 1 < tl:  # type: ignore[call-overload]
            r[0] = int(r[0]) + 1  # type: ignore[call-overload]
            queue.append(r)
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 120), st.integers(0, 6)), min_size=1, max_size=25),
    st.lists(st.integers(10, 700), min_size=1, max_size=12),
)
def test_fast_and_general_packing_agree(sizes: list[tuple[int, int]], limits: list[int]) -> None:
    q = TransmitLimitedQueue(1, lambda: 999)  # limit 3 transmits
    ref: list[list[object]] = []
    for i, (size, name) in enumerate(sizes):
        msg = bytes([i]) * size
        q.queue(msg, name=f"k{name}")
        ref = [r for r in ref if r[4] != f"k{name}"]
        ref.append([0, -size, -(i + 1), msg, f"k{name}"])
    for limit in limits:
        assert q.get_broadcasts(2, limit) == _reference_take(ref, 2, limit, 3)
        assert len(q) == len(ref)


def test_memberlist_still_builds_with_a_random_generator() -> None:
    Memberlist(Config(), "a", "10.0.0.1", 7946, random.Random(1), 0.0)
