"""A whole memberlist (+ networkdb) cluster in one process, on virtual time.

:class:`Simulator` drives N sans-IO cores (:class:`~vxnet.gossip.swim.Memberlist`, optionally
:class:`~vxnet.gossip.networkdb.NetworkDB`) only through their public inputs and outputs, from a
single event queue: a ``heapq`` of ``(time, seq, kind, node, payload)``.  Nothing sleeps and
nothing runs concurrently, so a run is a pure function of its seed.

The network (:class:`NetModel`):

* **UDP**: every datagram is lost with probability ``loss``, else delivered after
  ``delay_base + U(0, delay_jitter)`` seconds (datagrams reorder freely).  Every message the
  cores encoded is decoded again by vxnet's real codec (``decode_message_untrusted``); the byte
  strings of broadcasts (alive/suspect/dead/user), which are piggybacked many times, are decoded
  once and cached.  Bytes are counted exactly: the messages' lengths plus the compound header
  (``2 + 2 * count`` for a compound) and the 5-byte CRC header when the core asks for one; before
  compression and encryption, without IP/UDP headers.
* **TCP**: a stream exchange costs a handshake plus the request (3 one-way delays), then the
  reply (1 one-way delay); each leg is retransmitted while it is lost (``tcp_syn_rto`` for the
  handshake legs, ``tcp_rto`` for data), and the exchange fails at the operation's deadline.  A
  crashed or partitioned peer makes it fail at the deadline.  Stream messages are handed over as
  objects (``full_codec`` puts them through ``encode_message``/``decode_message_untrusted`` too).
  Their bytes are ``len(encode_message(msg))``, except push/pull states, which are *sampled*:
  one in :data:`PUSH_PULL_SAMPLE` (and the first) is encoded exactly, the others are estimated
  from the last sample's bytes per node record (a push/pull of 1,000 records costs ~2 ms to
  encode).
* **Slow members** (the Lifeguard paper's slow message processing): everything delivered to a
  slow member -- datagrams, TCP requests, TCP replies -- waits.  ``slow_model="stall"``: its
  receive path stops for ``stall`` seconds once every ``stall_period`` (at its own phase) and
  what arrived meanwhile is processed when the stall ends; ``"jitter"``: each delivery is
  ``U(slow_delay)`` late.  Its timers and sends are on time (memberlist's probe and suspicion
  timers are their own goroutines; the packet handler is what lags).
* **Partitions**: while a :class:`Partition` is active, nothing crosses between its ``side`` and
  the rest (datagrams are dropped, TCP fails at its deadline).

A crashed node (:meth:`Simulator.kill`) stops processing anything, its timers included.

**Warm start.**  Joining N nodes one by one gossips N alive messages to everyone, each
retransmitted ``4 * ceil(log10(N + 1))`` times by every node (O(N^2) deliveries).  The
benchmark measures a cluster that has been up for long, so :meth:`Simulator.warm_start` gives
every node the full member list through ``Memberlist.warm_start`` (everyone alive at
incarnation 1, no events, no broadcasts, the push/pull timer at a random phase of its N-scaled
period).  NetworkDB is warm-started the same way: every node joins one network (its join
broadcast is not sent: everyone already knows), and its public ``attachments`` and
``live_nodes`` are filled with every node.  One private access is left, in networkdb's warm
start: ``NetworkDB.networks[net].bulk_all``/``next_bulk`` (fields of ``_NetworkState``): no
bulk sync with every node, as right after a join, but one at a random phase of the 30 s period.

Who suspects whom comes from ``SuspectEvent`` (``Memberlist.report_suspicions``), whose cause
says whether the node's own failed probe raised it; a death seen in a timer step is the node's
own suspicion timer expiring (``DeathSeen.origin``).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vxnet.gossip.config import Config
from vxnet.gossip.messages import (
    DEFAULT_VSN,
    Message,
    NodeState,
    PushNodeState,
    PushPull,
    User,
    decode_message_untrusted,
    encode_message,
)
from vxnet.gossip.networkdb import MAGIC, NetworkDB, Settings, TableEvent
from vxnet.gossip.swim import Datagram, MemberEvent, Memberlist, StreamOp, SuspectEvent

Addr = tuple[str, int]
PORT = 7946
NETWORK = "bench-net"
#: One push/pull state in this many is encoded to measure its size; the others are estimated.
PUSH_PULL_SAMPLE = 16
#: Message types whose encoded bytes repeat (piggybacked broadcasts): decoded once, cached.
_CACHED_TYPES = frozenset({3, 4, 5, 8})  # suspect, alive, dead, user
_DECODE_CACHE_MAX = 200_000
_CRC_HEADER = 5  # [12][crc32]
_USER_TYPE = 8
_PROBE_TYPES = frozenset({0, 1, 2, 11})  # ping, indirect ping, ack, nack

# event kinds
_TIMER, _UDP, _SERVE, _RESULT, _ACTION = range(5)

Event = tuple[float, int, int, int, Any]


@dataclass(frozen=True, slots=True)
class Partition:
    """From ``start`` to ``end`` nothing crosses between the nodes in ``side`` and the others."""

    start: float
    end: float
    side: frozenset[int]


@dataclass(frozen=True, slots=True)
class NetModel:
    loss: float = 0.0
    delay_base: float = 0.002
    delay_jitter: float = 0.008
    slow: frozenset[int] = frozenset()
    #: ``"stall"``: a slow member's receive path stops for ``stall`` seconds once every
    #: ``stall_period`` (its own phase); what arrives meanwhile waits for the stall's end.
    #: ``"jitter"``: everything it receives is processed ``U(slow_delay)`` late.
    slow_model: str = "stall"
    stall: float = 20.0
    stall_period: float = 60.0
    slow_delay: tuple[float, float] = (0.4, 1.6)
    partitions: tuple[Partition, ...] = ()
    tcp_syn_rto: float = 1.0
    tcp_rto: float = 0.2


@dataclass(slots=True)
class Traffic:
    """What the nodes sent: datagrams and TCP exchanges, memberlist and networkdb apart.

    memberlist's datagrams are split by what the first message is: *probe* datagrams (ping,
    indirect ping, ack, nack: SWIM's protocol-period messages, with broadcasts piggybacked)
    and *gossip* datagrams (broadcasts only, sent every gossip_interval to gossip_nodes members
    while the broadcast queue is not empty).  ``udp_parts`` counts the messages inside them."""

    udp: int = 0
    udp_bytes: int = 0
    tcp: int = 0
    tcp_bytes: int = 0
    db_udp: int = 0
    db_udp_bytes: int = 0
    db_tcp: int = 0
    db_tcp_bytes: int = 0
    probe_udp: int = 0
    gossip_udp: int = 0
    gossip_bytes: int = 0
    udp_parts: int = 0

    def minus(self, other: Traffic) -> Traffic:
        return Traffic(*(a - b for a, b in zip(self.values(), other.values(), strict=True)))

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def copy(self) -> Traffic:
        return self.minus(Traffic())


@dataclass(frozen=True, slots=True)
class SuspicionSeen:
    """``observer`` started suspecting ``member`` at ``time``; ``origin``: its own failed probe."""

    time: float
    observer: int
    member: int
    origin: bool


@dataclass(frozen=True, slots=True)
class DeathSeen:
    """``observer`` recorded ``member`` dead (or left) at ``time``."""

    time: float
    observer: int
    member: int
    state: NodeState
    origin: bool = False  # the observer's own suspicion timer expired (not a Dead it heard)
    incarnation: int = 0


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def node_addr(i: int) -> str:
    k = i + 1
    return f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


class Simulator:
    """N memberlist cores (and optionally a networkdb on each) on one virtual clock."""

    def __init__(
        self,
        n: int,
        net: NetModel,
        config: Config,
        seed: str,
        *,
        vsn: bytes = DEFAULT_VSN,
        networkdb: bool = False,
        full_codec: bool = False,
    ) -> None:
        self.n = n
        self.net = net
        self.config = config
        self.vsn = vsn
        self.full_codec = full_codec
        self.now = 0.0
        self.rng = random.Random(f"net/{seed}")
        self.names = [node_name(i) for i in range(n)]
        self.addrs: list[Addr] = [(node_addr(i), PORT) for i in range(n)]
        self.index: dict[Addr, int] = {a: i for i, a in enumerate(self.addrs)}
        self.name_index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.alive = [True] * n
        self.slow = [i in net.slow for i in range(n)]
        phases = random.Random(f"stall/{seed}")
        self.stall_phase = [phases.random() * net.stall_period for _ in range(n)]
        self.nodes: list[Memberlist] = []
        self.dbs: list[NetworkDB] = []
        self.db_active = False
        self.traffic = Traffic()
        self.suspicions: list[SuspicionSeen] = []
        self.deaths: list[DeathSeen] = []
        self.dead_views: set[tuple[int, int]] = set()  # (observer, member) seen dead or left
        self.table_events: list[tuple[float, int, TableEvent]] = []
        self.events_processed = 0
        self._heap: list[Event] = []
        self._seq = 0
        self._timer_at: list[float | None] = [None] * n
        self._decode_cache: dict[bytes, Message] = {}
        self._pp_count = 0
        self._pp_per_record = 0.0
        self._pp_fixed = 0.0
        self._cut: frozenset[int] | None = None
        self._in_timer = False  # deaths now come from the node's own suspicion timers
        self._build(networkdb, seed)
        for p in net.partitions:
            self.at(p.start, functools.partial(self._set_cut, p.side))
            self.at(p.end, functools.partial(self._set_cut, None))

    # ------------------------------------------------------------------ set-up

    def _build(self, networkdb: bool, seed: str) -> None:
        for i in range(self.n):
            rng = random.Random(f"node/{seed}/{i}")
            host = self.addrs[i][0]
            self.nodes.append(
                Memberlist(self.config, self.names[i], host, PORT, rng, 0.0, vsn=self.vsn)
            )
            self.nodes[i].report_suspicions = True
            if networkdb:
                self.dbs.append(self._make_db(i, rng))

    def _make_db(self, i: int, rng: random.Random) -> NetworkDB:
        ml = self.nodes[i]

        def send_udp(node: str, payload: bytes) -> bool:
            return ml.send_user(node, payload)

        def send_tcp(node: str, payload: bytes) -> None:
            self._user_tcp(i, node, payload)

        def broadcast(payload: bytes, key: str) -> None:
            if self.db_active:  # nothing to announce while warm-starting
                ml.queue_broadcast(payload, key)

        return NetworkDB(self.names[i], send_udp, send_tcp, broadcast, rng, Settings())

    def warm_start(self) -> None:
        """A converged cluster at ``now``: see the module docstring."""
        from vxnet.gossip.states import ip_bytes

        state = PushPull(
            False,
            tuple(
                PushNodeState(
                    self.names[i],
                    ip_bytes(self.addrs[i][0]),
                    PORT,
                    b"",
                    1,
                    NodeState.ALIVE,
                    self.vsn,
                )
                for i in range(self.n)
            ),
            b"",
        )
        for i, ml in enumerate(self.nodes):
            ml.warm_start(state.nodes, self.now)
            if self.dbs:
                db = self.dbs[i]
                db.join_network(NETWORK, self.now)
                # what merge_remote_state(attachments) and node_alive(every name) would do,
                # at C speed (they cost N^2 Python calls): the attributes are public
                db.attachments[NETWORK] = dict.fromkeys(self.names, (1, False))
                db.network_clock = max(db.network_clock, 1)
                db.live_nodes = set(self.names)
                net_state = db.networks[NETWORK]
                net_state.bulk_all = False
                net_state.next_bulk = self.now + self.rng.random() * db.settings.bulk_sync_interval
                db.take_events()
            self._schedule_timer(i)
        self.db_active = bool(self.dbs)

    def stop_networkdb(self) -> None:
        """Detach networkdb: its timers stop and user messages are no longer delivered to it."""
        self.db_active = False

    # ------------------------------------------------------------------ control

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._push(when, _ACTION, -1, fn)

    def kill(self, i: int) -> None:
        self.alive[i] = False

    def flush(self, i: int) -> None:
        """Send what node ``i`` produced after the caller changed it (e.g. a networkdb write)."""
        self._pump(i)

    def _set_cut(self, side: frozenset[int] | None) -> None:
        self._cut = side

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> float:
        """Advance to ``end``, or until ``stop()`` holds (checked every 0.1 virtual s)."""
        heap = self._heap
        pop = heapq.heappop
        nodes = self.nodes
        alive = self.alive
        timer_at = self._timer_at
        next_check = self.now
        count = 0
        while heap and heap[0][0] <= end:
            when, _, kind, i, data = pop(heap)
            self.now = when
            count += 1
            if kind == _TIMER:
                if timer_at[i] != data or not alive[i]:
                    continue
                timer_at[i] = None
                nodes[i].handle_timer(when)
                if self.db_active:
                    self.dbs[i].handle_timer(when)
                self._in_timer = True
                self._pump(i)
                self._in_timer = False
            elif kind == _UDP:
                if alive[i]:
                    nodes[i].receive(data[0], data[1], when)
                    self._pump(i)
            elif kind == _SERVE:
                self._serve(i, data)
            elif kind == _RESULT:
                if alive[i]:
                    nodes[i].stream_result(data[0], data[1], when)
                    self._pump(i)
            else:
                data()
            if stop is not None and when >= next_check:
                next_check = when + 0.1
                if stop():
                    self.events_processed += count
                    return when
        self.events_processed += count
        self.now = end
        return end

    # ------------------------------------------------------------------ the outputs of a node

    def _push(self, when: float, kind: int, i: int, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, i, data))

    def _schedule_timer(self, i: int) -> None:
        due = self.nodes[i].next_timer()
        if self.db_active:
            db_due = self.dbs[i].next_timer()
            due = db_due if due is None else min(due, db_due)
        if due is not None and self._timer_at[i] != due:
            self._timer_at[i] = due
            self._push(due, _TIMER, i, due)

    def _pump(self, i: int) -> None:
        ml = self.nodes[i]
        events = ml.take_events()
        if events:
            self._on_events(i, events)
        for d in ml.take_datagrams():
            self._send_datagram(i, d)
        for op in ml.take_stream_ops():
            self._send_stream(i, op)
        self._schedule_timer(i)

    def _on_events(self, i: int, events: Sequence[object]) -> None:
        db = self.dbs[i] if self.db_active else None
        now = self.now
        for ev in events:
            if isinstance(ev, SuspectEvent):
                j = self.name_index[ev.member]
                self.suspicions.append(SuspicionSeen(now, i, j, ev.cause == "probe"))
            elif isinstance(ev, MemberEvent):
                m = ev.member
                j = self.name_index.get(m.name, -1)
                if ev.kind == "leave":
                    self.deaths.append(DeathSeen(now, i, j, m.state, self._in_timer, m.incarnation))
                    self.dead_views.add((i, j))
                elif ev.kind == "join":
                    self.dead_views.discard((i, j))
                if db is not None and j != i:
                    if ev.kind == "join" or (ev.kind == "update" and m.state == NodeState.ALIVE):
                        db.node_alive(m.name)
                    elif ev.kind == "leave":
                        if m.state == NodeState.LEFT:
                            db.node_left(m.name, now)
                        else:
                            db.node_failed(m.name)
            elif db is not None:  # a UserMessage
                db.handle_message(ev.payload, now)  # type: ignore[attr-defined]
        if db is not None:
            for te in db.take_events():
                self.table_events.append((now, i, te))

    # ------------------------------------------------------------------ UDP

    def _decode(self, raw: bytes) -> Message:
        if raw[0] not in _CACHED_TYPES:
            return decode_message_untrusted(raw)
        cache = self._decode_cache
        msg = cache.get(raw)
        if msg is None:
            if len(cache) >= _DECODE_CACHE_MAX:
                cache.clear()
            msg = cache[raw] = decode_message_untrusted(raw)
        return msg

    def _send_datagram(self, i: int, d: Datagram) -> None:
        msgs = d.messages
        size = len(msgs[0]) if len(msgs) == 1 else sum(map(len, msgs)) + 2 + 2 * len(msgs)
        if d.crc:
            size += _CRC_HEADER
        t = self.traffic
        first = msgs[0][0]
        if len(msgs) == 1 and first == _USER_TYPE and msgs[0][1:6] == MAGIC:
            t.db_udp += 1
            t.db_udp_bytes += size
        else:
            t.udp += 1
            t.udp_bytes += size
            t.udp_parts += len(msgs)
            if first in _PROBE_TYPES:
                t.probe_udp += 1
            else:
                t.gossip_udp += 1
                t.gossip_bytes += size
        j = self.index.get(d.dest)
        if j is None:
            return
        rng = self.rng
        if rng.random() < self.net.loss or not self.alive[j] or self._blocked(i, j):
            return
        decoded = [self._decode(m) for m in msgs]
        arrive = self.now + self.net.delay_base + rng.random() * self.net.delay_jitter
        if self.slow[j]:
            arrive = self._processed_at(j, arrive)
        self._push(arrive, _UDP, j, (decoded, self.addrs[i]))

    def _processed_at(self, j: int, arrive: float) -> float:
        """When slow member ``j`` gets to process what arrives at ``arrive``."""
        net = self.net
        if net.slow_model == "jitter":
            return arrive + self.rng.uniform(*net.slow_delay)
        since = (arrive - self.stall_phase[j]) % net.stall_period
        return arrive + net.stall - since if since < net.stall else arrive

    def _blocked(self, i: int, j: int) -> bool:
        cut = self._cut
        return cut is not None and ((i in cut) != (j in cut))

    # ------------------------------------------------------------------ TCP

    def _leg(self, rto: float) -> float:
        """One one-way trip of a TCP segment, retransmitted while it is lost."""
        net = self.net
        rng = self.rng
        t = net.delay_base + rng.random() * net.delay_jitter
        tries = 0
        while net.loss and rng.random() < net.loss and tries < 8:
            t += rto * (1 << tries)
            tries += 1
        return t

    def _connect_and_send(self, j: int) -> float:
        t = self._leg(self.net.tcp_syn_rto) + self._leg(self.net.tcp_syn_rto)
        t += self._leg(self.net.tcp_rto)
        if self.slow[j]:  # the kernel completes the handshake; the member reads late
            t = self._processed_at(j, self.now + t) - self.now
        return t

    def _stream_size(self, msg: Message) -> int:
        if not isinstance(msg, PushPull) or self.full_codec:
            return len(encode_message(msg))
        self._pp_count += 1
        records = len(msg.nodes)
        if self._pp_count % PUSH_PULL_SAMPLE == 1 or not self._pp_per_record or not records:
            size = len(encode_message(msg))
            if records:
                head = len(encode_message(PushPull(msg.join, (), b"")))
                self._pp_per_record = (size - head - len(msg.user_state)) / records
                self._pp_fixed = head
            return size
        return round(self._pp_fixed + self._pp_per_record * records + len(msg.user_state))

    def _wire(self, msg: Message) -> Message:
        return decode_message_untrusted(encode_message(msg)) if self.full_codec else msg

    def _send_stream(self, i: int, op: StreamOp) -> None:
        t = self.traffic
        t.tcp += 1
        t.tcp_bytes += self._stream_size(op.message)
        deadline = self.now + op.timeout
        j = self.index.get(op.dest)
        if j is None or not self.alive[j] or self._blocked(i, j):
            self._push(deadline, _RESULT, i, (op.op_id, None))
            return
        arrive = self.now + self._connect_and_send(j)
        if arrive > deadline:
            self._push(deadline, _RESULT, i, (op.op_id, None))
            return
        self._push(arrive, _SERVE, j, (i, op.op_id, self._wire(op.message), deadline))

    def _user_tcp(self, i: int, node: str, payload: bytes) -> None:
        """networkdb's reliable message: connect, send ``User(payload)``, close."""
        t = self.traffic
        t.db_tcp += 1
        t.db_tcp_bytes += 1 + len(payload)
        j = self.name_index.get(node)
        if j is None or not self.alive[j] or self._blocked(i, j):
            return
        arrive = self.now + self._connect_and_send(j)
        self._push(arrive, _SERVE, j, (i, -1, User(payload), math.inf))

    def _serve(self, j: int, data: tuple[int, int, Message, float]) -> None:
        i, op_id, request, deadline = data
        if not self.alive[j] or self._blocked(i, j):
            if op_id >= 0:
                self._push(max(deadline, self.now), _RESULT, i, (op_id, None))
            return
        reply = self.nodes[j].receive_stream(request, self.addrs[i], self.now)
        self._pump(j)
        if op_id < 0:
            return
        if reply is not None:
            self.traffic.tcp_bytes += self._stream_size(reply)
            reply = self._wire(reply)
        back = self.now + self._leg(self.net.tcp_rto)
        if self.slow[i]:
            back = self._processed_at(i, back)
        if back > deadline or not self.alive[i]:
            self._push(max(deadline, self.now), _RESULT, i, (op_id, None))
        else:
            self._push(back, _RESULT, i, (op_id, reply))

    # ------------------------------------------------------------------ views

    def counters(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for ml in self.nodes:
            total.update(ml.counters)
        return total

    def live(self) -> list[int]:
        return [i for i in range(self.n) if self.alive[i]]
