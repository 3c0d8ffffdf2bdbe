"""What ``vxnet trace`` knows about a lab, gathered once before the first packet.

A :class:`TraceContext` is a plain, frozen record: the dissector only reads it, so a test can
build one by hand (:meth:`TraceContext.build`) and a frame always gets the same description.
:func:`context_from_lab` fills it from the daemons' HTTP APIs: networks and VNIs, container and
load-balancer endpoints, VIPs, the hosts' underlay addresses, gossip member names and the swarm's
keys (``/swarm/keys?show=1``).  No scapy here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pyroute2 import NetlinkError

from vxnet import netns
from vxnet.errors import VxnetError

GOSSIP_PORT = 7946
MANAGER_PORT = 2377
DNS_PORT = 53
DEFAULT_VXLAN_PORT = 4789

EndpointKind = Literal["container", "task", "lb", "sandbox", "vip"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address on an overlay: a container, a task, a node's load balancer, a sandbox or a VIP."""

    kind: EndpointKind
    name: str  # container/task name; for lb and sandbox the host; for a VIP the service
    network: str
    ip: str
    mac: str = ""
    host: str = ""
    service: str = ""

    @property
    def label(self) -> str:
        """How a learner reads this address: ``c1 on h1``, ``VIP of service web``, ..."""
        if self.kind == "vip":
            return f"VIP of service {self.name}"
        if self.kind == "lb":
            return f"{self.host}'s load-balancer address on {self.network}"
        if self.kind == "sandbox":
            return f"{self.host}'s ingress sandbox"
        where = f" on {self.host}" if self.host else ""
        if self.kind == "task":
            return f"{self.name}{where}, task of {self.service}"
        return f"{self.name}{where}"

    def refs(self) -> tuple[tuple[str, str], ...]:
        out = [("network", self.network)]
        if self.host:
            out.append(("host", self.host))
        if self.kind in ("container", "task"):
            out.append(("container", self.name))
        if self.service:
            out.append(("service", self.service))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    name: str
    vni: int
    subnet: str = ""
    encrypted: bool = False
    id: str = ""


@dataclass(frozen=True, slots=True)
class Key:
    """A swarm key: its tag (Lamport time) and bytes.  ``primary`` is the middle one by tag."""

    tag: int
    key: bytes
    primary: bool = False


@dataclass(frozen=True, slots=True)
class TraceContext:
    """Names and keys for :func:`vxnet.trace.dissect.describe`; every table may be empty."""

    networks: Mapping[int, NetworkInfo] = field(default_factory=dict)  # by VNI
    network_ids: Mapping[str, str] = field(default_factory=dict)  # swarm network id -> name
    by_mac: Mapping[str, Endpoint] = field(default_factory=dict)
    by_ip: Mapping[str, Endpoint] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)  # underlay address -> host
    host_macs: Mapping[str, str] = field(default_factory=dict)  # underlay MAC -> host
    members: Mapping[str, str] = field(default_factory=dict)  # gossip member name -> host
    gwbridge: Mapping[str, str] = field(default_factory=dict)  # docker_gwbridge address -> name
    ipsec_keys: tuple[Key, ...] = ()
    gossip_keys: tuple[Key, ...] = ()
    vxlan_port: int = DEFAULT_VXLAN_PORT
    decrypt_esp: bool = False

    @classmethod
    def build(
        cls,
        *,
        networks: Iterable[NetworkInfo] = (),
        endpoints: Iterable[Endpoint] = (),
        hosts: Mapping[str, str] | None = None,
        host_macs: Mapping[str, str] | None = None,
        members: Mapping[str, str] | None = None,
        gwbridge: Mapping[str, str] | None = None,
        ipsec_keys: Iterable[tuple[int, bytes]] = (),
        gossip_keys: Iterable[tuple[int, bytes]] = (),
        vxlan_port: int = DEFAULT_VXLAN_PORT,
        decrypt_esp: bool = False,
    ) -> TraceContext:
        """A context from plain records (what a test or :func:`context_from_lab` has)."""
        nets = {n.vni: n for n in networks}
        by_mac: dict[str, Endpoint] = {}
        by_ip: dict[str, Endpoint] = {}
        for ep in endpoints:
            if ep.mac:
                by_mac.setdefault(ep.mac.lower(), ep)
            by_ip.setdefault(ep.ip, ep)
        return cls(
            networks=nets,
            network_ids={n.id: n.name for n in nets.values() if n.id},
            by_mac=by_mac,
            by_ip=by_ip,
            hosts=dict(hosts or {}),
            host_macs={mac.lower(): h for mac, h in (host_macs or {}).items()},
            members=dict(members or {}),
            gwbridge=dict(gwbridge or {}),
            ipsec_keys=_ring(ipsec_keys),
            gossip_keys=_ring(gossip_keys),
            vxlan_port=vxlan_port,
            decrypt_esp=decrypt_esp,
        )

    # ------------------------------------------------------------------ lookups

    def network_name(self, vni: int) -> str | None:
        net = self.networks.get(vni)
        return net.name if net else None

    def network_of_id(self, ident: str) -> str:
        """A swarm network id as its name (the id itself when unknown)."""
        return self.network_ids.get(ident, ident)

    def member(self, name: str) -> str:
        """A gossip member name, with its host when known: ``ppfr...-9d9e (h1)``."""
        host = self.members.get(name)
        return f"{name} ({host})" if host else name

    def ip_label(self, ip: str) -> str | None:
        ep = self.by_ip.get(ip)
        if ep is not None:
            return ep.label
        if ip in self.hosts:
            return self.hosts[ip]
        if ip in self.gwbridge:
            return f"{self.gwbridge[ip]} on docker_gwbridge"
        return None

    def ip_refs(self, ip: str) -> tuple[tuple[str, str], ...]:
        ep = self.by_ip.get(ip)
        if ep is not None:
            return ep.refs()
        if ip in self.hosts:
            return (("host", self.hosts[ip]),)
        return ()

    def mac_label(self, mac: str) -> str | None:
        if mac == "ff:ff:ff:ff:ff:ff":
            return "broadcast"
        ep = self.by_mac.get(mac.lower())
        return ep.label if ep is not None else self.host_macs.get(mac.lower())

    def mac_refs(self, mac: str) -> tuple[tuple[str, str], ...]:
        ep = self.by_mac.get(mac.lower())
        if ep is not None:
            return ep.refs()
        host = self.host_macs.get(mac.lower())
        return (("host", host),) if host else ()

    def lb_address(self, host: str, network: str) -> str | None:
        """``host``'s load-balancer address on ``network`` (Docker's ``lb-<network>``)."""
        for ep in self.by_ip.values():
            if ep.kind == "lb" and ep.host == host and ep.network == network:
                return ep.ip
        return None


def _ring(keys: Iterable[tuple[int, bytes]]) -> tuple[Key, ...]:
    """Keys sorted by tag; the middle one is primary (Docker sends with ``keys[len // 2]``)."""
    ordered = sorted(keys)
    middle = len(ordered) // 2
    return tuple(Key(tag, key, i == middle) for i, (tag, key) in enumerate(ordered))


# ---------------------------------------------------------------------- from a lab


def context_from_lab(lab: Any, *, decrypt_esp: bool = False, local_host: str = "") -> TraceContext:
    """Ask every daemon of ``lab`` (a :class:`vxnet.lab.Lab`) what the names are.

    ``local_host``: the host whose docker_gwbridge addresses to name (each host has its own
    bridge with the same subnet, so they only mean something on one host).
    """
    state = lab.state
    hosts: dict[str, str] = {}
    for host, info in state["hosts"].items():
        hosts[str(info["address"])] = host
        if info.get("data_path_addr"):
            hosts[str(info["data_path_addr"])] = host
    networks = _networks(lab)
    by_id = {n.id: n.name for n in networks if n.id}
    endpoints: list[Endpoint] = []
    members: dict[str, str] = {}
    gwbridge: dict[str, str] = {}
    ipsec: dict[int, bytes] = {}
    gossip: dict[int, bytes] = {}
    for host in lab.hosts:
        client = lab.client(host)
        endpoints += _containers(host, client.get("/containers"))
        endpoints += _node_endpoints(host, _get(client, "/endpoints", []))
        for m in _get(client, "/gossip", {}).get("members", []):
            if str(m.get("addr")) in hosts:
                members[str(m["name"])] = hosts[str(m["addr"])]
        for k in _get(client, "/swarm/keys?show=1", []):
            ring = ipsec if k.get("subsystem") == "networking:ipsec" else gossip
            if k.get("key"):
                ring[int(k["lamport_time"])] = bytes.fromhex(str(k["key"]))
        if host == local_host:
            mesh = _get(client, "/mesh", {})
            gwbridge = {str(ip): str(name) for name, ip in mesh.get("containers", {}).items()}
    if lab.swarm:
        endpoints += _vips(_get(lab.manager, "/services", []), by_id)
    return TraceContext.build(
        networks=networks,
        endpoints=endpoints,
        hosts=hosts,
        host_macs=_underlay_macs(state),
        members=members,
        gwbridge=gwbridge,
        ipsec_keys=ipsec.items(),
        gossip_keys=gossip.items(),
        vxlan_port=int(state.get("data_port") or DEFAULT_VXLAN_PORT),
        decrypt_esp=decrypt_esp,
    )


def _get(client: Any, path: str, default: Any) -> Any:
    """An optional part of the API (a lab without a swarm has no keys and no gossip)."""
    try:
        return client.get(path)
    except VxnetError:
        return default


def _underlay_macs(state: dict[str, Any]) -> dict[str, str]:
    """Each host's underlay MAC(s), read from its namespace, so the fabric's frames say h1."""
    out: dict[str, str] = {}
    for host, info in state["hosts"].items():
        names = [str(info[k]) for k in ("underlay_if", "data_if") if info.get(k)]
        try:
            with netns.ipr(str(info["netns"])) as ip:
                for ifname in names:
                    for link in ip.get_links(*ip.link_lookup(ifname=ifname)):
                        out[str(link.get_attr("IFLA_ADDRESS"))] = host
        except (OSError, NetlinkError):
            continue  # a host that is down: its frames just show the bare MAC
    return out


def _networks(lab: Any) -> list[NetworkInfo]:
    found: dict[int, NetworkInfo] = {}
    if lab.swarm:
        for n in _get(lab.manager, "/swarm/networks", []):
            found[int(n["vni"])] = NetworkInfo(
                str(n["name"]), int(n["vni"]), str(n["subnet"]), bool(n["encrypted"]), str(n["id"])
            )
    for host in lab.hosts:
        for n in _get(lab.client(host), "/networks", []):
            vni = int(n["vni"])
            found.setdefault(vni, NetworkInfo(str(n["name"]), vni, str(n.get("subnet", ""))))
    for n in lab.state.get("networks", []):
        vni = int(n["vni"])
        found.setdefault(vni, NetworkInfo(str(n["name"]), vni, str(n.get("subnet", ""))))
    return list(found.values())


def _containers(host: str, rows: list[dict[str, Any]]) -> list[Endpoint]:
    out = []
    for c in rows:
        svc = c.get("service") or {}
        service = str(svc.get("service_name") or "")
        kind: EndpointKind = "task" if c.get("task_id") else "container"
        for e in c.get("endpoints", []):
            out.append(
                Endpoint(
                    kind,
                    str(c["name"]),
                    str(e["network"]),
                    str(e["ip"]),
                    str(e["mac"]),
                    host,
                    service,
                )
            )
    return out


def _node_endpoints(host: str, rows: list[dict[str, Any]]) -> list[Endpoint]:
    """A node's own endpoints: ``lb-<network>`` (its LB address) and the ingress sandbox."""
    out = []
    for e in rows:
        owner = str(e.get("owner", ""))
        if owner.startswith("lb-"):
            kind: EndpointKind = "lb"
        elif owner == "ingress-sbox":
            kind = "sandbox"
        else:
            continue
        out.append(Endpoint(kind, host, str(e["network"]), str(e["ip"]), str(e["mac"]), host))
    return out


def _vips(services: list[dict[str, Any]], by_id: Mapping[str, str]) -> list[Endpoint]:
    out = []
    for svc in services:
        for net_id, vip in (svc.get("vips") or {}).items():
            ip = str(vip).split("/")[0]
            out.append(
                Endpoint(
                    "vip",
                    str(svc["name"]),
                    by_id.get(net_id, net_id),
                    ip,
                    vip_mac(ip),
                    service=str(svc["name"]),
                )
            )
    return out


def vip_mac(ip: str) -> str:
    """Docker's endpoint MAC for an address, ``02:42`` + its four octets (a VIP's too)."""
    packed = ipaddress.IPv4Address(ip).packed
    return ":".join(f"{b:02x}" for b in b"\x02\x42" + packed)
