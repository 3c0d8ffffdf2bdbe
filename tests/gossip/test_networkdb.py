"""networkdb without a network: several nodes wired through an in-memory, lossy transport."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import BadPacket
from vxnet.gossip.networkdb import (
    MAGIC,
    PEER_TABLE,
    NetworkDB,
    PeerRecord,
    Settings,
    TableEvent,
    decode_peer_record_untrusted,
)


class Cluster:
    """N networkdbs; UDP gossip may be lost, TCP (bulk sync) and broadcasts are delivered."""

    def __init__(self, n: int, loss: float = 0.0, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.now = 0.0
        self.queue: list[tuple[str, bytes]] = []
        self.dbs: dict[str, NetworkDB] = {}
        self.seen: dict[str, list[TableEvent]] = defaultdict(list)
        for i in range(n):
            name = f"n{i}"
            self.dbs[name] = NetworkDB(
                name,
                send_udp=lambda node, p, src=name: self._udp(node, p),
                send_tcp=lambda node, p: self.queue.append((node, p)),
                broadcast=lambda p, key, src=name: self._broadcast(src, p),
                rng=random.Random(seed + i),
                settings=Settings(bulk_sync_interval=5.0, reap_interval=60.0),
            )
        for db in self.dbs.values():
            for other in self.dbs:
                db.node_alive(other)

    def _udp(self, node: str, payload: bytes) -> bool:
        if self.rng.random() >= self.loss:
            self.queue.append((node, payload))
        return True

    def _broadcast(self, src: str, payload: bytes) -> None:
        for name in self.dbs:
            if name != src:
                self.queue.append((name, payload))

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for db in self.dbs.values():
                db.handle_timer(self.now)
            while self.queue:
                node, payload = self.queue.pop(0)
                if node in self.dbs:
                    assert self.dbs[node].handle_message(payload, self.now)
            for name, db in self.dbs.items():
                self.seen[name] += db.take_events()

    def visible(self, name: str, net: str) -> dict[str, bytes]:
        return {k: e.value for k, e in self.dbs[name].walk(net, PEER_TABLE)}


def test_entries_reach_every_node_of_the_network_and_only_them() -> None:
    c = Cluster(5)
    for name in ("n0", "n1", "n2"):
        c.dbs[name].join_network("blue", c.now)
    c.dbs["n3"].join_network("red", c.now)
    c.run(0.5)
    c.dbs["n0"].create_entry("blue", PEER_TABLE, "ep0", b"v0", c.now)
    c.dbs["n1"].create_entry("blue", PEER_TABLE, "ep1", b"v1", c.now)
    c.run(1.0)
    for name in ("n0", "n1", "n2"):
        assert c.visible(name, "blue") == {"ep0": b"v0", "ep1": b"v1"}
    assert c.visible("n3", "blue") == {} and c.visible("n4", "blue") == {}
    assert {e.key for e in c.seen["n2"] if e.kind == "create"} == {"ep0", "ep1"}
    assert c.dbs["n0"].network_nodes("blue") == ["n0", "n1", "n2"]


def test_a_late_joiner_gets_the_table_by_bulk_sync() -> None:
    c = Cluster(3)
    c.dbs["n0"].join_network("blue", c.now)
    c.dbs["n0"].create_entry("blue", PEER_TABLE, "old", b"x", c.now)
    c.run(2.0)  # gossip has long stopped retransmitting "old"
    c.dbs["n2"].join_network("blue", c.now)
    c.run(0.5)
    assert c.visible("n2", "blue") == {"old": b"x"}


def test_updates_win_only_with_a_greater_lamport_time_and_deletes_tombstone() -> None:
    c = Cluster(2)
    for db in c.dbs.values():
        db.join_network("blue", c.now)
    c.run(0.3)
    c.dbs["n0"].create_entry("blue", PEER_TABLE, "k", b"1", c.now)
    c.run(0.5)
    stale = {
        "k": "create",
        "net": "blue",
        "tbl": PEER_TABLE,
        "key": "k",
        "node": "n0",
        "l": 0,
        "v": b"stale",
    }
    import msgpack

    c.dbs["n1"].handle_message(MAGIC + msgpack.packb({"t": "batch", "m": [stale]}), c.now)
    assert c.visible("n1", "blue") == {"k": b"1"}
    c.dbs["n0"].update_entry("blue", PEER_TABLE, "k", b"2", c.now)
    c.run(0.5)
    assert c.visible("n1", "blue") == {"k": b"2"}
    c.dbs["n0"].delete_entry("blue", PEER_TABLE, "k", c.now)
    c.run(0.5)
    assert c.visible("n1", "blue") == {}
    tomb = c.dbs["n1"].entries[("blue", PEER_TABLE, "k")]
    assert tomb.deleting  # kept as a tombstone...
    replay = dict(stale, l=2, v=b"2")  # ...so the older create cannot resurrect it
    c.dbs["n1"].handle_message(MAGIC + msgpack.packb({"t": "batch", "m": [replay]}), c.now)
    assert c.visible("n1", "blue") == {}
    c.run(61.0)
    assert ("blue", PEER_TABLE, "k") not in c.dbs["n1"].entries  # reaped after reap_interval


def test_failed_nodes_are_hidden_and_restored_left_nodes_deleted() -> None:
    c = Cluster(3)
    for db in c.dbs.values():
        db.join_network("blue", c.now)
    c.run(0.3)
    c.dbs["n2"].create_entry("blue", PEER_TABLE, "e2", b"x", c.now)
    c.run(0.5)
    c.dbs["n0"].node_failed("n2")
    assert c.visible("n0", "blue") == {}
    assert c.dbs["n0"].take_events()[-1].kind == "delete"
    c.dbs["n0"].node_alive("n2")
    assert c.visible("n0", "blue") == {"e2": b"x"}
    c.dbs["n1"].node_left("n2", c.now)
    assert c.visible("n1", "blue") == {}
    c.dbs["n1"].node_alive("n2")
    assert c.visible("n1", "blue") == {}  # left means gone, not hidden


def test_leaving_a_network_forgets_it_and_tells_the_others() -> None:
    c = Cluster(3)
    for db in c.dbs.values():
        db.join_network("blue", c.now)
    c.run(0.3)
    c.dbs["n1"].create_entry("blue", PEER_TABLE, "e1", b"x", c.now)
    c.run(0.5)
    c.dbs["n1"].leave_network("blue", c.now)
    c.run(0.5)
    assert c.dbs["n0"].network_nodes("blue") == ["n0", "n2"]
    assert c.visible("n0", "blue") == {}


def test_convergence_under_20_percent_loss() -> None:
    c = Cluster(8, loss=0.2, seed=3)
    for db in c.dbs.values():
        db.join_network("blue", c.now)
    c.run(0.5)
    for i, db in enumerate(c.dbs.values()):
        db.create_entry("blue", PEER_TABLE, f"e{i}", b"v", c.now)
    c.run(6.0)  # gossip retransmits, and bulk sync (every 5 s here) repairs what loss took
    for name in c.dbs:
        assert set(c.visible(name, "blue")) == {f"e{i}" for i in range(8)}


def test_peer_records_round_trip() -> None:
    rec = PeerRecord("10.0.1.3/24", "02:42:0a:00:01:03", "192.168.100.12")
    assert decode_peer_record_untrusted(rec.encode()) == rec
    with pytest.raises(BadPacket):
        decode_peer_record_untrusted(b"\x81\xa1x\x01")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_counted_never_raised(data: bytes) -> None:
    db = NetworkDB("n0", lambda n, p: True, lambda n, p: None, lambda p, k: None, random.Random(1))
    db.join_network("blue", 0.0)
    assert db.handle_message(MAGIC + data, 1.0)
    assert not db.handle_message(b"other" + data, 1.0)  # not networkdb's: left to others


def test_a_node_that_missed_the_join_broadcasts_learns_attachments_from_push_pull() -> None:
    """A late joiner hears of earlier network joins only through memberlist's push/pull state."""
    c = Cluster(3)
    late = c.dbs.pop("n2")  # n2 is not on the network while the others join
    for name in ("n0", "n1"):
        c.dbs[name].join_network("blue", c.now)
    c.dbs["n0"].create_entry("blue", PEER_TABLE, "e0", b"x", c.now)
    c.run(2.0)
    assert late.network_nodes("blue") == []  # it heard nothing
    late.merge_remote_state(c.dbs["n0"].local_state())  # memberlist push/pull with n0
    assert late.network_nodes("blue") == ["n0", "n1"]
    c.dbs["n2"] = late
    late.join_network("blue", c.now)
    c.run(0.5)
    assert c.visible("n2", "blue") == {"e0": b"x"}  # bulk sync found a peer at once
    late.merge_remote_state(b"garbage")
    assert late.counters.get("drop_networkdb_not_msgpack", 0) == 1


def test_set_keys_on_a_plain_service_shrinks_the_piggyback_budget() -> None:
    import trio

    from vxnet.gossip.service import ENCRYPTION_OVERHEAD, GossipService

    async def main() -> None:
        svc = GossipService("a", "127.0.0.1", 7946)
        svc.set_keys([bytes(16)], bytes(16))
        assert svc.ml.encryption_overhead == ENCRYPTION_OVERHEAD

    trio.run(main)


def test_a_joiner_that_knows_one_peer_gets_every_owners_entries_from_it() -> None:
    """A restarted node often knows only one live peer when it joins a network: Docker's bulk
    sync carries the whole network table, so entries of owners it does not know yet arrive
    too (not 30 s later with the next periodic sync)."""
    c = Cluster(3)
    for name in ("n0", "n1"):
        c.dbs[name].join_network("blue", c.now)
    c.dbs["n0"].create_entry("blue", PEER_TABLE, "e0", b"x", c.now)
    c.dbs["n1"].create_entry("blue", PEER_TABLE, "e1", b"y", c.now)
    c.run(2.0)
    late = c.dbs["n2"]
    late.live_nodes.discard("n1")  # memberlist has told it of n0 only, so far
    late.join_network("blue", c.now)
    c.run(0.5)
    assert c.visible("n2", "blue") == {"e0": b"x"}
    e1 = late.entries.get(("blue", PEER_TABLE, "e1"))
    assert e1 is not None and e1.hidden  # n1's entry came from n0: kept, not shown, for now
    late.node_alive("n1")
    assert c.visible("n2", "blue") == {"e0": b"x", "e1": b"y"}


def test_nodes_on_a_network_push_their_table_to_a_node_that_joins_it() -> None:
    """A joiner that knows no peer of the network yet (a new ingress created on every node at
    once) still gets the table: those already on it push it when they hear the join."""
    c = Cluster(3)
    for name in ("n0", "n1"):
        c.dbs[name].join_network("green", c.now)
        c.dbs[name].create_entry("green", PEER_TABLE, f"e-{name}", name.encode(), c.now)
    c.run(2.0)
    late = c.dbs["n2"]
    late.attachments.clear()  # it has not heard who is on green: it can sync with nobody
    late.join_network("green", c.now)
    c.run(0.2)
    assert c.visible("n2", "green") == {"e-n0": b"n0", "e-n1": b"n1"}
