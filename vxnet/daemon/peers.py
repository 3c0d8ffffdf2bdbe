"""Peers from gossip: ``overlay_peer_table`` in, FDB and neighbour entries out.

Docker's model: every endpoint publishes ``PeerRecord{EndpointIP, EndpointMAC,
TunnelEndpointIP}`` in networkdb's ``overlay_peer_table`` of its network; every node attached
to that network programs a permanent FDB entry (MAC -> VTEP) and neighbour entry (IP -> MAC)
from the others' records.  A node joins a network's gossip with its first local endpoint there
and leaves it with its last.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from vxnet.daemon.containers import Endpoint
from vxnet.dataplane.tables import AddPeer, NetworkSpec, RemovePeer, ResetEspPeer
from vxnet.errors import BadPacket, UsageError
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord, TableEvent, decode_peer_record_untrusted
from vxnet.wire.ethernet import mac_from_str

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon
    from vxnet.gossip.service import GossipService

log = logging.getLogger("vxnet.peers")


class Peers:
    def __init__(self, daemon: Daemon, gossip: GossipService, node: str, vtep: str) -> None:
        self.daemon = daemon
        self.gossip = gossip
        self.node = node
        self.vtep = vtep
        self.counters: dict[str, int] = {
            "programmed": 0,
            "removed": 0,
            "bad_records": 0,
            "stale_deletes_ignored": 0,
        }
        # (network, MAC) -> the table key whose record programmed it.  A MAC can move: a task
        # restarted with the same address publishes it under a new key before the old key's
        # delete arrives (moby#35401's stale FDB); only the current owner may remove it.
        self.owners: dict[tuple[str, bytes], str] = {}
        # VTEP -> the gossip node that publishes from it: a new one means the peer restarted,
        # and its ESP sequence numbers start again at 1 (our replay window must forget it).
        self.vtep_nodes: dict[str, str] = {}

    def _key(self, container: str, endpoint: Endpoint) -> str:
        return f"{self.node}/{container}/{endpoint.ifname}"

    def _local_endpoints(self, network: str) -> int:
        return sum(
            1 for c in self.daemon.containers.values() for e in c.endpoints if e.network == network
        )

    async def endpoint_up(self, container: str, endpoint: Endpoint, spec: NetworkSpec) -> None:
        net_id = self.daemon.network_ids.get(spec.name)
        if net_id is None:
            return  # a lab-programmed (manual) network: no gossip there
        if net_id not in self.gossip.db.networks:
            self.gossip.join_network(net_id)
        record = PeerRecord(f"{endpoint.ip}/{spec.subnet.prefixlen}", endpoint.mac, self.vtep)
        self.gossip.put(net_id, PEER_TABLE, self._key(container, endpoint), record.encode())

    async def endpoint_down(self, container: str, endpoint: Endpoint) -> None:
        net_id = self.daemon.network_ids.get(endpoint.network)
        if net_id is None:
            return
        self.gossip.delete(net_id, PEER_TABLE, self._key(container, endpoint))
        if self._local_endpoints(endpoint.network) == 0:
            self.gossip.leave_network(net_id)

    async def publish_all(self) -> None:
        """Publish every local endpoint (gossip starts after the containers, e.g. on restart)."""
        for c in list(self.daemon.containers.values()):
            for endpoint in c.endpoints:
                spec = self.daemon.networks.get(endpoint.network)
                if spec is not None:
                    await self.endpoint_up(c.name, endpoint, spec)

    async def on_table_event(self, event: TableEvent) -> None:
        if event.table != PEER_TABLE or event.owner == self.gossip.name:
            return
        name = self.daemon.network_names.get(event.network)
        spec = self.daemon.networks.get(name) if name else None
        if spec is None:
            return
        try:
            record = decode_peer_record_untrusted(event.value)
            mac = mac_from_str(record.endpoint_mac)
            ip = ipaddress.ip_interface(record.endpoint_ip).ip
            vtep = ipaddress.IPv4Address(record.tunnel_endpoint_ip)
        except (BadPacket, UsageError, ValueError) as exc:  # a record we cannot use is counted
            self.counters["bad_records"] += 1
            log.info("unusable peer record %s: %s", event.key, exc)
            return
        slot = (event.network, mac)
        if event.kind == "delete":
            if self.owners.get(slot) != event.key:
                self.counters["stale_deletes_ignored"] += 1
                return
            del self.owners[slot]
            await self.daemon.program(RemovePeer(spec.vni, mac))
            self.counters["removed"] += 1
        else:
            self.owners[slot] = event.key
            previous = self.vtep_nodes.get(str(vtep))
            self.vtep_nodes[str(vtep)] = event.owner
            if previous is not None and previous != event.owner:
                await self.daemon.program(ResetEspPeer(vtep))
                self.counters["esp_peer_resets"] = self.counters.get("esp_peer_resets", 0) + 1
            await self.daemon.program(AddPeer(spec.vni, mac, ip, vtep, "gossip"))
            self.counters["programmed"] += 1
