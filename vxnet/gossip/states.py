"""The member state machine of memberlist (``aliveNode``/``suspectNode``/``deadNode``), as tables.

Every node keeps one record per member: ``alive -> suspect -> dead``, or ``left`` when a member
announces its own departure.  Messages move a record only if they pass an *incarnation guard*
(below); then :data:`TRANSITIONS` says where it goes and which event the application sees.
Pairs missing from the table are ignored, exactly as memberlist ignores them (a suspect about
a dead node, a second dead, ...).  The local node has its own small table: accusations against
it are *refuted* (a new incarnation is gossiped) instead of applied.

A member memberlist has never heard of is created in state ``dead`` with incarnation 0 and then
goes through the ``alive`` transition, so a first sighting is a ``join`` like a comeback.
Docs can draw both tables with :func:`to_dot`.

:class:`MemberTable` holds the records (memberlist's ``nodes``/``nodeMap``/``nodeTimers``) and
applies the tables: ``aliveNode``, ``suspectNode``, ``deadNode`` and ``mergeState``.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from vxnet.errors import UsageError
from vxnet.gossip.awareness import Awareness
from vxnet.gossip.broadcast import TransmitLimitedQueue
from vxnet.gossip.config import Config
from vxnet.gossip.messages import (
    Alive,
    Dead,
    NodeState,
    PushNodeState,
    Suspect,
    encode_message,
)
from vxnet.gossip.suspicion import Suspicion, suspicion_timeout

EventKind = Literal["join", "leave", "update"]
#: Why a member became suspect: our own failed probe, a Suspect message, a pushed dead state.
SuspectCause = Literal["probe", "message", "push_pull"]


class Trigger(enum.Enum):
    """What happened to a member record (after its incarnation guard passed)."""

    ALIVE = "alive"  # an Alive message (or a pushed alive state)
    SUSPECT = "suspect"  # a Suspect message, a pushed suspect/dead state, or a failed probe
    SUSPICION_TIMEOUT = "suspicion_timeout"  # the suspicion timer expired
    DEAD = "dead"  # a Dead message from another node
    LEAVE = "leave"  # a Dead message a node sent about itself (Node == From)
    REAP = "reap"  # dead or left for longer than gossip_to_the_dead_time, at a probe wrap-around


@dataclass(frozen=True, slots=True)
class Transition:
    """Where a record goes.  ``target`` None means the record is forgotten."""

    target: NodeState | None
    event: EventKind | None = None  # "update" is only sent when the meta really changed
    refute: bool = False  # the local node answers with a new incarnation instead
    note: str = ""


A, S, D, L = NodeState.ALIVE, NodeState.SUSPECT, NodeState.DEAD, NodeState.LEFT

#: Another member's record.
TRANSITIONS: dict[tuple[NodeState, Trigger], Transition] = {
    (A, Trigger.ALIVE): Transition(A, "update", note="newer incarnation; re-gossip"),
    (S, Trigger.ALIVE): Transition(A, "update", note="refuted; suspicion timer cancelled"),
    (D, Trigger.ALIVE): Transition(A, "join", note="first sighting or comeback"),
    (L, Trigger.ALIVE): Transition(A, "join", note="rejoined (newer incarnation or new address)"),
    (A, Trigger.SUSPECT): Transition(S, note="start suspicion timer; re-gossip"),
    (S, Trigger.SUSPECT): Transition(S, note="independent confirmation shortens the timer"),
    (S, Trigger.SUSPICION_TIMEOUT): Transition(D, "leave", note="declared dead; gossip Dead"),
    (A, Trigger.DEAD): Transition(D, "leave", note="re-gossip"),
    (S, Trigger.DEAD): Transition(D, "leave", note="re-gossip; timer cancelled"),
    (A, Trigger.LEAVE): Transition(L, "leave", note="graceful leave; re-gossip"),
    (S, Trigger.LEAVE): Transition(L, "leave", note="graceful leave; re-gossip"),
    (D, Trigger.REAP): Transition(None, note="dropped from the member list"),
    (L, Trigger.REAP): Transition(None, note="dropped from the member list"),
}

#: The local node's own record.
LOCAL_TRANSITIONS: dict[tuple[NodeState, Trigger], Transition] = {
    (A, Trigger.ALIVE): Transition(A, refute=True, note="someone gossips a different us"),
    (A, Trigger.SUSPECT): Transition(A, refute=True, note="refute: new incarnation, awareness+1"),
    (A, Trigger.DEAD): Transition(A, refute=True, note="refute: new incarnation, awareness+1"),
    (A, Trigger.LEAVE): Transition(L, "leave", note="we leave: gossip Dead(from=us)"),
    (D, Trigger.ALIVE): Transition(A, "join", note="start-up (setAlive)"),
}


def transition(state: NodeState, trigger: Trigger, *, local: bool = False) -> Transition | None:
    """The transition for ``trigger`` in ``state``, or None if memberlist ignores it."""
    table = LOCAL_TRANSITIONS if local else TRANSITIONS
    return table.get((state, trigger))


# ---------------------------------------------------------------------------- incarnation guards


def alive_accepted(known: int, incoming: int, *, local: bool, readdress: bool) -> bool:
    """An Alive applies if strictly newer; about us if not older; always to re-address a
    left (or reclaimable dead) member."""
    if readdress:
        return True
    return incoming >= known if local else incoming > known


def suspect_accepted(known: int, incoming: int) -> bool:
    """A Suspect about an older incarnation is stale."""
    return incoming >= known


def dead_accepted(known: int, incoming: int) -> bool:
    """A Dead about an older incarnation is stale."""
    return incoming >= known


def to_dot() -> str:
    """Both tables as a Graphviz digraph (local-node edges dashed)."""
    lines = ["digraph member {", "  rankdir=LR;"]
    for local, table in ((False, TRANSITIONS), (True, LOCAL_TRANSITIONS)):
        for (state, trigger), t in table.items():
            target = t.target.name.lower() if t.target is not None else "forgotten"
            label = trigger.value + (f" / {t.event}" if t.event else "")
            label += " / refute" if t.refute else ""
            style = ' style="dashed"' if local else ""
            lines.append(f'  {state.name.lower()} -> {target} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- records

_NO_VSN = bytes(6)
#: The token the local node's leave broadcast reports when it is finished.
LEAVE_TOKEN = "leave"


@functools.lru_cache(maxsize=1 << 16)
def ip_bytes(addr: str) -> bytes:
    """``"10.0.0.1"`` -> 4 bytes (16 for IPv6), as memberlist puts addresses on the wire.

    Cached (as :func:`ip_text`): a cluster has few addresses and every record, alive message
    and push/pull converts them again; a bad address raises, and raising is not cached."""
    return ipaddress.ip_address(addr).packed


@functools.lru_cache(maxsize=1 << 16)
def ip_text(raw: bytes) -> str | None:
    """Wire address bytes -> text, or None if they are not an address (IPv4-mapped -> IPv4)."""
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        v6 = ipaddress.IPv6Address(raw)
        return str(v6.ipv4_mapped or v6)
    return None


@dataclass(frozen=True, slots=True)
class Member:
    """One member as this node sees it."""

    name: str
    addr: str
    port: int
    state: NodeState
    incarnation: int
    meta: bytes
    vsn: bytes
    state_change: float

    @property
    def pmax(self) -> int:
        return self.vsn[1] if len(self.vsn) > 1 else 0


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """``join`` when a member becomes alive, ``update`` on a meta change, ``leave`` on
    dead or left."""

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True)
class SuspectEvent:
    """``member`` went from alive to suspect here, on ``accuser``'s word (memberlist has no
    such event; only emitted when asked for, see ``Memberlist.report_suspicions``)."""

    member: str
    accuser: str
    incarnation: int
    cause: SuspectCause
    time: float


@dataclass(slots=True)
class MemberRecord:
    """The mutable record behind a :class:`Member` (memberlist's ``nodeState``)."""

    name: str
    addr: str
    port: int
    meta: bytes
    vsn: bytes
    incarnation: int = 0
    state: NodeState = NodeState.DEAD
    state_change: float = -math.inf

    @property
    def pmax(self) -> int:
        return self.vsn[1]

    @property
    def dest(self) -> tuple[str, int]:
        return (self.addr, self.port)

    @property
    def gone(self) -> bool:
        return self.state in (NodeState.DEAD, NodeState.LEFT)

    def snapshot(self) -> Member:
        return Member(
            self.name,
            self.addr,
            self.port,
            self.state,
            self.incarnation,
            self.meta,
            self.vsn,
            self.state_change,
        )

    def push_state(self) -> PushNodeState:
        addr = ip_bytes(self.addr)
        return PushNodeState(
            self.name, addr, self.port, self.meta, self.incarnation, self.state, self.vsn
        )


def verify_protocol(remote: Sequence[PushNodeState], local: Sequence[MemberRecord]) -> str | None:
    """``verifyProtocol``: None if every node can speak to every other, else the reason."""
    alive = [n.vsn for n in remote if n.state == NodeState.ALIVE and n.vsn]
    alive += [m.vsn for m in local if m.state == NodeState.ALIVE]
    if any(len(v) < 6 for v in alive) or any(0 < len(n.vsn) < 6 for n in remote):
        return "short version vector"
    maxpmin = max((v[0] for v in alive), default=0)
    minpmax = min((v[1] for v in alive), default=255)
    maxdmin = max((v[3] for v in alive), default=0)
    mindmax = min((v[4] for v in alive), default=255)
    everyone = [(n.name, n.vsn or _NO_VSN) for n in remote] + [(m.name, m.vsn) for m in local]
    for name, vsn in everyone:
        if not maxpmin <= vsn[2] <= minpmax:
            return f"node {name!r} protocol version {vsn[2]} is incompatible"
        if not maxdmin <= vsn[5] <= mindmax:
            return f"node {name!r} delegate protocol version {vsn[5]} is incompatible"
    return None


# ---------------------------------------------------------------------------- the table


class MemberTable:
    """Every member record, changed only through the transition tables above."""

    def __init__(
        self,
        config: Config,
        name: str,
        rng: random.Random,
        broadcasts: TransmitLimitedQueue,
        awareness: Awareness,
        counters: Counter[str],
        emit: Callable[[MemberEvent | SuspectEvent], None],
    ) -> None:
        self.config = config
        self.name = name
        self.nodes: list[MemberRecord] = []  # probe order
        self.by_name: dict[str, MemberRecord] = {}
        self.suspicions: dict[str, Suspicion] = {}
        self.left = False  # we called leave()
        self._rng = rng
        self._broadcasts = broadcasts
        self._awareness = awareness
        self._counters = counters
        self._emit = emit
        self._incarnation = 0
        self.report_suspicions = False  # emit a SuspectEvent on alive -> suspect

    def __len__(self) -> int:
        """``estNumNodes``: every record, dead and left ones until they are reaped."""
        return len(self.nodes)

    def next_incarnation(self) -> int:
        self._incarnation += 1
        return self._incarnation

    def any_alive(self) -> bool:
        return any(n.name != self.name and not n.gone for n in self.nodes)

    def k_random(self, k: int, exclude: Callable[[MemberRecord], bool]) -> list[MemberRecord]:
        """``kRandomNodes``: up to ``k`` distinct members, at most ``3n`` random draws."""
        n = len(self.nodes)
        out: list[MemberRecord] = []
        for _ in range(3 * n):
            if len(out) >= k:
                break
            node = self.nodes[self._rng.randrange(n)]
            if exclude(node) or any(node is o for o in out):
                continue
            out.append(node)
        return out

    def reap(self, now: float) -> None:
        """``resetNodes``: forget members dead or left for long enough, shuffle the rest."""
        keep: list[MemberRecord] = []
        for node in self.nodes:
            if node.gone and now - node.state_change > self.config.gossip_to_the_dead_time:
                t = transition(node.state, Trigger.REAP)
                assert t is not None and t.target is None
                del self.by_name[node.name]
                self._counters["reaped"] += 1
            else:
                keep.append(node)
        self._rng.shuffle(keep)
        self.nodes = keep

    def expire_suspicions(self, now: float) -> None:
        for name in [n for n, s in self.suspicions.items() if s.expired(now)]:
            suspicion = self.suspicions.pop(name)
            node = self.by_name.get(name)
            if node is None or node.state != NodeState.SUSPECT:
                continue
            if node.state_change != suspicion.start:
                continue
            self._counters["suspicion_timeouts"] += 1
            if suspicion.k > 0 and suspicion.n < suspicion.k:
                self._counters["degraded_timeouts"] += 1
            t = transition(NodeState.SUSPECT, Trigger.SUSPICION_TIMEOUT)
            assert t is not None and t.target == NodeState.DEAD
            self.dead(Dead(node.incarnation, name, self.name), now)

    def merge(self, remote: Sequence[PushNodeState], now: float, default_port: int) -> bool:
        """``mergeRemoteState`` (verify versions) and ``mergeState``."""
        if verify_protocol(remote, self.nodes) is not None:
            self._counters["merges_rejected"] += 1
            return False
        for r in remote:
            port = r.port if r.port and self.config.protocol_version >= 2 else default_port
            if r.state == NodeState.ALIVE:
                self.alive(Alive(r.incarnation, r.name, r.addr, port, r.meta, r.vsn), now)
            elif r.state == NodeState.LEFT:
                self.dead(Dead(r.incarnation, r.name, r.name), now)
            else:  # a pushed dead is only a suspicion here: let the member refute it
                self.suspect(Suspect(r.incarnation, r.name, self.name), now, "push_pull")
        return True

    def preload(self, remote: Sequence[PushNodeState], now: float) -> None:
        """Records for alive members that everyone already knows (a converged cluster):
        no guard, no event, no broadcast.  Members already known are left as they are."""
        for r in remote:
            if r.name in self.by_name:
                continue
            addr = ip_text(r.addr)
            if addr is None or r.state != NodeState.ALIVE or len(r.vsn) < 6:
                raise UsageError(f"preload: {r.name!r} is not an alive member with an address")
            node = MemberRecord(r.name, addr, r.port, r.meta or b"", r.vsn[:6], r.incarnation)
            node.state, node.state_change = NodeState.ALIVE, now
            self.by_name[r.name] = node
            self.nodes.append(node)
        self._rng.shuffle(self.nodes)

    # ------------------------------------------------------------------ the three handlers

    def alive(self, a: Alive, now: float, bootstrap: bool = False) -> None:
        """``aliveNode``."""
        if self.left and a.node == self.name:
            return
        if len(a.vsn) >= 3 and (a.vsn[0] == 0 or a.vsn[1] == 0 or a.vsn[0] > a.vsn[1]):
            self._counters["alive_bad_vsn"] += 1
            return
        addr = ip_text(a.addr)
        if addr is None or 0 < len(a.vsn) < 6:
            self._counters["alive_malformed"] += 1
            return
        node = self.by_name.get(a.node)
        readdress = False
        if node is None:
            node = self._add(a, addr)
        elif node.addr != addr or node.port != a.port:
            if not self._may_readdress(node, now):
                self._counters["alive_conflicts"] += 1
                return
            readdress = True
        local = node.name == self.name
        if not alive_accepted(node.incarnation, a.incarnation, local=local, readdress=readdress):
            return
        self.suspicions.pop(a.node, None)
        old_state, old_meta = node.state, node.meta
        meta = a.meta or b""
        if not bootstrap and local:
            if a.incarnation == node.incarnation and meta == node.meta and a.vsn == node.vsn:
                return
            self._refute(node, a.incarnation)
            return
        t = transition(old_state, Trigger.ALIVE)
        assert t is not None
        self._broadcasts.queue(encode_message(a), name=a.node)
        node.vsn = a.vsn[:6] or node.vsn
        node.incarnation, node.meta, node.addr, node.port = a.incarnation, meta, addr, a.port
        self._apply(node, t, now, meta_changed=old_meta != meta)

    def suspect(self, s: Suspect, now: float, cause: SuspectCause = "message") -> None:
        """``suspectNode``."""
        node = self.by_name.get(s.node)
        if node is None or not suspect_accepted(node.incarnation, s.incarnation):
            return
        suspicion = self.suspicions.get(s.node)
        if suspicion is not None:
            if suspicion.confirm(s.from_, now):
                self._counters["confirmations"] += 1
                self._broadcasts.queue(encode_message(s), name=s.node)
            return
        t = transition(node.state, Trigger.SUSPECT, local=node.name == self.name)
        if t is None or node.state != NodeState.ALIVE:
            return
        if t.refute:
            self._refute(node, s.incarnation)
            return
        self._broadcasts.queue(encode_message(s), name=s.node)
        node.incarnation = s.incarnation
        self._apply(node, t, now)
        self._counters["suspects"] += 1
        self._start_suspicion(s, now)
        if self.report_suspicions:
            self._emit(SuspectEvent(s.node, s.from_, s.incarnation, cause, now))

    def dead(self, d: Dead, now: float) -> None:
        """``deadNode``."""
        node = self.by_name.get(d.node)
        if node is None or not dead_accepted(node.incarnation, d.incarnation):
            return
        self.suspicions.pop(d.node, None)
        local = node.name == self.name
        trigger = Trigger.LEAVE if d.node == d.from_ else Trigger.DEAD
        if local and not self.left:
            trigger = Trigger.DEAD  # any accusation, even one "from us", is refuted
        t = transition(node.state, trigger, local=local)
        if t is None:
            return
        if t.refute:
            self._refute(node, d.incarnation)
            return
        token = LEAVE_TOKEN if local else None
        self._broadcasts.queue(encode_message(d), name=d.node, token=token)
        node.incarnation = d.incarnation
        self._apply(node, t, now)

    # ------------------------------------------------------------------ internals

    def _add(self, a: Alive, addr: str) -> MemberRecord:
        """A new record (state dead, incarnation 0) at a random place in the probe order."""
        node = MemberRecord(a.node, addr, a.port, a.meta or b"", a.vsn[:6] or _NO_VSN)
        self.by_name[a.node] = node
        n = len(self.nodes)
        offset = self._rng.randrange(n) if n else 0
        self.nodes.append(node)
        self.nodes[offset], self.nodes[n] = self.nodes[n], self.nodes[offset]
        return node

    def _may_readdress(self, node: MemberRecord, now: float) -> bool:
        reclaim = self.config.dead_node_reclaim_time
        can_reclaim = reclaim > 0 and now - node.state_change > reclaim
        return node.state == NodeState.LEFT or (node.state == NodeState.DEAD and can_reclaim)

    def _start_suspicion(self, s: Suspect, now: float) -> None:
        # Expect k = suspicion_mult - 2 confirmations, none if the cluster is too small.
        k = self.config.suspicion_mult - 2
        n = len(self.nodes)
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        hi = self.config.suspicion_max_timeout_mult * lo
        self.suspicions[s.node] = Suspicion(s.from_, k, lo, hi, now)

    def _refute(self, me: MemberRecord, accused: int) -> None:
        """``refute``: gossip an incarnation above the accusation; we are less healthy."""
        inc = self.next_incarnation()
        if accused >= inc:
            self._incarnation += accused - inc + 1
            inc = self._incarnation
        me.incarnation = inc
        self._awareness.apply_delta(1)
        self._counters["refutations"] += 1
        alive = Alive(inc, me.name, ip_bytes(me.addr), me.port, me.meta, me.vsn)
        # memberlist names this broadcast after our address, not our name (state.go refute).
        self._broadcasts.queue(encode_message(alive), name=me.addr)

    def _apply(
        self, node: MemberRecord, t: Transition, now: float, meta_changed: bool = False
    ) -> None:
        assert t.target is not None
        if node.state != t.target:
            node.state = t.target
            node.state_change = now
        if t.event is None or (t.event == "update" and not meta_changed):
            return
        self._emit(MemberEvent(t.event, node.snapshot()))
