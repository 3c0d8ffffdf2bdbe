"""A hundred memberlist nodes in one process: seeded loss, delay and reordering, a virtual clock.

``FakeNet`` drives each :class:`Memberlist` only through its public sans-IO interface and sends
every UDP message through the real codec (``decode_message_untrusted``).  TCP exchanges are
reliable but slow down with the link; a killed node's TCP times out.  The figures each scenario
measures are printed (``pytest -s`` shows them) and kept in ``FIGURES`` for the report.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from vxnet.gossip.config import Config
from vxnet.gossip.messages import Message, NodeState, decode_message_untrusted, encode_message
from vxnet.gossip.suspicion import suspicion_timeout
from vxnet.gossip.swim import Datagram, MemberEvent, Memberlist, StreamOp, UserMessage

Addr = tuple[str, int]
FIGURES: dict[str, object] = {}
MAX_PACKET = 1400 + 2  # memberlist's budget leaves the first part's 2-byte length unaccounted


@dataclass
class Link:
    loss: float = 0.0
    delay: tuple[float, float] = (0.001, 0.020)  # uniform one-way delay: reorders freely


@dataclass
class SeenEvent:
    time: float
    observer: str
    kind: str
    member: str
    state: NodeState


@dataclass
class FakeNet:
    seed: int
    config: Config = field(default_factory=Config)
    link: Link = field(default_factory=Link)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes: dict[Addr, Memberlist] = {}
        self.by_name: dict[str, Memberlist] = {}
        self.killed: set[Addr] = set()
        self.slow: dict[Addr, tuple[float, float]] = {}  # extra delay to packets it receives
        self.sent: Counter[str] = Counter()
        self.sent_bytes: Counter[str] = Counter()
        self.events: list[SeenEvent] = []
        self.user_messages: list[tuple[str, UserMessage]] = []
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._timer_at: dict[Addr, float | None] = {}

    # ------------------------------------------------------------------ topology

    def add(self, name: str, config: Config | None = None) -> Memberlist:
        i = len(self.nodes)
        addr = (f"10.0.{i // 200}.{i % 200 + 1}", 7946)
        rng = random.Random(self.seed * 100_003 + i)
        ml = Memberlist(config or self.config, name, addr[0], addr[1], rng, self.now)
        self.nodes[addr] = ml
        self.by_name[name] = ml
        self._pump(ml)
        return ml

    def kill(self, name: str) -> None:
        self.killed.add(_addr(self.by_name[name]))

    def alive_nodes(self) -> list[Memberlist]:
        return [ml for a, ml in self.nodes.items() if a not in self.killed]

    # ------------------------------------------------------------------ the clock

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> float:
        """Advance to ``end`` (or until ``stop()``, checked every 0.1 s, holds)."""
        next_check = self.now
        while self._heap and self._heap[0][0] <= end:
            when, _, fn = heapq.heappop(self._heap)
            self.now = when
            fn()
            if stop is not None and self.now >= next_check:
                next_check = self.now + 0.1
                if stop():
                    return self.now
        self.now = end
        return end

    # ------------------------------------------------------------------ plumbing

    def _pump(self, ml: Memberlist) -> None:
        me = _addr(ml)
        if me in self.killed:
            return
        for d in ml.take_datagrams():
            self._send_datagram(ml, d)
        for op in ml.take_stream_ops():
            self._send_stream(ml, op)
        for ev in ml.take_events():
            if isinstance(ev, MemberEvent):
                m = ev.member
                self.events.append(SeenEvent(self.now, ml.name, ev.kind, m.name, m.state))
            else:
                self.user_messages.append((ml.name, ev))
        due = ml.next_timer()
        if due is not None and self._timer_at.get(me) != due:
            self._timer_at[me] = due
            self.at(due, lambda: self._fire(ml, due))

    def _fire(self, ml: Memberlist, due: float) -> None:
        me = _addr(ml)
        if self._timer_at.get(me) != due or me in self.killed:
            return
        self._timer_at[me] = None
        ml.handle_timer(self.now)
        self._pump(ml)

    def _delay(self, dest: Addr) -> float:
        lo, hi = self.link.delay
        extra = self.slow.get(dest)
        slow = self.rng.uniform(*extra) if extra else 0.0
        return self.rng.uniform(lo, hi) + slow

    def _send_datagram(self, ml: Memberlist, d: Datagram) -> None:
        size = sum(len(m) for m in d.messages)
        size += 2 + 2 * len(d.messages) if len(d.messages) > 1 else 0
        assert size <= MAX_PACKET, f"{ml.name} built a {size}-byte packet"
        self.sent[ml.name] += 1
        self.sent_bytes[ml.name] += size
        target = self.nodes.get(d.dest)
        if target is None or d.dest in self.killed or self.rng.random() < self.link.loss:
            return
        src = _addr(ml)
        msgs = [decode_message_untrusted(m) for m in d.messages]
        self.at(self.now + self._delay(d.dest), lambda: self._deliver(target, msgs, src))

    def _deliver(self, target: Memberlist, msgs: list[Message], src: Addr) -> None:
        if _addr(target) in self.killed:
            return
        target.receive(msgs, src, self.now)
        self._pump(target)

    def _send_stream(self, ml: Memberlist, op: StreamOp) -> None:
        target = self.nodes.get(op.dest)
        deadline = self.now + op.timeout
        request = decode_message_untrusted(encode_message(op.message))

        def fail() -> None:
            ml.stream_result(op.op_id, None, self.now)
            self._pump(ml)

        if target is None or op.dest in self.killed:
            self.at(deadline, fail)
            return
        arrive = self.now + self._delay(op.dest)

        def serve() -> None:
            if _addr(target) in self.killed:
                self.at(max(deadline, self.now), fail)
                return
            reply = target.receive_stream(request, _addr(ml), self.now)
            self._pump(target)
            back = self.now + self._delay(_addr(ml))
            if back > deadline:
                self.at(deadline, fail)
                return
            wire = decode_message_untrusted(encode_message(reply)) if reply is not None else None

            def result() -> None:
                ml.stream_result(op.op_id, wire, self.now)
                self._pump(ml)

            self.at(back, result)

        if arrive > deadline:
            self.at(deadline, fail)
        else:
            self.at(arrive, serve)

    # ------------------------------------------------------------------ views

    def sees_all(self, ml: Memberlist, expected: set[str]) -> bool:
        return {m.name for m in ml.members()} == expected

    def converged(self, expected: set[str]) -> bool:
        return all(self.sees_all(ml, expected) for ml in self.alive_nodes())

    def state_of(self, observer: Memberlist, name: str) -> NodeState | None:
        m = observer.member(name)
        return m.state if m is not None else None


def _addr(ml: Memberlist) -> Addr:
    return (ml.addr, ml.port)


def build_cluster(net: FakeNet, n: int, spread: float = 5.0) -> list[Memberlist]:
    """Node 0 starts; the others start over ``spread`` seconds and join a random earlier node."""
    nodes = [net.add("node-000")]
    for i in range(1, n):
        net.run_until(net.now + spread / n)
        ml = net.add(f"node-{i:03d}")
        seed = nodes[net.rng.randrange(len(nodes))]
        ml.join([_addr(seed)], net.now)
        net._pump(ml)
        nodes.append(ml)
    return nodes


def converge(net: FakeNet, nodes: list[Memberlist], limit: float) -> float:
    """Run until every node lists every other; returns the time it took."""
    names = {ml.name for ml in nodes}
    pending = set(nodes)

    def done() -> bool:
        pending.difference_update([ml for ml in pending if net.sees_all(ml, names)])
        return not pending

    net.run_until(net.now + limit, stop=done)
    assert net.converged(names), "the cluster did not converge"
    return net.now


def msgs_per_node_second(net: FakeNet, since: Counter[str], seconds: float, n: int) -> float:
    sent = sum((net.sent - since).values())
    return sent / (seconds * n)


def report(key: str, value: object) -> None:
    FIGURES[key] = value
    print(f"{key}: {value}")


# ---------------------------------------------------------------------------- scenarios

N = 100


@pytest.fixture(scope="module")
def cluster() -> tuple[FakeNet, list[Memberlist]]:
    """A converged 100-node cluster on a clean network (shared by the read-mostly tests)."""
    net = FakeNet(seed=1)
    nodes = build_cluster(net, N)
    started_last = net.now
    done = converge(net, nodes, limit=60.0)
    report("converge_100_after_last_join_s", round(done - started_last, 2))
    return net, nodes


def test_everyone_converges_to_the_full_member_list(
    cluster: tuple[FakeNet, list[Memberlist]],
) -> None:
    net, nodes = cluster
    names = {ml.name for ml in nodes}
    for ml in nodes:
        assert {m.name for m in ml.members()} == names
        assert all(m.state == NodeState.ALIVE for m in ml.members())
    joins = Counter(e.observer for e in net.events if e.kind == "join")
    assert all(joins[ml.name] >= N for ml in nodes)  # each saw every member join (itself too)


def test_steady_state_load(cluster: tuple[FakeNet, list[Memberlist]]) -> None:
    net, _ = cluster
    before = net.sent.copy()
    before_bytes = net.sent_bytes.copy()
    start = net.now
    net.run_until(start + 20.0)
    rate = msgs_per_node_second(net, before, 20.0, N)
    byte_rate = sum((net.sent_bytes - before_bytes).values()) / (20.0 * N)
    report("steady_datagrams_per_node_s", round(rate, 2))
    report("steady_bytes_per_node_s", round(byte_rate))
    # One probe (ping + ack) a second, relays and gossip only when there is news.
    assert 1.5 <= rate <= 4.0
    assert not [e for e in net.events if e.time > start and e.kind == "leave"]


def test_killed_node_is_declared_dead_by_everyone(
    cluster: tuple[FakeNet, list[Memberlist]],
) -> None:
    net, nodes = cluster
    victim = nodes[37]
    net.kill(victim.name)
    killed_at = net.now
    others = [ml for ml in nodes if ml is not victim]
    net.run_until(
        killed_at + 90.0,
        stop=lambda: all(net.state_of(ml, victim.name) == NodeState.DEAD for ml in others),
    )
    seen = {
        e.observer: e.time - killed_at
        for e in net.events
        if e.member == victim.name and e.kind == "leave" and e.time >= killed_at
    }
    assert set(seen) == {ml.name for ml in others}, "someone never declared the victim dead"
    lo = suspicion_timeout(4, N, 1.0)  # 8 s for 100 nodes
    hi = 6 * lo  # without confirmations
    times = sorted(seen.values())
    report(
        "detect_dead_100_s",
        {
            "first": round(times[0], 2),
            "median": round(statistics.median(times), 2),
            "last": round(times[-1], 2),
            "suspicion_min_s": lo,
        },
    )
    # Expected: a probe within a few seconds, the probe window (1 s), then the suspicion timer,
    # cut to its minimum by k = 2 independent confirmations, then gossip to everyone.
    assert times[0] >= lo
    assert statistics.median(times) <= lo + 6.0
    assert times[-1] <= hi + 5.0
    # Nobody else was hurt.
    assert not [
        e
        for e in net.events
        if e.time >= killed_at and e.kind == "leave" and e.member != victim.name
    ]


def test_left_node_is_seen_as_left(cluster: tuple[FakeNet, list[Memberlist]]) -> None:
    net, nodes = cluster
    leaver = nodes[58]
    start = net.now
    leaver.leave(net.now)
    net._pump(leaver)
    others = [ml for ml in net.alive_nodes() if ml is not leaver]
    net.run_until(
        start + 30.0,
        stop=lambda: all(net.state_of(ml, leaver.name) == NodeState.LEFT for ml in others),
    )
    assert all(net.state_of(ml, leaver.name) == NodeState.LEFT for ml in others)
    spread = max(e.time for e in net.events if e.member == leaver.name and e.time >= start)
    report("leave_seen_by_all_s", round(spread - start, 2))
    net.run_until(net.now + 5.0)
    assert leaver.leave_broadcast_done
    net.kill(leaver.name)  # it shuts down after its leave went out
    net.run_until(net.now + 15.0)
    assert all(net.state_of(ml, leaver.name) == NodeState.LEFT for ml in others)
    assert not [e for e in net.events if e.member == leaver.name and e.state == NodeState.DEAD]


def _lossy_run(disable_tcp: bool, n: int, minutes: float, seed: int) -> dict[str, float]:
    config = Config(disable_tcp_pings=disable_tcp)
    net = FakeNet(seed=seed, config=config, link=Link(loss=0.10))
    nodes = build_cluster(net, n)
    # A join announcement lost to every node that had not joined yet is only repaired by
    # push/pull: up to 30 s of stagger plus one 60 s period (50 nodes), as in memberlist.
    joined = converge(net, nodes, limit=150.0)
    start = net.now
    before = net.sent.copy()
    counters_before = Counter[str]()
    for ml in nodes:
        counters_before.update(ml.counters)
    net.run_until(start + minutes * 60)
    totals = Counter[str]()
    for ml in nodes:
        totals.update(ml.counters)
    totals.subtract(counters_before)
    deaths = [e for e in net.events if e.time >= start and e.kind == "leave"]
    revived = [
        next(
            (
                j.time - d.time
                for j in net.events
                if j.time >= d.time
                and j.kind == "join"
                and (j.observer, j.member) == (d.observer, d.member)
            ),
            None,
        )
        for d in deaths
    ]
    gone = (NodeState.DEAD, NodeState.LEFT)
    dead_at_end = sum(m.state in gone for ml in nodes for m in ml.all_members())
    return {
        "nodes": n,
        "converged_after_s": round(joined - 5.0, 1),
        "minutes": int(minutes),
        "probes": totals["probes"],
        "suspicions": totals["suspicions_raised"],
        "refutations": totals["refutations"],
        "false_deaths": len(deaths),
        "revived_within_s": max((r for r in revived if r is not None), default=0.0),
        "never_revived": sum(r is None for r in revived),
        "dead_at_end": dead_at_end,
        "datagrams_per_node_s": round(msgs_per_node_second(net, before, minutes * 60, n), 2),
    }


def test_no_false_deaths_at_10_percent_loss() -> None:
    figures = _lossy_run(disable_tcp=False, n=100, minutes=3, seed=7)
    report("loss10_with_tcp_fallback", figures)
    assert figures["false_deaths"] == 0
    assert figures["dead_at_end"] == 0


def test_suspicions_at_10_percent_loss_are_refuted_without_tcp() -> None:
    """Without the TCP fallback, 10 % loss makes probes fail and members get suspected.

    Each suspicion is refuted.  Rarely one observer misses every copy of a refutation, and its
    old timer fires when the next suspicion confirms it: that observer alone sees a death for a
    moment, until the refutation of the new suspicion reaches it -- memberlist does the same.
    """
    figures = _lossy_run(disable_tcp=True, n=100, minutes=3, seed=8)
    report("loss10_udp_only", figures)
    assert figures["suspicions"] > 20
    assert figures["refutations"] >= figures["suspicions"] * 0.8
    assert figures["false_deaths"] <= 3
    assert figures["never_revived"] == 0
    assert figures["dead_at_end"] == 0
    assert figures["revived_within_s"] < 5.0


def _slow_node_run(lifeguard: bool, seed: int) -> dict[str, float]:
    config = Config(awareness_max_multiplier=8 if lifeguard else 1, disable_tcp_pings=True)
    net = FakeNet(seed=seed, config=config)
    nodes = build_cluster(net, 24)
    converge(net, nodes, limit=60.0)
    slow = nodes[5]
    net.slow[_addr(slow)] = (0.4, 1.6)  # its receive loop lags: acks and nacks reach it late
    start = net.now
    before = Counter(slow.counters)
    peak = 0
    for step in range(120):
        net.run_until(start + step + 1.0)
        peak = max(peak, slow.awareness_score)
    raised = slow.counters["suspicions_raised"] - before["suspicions_raised"]
    deaths = [e for e in net.events if e.time >= start and e.kind == "leave"]
    return {
        "slow_node_false_suspicions": raised,
        "slow_node_probes": slow.counters["probes"] - before["probes"],
        "peak_awareness": peak,
        "false_deaths": len(deaths),
    }


def test_lifeguard_slow_node_backs_off() -> None:
    with_lg = _slow_node_run(lifeguard=True, seed=11)
    without = _slow_node_run(lifeguard=False, seed=11)
    report("slow_node_lifeguard", with_lg)
    report("slow_node_no_lifeguard", without)
    assert with_lg["peak_awareness"] >= 2
    assert without["peak_awareness"] == 0
    assert with_lg["false_deaths"] == 0
    assert with_lg["slow_node_false_suspicions"] * 2 <= without["slow_node_false_suspicions"]
