"""Programming the FDB from overlay_peer_table, with a fake daemon that records table updates."""

from __future__ import annotations

import ipaddress
from typing import Any

import msgpack
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.daemon.peers import Peers
from vxnet.dataplane.tables import AddPeer, NetworkSpec, RemovePeer
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord, TableEvent
from vxnet.wire.ethernet import mac_from_str

SPEC = NetworkSpec(
    "front", 4097, ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Address("10.0.1.1")
)


class FakeDaemon:
    def __init__(self) -> None:
        self.networks = {"front": SPEC}
        self.network_ids = {"front": "netid"}
        self.network_names = {"netid": "front"}
        self.containers: dict[str, Any] = {}
        self.programmed: list[Any] = []

    async def program(self, update: Any) -> None:
        self.programmed.append(update)


class FakeGossip:
    name = "me"


def event(kind: str, key: str, owner: str, vtep: str, ltime: int = 1) -> TableEvent:
    rec = PeerRecord("10.0.1.8/24", "02:42:0a:00:01:08", vtep).encode()
    return TableEvent(kind, "netid", PEER_TABLE, key, owner, rec, ltime)  # type: ignore[arg-type]


def test_a_mac_that_moved_is_not_removed_by_its_old_owners_delete() -> None:
    daemon = FakeDaemon()
    peers = Peers(daemon, FakeGossip(), "me", "192.168.100.11")  # type: ignore[arg-type]

    async def main() -> None:
        await peers.on_table_event(event("create", "old/t/eth0", "old", "192.168.100.12"))
        await peers.on_table_event(event("create", "new/t/eth0", "new", "192.168.100.13", 2))
        await peers.on_table_event(event("delete", "old/t/eth0", "old", "192.168.100.12", 3))
        await peers.on_table_event(event("create", "x", "me", "192.168.100.11"))  # our own: skipped
        await peers.on_table_event(TableEvent("create", "netid", PEER_TABLE, "bad", "o", b"\xc1"))

    trio.run(main)
    kinds = [type(u).__name__ for u in daemon.programmed]
    assert kinds == ["AddPeer", "AddPeer"]  # the stale delete removed nothing
    last = daemon.programmed[-1]
    assert isinstance(last, AddPeer) and str(last.vtep) == "192.168.100.13"
    assert peers.counters["stale_deletes_ignored"] == 1 and peers.counters["bad_records"] == 1

    async def current_owner_leaves() -> None:
        await peers.on_table_event(event("delete", "new/t/eth0", "new", "192.168.100.13", 4))

    trio.run(current_owner_leaves)
    assert isinstance(daemon.programmed[-1], RemovePeer)


def test_claim_rows_show_every_live_claim_and_which_one_the_fdb_holds() -> None:
    peers = Peers(FakeDaemon(), FakeGossip(), "me", "192.168.100.11")  # type: ignore[arg-type]

    async def main() -> None:
        await peers.on_table_event(event("create", "old/t/eth0", "old", "192.168.100.12"))
        await peers.on_table_event(event("create", "new/t/eth0", "new", "192.168.100.13", 2))

    trio.run(main)
    rows = {r["key"]: (r["vtep"], r["ltime"], r["programmed"]) for r in peers.claim_rows()}
    assert rows == {
        "old/t/eth0": ("192.168.100.12", 1, False),
        "new/t/eth0": ("192.168.100.13", 2, True),
    }
    assert {(r["network"], r["mac"]) for r in peers.claim_rows()} == {
        ("front", "02:42:0a:00:01:08")
    }


def fdb_after(events: list[TableEvent]) -> dict[bytes, str]:
    """Replay ``events`` through Peers; return MAC -> VTEP as the FDB would hold it."""
    daemon = FakeDaemon()
    peers = Peers(daemon, FakeGossip(), "me", "192.168.100.11")  # type: ignore[arg-type]

    async def main() -> None:
        for e in events:
            await peers.on_table_event(e)

    trio.run(main)
    fdb: dict[bytes, str] = {}
    for u in daemon.programmed:
        if isinstance(u, AddPeer):
            fdb[u.mac] = str(u.vtep)
        elif isinstance(u, RemovePeer):
            del fdb[u.mac]  # a remove of something not programmed would raise here
    return fdb


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fdb_is_a_function_of_the_live_claims_not_of_their_order(data: st.DataObject) -> None:
    # Three keys on three nodes claim one address over time (it was freed and reused); each is
    # created once and maybe deleted.  Gossip may deliver those events in any order that keeps
    # each key's own create before its delete (a key's events are ordered by its Lamport time).
    keys = [(f"h{i}/web.{i}/eth0", f"h{i}", f"192.168.100.{20 + i}", i + 1) for i in range(3)]
    deleted = data.draw(st.lists(st.booleans(), min_size=3, max_size=3))
    streams = []
    for (key, owner, vtep, ltime), gone in zip(keys, deleted, strict=True):
        rec = PeerRecord("10.0.1.8/24", "02:42:0a:00:01:08", vtep).encode()
        stream = [TableEvent("create", "netid", PEER_TABLE, key, owner, rec, ltime)]
        if gone:
            stream.append(TableEvent("delete", "netid", PEER_TABLE, key, owner, rec, ltime + 10))
        streams.append(stream)
    order: list[TableEvent] = []
    while any(streams):
        i = data.draw(st.sampled_from([i for i, s in enumerate(streams) if s]))
        order.append(streams[i].pop(0))
    live = [(lt, vtep) for (_, _, vtep, lt), gone in zip(keys, deleted, strict=True) if not gone]
    want = {mac_from_str("02:42:0a:00:01:08"): max(live)[1]} if live else {}
    assert fdb_after(order) == want


def test_the_old_owners_create_arriving_last_does_not_strand_the_entry() -> None:
    # The CI failure this replaces: new create, old create (late), new delete, old delete.
    old = PeerRecord("10.0.1.8/24", "02:42:0a:00:01:08", "192.168.100.12").encode()
    new = PeerRecord("10.0.1.8/24", "02:42:0a:00:01:08", "192.168.100.13").encode()
    events = [
        TableEvent("create", "netid", PEER_TABLE, "new/t/eth0", "new", new, 5),
        TableEvent("create", "netid", PEER_TABLE, "old/t/eth0", "old", old, 1),
        TableEvent("delete", "netid", PEER_TABLE, "new/t/eth0", "new", new, 6),
        TableEvent("delete", "netid", PEER_TABLE, "old/t/eth0", "old", old, 2),
    ]
    assert fdb_after(events[:2]) == {mac_from_str("02:42:0a:00:01:08"): "192.168.100.13"}
    assert fdb_after(events[:3]) == {mac_from_str("02:42:0a:00:01:08"): "192.168.100.12"}
    assert fdb_after(events) == {}


class SlowDaemon(FakeDaemon):
    """The first table update waits for ``release``, as ``program`` waits on the dataplane."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def program(self, update: Any) -> None:
        if not self.programmed:
            self.programmed.append(update)
            await self.release.wait()
        else:
            self.programmed.append(update)


def test_a_delete_gossiped_while_a_bulk_sync_is_being_programmed_is_not_overtaken() -> None:
    """The mesh lab's stale FDB row.  A bulk sync (one TCP stream) brings a table in which a
    removed task is still live; while the watcher programs its first entry, a UDP datagram
    brings the task's delete.  Delivered in another task, the delete reached Peers before the
    create, was ignored as stale, and the create then stood for good."""
    from vxnet.gossip.networkdb import MAGIC
    from vxnet.gossip.service import GossipService

    def record(ip: str, mac: str) -> bytes:
        return PeerRecord(f"{ip}/24", mac, "192.168.100.11").encode()

    def row(kind: str, key: str, ltime: int, value: bytes) -> dict[str, Any]:
        return {"k": kind, "net": "netid", "tbl": PEER_TABLE, "key": key, "node": "h1",
                "l": ltime, "v": value}  # fmt: skip

    first, gone = record("10.0.1.2", "02:42:0a:00:01:02"), record("10.0.1.4", "02:42:0a:00:01:04")
    table = [row("create", "h1/lb", 2, first), row("create", "h1/web.2/eth0", 10, gone)]
    bulk = {"t": "bulk", "net": "netid", "resp": True, "from": "h1", "nodes": [], "e": table}
    delete = {"t": "batch", "m": [row("delete", "h1/web.2/eth0", 35, gone)]}
    daemon = SlowDaemon()

    async def main() -> None:
        gossip = GossipService("me", "127.0.0.1")
        peers = Peers(daemon, gossip, "me", "192.168.100.13")  # type: ignore[arg-type]
        gossip.watcher = peers.on_table_event
        gossip.db.node_alive("h1")
        gossip.db.join_network("netid", trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gossip.watch_events)
            gossip.db.handle_message(MAGIC + msgpack.packb(bulk), trio.current_time())
            nursery.start_soon(gossip._deliver)  # the bulk sync's stream
            await trio.testing.wait_all_tasks_blocked()
            gossip.db.handle_message(MAGIC + msgpack.packb(delete), trio.current_time())
            nursery.start_soon(gossip._deliver)  # the datagram's
            await trio.testing.wait_all_tasks_blocked()
            daemon.release.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # watch_events waits for more, forever

    trio.run(main)
    fdb = {u.mac for u in daemon.programmed if isinstance(u, AddPeer)}
    fdb -= {u.mac for u in daemon.programmed if isinstance(u, RemovePeer)}
    assert fdb == {mac_from_str("02:42:0a:00:01:02")}
