"""networkdb: per-network tables gossiped to the nodes attached to each network.  Sans-IO.

Docker's libnetwork/networkdb, rebuilt:

* A node **joins a network** when it gets its first endpoint there.  Network join and leave
  events travel cluster-wide, piggybacked on memberlist's gossip, ordered by a Lamport clock.
* A **table entry** is ``{owner, ltime, value, deleting, reap_time}``, keyed by
  ``(network, table, key)``.  An event replaces an entry only if its Lamport time is greater.
  Deleted entries stay as tombstones for ``reap_interval`` (30 min), so a late create cannot
  resurrect them.
* Every ``gossip_interval`` (200 ms) a node sends its pending table events for each network to
  ``gossip_nodes`` (3) random nodes *of that network*, over UDP.  When it joins a network it
  sends the whole network table (every owner's entries) to every node of the network it knows,
  over TCP, and each answers with its own; then every ``bulk_sync_interval`` (30 s) to 2 of
  them at random.  A node already on a network pushes its table to a node it hears join.
* When a node **fails**, its entries are hidden from watchers and restored if it comes back.
  When it **leaves**, its entries are deleted.

The wire format of these messages is vxnet's own (msgpack maps), carried in memberlist user
messages; Docker's is protobuf.  The memberlist layer under it is byte-compatible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from vxnet.errors import BadPacket

PEER_TABLE = "overlay_peer_table"
ENDPOINT_TABLE = "endpoint_table"
MAGIC = b"vxdb1"  # marks networkdb payloads inside memberlist user messages

EventKind = Literal["create", "update", "delete"]


@dataclass(frozen=True, slots=True)
class Settings:
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    bulk_sync_interval: float = 30.0
    reap_interval: float = 30 * 60.0
    retransmit_mult: int = 4
    max_gossip_bytes: int = 1300


@dataclass(slots=True)
class Entry:
    owner: str
    ltime: int
    value: bytes
    deleting: bool = False
    reap_at: float = 0.0
    hidden: bool = False  # the owner failed: not visible until it comes back


@dataclass(frozen=True, slots=True)
class TableEvent:
    """What watchers see: an entry appeared, changed or went away."""

    kind: EventKind
    network: str
    table: str
    key: str
    owner: str
    value: bytes
    ltime: int = 0  # the entry's Lamport time: watchers order claims on one resource by it


@dataclass(slots=True)
class _Pending:
    message: dict[str, Any]
    transmits: int = 0


@dataclass(slots=True)
class _NetworkState:
    """A network this node is attached to: what is waiting to be gossiped, next bulk sync."""

    pending: list[_Pending] = field(default_factory=list)
    next_bulk: float = 0.0
    bulk_all: bool = True  # right after joining: sync with every node of the network


class NetworkDB:
    """One node's networkdb.  Outputs go through the two callables the service provides."""

    def __init__(
        self,
        name: str,
        send_udp: Callable[[str, bytes], bool],
        send_tcp: Callable[[str, bytes], None],
        broadcast: Callable[[bytes, str], None],
        rng: random.Random,
        settings: Settings = Settings(),
    ) -> None:
        self.name = name
        self._send_udp = send_udp  # (node, payload) -> queued?
        self._send_tcp = send_tcp  # (node, payload): a reliable user message
        self._broadcast = broadcast  # (payload, invalidation key): piggybacked cluster-wide
        self.rng = rng
        self.settings = settings
        self.network_clock = 0
        self.table_clock = 0
        self.networks: dict[str, _NetworkState] = {}  # the networks this node is attached to
        # every node's attachments, cluster-wide (how a late joiner knows whom to sync with):
        # network -> node -> (Lamport time, leaving)
        self.attachments: dict[str, dict[str, tuple[int, bool]]] = {}
        self.entries: dict[tuple[str, str, str], Entry] = {}
        self.live_nodes: set[str] = {name}
        self.events: list[TableEvent] = []
        self.counters: dict[str, int] = {}
        self._next_gossip = 0.0

    # ----------------------------------------------------------------- local changes

    def join_network(self, network: str, now: float) -> None:
        state = self.networks.setdefault(network, _NetworkState())
        state.bulk_all = True
        self.network_clock += 1
        self.attachments.setdefault(network, {})[self.name] = (self.network_clock, False)
        self._broadcast(self._net_event(network, "join"), f"net:{network}:{self.name}")
        state.next_bulk = now  # pull the table from a peer of the network at once

    def leave_network(self, network: str, now: float) -> None:
        state = self.networks.get(network)
        if state is None:
            return
        self.network_clock += 1
        self.attachments.setdefault(network, {})[self.name] = (self.network_clock, True)
        self._broadcast(self._net_event(network, "leave"), f"net:{network}:{self.name}")
        for key, entry in list(self.entries.items()):
            if key[0] == network and entry.owner != self.name and not entry.deleting:
                self._emit("delete", key, entry)
        del self.networks[network]
        self.entries = {
            k: e for k, e in self.entries.items() if k[0] != network or e.owner == self.name
        }

    def create_entry(self, network: str, table: str, key: str, value: bytes, now: float) -> None:
        self._local_write("create", network, table, key, value, now)

    def update_entry(self, network: str, table: str, key: str, value: bytes, now: float) -> None:
        self._local_write("update", network, table, key, value, now)

    def delete_entry(self, network: str, table: str, key: str, now: float) -> None:
        entry = self.entries.get((network, table, key))
        if entry is None or entry.deleting:
            return
        self._local_write("delete", network, table, key, entry.value, now)

    def _local_write(
        self, kind: EventKind, network: str, table: str, key: str, value: bytes, now: float
    ) -> None:
        self.table_clock += 1
        deleting = kind == "delete"
        entry = Entry(
            self.name,
            self.table_clock,
            value,
            deleting,
            now + self.settings.reap_interval if deleting else 0.0,
        )
        self.entries[(network, table, key)] = entry
        state = self.networks.get(network)
        if state is not None:
            state.pending.append(_Pending(self._table_event(kind, network, table, key, entry)))

    # ------------------------------------------------------------------- reading

    def get(self, network: str, table: str, key: str) -> Entry | None:
        entry = self.entries.get((network, table, key))
        return None if entry is None or entry.deleting or entry.hidden else entry

    def walk(self, network: str, table: str) -> list[tuple[str, Entry]]:
        return [
            (k[2], e)
            for k, e in self.entries.items()
            if k[0] == network and k[1] == table and not e.deleting and not e.hidden
        ]

    def network_nodes(self, network: str) -> list[str]:
        nodes = self.attachments.get(network, {})
        return sorted(n for n, (_, leaving) in nodes.items() if not leaving)

    def take_events(self) -> list[TableEvent]:
        out, self.events = self.events, []
        return out

    # ------------------------------------------------------------------- membership

    def node_alive(self, node: str) -> None:
        """memberlist says ``node`` is alive (joined, or came back after failing)."""
        self.live_nodes.add(node)
        for key, entry in self.entries.items():
            if entry.owner == node and entry.hidden:
                entry.hidden = False
                if not entry.deleting:
                    self._emit("create", key, entry)

    def node_failed(self, node: str) -> None:
        """Failed: hide its entries (they come back if it does)."""
        self.live_nodes.discard(node)
        for key, entry in self.entries.items():
            if entry.owner == node and not entry.hidden:
                entry.hidden = True
                if not entry.deleting:
                    self._emit("delete", key, entry)

    def node_left(self, node: str, now: float) -> None:
        """Left on purpose: its entries are deleted and its networks forgotten."""
        self.node_failed(node)
        for entry in self.entries.values():
            if entry.owner == node:
                entry.deleting = True
                entry.reap_at = now + self.settings.reap_interval
        for nodes in self.attachments.values():
            nodes.pop(node, None)

    # -------------------------------------------------------------------- timers

    def handle_timer(self, now: float) -> None:
        if now >= self._next_gossip:
            self._next_gossip = now + self.settings.gossip_interval
            self._gossip()
        for network, state in self.networks.items():
            if now >= state.next_bulk:
                # as Docker: every node of the network right after joining, then 2 at random
                peers = self._peers(network)
                if not state.bulk_all:
                    peers = self.rng.sample(peers, min(2, len(peers)))
                for peer in peers:
                    self._bulk_sync(network, response=False, to=peer)
                if peers:
                    state.bulk_all = False
                # no peer known yet (we joined before hearing who else is there): retry soon
                state.next_bulk = now + (self.settings.bulk_sync_interval if peers else 1.0)
        self._reap(now)

    def next_timer(self) -> float:
        nexts = [self._next_gossip] + [s.next_bulk for s in self.networks.values()]
        return min(nexts)

    def _peers(self, network: str) -> list[str]:
        return [n for n in self.network_nodes(network) if n != self.name and n in self.live_nodes]

    def _gossip(self) -> None:
        for network, state in self.networks.items():
            if not state.pending:
                continue
            peers = self._peers(network)
            limit = self.settings.retransmit_mult * math.ceil(math.log10(len(peers) + 2))
            if not peers:
                continue
            batch = sorted(state.pending, key=lambda p: p.transmits)
            payload, used = self._pack_batch(batch)
            for node in self.rng.sample(peers, min(self.settings.gossip_nodes, len(peers))):
                self._send_udp(node, payload)
                self.counters["gossip_sent"] = self.counters.get("gossip_sent", 0) + 1
            for p in used:
                p.transmits += 1
            state.pending = [p for p in state.pending if p.transmits < limit]

    def _pack_batch(self, batch: list[_Pending]) -> tuple[bytes, list[_Pending]]:
        used: list[_Pending] = []
        size = 0
        for p in batch:
            size += len(msgpack.packb(p.message)) + 4
            if used and size > self.settings.max_gossip_bytes:
                break
            used.append(p)
        return _encode({"t": "batch", "m": [p.message for p in used]}), used

    def _bulk_sync(self, network: str, response: bool, to: str) -> None:
        # every entry of the network, whoever owns it (Docker's bulkSyncNode walks the whole
        # network index): a node that joined while some owners were still unknown to it gets
        # their entries from the first peer it syncs with, not 30 s later
        entries = [
            self._table_event("delete" if e.deleting else "create", *k, e)
            for k, e in self.entries.items()
            if k[0] == network
        ]
        nodes = [
            {"n": n, "l": lt, "x": leaving}
            for n, (lt, leaving) in self.attachments.get(network, {}).items()
        ]
        payload = _encode(
            {
                "t": "bulk",
                "net": network,
                "resp": response,
                "from": self.name,
                "e": entries,
                "nodes": nodes,
            }
        )
        self._send_tcp(to, payload)
        self.counters["bulk_sent"] = self.counters.get("bulk_sent", 0) + 1

    def _reap(self, now: float) -> None:
        gone = [k for k, e in self.entries.items() if e.deleting and e.reap_at and now >= e.reap_at]
        for key in gone:
            del self.entries[key]

    # --------------------------------------------------------------- messages in

    def handle_message(self, payload: bytes, now: float) -> bool:
        """A memberlist user message (UDP or TCP).  False if it is not networkdb's."""
        if not payload.startswith(MAGIC):
            return False
        try:
            msg = decode_payload_untrusted(payload)
            kind = msg.get("t")
            if kind == "batch":
                for inner in list_field(msg, "m"):
                    self._apply_table_event(as_map(inner), now)
            elif kind == "net":
                self._apply_net_event(msg)
            elif kind == "bulk":
                self._apply_bulk(msg, now)
            else:
                raise BadPacket("networkdb_unknown_message")
        except BadPacket as exc:
            self.counters[f"drop_{exc.reason}"] = self.counters.get(f"drop_{exc.reason}", 0) + 1
        return True

    def _apply_net_event(self, msg: dict[str, Any]) -> None:
        network, node, ltime = str_field(msg, "net"), str_field(msg, "node"), int_field(msg, "l")
        self.network_clock = max(self.network_clock, ltime)
        if node == self.name:
            return
        nodes = self.attachments.setdefault(network, {})
        current = nodes.get(node)
        if current is not None and current[0] >= ltime:
            return
        leaving = str_field(msg, "k") == "leave"
        nodes[node] = (ltime, leaving)
        if not leaving and network in self.networks and (current is None or current[1]):
            # a node (re)joined a network we are on: push it our table at once.  Without this,
            # nodes joining one network together (a new ingress on every node) each synced
            # with the peers they happened to know first, and the rest waited 30 s.
            self._bulk_sync(network, response=True, to=node)
        if leaving:
            for key, entry in self.entries.items():
                if key[0] == network and entry.owner == node and not entry.deleting:
                    entry.deleting = True
                    self._emit("delete", key, entry)

    def _apply_table_event(self, msg: dict[str, Any], now: float) -> bool:
        network = str_field(msg, "net")
        key = (network, str_field(msg, "tbl"), str_field(msg, "key"))
        owner, ltime = str_field(msg, "node"), int_field(msg, "l")
        self.table_clock = max(self.table_clock, ltime)
        if network not in self.networks or owner == self.name:
            return False
        current = self.entries.get(key)
        if current is not None and current.ltime >= ltime:
            return False  # an update wins only with a greater Lamport time
        deleting = str_field(msg, "k") == "delete"
        entry = Entry(
            owner,
            ltime,
            bytes_field(msg, "v"),
            deleting,
            now + self.settings.reap_interval if deleting else 0.0,
            hidden=owner not in self.live_nodes,
        )
        self.entries[key] = entry
        if current is None or current.deleting or current.hidden:
            if not deleting and not entry.hidden:
                self._emit("create", key, entry)
        elif deleting:
            self._emit("delete", key, current)
        elif not entry.hidden:
            self._emit("update", key, entry)
        state = self.networks[network]
        state.pending.append(_Pending(msg))  # rebroadcast, as networkdb does
        return True

    def _apply_bulk(self, msg: dict[str, Any], now: float) -> None:
        network = str_field(msg, "net")
        if network not in self.networks:
            return
        for node in list_field(msg, "nodes"):
            self._apply_net_event(
                {
                    "net": network,
                    "node": str_field(as_map(node), "n"),
                    "l": int_field(as_map(node), "l"),
                    "k": "leave" if as_map(node).get("x") else "join",
                }
            )
        for inner in list_field(msg, "e"):
            self._apply_table_event(as_map(inner), now)
        if not msg.get("resp"):
            self._bulk_sync(network, response=True, to=str_field(msg, "from"))

    # ------------------------------------------------- memberlist push/pull state

    def local_state(self) -> bytes:
        """Every attachment this node knows (memberlist's LocalState delegate)."""
        nets = {
            net: [[n, lt, leaving] for n, (lt, leaving) in nodes.items()]
            for net, nodes in self.attachments.items()
        }
        return _encode({"t": "state", "clock": self.network_clock, "nets": nets})

    def merge_remote_state(self, payload: bytes) -> None:
        """A push/pull partner's attachments (memberlist's MergeRemoteState delegate)."""
        if not payload:
            return
        try:
            msg = decode_payload_untrusted(payload)
            for net, nodes in as_map(msg.get("nets", {})).items():
                for row in nodes if isinstance(nodes, list) else []:
                    if not (isinstance(row, list) and len(row) == 3):
                        raise BadPacket("networkdb_bad_state_row")
                    kind = "leave" if row[2] else "join"
                    self._apply_net_event({"net": str(net), "node": row[0], "l": row[1], "k": kind})
        except BadPacket as exc:
            self.counters[f"drop_{exc.reason}"] = self.counters.get(f"drop_{exc.reason}", 0) + 1

    # ------------------------------------------------------------------- helpers

    def _emit(self, kind: EventKind, key: tuple[str, str, str], entry: Entry) -> None:
        self.events.append(
            TableEvent(kind, key[0], key[1], key[2], entry.owner, entry.value, entry.ltime)
        )

    def _net_event(self, network: str, kind: str) -> bytes:
        return _encode(
            {"t": "net", "k": kind, "net": network, "node": self.name, "l": self.network_clock}
        )

    def _table_event(
        self, kind: EventKind, network: str, table: str, key: str, entry: Entry
    ) -> dict[str, Any]:
        return {
            "k": kind,
            "net": network,
            "tbl": table,
            "key": key,
            "node": entry.owner,
            "l": entry.ltime,
            "v": entry.value,
        }


def _encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return MAGIC + body


def decode_payload_untrusted(payload: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(payload[len(MAGIC) :], raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise BadPacket("networkdb_not_msgpack") from None
    return as_map(msg)


def as_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadPacket("networkdb_not_a_map")
    return value


def list_field(msg: dict[str, Any], key: str) -> list[Any]:
    value = msg.get(key, [])
    if not isinstance(value, list):
        raise BadPacket("networkdb_bad_field", key)
    return value


def str_field(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise BadPacket("networkdb_bad_field", key)
    return value


def int_field(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadPacket("networkdb_bad_field", key)
    return value


def bytes_field(msg: dict[str, Any], key: str) -> bytes:
    value = msg.get(key)
    if not isinstance(value, bytes):
        raise BadPacket("networkdb_bad_field", key)
    return value


# --------------------------------------------------------------------- peer records


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """Docker's ``PeerRecord{EndpointIP, EndpointMAC, TunnelEndpointIP}`` (overlay_peer_table)."""

    endpoint_ip: str  # CIDR, as Docker stores it
    endpoint_mac: str
    tunnel_endpoint_ip: str

    def encode(self) -> bytes:
        body: bytes = msgpack.packb(
            {
                "EndpointIP": self.endpoint_ip,
                "EndpointMAC": self.endpoint_mac,
                "TunnelEndpointIP": self.tunnel_endpoint_ip,
            }
        )
        return body


def decode_peer_record_untrusted(value: bytes) -> PeerRecord:
    try:
        data = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise BadPacket("peer_record_not_msgpack") from None
    m = as_map(data)
    return PeerRecord(
        str_field(m, "EndpointIP"), str_field(m, "EndpointMAC"), str_field(m, "TunnelEndpointIP")
    )
