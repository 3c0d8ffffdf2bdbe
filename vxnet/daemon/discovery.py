"""Service discovery on one node: ``endpoint_table`` in and out, DNS, and the VIP backends.

Docker's model, which this follows: every container endpoint on a swarm network publishes an
``EndpointRecord{Name, ServiceName, ServiceID, VirtualIP, EndpointIP, Aliases, TaskAliases,
ServiceDisabled, IngressPorts}`` in networkdb's ``endpoint_table`` of that network.  Every node
attached to the network builds the same two things from the same records:

* the **directory** its embedded resolvers (127.0.0.11 in each local container) answer from;
* the **service bindings** of its load balancer: per VIP, the task addresses behind it (weight 0
  for a task that is stopping), and on ``ingress`` the published -> target port map.

A node also owns one load-balancer address per network (the manager's ``lb_addresses``): the
dataplane SNATs VIP traffic to it, and it is published in ``overlay_peer_table`` like an
endpoint so that backends on other nodes can answer it.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from vxnet.daemon.containers import Container, Endpoint
from vxnet.dataplane.tables import (
    Backend,
    PortMap,
    RemoveService,
    SetLoadBalancer,
    SetService,
    endpoint_mac,
)
from vxnet.dns.records import Directory, EndpointRecord, decode_endpoint_record_untrusted
from vxnet.dns.resolver import Resolver
from vxnet.dns.server import remove_resolv_conf, serve_resolver, write_resolv_conf
from vxnet.errors import BadPacket, VxnetError
from vxnet.gossip.networkdb import ENDPOINT_TABLE, TableEvent

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon
    from vxnet.gossip.service import GossipService

log = logging.getLogger("vxnet.discovery")

#: How long a stopping task stays a backend with weight 0 before it is killed: existing
#: connections finish, new ones go elsewhere (Docker: ServiceDisabled, then the stop).
DRAIN_SECONDS = 0.5


class Discovery:
    def __init__(self, daemon: Daemon, gossip: GossipService, node: str) -> None:
        self.daemon = daemon
        self.gossip = gossip
        self.node = node
        self.directory = Directory()
        self.resolver = Resolver(self.directory, random.Random())
        self.lb_addresses: dict[str, ipaddress.IPv4Address] = {}  # network name -> address
        self.programmed: dict[tuple[int, ipaddress.IPv4Address], SetService] = {}
        self.counters: dict[str, int] = {"bad_records": 0, "published": 0, "withdrawn": 0}
        self._resolvers: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the resolvers' tasks; publish what is already running (after a restart)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.set_lb_addresses(dict(self.daemon.lb_addresses))
            for c in list(self.daemon.containers.values()):
                await self.container_up(c)
            await trio.sleep_forever()

    # --------------------------------------------------------------- what we publish

    def _key(self, container: str, endpoint: Endpoint) -> str:
        return f"{self.node}/{container}/{endpoint.ifname}"

    def _record(self, c: Container, endpoint: Endpoint, disabled: bool) -> EndpointRecord | None:
        net_id = self.daemon.network_ids.get(endpoint.network)
        if net_id is None:
            return None
        svc = c.service or {}
        ingress = bool(self.daemon.swarm_ingress(endpoint.network))
        ports: tuple[tuple[str, int, int], ...] = ()
        if ingress:
            if not svc:
                return None  # only services are reachable through the routing mesh
            ports = tuple(
                (str(p["protocol"]), int(p["published"]), int(p["target"]))
                for p in svc.get("ports", [])
                if p.get("protocol") in ("tcp", "udp")
            )
        return EndpointRecord(
            name=c.name,
            service_name=str(svc.get("service_name", "")),
            service_id=str(svc.get("service_id", "")),
            virtual_ip=str(svc.get("vips", {}).get(net_id, "")),
            endpoint_ip=endpoint.ip,
            aliases=(),
            task_aliases=tuple(c.aliases),
            service_disabled=disabled,
            ingress_ports=ports,
        )

    async def container_up(self, c: Container, disabled: bool = False) -> None:
        """Publish ``c``'s records and serve its resolver (idempotent)."""
        if c.sandbox:
            return
        for endpoint in c.endpoints:
            record = self._record(c, endpoint, disabled)
            if record is None:
                continue
            key = self._key(c.name, endpoint)
            net_id = self.daemon.network_ids[endpoint.network]
            self.gossip.put(net_id, ENDPOINT_TABLE, key, record.encode())
            self.directory.put(endpoint.network, key, record)
            self.counters["published"] += 1
            await self._rebind(endpoint.network)
        if not disabled and c.name not in self._resolvers and self._nursery is not None:
            await self._nursery.start(self._serve_resolver, c)

    async def drain(self, c: Container) -> None:
        """Graceful stop, first half: weight 0 everywhere, out of DNS answers."""
        if c.service and not c.sandbox:
            await self.container_up(c, disabled=True)
            await trio.sleep(DRAIN_SECONDS)

    async def container_down(self, c: Container) -> None:
        scope = self._resolvers.pop(c.name, None)
        if scope is not None:
            scope.cancel()
        for endpoint in c.endpoints:
            net_id = self.daemon.network_ids.get(endpoint.network)
            if net_id is None:
                continue
            key = self._key(c.name, endpoint)
            if key in self.directory.records(endpoint.network):
                self.gossip.delete(net_id, ENDPOINT_TABLE, key)
                self.directory.delete(endpoint.network, key)
                self.counters["withdrawn"] += 1
                await self._rebind(endpoint.network)

    def networks_of(self, name: str) -> Sequence[str]:
        """The networks a container's questions are answered from (not ingress: Docker's
        ingress network has no service discovery)."""
        c = self.daemon.containers.get(name)
        if c is None:
            return ()
        return [e.network for e in c.endpoints if not self.daemon.swarm_ingress(e.network)]

    async def _serve_resolver(self, c: Container, *, task_status: Any) -> None:
        with trio.CancelScope() as scope:
            self._resolvers[c.name] = scope
            try:
                await trio.to_thread.run_sync(write_resolv_conf, c.netns)
                await serve_resolver(
                    c.netns, self.resolver, lambda: self.networks_of(c.name),
                    [(ip, 53) for ip in c.dns], task_status=task_status,
                )  # fmt: skip
            except (VxnetError, OSError) as exc:  # the namespace went away under us
                log.warning("resolver for %s stopped: %s", c.name, exc)
                task_status.started()
            finally:
                if self._resolvers.get(c.name) is scope:
                    del self._resolvers[c.name]
                await trio.to_thread.run_sync(remove_resolv_conf, c.netns)

    # ------------------------------------------------------------ what others publish

    async def on_table_event(self, event: TableEvent) -> None:
        if event.table != ENDPOINT_TABLE or event.owner == self.gossip.name:
            return
        network = self.daemon.network_names.get(event.network)
        if network is None:
            return
        if event.kind == "delete":
            self.directory.delete(network, event.key)
        else:
            try:
                record = decode_endpoint_record_untrusted(event.value)
            except BadPacket as exc:
                self.counters["bad_records"] += 1
                log.info("unusable endpoint record %s: %s", event.key, exc.reason)
                return
            self.directory.put(network, event.key, record)
        await self._rebind(network)

    # --------------------------------------------------------- the load balancer's view

    async def set_lb_addresses(self, addresses: dict[str, ipaddress.IPv4Address]) -> None:
        """This node's load-balancer address per network, from the manager's assignments."""
        d = self.daemon
        for network, ip in addresses.items():
            spec = d.networks.get(network)
            if spec is None or self.lb_addresses.get(network) == ip:
                continue
            await d.program(SetLoadBalancer(spec.vni, ip))
            self.lb_addresses[network] = ip
            if d.peers is not None and not d.swarm_ingress(network):  # ingress: the sandbox's
                lb = Endpoint(network, str(ip), endpoint_mac(ip).hex(":"), "lb")
                await d.peers.endpoint_up(f"lb-{network}", lb, spec)
            await self._rebind(network)
        for network in set(self.lb_addresses) - set(addresses):
            ip = self.lb_addresses.pop(network)
            if d.peers is not None and not d.swarm_ingress(network):
                lb = Endpoint(network, str(ip), endpoint_mac(ip).hex(":"), "lb")
                await d.peers.endpoint_down(f"lb-{network}", lb)

    def bindings(self, network: str) -> dict[ipaddress.IPv4Address, SetService]:
        """Every VIP of ``network`` with its backends, from the directory."""
        spec = self.daemon.networks.get(network)
        if spec is None:
            return {}
        ingress = bool(self.daemon.swarm_ingress(network))
        backends: dict[ipaddress.IPv4Address, dict[ipaddress.IPv4Address, int]] = {}
        ports: dict[ipaddress.IPv4Address, set[PortMap]] = {}
        for record in self.directory.records(network).values():
            if not record.virtual_ip:
                continue  # dnsrr, or a standalone container: no VIP
            vip = ipaddress.IPv4Address(record.virtual_ip)
            weight = 0 if record.service_disabled else 1
            ip = ipaddress.IPv4Address(record.endpoint_ip)
            backends.setdefault(vip, {})[ip] = max(weight, backends.get(vip, {}).get(ip, 0))
            if ingress:
                ports.setdefault(vip, set()).update(
                    PortMap(proto, published, target)  # type: ignore[arg-type]
                    for proto, published, target in record.ingress_ports
                )
        return {
            vip: SetService(
                spec.vni,
                vip,
                tuple(Backend(ip, w) for ip, w in sorted(members.items())),
                tuple(sorted(ports.get(vip, ()), key=lambda p: (p.protocol, p.published))),
            )
            for vip, members in backends.items()
        }

    async def _rebind(self, network: str) -> None:
        """Program what changed in ``network``'s VIPs; on ingress, the published ports too."""
        spec = self.daemon.networks.get(network)
        if spec is None or network not in self.lb_addresses:
            return  # no load balancer of ours there (yet)
        wanted = self.bindings(network)
        for vip, update in wanted.items():
            if self.programmed.get((spec.vni, vip)) != update:
                await self.daemon.program(update)
                self.programmed[(spec.vni, vip)] = update
        for vni, vip in [k for k in self.programmed if k[0] == spec.vni]:
            if vip not in wanted:
                await self.daemon.program(RemoveService(vni, vip))
                del self.programmed[(vni, vip)]
        if self.daemon.swarm_ingress(network):
            await self.daemon.mesh.set_ingress(
                {(p.protocol, p.published): vip for vip, u in wanted.items() for p in u.ports}
            )

    def forget_network(self, network: str, vni: int) -> None:
        """The network is gone from this node (the dataplane dropped its state with it)."""
        self.directory.drop_network(network)
        self.lb_addresses.pop(network, None)
        for key in [k for k in self.programmed if k[0] == vni]:
            del self.programmed[key]

    def to_json(self) -> dict[str, Any]:
        return {
            "lb_addresses": {n: str(ip) for n, ip in self.lb_addresses.items()},
            "services": [
                {
                    "vni": vni,
                    "vip": str(vip),
                    "backends": [[str(b.ip), b.weight] for b in u.backends],
                    "ports": [[p.protocol, p.published, p.target] for p in u.ports],
                }
                for (vni, vip), u in sorted(self.programmed.items())
            ],
            "resolvers": sorted(self._resolvers),
            "dns": dict(self.resolver.counters),
            "records": {n: len(self.directory.records(n)) for n in self.directory.networks()},
            **self.counters,
        }
