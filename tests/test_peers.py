"""Programming the FDB from overlay_peer_table, with a fake daemon that records table updates."""

from __future__ import annotations

import ipaddress
from typing import Any

import trio

from vxnet.daemon.peers import Peers
from vxnet.dataplane.tables import AddPeer, NetworkSpec, RemovePeer
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord, TableEvent

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


def event(kind: str, key: str, owner: str, vtep: str) -> TableEvent:
    rec = PeerRecord("10.0.1.8/24", "02:42:0a:00:01:08", vtep).encode()
    return TableEvent(kind, "netid", PEER_TABLE, key, owner, rec)  # type: ignore[arg-type]


def test_a_mac_that_moved_is_not_removed_by_its_old_owners_delete() -> None:
    daemon = FakeDaemon()
    peers = Peers(daemon, FakeGossip(), "me", "192.168.100.11")  # type: ignore[arg-type]

    async def main() -> None:
        await peers.on_table_event(event("create", "old/t/eth0", "old", "192.168.100.12"))
        await peers.on_table_event(event("create", "new/t/eth0", "new", "192.168.100.13"))
        await peers.on_table_event(event("delete", "old/t/eth0", "old", "192.168.100.12"))
        await peers.on_table_event(event("create", "x", "me", "192.168.100.11"))  # our own: skipped
        await peers.on_table_event(TableEvent("create", "netid", PEER_TABLE, "bad", "o", b"\xc1"))

    trio.run(main)
    kinds = [type(u).__name__ for u in daemon.programmed]
    assert kinds == ["AddPeer", "AddPeer"]  # the stale delete removed nothing
    last = daemon.programmed[-1]
    assert isinstance(last, AddPeer) and str(last.vtep) == "192.168.100.13"
    assert peers.counters["stale_deletes_ignored"] == 1 and peers.counters["bad_records"] == 1

    async def current_owner_leaves() -> None:
        await peers.on_table_event(event("delete", "new/t/eth0", "new", "192.168.100.13"))

    trio.run(current_owner_leaves)
    assert isinstance(daemon.programmed[-1], RemovePeer)
