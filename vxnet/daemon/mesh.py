"""The routing mesh's plumbing on one node: docker_gwbridge, the ingress sandbox, published ports.

Docker's picture, kept here:

* Every container on a swarm network gets one more interface on the node's ``docker_gwbridge``
  (a kernel bridge, ICC off, masquerade on), and its default route goes there: that is how a
  task reaches anything outside the swarm.
* Every node has an **ingress sandbox** (``ingress-sbox``): a namespace with ``eth0`` on the
  ``ingress`` overlay (its address is the node's load-balancer address there) and ``eth1`` on
  docker_gwbridge.  A published port ``P`` (mode ingress) is a DNAT in the host, ``:P`` -> the
  sandbox's gwbridge address, then one in the sandbox, ``:P`` -> the service's ingress VIP; the
  dataplane's load balancer picks a task anywhere in the swarm, maps ``P`` to the target port and
  SNATs to the sandbox's ingress address, so the reply comes back the same way.  Any node
  answers, whether or not it runs a task.
* ``mode=host`` publishing, and ``vxnet run -p`` for a standalone container, are one DNAT on
  the node that runs it, to the container's gwbridge address.

All kernel work is in :mod:`vxnet.daemon.gwbridge` (blocking, called from threads); this class
keeps the node's state and rewrites the nftables tables whenever it changes.  It does nothing
unless the daemon lives in a namespace of its own (a lab host): it never touches the machine's.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from vxnet import netns
from vxnet.daemon import containers as ctr
from vxnet.daemon import gwbridge
from vxnet.daemon.localnets import GWBRIDGE
from vxnet.dataplane.tables import AddPort, NetworkSpec, RemovePort, endpoint_mac
from vxnet.errors import Conflict, UsageError, VxnetError

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon

log = logging.getLogger("vxnet.mesh")

INGRESS_SANDBOX = "ingress-sbox"
#: (protocol, published port, target port): what `-p 8080:80/udp` says.
PortSpec = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Bridge:
    name: str  # the kernel bridge (com.docker.network.bridge.name)
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    icc: bool
    masquerade: bool
    mtu: int

    @classmethod
    def from_object(cls, item: dict[str, Any]) -> Bridge:
        """docker_gwbridge as `network create -d bridge` (or the swarm) made it."""
        opts = item.get("Options", {})
        config = item["IPAM"]["Config"][0]
        return cls(
            opts.get("com.docker.network.bridge.name", GWBRIDGE)[:15],
            ipaddress.IPv4Network(config["Subnet"]),
            ipaddress.IPv4Address(config["Gateway"]),
            opts.get("com.docker.network.bridge.enable_icc", "false") == "true",
            opts.get("com.docker.network.bridge.enable_ip_masquerade", "true") == "true",
            int(opts.get("com.docker.network.driver.mtu", "1500")),
        )


@dataclass(frozen=True, slots=True)
class Sandbox:
    network: str  # the ingress network's name
    ip: ipaddress.IPv4Address  # on ingress: the node's load-balancer address there


def parse_publish(spec: str) -> PortSpec:
    """``8080:80``, ``8080:80/udp``, ``8080:80/sctp`` for `vxnet run -p`."""
    ports, _, proto = spec.partition("/")
    published, sep, target = ports.partition(":")
    proto = proto or "tcp"
    try:
        pair = (int(published), int(target)) if sep else (0, 0)
    except ValueError:
        pair = (0, 0)
    if proto not in gwbridge.PROTOCOLS or not all(1 <= p <= 65535 for p in pair):
        raise UsageError(f"invalid publish {spec!r}: use HOST:CONTAINER[/tcp|udp|sctp]")
    return proto, pair[0], pair[1]


class Mesh:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.bridge: Bridge | None = None  # set while the node is in a swarm
        self.gw_ips: dict[str, ipaddress.IPv4Address] = {}  # container -> gwbridge address
        self.veths: dict[str, str] = {}  # container -> host side of its gwbridge veth
        self.sandbox: Sandbox | None = None
        self.ingress: dict[tuple[str, int], ipaddress.IPv4Address] = {}  # (proto, P) -> VIP
        self.published: dict[str, list[PortSpec]] = {}  # container -> host/standalone ports
        self.rules_error = ""  # why the last rules could not be applied ("" when they were)
        self._lock = trio.Lock()

    @property
    def host_ns(self) -> str | None:
        return self.daemon.config.netns

    @property
    def enabled(self) -> bool:
        return self.bridge is not None

    # ------------------------------------------------------------------- the bridge

    async def enable(self) -> None:
        """The node entered a swarm (or restarted in one): bring docker_gwbridge up."""
        if self.host_ns is None:
            log.warning("daemon in the root namespace: docker_gwbridge is not built")
            return
        bridge = Bridge.from_object(self.daemon.localnets.ensure_gwbridge())
        await trio.to_thread.run_sync(
            gwbridge.ensure_bridge,
            self.host_ns,
            bridge.name,
            bridge.subnet,
            bridge.gateway,
            bridge.mtu,
        )
        self.bridge = bridge
        await self.apply_rules()

    async def disable(self) -> None:
        """The node left the swarm: the sandbox and the rules go, the bridge stays (as Docker)."""
        await self.remove_sandbox()
        if self.host_ns is not None and self.bridge is not None:
            await trio.to_thread.run_sync(gwbridge.remove_rules, self.host_ns)
        self.bridge = None
        self.ingress.clear()

    def _free_ip(self) -> ipaddress.IPv4Address:
        assert self.bridge is not None
        used = set(self.gw_ips.values()) | {self.bridge.gateway}
        for ip in self.bridge.subnet.hosts():
            if ip not in used:
                return ip
        raise Conflict(f"{GWBRIDGE} {self.bridge.subnet} has no free address")

    async def attach(self, container: ctr.Container) -> None:
        """Give ``container`` its docker_gwbridge interface and default route."""
        bridge, host_ns = self.bridge, self.host_ns
        if bridge is None or host_ns is None or container.name in self.gw_ips:
            return
        ip = self._free_ip()
        self.gw_ips[container.name] = ip  # taken before the thread runs: no double booking
        try:
            veth = await trio.to_thread.run_sync(
                lambda: gwbridge.attach(
                    host_ns,
                    bridge.name,
                    container.netns,
                    f"eth{len(container.endpoints)}",
                    ip,
                    bridge.subnet.prefixlen,
                    bridge.gateway,
                    icc=bridge.icc,
                    mtu=bridge.mtu,
                )
            )
        except BaseException:
            del self.gw_ips[container.name]
            raise
        self.veths[container.name] = veth
        container.gateway_ip = str(ip)
        container.gateway_veth = veth

    def restore(self, c: ctr.Container) -> None:
        """A re-adopted container: its gwbridge link survived the restart; remember it."""
        if c.gateway_ip:
            self.gw_ips[c.name] = ipaddress.IPv4Address(c.gateway_ip)
            self.veths[c.name] = c.gateway_veth
        if c.publish:
            self.published[c.name] = list(c.publish)
        if c.sandbox and c.endpoints:
            self.sandbox = Sandbox(c.endpoints[0].network, ipaddress.IPv4Address(c.endpoints[0].ip))

    async def release(self, name: str) -> None:
        """A container went away (its namespace, and so its veth end, is gone or going)."""
        self.gw_ips.pop(name, None)
        veth = self.veths.pop(name, None)
        if veth is not None and self.host_ns is not None:
            await trio.to_thread.run_sync(gwbridge.detach, self.host_ns, veth)
        if self.published.pop(name, None):
            await self.apply_rules()

    def check_free(self, ports: list[PortSpec]) -> None:
        """Refuse a host port this node already publishes (in Docker's words)."""
        taken = {(proto, port) for proto, port in self.ingress} | {
            (proto, port) for other in self.published.values() for proto, port, _ in other
        }
        for proto, port, _ in ports:
            if (proto, port) in taken:
                raise Conflict(f"Bind for 0.0.0.0:{port}/{proto} failed: port is already allocated")

    async def publish(self, name: str, ports: list[PortSpec]) -> None:
        """Host-mode or standalone published ports of a local container."""
        if not ports:
            return
        if name not in self.gw_ips:
            raise UsageError(
                f"cannot publish ports of {name}: publishing needs {GWBRIDGE}, which exists "
                "once this node is in a swarm"
            )
        self.check_free(ports)
        self.published[name] = list(ports)
        await self.apply_rules()

    # -------------------------------------------------------------- the ingress sandbox

    async def ensure_sandbox(self, spec: NetworkSpec, ip: ipaddress.IPv4Address) -> None:
        """The node's ingress sandbox on ``spec`` (the ingress network) with address ``ip``."""
        wanted = Sandbox(spec.name, ip)
        if self.sandbox == wanted or self.bridge is None:
            return
        await self.remove_sandbox()
        d = self.daemon
        ns, made = await trio.to_thread.run_sync(
            ctr.create_container, d.config.ns_prefix, INGRESS_SANDBOX, [(spec, ip)]
        )
        endpoint, fd = made[0]
        await d.program(
            AddPort(spec.vni, endpoint.port_id(INGRESS_SANDBOX), fd, endpoint_mac(ip), ip)
        )
        sandbox = ctr.Container(INGRESS_SANDBOX, [endpoint], ns, "(ingress sandbox)", [])
        sandbox.sandbox = True
        d.containers[INGRESS_SANDBOX] = sandbox
        self.sandbox = wanted
        try:
            await self.attach(sandbox)
            await trio.to_thread.run_sync(gwbridge.prepare_sandbox, ns)
        except BaseException:
            await self.remove_sandbox()
            raise
        d.persist()
        if d.peers is not None:
            await d.peers.endpoint_up(INGRESS_SANDBOX, endpoint, spec)
        await self.apply_rules()
        log.info("ingress sandbox %s on %s, %s on %s", ip, spec.name, self.gw_ips.get(
            INGRESS_SANDBOX), GWBRIDGE)  # fmt: skip

    async def remove_sandbox(self) -> None:
        d = self.daemon
        sandbox = d.containers.pop(INGRESS_SANDBOX, None)
        self.sandbox = None
        if sandbox is None:
            return
        for endpoint in sandbox.endpoints:
            if d.peers is not None:
                await d.peers.endpoint_down(INGRESS_SANDBOX, endpoint)
            await d.program(RemovePort(endpoint.port_id(INGRESS_SANDBOX)))
        await self.release(INGRESS_SANDBOX)
        await trio.to_thread.run_sync(netns.remove, sandbox.netns)
        d.persist()

    async def set_ingress(self, ports: dict[tuple[str, int], ipaddress.IPv4Address]) -> None:
        """Every service's ingress ports in the swarm, (protocol, published) -> ingress VIP."""
        if ports != self.ingress:
            self.ingress = dict(ports)
            await self.apply_rules()

    # ------------------------------------------------------------------------ rules

    def host_rules(self) -> gwbridge.HostRules | None:
        if self.bridge is None:
            return None
        publish = []
        sandbox_gw = self.gw_ips.get(INGRESS_SANDBOX)
        if sandbox_gw is not None:
            publish += [
                gwbridge.Dnat(proto, port, sandbox_gw, port)  # type: ignore[arg-type]
                for proto, port in self.ingress
            ]
        for name, ports in self.published.items():
            ip = self.gw_ips.get(name)
            if ip is not None:
                publish += [
                    gwbridge.Dnat(proto, port, ip, target)  # type: ignore[arg-type]
                    for proto, port, target in ports
                ]
        return gwbridge.HostRules(self.bridge.name, self.bridge.subnet, self.bridge.masquerade,
                                  publish)  # fmt: skip

    def sandbox_rules(self) -> gwbridge.SandboxRules:
        return gwbridge.SandboxRules(
            [
                gwbridge.Dnat(proto, port, vip, port)  # type: ignore[arg-type]
                for (proto, port), vip in self.ingress.items()
            ]
        )

    async def apply_rules(self) -> None:
        """Rewrite the host's (and the sandbox's) nftables table from the current state.

        A conflict (one port published twice on this node) or an nft failure is logged and kept
        in ``rules_error``; the previous rules stay in force (each table is one transaction).
        """
        host_ns = self.host_ns
        rules = self.host_rules()
        if host_ns is None or rules is None:
            return
        async with self._lock:
            try:
                await trio.to_thread.run_sync(gwbridge.apply_host_rules, host_ns, rules)
                sandbox = self.daemon.containers.get(INGRESS_SANDBOX)
                if sandbox is not None:
                    await trio.to_thread.run_sync(
                        gwbridge.apply_sandbox_rules, sandbox.netns, self.sandbox_rules()
                    )
                self.rules_error = ""
            except VxnetError as exc:
                self.rules_error = str(exc)
                log.warning("published ports not applied: %s", exc)

    def to_json(self) -> dict[str, Any]:
        return {
            "bridge": None if self.bridge is None else {
                "name": self.bridge.name, "subnet": str(self.bridge.subnet),
                "gateway": str(self.bridge.gateway), "icc": self.bridge.icc,
                "masquerade": self.bridge.masquerade,
            },
            "containers": {name: str(ip) for name, ip in self.gw_ips.items()},
            "ingress_sandbox": None if self.sandbox is None else {
                "network": self.sandbox.network, "ip": str(self.sandbox.ip),
                "gwbridge_ip": str(self.gw_ips.get(INGRESS_SANDBOX, "")),
            },
            "ingress_ports": [
                {"protocol": proto, "published": port, "vip": str(vip)}
                for (proto, port), vip in sorted(self.ingress.items())
            ],
            "published": {name: [list(p) for p in ports] for name, ports in self.published.items()},
            "rules_error": self.rules_error,
        }  # fmt: skip
