"""SWIM with Lifeguard, as hashicorp/memberlist runs it -- a sans-IO core.

:class:`Memberlist` never touches a socket, a clock or the global random generator.  The trio
service around it feeds it decoded UDP packets (:meth:`Memberlist.receive`), TCP requests
(:meth:`Memberlist.receive_stream`) and the results of the TCP exchanges it asked for
(:meth:`Memberlist.stream_result`), calls :meth:`Memberlist.handle_timer` at
:meth:`Memberlist.next_timer`, and sends what :meth:`Memberlist.take_datagrams` and
:meth:`Memberlist.take_stream_ops` return.  Every call takes ``now`` (seconds, any monotonic
origin).

What happens, following memberlist's ``state.go``/``net.go`` line by line:

* **Probing.**  Every ``probe_interval`` the next member of a shuffled round-robin list is
  pinged.  No ack within ``probe_timeout`` -> ``indirect_checks`` random alive members ping it
  for us (and nack if they get nothing), and a TCP ping is tried.  Nothing by the end of the
  probe window (``probe_interval`` scaled by awareness) -> the member is *suspected*.
* **Suspicion** (:mod:`~vxnet.gossip.suspicion`) ends in a *dead* declaration unless the member
  refutes it with a newer incarnation; other nodes' suspicions shorten the timer.
* **Gossip.**  Every ``gossip_interval`` queued broadcasts (:mod:`~vxnet.gossip.broadcast`) go
  to ``gossip_nodes`` random members in compound datagrams; they also ride on every ping/ack.
* **Push/pull.**  Every ``push_pull_interval`` (longer above 32 nodes) full state is exchanged
  with one random member over TCP; joining is a push/pull with the seeds.
* **Lifeguard** (:mod:`~vxnet.gossip.awareness`): missed nacks and refutations raise a local
  health score that slows our own probing, so a slow node accuses others less.

Member records move through the table of :mod:`~vxnet.gossip.states`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from vxnet.gossip.awareness import Awareness
from vxnet.gossip.broadcast import TransmitLimitedQueue
from vxnet.gossip.config import (
    COMPOUND_HEADER_OVERHEAD,
    COMPOUND_OVERHEAD,
    USER_MSG_OVERHEAD,
    Config,
    push_pull_scale,
)
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
    encode_message,
)
from vxnet.gossip.states import (
    LEAVE_TOKEN,
    Member,
    MemberEvent,
    MemberRecord,
    MemberTable,
    SuspectEvent,
    ip_bytes,
    ip_text,
)
from vxnet.gossip.swim_records import (
    Addr,
    Datagram,
    Probe,
    Relay,
    RemoteState,
    StreamOp,
    StreamWait,
    Timers,
    UserMessage,
    next_tick,
    reply_addr,
)

__all__ = [
    "Config",
    "Datagram",
    "Member",
    "MemberEvent",
    "Memberlist",
    "RemoteState",
    "StreamOp",
    "SuspectEvent",
    "UserMessage",
]

_USER = b"\x08"


# ---------------------------------------------------------------------------- the protocol


class Memberlist:
    """One memberlist node.  See the module docstring for how to drive it."""

    def __init__(
        self,
        config: Config,
        name: str,
        addr: str,
        port: int,
        rng: random.Random,
        now: float,
        meta: bytes = b"",
        vsn: bytes = DEFAULT_VSN,
    ) -> None:
        self.config = config
        self.name = name
        self.addr = addr
        self.port = port
        self.encryption_overhead = config.encryption_overhead
        #: memberlist's ``Delegate.LocalState(join)``: application state for push/pull.
        self.local_state_provider: Callable[[bool], bytes] | None = None
        #: memberlist's ``PingDelegate.AckPayload``.
        self.ack_payload: bytes | None = None
        self.counters: Counter[str] = Counter()
        self._rng = rng
        self._addr_bytes = ip_bytes(addr)
        self._vsn = bytes(vsn)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._broadcasts = TransmitLimitedQueue(config.retransmit_mult, self._num_nodes)
        self._user_broadcasts = TransmitLimitedQueue(config.retransmit_mult, self._num_nodes)
        self._events: list[MemberEvent | UserMessage | SuspectEvent] = []
        self._table = MemberTable(
            config, name, rng, self._broadcasts, self._awareness, self.counters, self._events.append
        )
        self._probe_index = 0
        self._seq_no = 0
        self._probe: Probe | None = None
        self._relays: dict[int, Relay] = {}
        self._streams: dict[int, StreamWait] = {}
        self._op_id = 0
        self._leave_sent = False
        self._timers = Timers(
            probe=now + rng.random() * config.probe_interval,
            gossip=now + rng.random() * config.gossip_interval,
            push_pull=now + rng.random() * config.push_pull_interval,
        )
        self._datagrams: list[Datagram] = []
        self._stream_ops: list[StreamOp] = []
        self._remote_states: list[RemoteState] = []
        inc = self._table.next_incarnation()
        self._table.alive(Alive(inc, name, self._addr_bytes, port, meta, self._vsn), now, True)

    # ------------------------------------------------------------------ public: inputs

    def join(self, seeds: Sequence[Addr], now: float) -> None:
        """Push/pull with each seed (``Join``); results come back through stream_result."""
        for seed in seeds:
            self.counters["joins"] += 1
            self._stream(seed, self.local_state(join=True), StreamWait("join", join=True))

    def receive(self, messages: Sequence[Message], src: Addr, now: float) -> None:
        """One UDP packet, already decrypted, CRC-checked, decompressed and decompounded."""
        for msg in messages:
            self._receive_one(msg, src, now)

    def receive_stream(self, message: Message, src: Addr, now: float) -> Message | None:
        """A TCP request (``handleConn``); the return value is the reply to write, if any."""
        if isinstance(message, Ping):
            if message.node and message.node != self.name:
                self.counters["pings_wrong_node"] += 1
                return None
            self.counters["stream_pings"] += 1
            return Ack(message.seq_no, None)
        if isinstance(message, PushPull):
            self.counters["push_pulls_served"] += 1
            reply = self.local_state(message.join)  # memberlist answers before merging
            self._merge(message, message.join, now)
            return reply
        if isinstance(message, User):
            self._events.append(UserMessage(message.payload, src))
            return None
        self.counters["stream_unexpected"] += 1
        return None

    def stream_result(self, op_id: int, reply: Message | None, now: float) -> None:
        """The reply to a :class:`StreamOp` (None: could not connect, or timed out)."""
        op = self._streams.pop(op_id, None)
        if op is None:
            return
        if op.kind == "ping":
            self._fallback_result(op, reply)
        elif isinstance(reply, PushPull) and self._merge(reply, op.join, now):
            self.counters["joins_ok" if op.kind == "join" else "push_pulls_ok"] += 1
        else:
            self.counters["joins_failed" if op.kind == "join" else "push_pulls_failed"] += 1

    def handle_timer(self, now: float) -> None:
        """Run everything that is due at ``now``."""
        self._table.expire_suspicions(now)
        self._expire_relays(now)
        self._advance_probe(now)
        t = self._timers
        if now >= t.probe:
            t.probe = next_tick(t.probe, self.config.probe_interval, now)
            if self._probe is None:
                self._start_probe(now)
            else:
                t.probe_pending = True
        if now >= t.gossip:
            t.gossip = next_tick(t.gossip, self.config.gossip_interval, now)
            self._gossip(now)
        if now >= t.push_pull:
            if t.push_pull_armed:
                self._push_pull()
            t.push_pull_armed = True
            t.push_pull = now + push_pull_scale(self.config.push_pull_interval, self._num_nodes())

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called."""
        t = self._timers
        due = min(t.probe, t.gossip, t.push_pull)
        p = self._probe
        if p is not None:
            due = min(due, p.deadline if p.indirect_sent else min(p.timeout_at, p.deadline))
        if self._relays:
            due = min(due, *(r.deadline for r in self._relays.values()))
        if self._table.suspicions:
            due = min(due, *(s.deadline for s in self._table.suspicions.values()))
        return due

    # ------------------------------------------------------------------ public: outputs

    def take_datagrams(self) -> list[Datagram]:
        out, self._datagrams = self._datagrams, []
        return out

    def take_stream_ops(self) -> list[StreamOp]:
        out, self._stream_ops = self._stream_ops, []
        return out

    def take_events(self) -> list[MemberEvent | UserMessage | SuspectEvent]:
        out = self._events[:]
        self._events.clear()  # the member table appends to this very list
        return out

    def take_remote_states(self) -> list[RemoteState]:
        """Application state received by push/pull (memberlist's ``MergeRemoteState``)."""
        out, self._remote_states = self._remote_states, []
        return out

    # ------------------------------------------------------------------ public: actions

    def leave(self, now: float) -> None:
        """``Leave``: gossip Dead(node=us, from=us); others will record us as left."""
        if self._table.left:
            return
        self._table.left = True
        me = self._table.by_name[self.name]
        self._table.dead(Dead(me.incarnation, self.name, self.name), now)

    @property
    def leave_broadcast_done(self) -> bool:
        """True once the leave was gossiped its full count (or nobody is left to tell)."""
        if LEAVE_TOKEN in self._broadcasts.take_finished():
            self._leave_sent = True
        return self._table.left and (self._leave_sent or not self._table.any_alive())

    def update_meta(self, meta: bytes, now: float) -> None:
        """``UpdateNode``: gossip new metadata under a new incarnation."""
        inc = self._table.next_incarnation()
        alive = Alive(inc, self.name, self._addr_bytes, self.port, meta, self._vsn)
        self._table.alive(alive, now, bootstrap=True)

    def send_user(self, node: str, payload: bytes, *, piggyback: bool = False) -> bool:
        """``SendBestEffort``: ``[8][payload]`` over UDP to a live member.

        memberlist sends it alone; ``piggyback=True`` adds queued broadcasts like a ping does.
        """
        target = self._table.by_name.get(node)
        if target is None or target.gone:
            return False
        msg = _USER + payload
        if piggyback:
            self._send_msg(target.dest, msg)
        else:
            self._datagrams.append(Datagram(target.dest, (msg,), target.pmax >= 5))
        return True

    def queue_broadcast(self, payload: bytes, key: str | None = None) -> None:
        """An application broadcast (``Delegate.GetBroadcasts``); ``key`` replaces older ones."""
        self._user_broadcasts.queue(payload, name=key)

    def set_encryption_overhead(self, overhead: int) -> None:
        """29 once a keyring is installed, 0 without one (shrinks the piggyback budget)."""
        self.encryption_overhead = overhead

    # ------------------------------------------------------------------ public: views

    def members(self) -> list[Member]:
        """``Members``: alive and suspect members, ourselves included."""
        return [n.snapshot() for n in self._table.nodes if not n.gone]

    def all_members(self) -> list[Member]:
        """Every record, dead and left ones too (until they are reaped)."""
        return [n.snapshot() for n in self._table.nodes]

    def member(self, name: str) -> Member | None:
        node = self._table.by_name.get(name)
        return node.snapshot() if node is not None else None

    @property
    def awareness_score(self) -> int:
        return self._awareness.score

    @property
    def incarnation(self) -> int:
        return self._table.by_name[self.name].incarnation

    @property
    def num_queued(self) -> int:
        """Broadcasts waiting: memberlist's own plus the application's."""
        return len(self._broadcasts) + len(self._user_broadcasts)

    def local_state(self, join: bool) -> PushPull:
        """What we send in a push/pull (``sendLocalState``)."""
        nodes = tuple(n.push_state() for n in self._table.nodes)
        user = self.local_state_provider(join) if self.local_state_provider else b""
        return PushPull(join, nodes, user)

    def merge_remote_state(self, pp: PushPull, now: float) -> None:
        """``mergeRemoteState`` for a push/pull received by other means."""
        self._merge(pp, pp.join, now)

    def warm_start(self, members: Sequence[PushNodeState], now: float) -> None:
        """Start as one node of a cluster that has long been up and converged (simulators).

        ``members`` (alive, with addresses) become known without events or broadcasts, what is
        queued so far is dropped (our own alive: everyone has it), and the push/pull timer is
        put at a random phase of its period, as in a cluster that did not start all at once.
        Joining N nodes for real gossips N alive messages to everyone, a few times each."""
        self._table.preload(members, now)
        self._broadcasts.reset()
        period = push_pull_scale(self.config.push_pull_interval, self._num_nodes())
        self._timers.push_pull = now + self._rng.random() * period
        self._timers.push_pull_armed = True

    @property
    def report_suspicions(self) -> bool:
        """Emit a :class:`SuspectEvent` whenever a member becomes suspect (off by default:
        memberlist's delegates hear of joins, leaves and updates only)."""
        return self._table.report_suspicions

    @report_suspicions.setter
    def report_suspicions(self, on: bool) -> None:
        self._table.report_suspicions = on

    # ------------------------------------------------------------------ packets in

    def _receive_one(self, msg: Message, src: Addr, now: float) -> None:
        match msg:  # the most frequent first: piggybacked news, then the probe's messages
            case Alive():
                self._table.alive(self._fix_port(msg), now)
            case Suspect():
                self._table.suspect(msg, now)
            case Ping():
                self._on_ping(msg, src)
            case Ack():
                self._on_ack(msg, now)
            case Dead():
                self._table.dead(msg, now)
            case IndirectPing():
                self._on_indirect_ping(msg, src, now)
            case Nack():
                self._on_nack(msg)
            case User():
                self._events.append(UserMessage(msg.payload, src))
            case _:
                self.counters["packet_unexpected"] += 1

    def _on_ping(self, ping: Ping, src: Addr) -> None:
        if ping.node and ping.node != self.name:
            self.counters["pings_wrong_node"] += 1
            return
        self.counters["pings_received"] += 1
        ack = encode_message(Ack(ping.seq_no, self.ack_payload))
        self._send_msg(reply_addr(ping.source_addr, ping.source_port, src), ack)

    def _on_indirect_ping(self, ind: IndirectPing, src: Addr, now: float) -> None:
        target = ip_text(ind.target)
        if target is None:
            self.counters["bad_address"] += 1
            return
        port = ind.port if ind.port and self.config.protocol_version >= 2 else self.port
        seq = self._next_seq_no()
        reply_to = reply_addr(ind.source_addr, ind.source_port, src)
        self._relays[seq] = Relay(ind.seq_no, reply_to, ind.nack, now + self.config.probe_timeout)
        self.counters["pings_relayed"] += 1
        self._send_msg((target, port), self._ping(seq, ind.node))

    def _on_ack(self, ack: Ack, now: float) -> None:
        probe = self._probe
        if probe is not None and ack.seq_no == probe.seq_no and now < probe.deadline:
            self.counters["acks"] += 1
            self._finish_probe(now, ok=True)
            return
        relay = self._relays.pop(ack.seq_no, None)
        if relay is not None:
            self.counters["acks_forwarded"] += 1
            self._send_msg(relay.reply_to, encode_message(Ack(relay.seq_no, None)))
            return
        self.counters["acks_unmatched"] += 1

    def _on_nack(self, nack: Nack) -> None:
        probe = self._probe
        if probe is not None and nack.seq_no == probe.seq_no:
            self.counters["nacks"] += 1
            probe.nacks = min(probe.nacks + 1, self.config.indirect_checks + 1)

    def _fix_port(self, a: Alive) -> Alive:
        if a.port and self.config.protocol_version >= 2:
            return a
        return Alive(a.incarnation, a.node, a.addr, self.port, a.meta, a.vsn)

    # ------------------------------------------------------------------ probing

    def _start_probe(self, now: float) -> None:
        """``probe``: the next probe-able member in round-robin order."""
        nodes = self._table.nodes
        checked = 0
        while checked < len(nodes):
            if self._probe_index >= len(nodes):
                self._table.reap(now)
                nodes = self._table.nodes
                self._probe_index = 0
                checked += 1
                continue
            node = nodes[self._probe_index]
            self._probe_index += 1
            if node.name == self.name or node.gone:
                checked += 1
                continue
            self._probe_node(node, now)
            return

    def _probe_node(self, node: MemberRecord, now: float) -> None:
        interval = self._awareness.scale_timeout(self.config.probe_interval)
        seq = self._next_seq_no()
        self._probe = Probe(
            seq,
            node.name,
            node.incarnation,
            node.dest,
            node.pmax,
            timeout_at=now + self.config.probe_timeout,
            deadline=now + interval,
        )
        self.counters["probes"] += 1
        ping = self._ping(seq, node.name)
        if node.state == NodeState.ALIVE or self.config.disable_buddy_system:
            self._send_msg(node.dest, ping)
        else:  # give a suspect the accusation along with the ping, so it can refute at once
            accuse = encode_message(Suspect(node.incarnation, node.name, self.name))
            self._datagrams.append(Datagram(node.dest, (ping, accuse), node.pmax >= 5))

    def _advance_probe(self, now: float) -> None:
        probe = self._probe
        if probe is None:
            return
        if not probe.indirect_sent and now >= min(probe.timeout_at, probe.deadline):
            self._probe_indirect(probe, now)
        if now >= probe.deadline:
            self._finish_probe(now, ok=probe.fallback_ok)

    def _probe_indirect(self, probe: Probe, now: float) -> None:
        """No direct ack in time: ask others to ping, and try TCP ourselves."""
        probe.indirect_sent = True
        peers = self._table.k_random(
            self.config.indirect_checks,
            lambda n: n.name in (self.name, probe.name) or n.state != NodeState.ALIVE,
        )
        target = ip_bytes(probe.dest[0])
        for peer in peers:
            nack = peer.pmax >= 4
            probe.expected_nacks += nack
            ind = IndirectPing(
                probe.seq_no,
                target,
                probe.dest[1],
                probe.name,
                nack,
                self._addr_bytes,
                self.port,
                self.name,
            )
            self.counters["indirect_pings"] += 1
            self._send_msg(peer.dest, encode_message(ind))
        if not self.config.disable_tcp_pings and probe.pmax >= 3:
            self.counters["tcp_fallbacks"] += 1
            ping = Ping(probe.seq_no, probe.name, self._addr_bytes, self.port, self.name)
            op = StreamWait("ping", seq_no=probe.seq_no)
            self._stream(probe.dest, ping, op, timeout=max(probe.deadline - now, 0.0))

    def _fallback_result(self, op: StreamWait, reply: Message | None) -> None:
        probe = self._probe
        if isinstance(reply, Ack) and reply.seq_no == op.seq_no:
            self.counters["tcp_fallback_acks"] += 1
            if probe is not None and probe.seq_no == op.seq_no:
                probe.fallback_ok = True

    def _finish_probe(self, now: float, *, ok: bool) -> None:
        """The probe is over: adjust our health, suspect the target if it failed."""
        probe = self._probe
        assert probe is not None
        self._probe = None
        if ok:
            self._awareness.apply_delta(-1)
        else:
            # With nack-capable helpers, only missing nacks count against us (Lifeguard).
            self.counters["probe_failures"] += 1
            if probe.expected_nacks > 0:
                self._awareness.apply_delta(max(probe.expected_nacks - probe.nacks, 0))
            else:
                self._awareness.apply_delta(1)
            self.counters["suspicions_raised"] += 1
            self._table.suspect(Suspect(probe.incarnation, probe.name, self.name), now, "probe")
        if self._timers.probe_pending:
            self._timers.probe_pending = False
            self._start_probe(now)

    def _expire_relays(self, now: float) -> None:
        for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
            relay = self._relays.pop(seq)
            if relay.nack:
                self.counters["nacks_sent"] += 1
                self._send_msg(relay.reply_to, encode_message(Nack(relay.seq_no)))

    # ------------------------------------------------------------------ gossip and push/pull

    def _gossip(self, now: float) -> None:
        """``gossip``: queued broadcasts to a few random members (recently dead ones too)."""
        if not self.num_queued:
            return  # nothing to send (memberlist draws the nodes first, then sends nothing)
        dead_time = self.config.gossip_to_the_dead_time

        def exclude(n: MemberRecord) -> bool:
            if n.name == self.name or n.state == NodeState.LEFT:
                return True
            return n.state == NodeState.DEAD and now - n.state_change > dead_time

        nodes = self._table.k_random(self.config.gossip_nodes, exclude)
        avail = self.config.udp_buffer_size - COMPOUND_HEADER_OVERHEAD - self.encryption_overhead
        for node in nodes:
            msgs = self._get_broadcasts(COMPOUND_OVERHEAD, avail)
            if not msgs:
                return
            self.counters["gossip_datagrams"] += 1
            self._datagrams.append(Datagram(node.dest, tuple(msgs), node.pmax >= 5))

    def _push_pull(self) -> None:
        nodes = self._table.k_random(1, lambda n: n.name == self.name or n.state != NodeState.ALIVE)
        if nodes:
            self.counters["push_pulls"] += 1
            self._stream(nodes[0].dest, self.local_state(join=False), StreamWait("push_pull"))

    def _merge(self, pp: PushPull, join: bool, now: float) -> bool:
        if not self._table.merge(pp.nodes, now, self.port):
            return False
        if pp.user_state:
            self._remote_states.append(RemoteState(pp.user_state, join))
        return True

    # ------------------------------------------------------------------ sending

    def _send_msg(self, dest: Addr, msg: bytes) -> None:
        """``sendMsg``: one message with as many broadcasts piggybacked as fit."""
        avail = self.config.udp_buffer_size - len(msg) - COMPOUND_HEADER_OVERHEAD
        avail -= self.encryption_overhead
        extra = self._get_broadcasts(COMPOUND_OVERHEAD, avail)
        # memberlist looks the destination up by *address* in a map keyed by *name*, so a CRC
        # is only added here when a member is named after its IP address.
        named = self._table.by_name.get(dest[0])
        crc = named is not None and named.pmax >= 5
        self._datagrams.append(Datagram(dest, (msg, *extra), crc))

    def _get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        """``getBroadcasts``: memberlist's own first, then the application's in what is left."""
        msgs = self._broadcasts.get_broadcasts(overhead, limit)
        avail = limit - sum(len(m) + overhead for m in msgs)
        if avail > overhead + USER_MSG_OVERHEAD and len(self._user_broadcasts):
            user = self._user_broadcasts.get_broadcasts(overhead + USER_MSG_OVERHEAD, avail)
            msgs.extend(_USER + m for m in user)
        return msgs

    def _stream(
        self, dest: Addr, msg: Message, op: StreamWait, timeout: float | None = None
    ) -> None:
        self._op_id += 1
        self._streams[self._op_id] = op
        wait = self.config.tcp_timeout if timeout is None else timeout
        self._stream_ops.append(StreamOp(self._op_id, dest, msg, wait))

    def _ping(self, seq: int, node: str) -> bytes:
        return encode_message(Ping(seq, node, self._addr_bytes, self.port, self.name))

    def _num_nodes(self) -> int:
        return len(self._table)

    def _next_seq_no(self) -> int:
        self._seq_no = (self._seq_no + 1) & 0xFFFFFFFF
        return self._seq_no
