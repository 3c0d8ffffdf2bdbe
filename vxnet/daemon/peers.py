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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vxnet.daemon.containers import Endpoint
from vxnet.dataplane.tables import AddPeer, NetworkSpec, RemovePeer, ResetEspPeer
from vxnet.errors import BadPacket, UsageError
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord, TableEvent, decode_peer_record_untrusted
from vxnet.wire.ethernet import mac_from_str, mac_to_str

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon
    from vxnet.gossip.service import GossipService

log = logging.getLogger("vxnet.peers")

Slot = tuple[str, bytes]  # (network id, MAC): one FDB entry


@dataclass(frozen=True, slots=True)
class Claim:
    """One table entry's say about where a MAC lives."""

    key: str
    owner: str
    ltime: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    vtep: ipaddress.IPv4Address


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
        # (network, MAC) -> every live table key that claims it.  A MAC can move: an address
        # freed on one node is reused on another, and gossip delivers the old key's create,
        # the new key's create and the old key's delete in any order (moby#35401's stale
        # FDB).  So the FDB entry is a function of this set, never of the order events came
        # in: the claim with the greatest Lamport time programs it, and it goes with the last.
        self.claims: dict[Slot, dict[str, Claim]] = {}
        self.key_slots: dict[tuple[str, str], Slot] = {}  # (network, key) -> its claim's slot
        self.programmed: dict[Slot, Claim] = {}  # what the FDB holds now, per slot
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
        if spec is None:  # not (or no longer) a network here: its FDB went with it
            self._forget_network(event.network)
            return
        touched: list[Slot] = []
        old = self.key_slots.pop((event.network, event.key), None)
        if old is not None:  # this key's previous claim: withdrawn, or replaced below
            self.claims[old].pop(event.key, None)
            touched.append(old)
        if event.kind == "delete":
            held = self.programmed.get(old) if old is not None else None
            if held is None or held.key != event.key:
                self.counters["stale_deletes_ignored"] += 1  # it was not what the FDB held
        else:
            decoded = self._decode(event)
            if decoded is not None:
                slot, claim = decoded
                self.claims.setdefault(slot, {})[event.key] = claim
                self.key_slots[(event.network, event.key)] = slot
                touched.append(slot)
                await self._note_vtep(claim)
        for slot in dict.fromkeys(touched):
            await self._reconcile(spec.vni, slot)

    def _decode(self, event: TableEvent) -> tuple[Slot, Claim] | None:
        try:
            record = decode_peer_record_untrusted(event.value)
            mac = mac_from_str(record.endpoint_mac)
            ip = ipaddress.ip_interface(record.endpoint_ip).ip
            vtep = ipaddress.IPv4Address(record.tunnel_endpoint_ip)
        except (BadPacket, UsageError, ValueError) as exc:  # a record we cannot use is counted
            self.counters["bad_records"] += 1
            log.info("unusable peer record %s: %s", event.key, exc)
            return None
        return (event.network, mac), Claim(event.key, event.owner, event.ltime, ip, vtep)

    async def _note_vtep(self, claim: Claim) -> None:
        previous = self.vtep_nodes.get(str(claim.vtep))
        self.vtep_nodes[str(claim.vtep)] = claim.owner
        if previous is not None and previous != claim.owner:
            await self.daemon.program(ResetEspPeer(claim.vtep))
            self.counters["esp_peer_resets"] = self.counters.get("esp_peer_resets", 0) + 1

    async def _reconcile(self, vni: int, slot: Slot) -> None:
        """Make the FDB entry of ``slot`` what its claims say, whatever order they came in."""
        claims = self.claims.get(slot)
        winner = max(claims.values(), key=lambda c: (c.ltime, c.key)) if claims else None
        held = self.programmed.get(slot)
        if winner is None:
            self.claims.pop(slot, None)
            if held is not None:
                del self.programmed[slot]
                await self.daemon.program(RemovePeer(vni, slot[1]))
                self.counters["removed"] += 1
        elif winner != held:
            self.programmed[slot] = winner
            await self.daemon.program(AddPeer(vni, slot[1], winner.ip, winner.vtep, "gossip"))
            self.counters["programmed"] += 1

    def claim_rows(self) -> list[dict[str, object]]:
        """Every live claim, and whether it is the one the FDB holds (``/gossip/claims``)."""
        names = self.daemon.network_names
        return [
            {
                "network": names.get(slot[0], slot[0]),
                "mac": mac_to_str(slot[1]),
                "key": claim.key,
                "owner": claim.owner,
                "ltime": claim.ltime,
                "ip": str(claim.ip),
                "vtep": str(claim.vtep),
                "programmed": self.programmed.get(slot) == claim,
            }
            for slot, claims in sorted(self.claims.items())
            for claim in claims.values()
        ]

    def _forget_network(self, network: str) -> None:
        for slot in [s for s in self.claims if s[0] == network]:
            del self.claims[slot]
        for slot in [s for s in self.programmed if s[0] == network]:
            del self.programmed[slot]
        for key in [k for k in self.key_slots if k[0] == network]:
            del self.key_slots[key]
