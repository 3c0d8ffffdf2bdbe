"""The memberlist core, one behaviour at a time, driven only through its sans-IO interface."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from vxnet.gossip.config import Config, push_pull_scale
from vxnet.gossip.messages import (
    DEFAULT_VSN,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    decode_message_untrusted,
    encode_message,
)
from vxnet.gossip.states import (
    LOCAL_TRANSITIONS,
    TRANSITIONS,
    Trigger,
    ip_bytes,
    to_dot,
    transition,
    verify_protocol,
)
from vxnet.gossip.swim import Datagram, MemberEvent, Memberlist, UserMessage

A, S, D, L = NodeState.ALIVE, NodeState.SUSPECT, NodeState.DEAD, NodeState.LEFT
SRC = ("10.0.0.99", 7946)
B_ADDR = "10.0.0.2"


def make(config: Config | None = None, now: float = 0.0, name: str = "me") -> Memberlist:
    ml = Memberlist(config or Config(), name, "10.0.0.1", 7946, random.Random(7), now)
    ml.take_events()
    return ml


def alive(
    name: str,
    inc: int,
    addr: str = B_ADDR,
    meta: bytes = b"",
    vsn: bytes = DEFAULT_VSN,
    port: int = 7946,
) -> Alive:
    return Alive(inc, name, ip_bytes(addr), port, meta, vsn)


def feed(ml: Memberlist, *msgs: Message, now: float = 1.0) -> None:
    ml.receive(list(msgs), SRC, now)


def decode(d: Datagram) -> list[Message]:
    return [decode_message_untrusted(m) for m in d.messages]


def with_members(ml: Memberlist, count: int, vsn: bytes = DEFAULT_VSN) -> list[str]:
    names = [f"n{i}" for i in range(count)]
    for i, name in enumerate(names):
        feed(ml, alive(name, 1, f"10.0.1.{i + 1}", vsn=vsn), now=0.0)
    ml.take_events()
    ml.take_datagrams()
    return names


def events(ml: Memberlist) -> list[tuple[str, str]]:
    return [(e.kind, e.member.name) for e in ml.take_events() if isinstance(e, MemberEvent)]


def run_to(ml: Memberlist, end: float) -> list[Datagram]:
    """Fire every timer up to ``end``; returns the datagrams sent."""
    out: list[Datagram] = []
    while (due := ml.next_timer()) is not None and due <= end:
        ml.handle_timer(due)
        out.extend(ml.take_datagrams())
    return out


# ---------------------------------------------------------------------------- transitions


@dataclass(frozen=True)
class Case:
    start: NodeState
    trigger: Trigger | None  # the table entry this case exercises (None: a guard rejects it)
    message: Callable[[], Message]
    state: NodeState
    incarnation: int
    events: tuple[str, ...] = ()


def _setup(ml: Memberlist, start: NodeState) -> None:
    feed(ml, alive("b", 5))
    if start == S:
        feed(ml, Suspect(5, "b", "c"))
    elif start == D:
        feed(ml, Dead(5, "b", "c"))
    elif start == L:
        feed(ml, Dead(5, "b", "b"))
    ml.take_events()


CASES = {
    "alive+newer alive": Case(A, Trigger.ALIVE, lambda: alive("b", 6), A, 6),
    "alive+newer alive, new meta": Case(
        A, Trigger.ALIVE, lambda: alive("b", 6, meta=b"m"), A, 6, ("update",)
    ),
    "alive+same alive ignored": Case(A, None, lambda: alive("b", 5, meta=b"m"), A, 5),
    "alive+older alive ignored": Case(A, None, lambda: alive("b", 4), A, 5),
    "alive+suspect": Case(A, Trigger.SUSPECT, lambda: Suspect(5, "b", "c"), S, 5),
    "alive+newer suspect": Case(A, Trigger.SUSPECT, lambda: Suspect(7, "b", "c"), S, 7),
    "alive+stale suspect ignored": Case(A, None, lambda: Suspect(4, "b", "c"), A, 5),
    "alive+dead": Case(A, Trigger.DEAD, lambda: Dead(5, "b", "c"), D, 5, ("leave",)),
    "alive+stale dead ignored": Case(A, None, lambda: Dead(4, "b", "c"), A, 5),
    "alive+own dead is left": Case(A, Trigger.LEAVE, lambda: Dead(5, "b", "b"), L, 5, ("leave",)),
    "suspect+newer alive": Case(S, Trigger.ALIVE, lambda: alive("b", 6), A, 6),
    "suspect+same alive ignored": Case(S, None, lambda: alive("b", 5), S, 5),
    "suspect+confirmation": Case(S, Trigger.SUSPECT, lambda: Suspect(5, "b", "d"), S, 5),
    "suspect+dead": Case(S, Trigger.DEAD, lambda: Dead(5, "b", "c"), D, 5, ("leave",)),
    "suspect+own dead is left": Case(S, Trigger.LEAVE, lambda: Dead(6, "b", "b"), L, 6, ("leave",)),
    "dead+newer alive joins": Case(D, Trigger.ALIVE, lambda: alive("b", 6), A, 6, ("join",)),
    "dead+same alive ignored": Case(D, None, lambda: alive("b", 5), D, 5),
    "dead+suspect ignored": Case(D, None, lambda: Suspect(6, "b", "c"), D, 5),
    "dead+dead ignored": Case(D, None, lambda: Dead(6, "b", "c"), D, 5),
    "dead+alive at new address is a conflict": Case(
        D, None, lambda: alive("b", 9, addr="10.0.0.3"), D, 5
    ),
    "left+newer alive joins": Case(L, Trigger.ALIVE, lambda: alive("b", 6), A, 6, ("join",)),
    "left+same alive ignored": Case(L, None, lambda: alive("b", 5), L, 5),
    "left+alive at new address rejoins": Case(
        L, Trigger.ALIVE, lambda: alive("b", 1, addr="10.0.0.3"), A, 1, ("join",)
    ),
    "left+dead ignored": Case(L, None, lambda: Dead(6, "b", "c"), L, 5),
    "alive+alive at new address is a conflict": Case(
        A, None, lambda: alive("b", 9, addr="10.0.0.3"), A, 5
    ),
    "alive+alive with bad versions ignored": Case(
        A, None, lambda: alive("b", 9, vsn=bytes([3, 2, 2, 0, 0, 0])), A, 5
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_transition(case: Case) -> None:
    ml = make()
    _setup(ml, case.start)
    assert ml.member("b") is not None
    feed(ml, case.message(), now=2.0)
    b = ml.member("b")
    assert b is not None
    assert (b.state, b.incarnation) == (case.state, case.incarnation)
    assert tuple(kind for kind, _ in events(ml)) == case.events
    if case.start != case.state:
        assert b.state_change == 2.0


def test_every_table_entry_has_a_case() -> None:
    covered = {(c.start, c.trigger) for c in CASES.values() if c.trigger is not None}
    separate = {(S, Trigger.SUSPICION_TIMEOUT), (D, Trigger.REAP), (L, Trigger.REAP)}
    assert set(TRANSITIONS) - separate <= covered
    assert transition(D, Trigger.SUSPECT) is None


def test_transitions_are_rebroadcast_and_ignored_ones_are_not() -> None:
    ml = make()
    _setup(ml, A)
    queued = ml.num_queued
    feed(ml, Suspect(4, "b", "c"))  # stale
    assert ml.num_queued == queued
    feed(ml, Suspect(5, "b", "c"))  # replaces the queued alive about b (same name)
    assert ml.num_queued == queued


def test_unknown_members_need_an_alive_first() -> None:
    ml = make()
    feed(ml, Suspect(3, "x", "c"), Dead(3, "y", "c"))
    assert ml.member("x") is None and ml.member("y") is None
    feed(ml, alive("z", 1))
    assert events(ml) == [("join", "z")]
    # memberlist records an incarnation-0 sighting as a dead stub and waits for a newer one.
    feed(ml, alive("w", 0, addr="10.0.0.4"))
    w = ml.member("w")
    assert w is not None and w.state == D
    assert "w" not in {m.name for m in ml.members()}


def test_dead_member_address_can_be_reclaimed_after_reclaim_time() -> None:
    ml = make(Config(dead_node_reclaim_time=10.0))
    _setup(ml, D)
    feed(ml, alive("b", 1, addr="10.0.0.3"), now=5.0)
    assert ml.member("b").state == D  # type: ignore[union-attr]
    feed(ml, alive("b", 1, addr="10.0.0.3"), now=12.0)
    b = ml.member("b")
    assert b is not None and (b.state, b.addr) == (A, "10.0.0.3")


# ---------------------------------------------------------------------------- the local node


def test_start_up_joins_ourselves_and_announces_us() -> None:
    ml = Memberlist(Config(), "me", "10.0.0.1", 7946, random.Random(1), 0.0, meta=b"m")
    assert events(ml) == [("join", "me")]
    me = ml.member("me")
    assert me is not None and (me.state, me.incarnation, me.meta) == (A, 1, b"m")
    assert ml.num_queued == 1


@pytest.mark.parametrize(
    ("accusation", "incarnation"),
    [
        (Suspect(1, "me", "c"), 2),
        (Suspect(9, "me", "c"), 10),
        (Dead(1, "me", "c"), 2),
        (Dead(1, "me", "me"), 2),  # a stale leave of ours, while we are not leaving
        (alive("me", 1, addr="10.0.0.1", meta=b"other"), 2),
        (alive("me", 4, addr="10.0.0.1"), 5),
    ],
)
def test_accusations_about_us_are_refuted(accusation: Message, incarnation: int) -> None:
    ml = make()
    feed(ml, accusation)
    me = ml.member("me")
    assert me is not None and (me.state, me.incarnation) == (A, incarnation)
    assert ml.awareness_score == 1
    assert ml.counters["refutations"] == 1
    assert events(ml) == []
    # The refutation is gossiped: the next packet we send carries Alive(incarnation).
    feed(ml, Ping(1, "me"))
    (reply,) = ml.take_datagrams()
    assert alive("me", incarnation, addr="10.0.0.1") in decode(reply)
    assert LOCAL_TRANSITIONS[(A, Trigger.SUSPECT)].refute


def test_our_own_current_alive_is_not_refuted() -> None:
    ml = make()
    feed(ml, alive("me", 1, addr="10.0.0.1"))
    assert ml.counters["refutations"] == 0


def test_leave_gossips_our_death_and_stops_refuting() -> None:
    ml = make()
    with_members(ml, 2)
    ml.leave(3.0)
    me = ml.member("me")
    assert me is not None and (me.state, me.incarnation) == (L, 1)
    assert events(ml) == [("leave", "me")]
    assert not ml.leave_broadcast_done
    feed(ml, alive("me", 7, addr="10.0.0.1"), Suspect(1, "me", "x"))
    assert ml.member("me").state == L  # type: ignore[union-attr]
    assert ml.counters["refutations"] == 0
    sent = run_to(ml, 20.0)
    dead = Dead(1, "me", "me")
    assert any(dead in decode(d) for d in sent)
    assert ml.leave_broadcast_done


def test_leave_alone_is_done_at_once() -> None:
    ml = make()
    ml.leave(1.0)
    assert ml.leave_broadcast_done


def test_update_meta_gossips_a_new_incarnation() -> None:
    ml = make()
    ml.update_meta(b"new", 1.0)
    assert events(ml) == [("update", "me")]
    assert ml.incarnation == 2


# ---------------------------------------------------------------------------- pings and acks


def test_ping_is_acked_to_its_source_address() -> None:
    ml = make()
    ml.receive([Ping(42, "me", ip_bytes("10.0.0.7"), 8000, "x")], SRC, 1.0)
    (d,) = ml.take_datagrams()
    assert d.dest == ("10.0.0.7", 8000)
    assert decode(d)[0] == Ack(42, None)
    assert not d.crc


def test_ping_without_source_is_acked_to_the_sender_and_any_name_is_us() -> None:
    ml = make()
    ml.receive([Ping(1, "")], SRC, 1.0)
    (d,) = ml.take_datagrams()
    assert d.dest == SRC


def test_ping_for_someone_else_is_dropped() -> None:
    ml = make()
    ml.receive([Ping(1, "other")], SRC, 1.0)
    assert ml.take_datagrams() == []
    assert ml.counters["pings_wrong_node"] == 1
    assert ml.receive_stream(Ping(1, "other"), SRC, 1.0) is None
    assert ml.receive_stream(Ping(2, "me"), SRC, 1.0) == Ack(2, None)


def test_acks_piggyback_broadcasts_within_the_budget() -> None:
    config = Config(udp_buffer_size=200)
    ml = make(config)
    for i in range(20):
        feed(ml, alive(f"n{i}", 1, f"10.0.1.{i + 1}"))
    ml.take_datagrams()
    ml.receive([Ping(5, "me")], SRC, 1.0)
    (d,) = ml.take_datagrams()
    parts = decode(d)
    assert parts[0] == Ack(5, None)
    assert len(parts) > 2 and all(isinstance(p, Alive) for p in parts[1:])
    # sendMsg: 200 - len(ack) - 2 left for the rest, 2 bytes each on top.
    assert sum(len(m) + 2 for m in d.messages[1:]) <= 200 - len(d.messages[0]) - 2
    ml.set_encryption_overhead(29)
    ml.receive([Ping(6, "me")], SRC, 1.0)
    (d2,) = ml.take_datagrams()
    assert sum(len(m) + 2 for m in d2.messages[1:]) <= 200 - len(d2.messages[0]) - 2 - 29


def _probe_first(ml: Memberlist) -> tuple[Datagram, Ping, float]:
    """Fire timers until the first probe goes out: its datagram, ping and time."""
    while (due := ml.next_timer()) is not None:
        ml.handle_timer(due)
        for d in ml.take_datagrams():
            msgs = decode(d)
            if isinstance(msgs[0], Ping):
                return d, msgs[0], due
    raise AssertionError("no probe")


def test_probe_acked_directly() -> None:
    ml = make()
    names = with_members(ml, 4)
    _, ping, at = _probe_first(ml)
    assert ping.node in names and ping.source_node == "me"
    feed(ml, Ack(ping.seq_no), now=at + 0.1)
    assert ml.counters["acks"] == 1 and ml.counters["probe_failures"] == 0
    assert ml.awareness_score == 0


def _fail_probe(ml: Memberlist) -> tuple[Ping, list[Datagram], float]:
    """Probe, get no ack: returns the ping, what went out at the probe timeout, probe time."""
    _, ping, at = _probe_first(ml)
    sent = run_to(ml, at + ml.config.probe_timeout)
    return ping, sent, at


def test_probe_timeout_goes_indirect_with_nacks_and_tcp() -> None:
    ml = make()
    names = with_members(ml, 5)
    ping, sent, _ = _fail_probe(ml)
    indirect = [m for d in sent for m in decode(d) if isinstance(m, IndirectPing)]
    assert len(indirect) == 3
    assert {i.node for i in indirect} == {ping.node}
    assert all(i.nack and i.seq_no == ping.seq_no for i in indirect)
    relays = {d.dest for d in sent if isinstance(decode(d)[0], IndirectPing)}
    target = ml.member(ping.node)
    assert target is not None and (target.addr, target.port) not in relays
    (op,) = ml.take_stream_ops()
    assert op.message == Ping(ping.seq_no, ping.node, ip_bytes("10.0.0.1"), 7946, "me")
    assert op.dest == (target.addr, target.port)
    assert op.timeout == pytest.approx(0.5)  # the rest of the 1 s probe window
    assert len(names) == 5


def test_old_peers_get_no_nack_request_and_no_tcp_ping() -> None:
    ml = make()
    with_members(ml, 4, vsn=bytes([1, 2, 2, 0, 0, 0]))
    _, sent, _ = _fail_probe(ml)
    indirect = [m for d in sent for m in decode(d) if isinstance(m, IndirectPing)]
    assert indirect and not any(i.nack for i in indirect)
    assert ml.take_stream_ops() == []


def test_failed_probe_suspects_and_missing_nacks_cost_awareness() -> None:
    ml = make()
    with_members(ml, 5)
    ping, _, at = _fail_probe(ml)
    run_to(ml, at + 1.0)
    assert ml.member(ping.node).state == S  # type: ignore[union-attr]
    assert ml.counters["suspicions_raised"] == 1
    assert ml.awareness_score == 3  # three nacks expected, none came


def test_nacks_spare_our_awareness() -> None:
    ml = make()
    with_members(ml, 5)
    ping, _, at = _fail_probe(ml)
    feed(ml, Nack(ping.seq_no), Nack(ping.seq_no), Nack(ping.seq_no), now=at + 0.9)
    run_to(ml, at + 1.0)
    assert ml.member(ping.node).state == S  # type: ignore[union-attr]
    assert ml.awareness_score == 0


def test_an_indirect_ack_saves_the_probe() -> None:
    ml = make()
    with_members(ml, 5)
    ping, _, at = _fail_probe(ml)
    feed(ml, Ack(ping.seq_no), now=at + 0.9)
    run_to(ml, at + 1.0)
    assert ml.member(ping.node).state == A  # type: ignore[union-attr]
    assert ml.counters["probe_failures"] == 0


def test_tcp_fallback_ack_saves_the_probe() -> None:
    ml = make()
    with_members(ml, 5)
    ping, _, at = _fail_probe(ml)
    (op,) = ml.take_stream_ops()
    ml.stream_result(op.op_id, Ack(ping.seq_no), at + 0.7)
    run_to(ml, at + 1.0)
    assert ml.member(ping.node).state == A  # type: ignore[union-attr]
    assert ml.counters["probe_failures"] == 0


def test_awareness_stretches_the_probe_window() -> None:
    ml = make()
    with_members(ml, 5)
    for i in range(2):  # two refutations: score 2, probe window 3 s
        feed(ml, Suspect(ml.incarnation, "me", f"c{i}"), now=0.0)
    _, ping, at = _probe_first(ml)
    # No suspicion before three probe intervals have passed, even with no answers at all.
    run_to(ml, at + 2.99)
    assert ml.member(ping.node).state == A  # type: ignore[union-attr]
    assert ml.counters["probes"] == 1  # the ticks in between wait for this probe
    run_to(ml, at + 3.0)
    assert ml.member(ping.node).state == S  # type: ignore[union-attr]


def test_suspect_is_pinged_with_the_accusation_attached() -> None:
    ml = make()
    with_members(ml, 1)
    feed(ml, Suspect(1, "n0", "x"), now=0.0)
    d, ping, _ = _probe_first(ml)
    assert decode(d) == [ping, Suspect(1, "n0", "me")]
    assert d.crc  # sent with the node known: pmax 5 gets a CRC


def test_indirect_ping_relays_and_forwards_the_ack() -> None:
    ml = make()
    ind = IndirectPing(77, ip_bytes("10.0.0.5"), 7000, "t", True, ip_bytes("10.0.0.8"), 9000, "r")
    ml.receive([ind], SRC, 1.0)
    (out,) = ml.take_datagrams()
    assert out.dest == ("10.0.0.5", 7000)
    relay_ping = decode(out)[0]
    assert isinstance(relay_ping, Ping) and relay_ping.node == "t"
    ml.receive([Ack(relay_ping.seq_no)], ("10.0.0.5", 7000), 1.2)
    (fwd,) = ml.take_datagrams()
    assert fwd.dest == ("10.0.0.8", 9000) and decode(fwd)[0] == Ack(77, None)
    run_to(ml, 2.0)
    assert ml.counters["nacks_sent"] == 0


def test_indirect_ping_without_answer_is_nacked() -> None:
    ml = make()
    ind = IndirectPing(78, ip_bytes("10.0.0.5"), 7000, "t", True)
    ml.receive([ind], SRC, 1.0)
    ml.take_datagrams()
    sent = run_to(ml, 1.5)
    nacks = [(d.dest, decode(d)[0]) for d in sent if isinstance(decode(d)[0], Nack)]
    assert nacks == [(SRC, Nack(78))]


# ---------------------------------------------------------------------------- suspicion timers


def test_suspicion_times_out_into_dead_at_min_in_a_small_cluster() -> None:
    ml = make()
    with_members(ml, 2)  # n = 3: k = 0, timeout = min = 4 s
    feed(ml, Suspect(1, "n0", "x"), now=10.0)
    assert ml.member("n0").state == S  # type: ignore[union-attr]
    ml.handle_timer(13.99)
    assert ml.member("n0").state == S  # type: ignore[union-attr]
    ml.handle_timer(14.0)
    assert ml.member("n0").state == D  # type: ignore[union-attr]
    assert events(ml) == [("leave", "n0")]
    assert ml.counters["suspicion_timeouts"] == 1


def test_confirmations_bring_the_dead_declaration_forward() -> None:
    ml = make()
    with_members(ml, 9)  # n = 10: min 4 s, max 24 s, k = 2
    feed(ml, Suspect(1, "n0", "x"), now=0.0)
    ml.handle_timer(23.0)
    feed(ml, Suspect(1, "n0", "x"), now=1.0)  # the same accuser again: no news
    assert ml.counters["confirmations"] == 0
    feed(ml, Suspect(1, "n0", "y"), Suspect(1, "n0", "z"), now=1.0)
    assert ml.counters["confirmations"] == 2
    ml.handle_timer(3.99)
    assert ml.member("n0").state == S  # type: ignore[union-attr]
    ml.handle_timer(4.0)
    assert ml.member("n0").state == D  # type: ignore[union-attr]


def test_refutation_cancels_the_timer() -> None:
    ml = make()
    with_members(ml, 2)
    feed(ml, Suspect(1, "n0", "x"), now=10.0)
    feed(ml, alive("n0", 2, "10.0.1.1"), now=11.0)
    ml.handle_timer(30.0)
    assert ml.member("n0").state == A  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- gossip


def test_gossip_sends_queued_broadcasts_to_a_few_members_with_crc() -> None:
    ml = make()
    with_members(ml, 6)
    feed(ml, Suspect(1, "n0", "x"), now=0.0)
    sent: list[Datagram] = []
    while not sent and (due := ml.next_timer()) is not None:  # the first gossip round
        ml.handle_timer(due)
        sent = [d for d in ml.take_datagrams() if Suspect(1, "n0", "x") in decode(d)]
    assert 1 <= len(sent) <= 3
    assert all(d.crc for d in sent)
    assert ml.counters["gossip_datagrams"] >= 1


def test_no_gossip_without_news() -> None:
    ml = make()
    with_members(ml, 6)
    run_to(ml, 30.0)  # let everything be sent its retransmit limit
    before = ml.counters["gossip_datagrams"]
    run_to(ml, 31.0)
    assert ml.counters["gossip_datagrams"] == before


def test_gossip_reaches_the_recently_dead_but_not_the_left() -> None:
    ml = make(Config(gossip_nodes=10))
    with_members(ml, 2)
    feed(ml, Dead(1, "n0", "x"), Dead(1, "n1", "n1"), now=0.0)
    dests = {d.dest for d in run_to(ml, 0.25) if ml.counters["gossip_datagrams"]}
    assert ("10.0.1.1", 7946) in dests
    assert ("10.0.1.2", 7946) not in dests


def test_dead_members_are_reaped_after_gossip_to_the_dead_time() -> None:
    ml = make(Config(gossip_to_the_dead_time=5.0))
    with_members(ml, 3)
    feed(ml, Dead(1, "n0", "x"), now=0.0)
    run_to(ml, 4.0)
    assert ml.member("n0") is not None
    run_to(ml, 12.0)
    assert ml.member("n0") is None
    assert ml.counters["reaped"] == 1


def test_user_broadcasts_ride_after_memberlist_ones_and_keys_replace() -> None:
    ml = make()
    with_members(ml, 3)
    run_to(ml, 30.0)
    ml.queue_broadcast(b"v1", key="k")
    ml.queue_broadcast(b"v2", key="k")
    ml.queue_broadcast(b"other")
    feed(ml, Suspect(1, "n0", "x"), now=30.0)
    ml.receive([Ping(9, "me")], SRC, 30.0)
    (d,) = ml.take_datagrams()
    parts = decode(d)
    assert parts[0] == Ack(9, None) and parts[1] == Suspect(1, "n0", "x")
    assert {p.payload for p in parts[2:] if isinstance(p, User)} == {b"v2", b"other"}


def test_send_user() -> None:
    ml = make()
    with_members(ml, 1)
    assert ml.send_user("n0", b"hello")
    (d,) = ml.take_datagrams()
    assert d.messages == (b"\x08hello",) and d.dest == ("10.0.1.1", 7946) and d.crc
    assert not ml.send_user("nobody", b"x")
    feed(ml, User(b"hi"))
    assert ml.take_events() == [UserMessage(b"hi", SRC)]


# ---------------------------------------------------------------------------- push/pull


def _push(nodes: list[tuple[str, str, int, NodeState]], user: bytes = b"") -> PushPull:
    return PushPull(
        False,
        tuple(
            PushNodeState(name, ip_bytes(addr), 7946, b"", inc, state, DEFAULT_VSN)
            for name, addr, inc, state in nodes
        ),
        user,
    )


def test_join_pushes_our_state_to_each_seed() -> None:
    ml = make()
    ml.join([("10.0.0.2", 7946), ("10.0.0.3", 7946)], 0.0)
    ops = ml.take_stream_ops()
    assert [op.dest for op in ops] == [("10.0.0.2", 7946), ("10.0.0.3", 7946)]
    assert all(isinstance(op.message, PushPull) and op.message.join for op in ops)
    ml.stream_result(ops[0].op_id, _push([("b", "10.0.0.2", 3, A)], b"app"), 0.5)
    ml.stream_result(ops[1].op_id, None, 10.0)
    assert ml.counters["joins_ok"] == 1 and ml.counters["joins_failed"] == 1
    assert ml.member("b").incarnation == 3  # type: ignore[union-attr]
    (state,) = ml.take_remote_states()
    assert (state.user_state, state.join) == (b"app", True)


def test_merge_applies_alive_left_and_softens_dead_to_suspect() -> None:
    ml = make()
    with_members(ml, 2)
    ml.merge_remote_state(
        _push(
            [
                ("n0", "10.0.1.1", 1, D),
                ("n1", "10.0.1.2", 1, L),
                ("new", "10.0.1.9", 1, A),
                ("ghost", "10.0.1.8", 1, D),
            ]
        ),
        1.0,
    )
    states = {m.name: m.state for m in ml.all_members()}
    assert states["n0"] == S and states["n1"] == L and states["new"] == A
    assert "ghost" not in states


def test_incompatible_versions_are_not_merged() -> None:
    ml = make()
    pp = PushPull(
        False,
        (PushNodeState("b", ip_bytes("10.0.0.2"), 7946, b"", 1, A, bytes([3, 4, 3, 0, 0, 0])),),
    )
    ml.merge_remote_state(pp, 1.0)
    assert ml.member("b") is None
    assert ml.counters["merges_rejected"] == 1
    assert verify_protocol(pp.nodes, []) is None  # fine on its own


def test_receive_stream_push_pull_answers_with_our_state_then_merges() -> None:
    ml = make()
    request = _push([("b", "10.0.0.2", 1, A)])
    reply = ml.receive_stream(request, SRC, 1.0)
    assert isinstance(reply, PushPull) and not reply.join
    assert [n.name for n in reply.nodes] == ["me"]
    assert ml.member("b") is not None
    assert ml.receive_stream(User(b"x"), SRC, 1.0) is None
    assert ml.take_events()[-1] == UserMessage(b"x", SRC)


def test_periodic_push_pull_with_a_random_alive_member() -> None:
    ml = make(Config(probe_interval=1000.0))  # nobody answers here: keep them unprobed
    with_members(ml, 3)
    run_to(ml, 61.0)  # stagger < 30 s, then one 30 s period
    ops = [op for op in ml.take_stream_ops() if isinstance(op.message, PushPull)]
    assert ops and not any(op.message.join for op in ops)  # type: ignore[union-attr]
    assert all(op.timeout == 10.0 for op in ops)


@pytest.mark.parametrize(("n", "scale"), [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (128, 3)])
def test_push_pull_scale(n: int, scale: int) -> None:
    assert push_pull_scale(1.0, n) == scale


def test_state_machine_can_be_drawn() -> None:
    dot = to_dot()
    assert dot.startswith("digraph")
    assert dot.count("->") == len(TRANSITIONS) + len(LOCAL_TRANSITIONS)


def test_messages_on_the_wire_are_the_encoded_records() -> None:
    ml = make()
    ml.receive([Ping(3, "me")], SRC, 0.0)
    (d,) = ml.take_datagrams()
    assert d.messages[0] == encode_message(Ack(3, None))
