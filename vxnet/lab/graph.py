"""``vxnet lab graph``: a picture of the live lab, drawn from what the daemons say.

:func:`collect` asks every daemon (containers, networks, FDB) and the manager (swarm networks,
services, nodes) and builds a :class:`LabGraph`; the renderers are pure functions of that model:
:func:`to_text`, :func:`to_mermaid` (paste into a Markdown file) and :func:`to_dot` (Graphviz).

Which hosts *peer* on a network is read from each host's FDB: h1 peers with h2 on ``front`` when
h1's FDB has entries of ``front`` that point at h2's VTEP.  Gossip programs these in a swarm, so
the picture shows what the dataplane will really do, not what the manager intended.  A VTEP
that is no host of the lab (a kernel VXLAN device) appears as an external VTEP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vxnet.client import DaemonClient, DaemonUnavailable
from vxnet.lab import Lab

API_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class GraphContainer:
    name: str
    endpoints: tuple[tuple[str, str], ...]  # (network, IP): a task may be on ingress too
    service: str | None = None  # the service this container is a task of

    @property
    def addresses(self) -> str:
        return ", ".join(f"{net} {ip}" for net, ip in self.endpoints)


@dataclass(frozen=True, slots=True)
class GraphHost:
    name: str
    address: str  # underlay (--advertise-addr: 2377, 7946)
    data_address: str  # VTEP (--data-path-addr: VXLAN, ESP)
    role: str = ""  # "manager", "worker", "" without a swarm; ", down" when it does not answer
    containers: tuple[GraphContainer, ...] = ()


@dataclass(frozen=True, slots=True)
class GraphNetwork:
    name: str
    vni: int
    subnet: str
    mtu: int
    encrypted: bool = False
    ingress: bool = False


@dataclass(frozen=True, slots=True)
class Peering:
    """``host``'s FDB has ``entries`` entries of ``network`` pointing at ``vtep``."""

    host: str
    network: str
    vtep: str  # a host of the lab, or the address of a VTEP outside it
    entries: int


@dataclass(frozen=True, slots=True)
class GraphService:
    name: str
    mode: str  # replicated, global
    endpoint_mode: str  # vip, dnsrr
    running: int
    desired: int
    vips: tuple[tuple[str, str], ...] = ()  # (network, VIP)
    ports: tuple[str, ...] = ()  # "8080->80/tcp"


@dataclass(frozen=True, slots=True)
class LabGraph:
    lab: str
    hosts: tuple[GraphHost, ...]
    networks: tuple[GraphNetwork, ...]
    peerings: tuple[Peering, ...] = ()
    services: tuple[GraphService, ...] = ()

    @property
    def external_vteps(self) -> list[str]:
        hosts = {h.name for h in self.hosts}
        return sorted({p.vtep for p in self.peerings if p.vtep not in hosts})


@dataclass(frozen=True, slots=True)
class Link:
    """Two VTEPs that peer on a network; ``both``: each has entries for the other."""

    network: str
    a: str
    b: str
    both: bool


def links(graph: LabGraph) -> list[Link]:
    """The peerings folded into one link per (network, pair of VTEPs), sorted."""
    pairs = {(p.network, p.host, p.vtep) for p in graph.peerings}
    out = []
    for net, a, b in sorted(pairs):
        back = (net, b, a) in pairs
        if back and b < a:
            continue  # already folded into (net, b, a)
        out.append(Link(net, a, b, back))
    return out


# ---------------------------------------------------------------------------- collect


def collect(lab: Lab) -> LabGraph:
    """Ask the daemons of ``lab`` (each call bounded by :data:`API_TIMEOUT`)."""

    def client(host: str) -> DaemonClient:
        return lab.client(host, timeout=API_TIMEOUT)

    by_vtep = {lab.data_address(h): h for h in lab.hosts} | {
        lab.host_address(h): h for h in lab.hosts
    }
    manager = client(lab.state["swarm"]["manager"]) if lab.swarm else None
    swarm_nets = manager.get("/swarm/networks") if manager else []
    roles = (
        {n["hostname"]: (n["role"], n["status"]) for n in manager.get("/nodes")} if manager else {}
    )
    hosts, peerings, networks = [], [], {n["name"]: _network(n) for n in swarm_nets}
    for name in lab.hosts:
        role, status = roles.get(name, ("", ""))
        try:
            containers = client(name).get("/containers")
            fdb = client(name).get("/fdb")
            for n in client(name).get("/networks"):
                networks.setdefault(n["name"], _network(n))
        except DaemonUnavailable:
            containers, fdb, status = [], [], "down"
        role = ", ".join(x for x in (role, "down" if status == "down" else "") if x)
        hosts.append(GraphHost(name, lab.host_address(name), lab.data_address(name), role,
                               tuple(_container(c) for c in containers)))  # fmt: skip
        counts: dict[tuple[str, str], int] = {}
        for row in fdb:
            key = (row["network"], by_vtep.get(row["vtep"], row["vtep"]))
            counts[key] = counts.get(key, 0) + 1
        peerings += [Peering(name, net, vtep, n) for (net, vtep), n in sorted(counts.items())]
    if not lab.swarm:
        for n in lab.state["networks"]:
            networks.setdefault(n["name"], _network(n))
    net_names = {n["id"]: n["name"] for n in swarm_nets}
    services = [_service(s, net_names) for s in manager.get("/services")] if manager else []
    return LabGraph(lab.name, tuple(hosts), tuple(sorted(networks.values(), key=lambda n: n.vni)),
                    tuple(peerings), tuple(services))  # fmt: skip


def _network(n: dict[str, Any]) -> GraphNetwork:
    return GraphNetwork(n["name"], int(n["vni"]), str(n["subnet"]), int(n["mtu"]),
                        bool(n.get("encrypted")), bool(n.get("ingress")))  # fmt: skip


def _container(c: dict[str, Any]) -> GraphContainer:
    svc = c.get("service") or {}
    endpoints = tuple((e["network"], e["ip"]) for e in c["endpoints"])
    return GraphContainer(c["name"], endpoints, svc.get("service_name"))


def _service(s: dict[str, Any], net_names: dict[str, str]) -> GraphService:
    vips = tuple(sorted((net_names.get(k, k), v) for k, v in s["vips"].items()))
    ports = tuple(f"{p['published']}->{p['target']}/{p['protocol']}" for p in s["ports"])
    return GraphService(s["name"], s["mode"], s["endpoint_mode"], int(s["running"]),
                        int(s["desired"]), vips, ports)  # fmt: skip


# ------------------------------------------------------------------------------- text


def _net_line(n: GraphNetwork) -> str:
    tags = [t for t, on in (("encrypted", n.encrypted), ("ingress", n.ingress)) if on]
    return f"VNI {n.vni}  {n.subnet}  MTU {n.mtu}" + (f"  ({', '.join(tags)})" if tags else "")


def _host_line(h: GraphHost) -> str:
    data = f", data {h.data_address}" if h.data_address != h.address else ""
    return f"{h.address}{data}" + (f"  [{h.role}]" if h.role else "")


def _service_line(s: GraphService) -> str:
    vips = ", ".join(f"VIP {vip} on {net}" for net, vip in s.vips) or "no VIP"
    if s.endpoint_mode != "vip":
        vips = f"{s.endpoint_mode} ({vips})"
    ports = f", published {' '.join(s.ports)}" if s.ports else ""
    return f"{s.mode} {s.running}/{s.desired}, {vips}{ports}"


def to_text(graph: LabGraph) -> str:
    out = [f"lab {graph.lab}"]
    width = max([len(n.name) for n in graph.networks] + [4])
    out.append("networks:")
    out += [f"  {n.name.ljust(width)}  {_net_line(n)}" for n in graph.networks]
    out.append("hosts:")
    for h in graph.hosts:
        out.append(f"  {h.name}  {_host_line(h)}")
        cw = max([len(c.name) for c in h.containers] + [1])
        for c in h.containers:
            task = f"  (task of {c.service})" if c.service else ""
            out.append(f"    {c.name.ljust(cw)}  {c.addresses}{task}")
        if not h.containers:
            out.append("    (no containers)")
    out.append("peers (from each host's FDB):")
    for link in links(graph):
        arrow = "<->" if link.both else "->"
        out.append(f"  {link.network.ljust(width)}  {link.a} {arrow} {link.b}")
    if not graph.peerings:
        out.append("  (none: no host has an FDB entry yet)")
    out += [f"  {v}: a VTEP outside the lab" for v in graph.external_vteps]
    if graph.services:
        out.append("services:")
        out += [f"  {s.name}  {_service_line(s)}" for s in graph.services]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- mermaid


def _ident(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]", "_", p) for p in parts)


def _mq(text: str) -> str:
    """A Mermaid label: quoted, with its own quotes escaped."""
    return '"' + text.replace('"', "#quot;") + '"'


def _nodes(graph: LabGraph) -> Iterator[tuple[str, GraphHost, GraphContainer]]:
    for h in graph.hosts:
        for c in h.containers:
            yield _ident("c", h.name, c.name), h, c


def _vtep_id(graph: LabGraph, vtep: str) -> str:
    hosts = {h.name for h in graph.hosts}
    return _ident("h", vtep) if vtep in hosts else _ident("x", vtep)


def to_mermaid(graph: LabGraph) -> str:
    out = ["flowchart LR"]
    for h in graph.hosts:
        out.append(f"  subgraph {_ident('h', h.name)}[{_mq(f'{h.name} {_host_line(h)}')}]")
        out += [f"    {cid}[{_mq(c.name + '<br/>' + c.addresses)}]" for cid, hh, c in _nodes(graph)
                if hh is h]  # fmt: skip
        if not h.containers:  # an empty subgraph would not be drawn as a box
            out.append(f"    {_ident('e', h.name)}[{_mq('no containers')}]")
        out.append("  end")
    for v in graph.external_vteps:
        out.append(f"  {_ident('x', v)}[/{_mq(f'VTEP {v}, outside the lab')}/]")
    for n in graph.networks:
        out.append(f"  {_ident('n', n.name)}{{{{{_mq(f'{n.name}<br/>{_net_line(n)}')}}}}}")
    out += [
        f"  {cid} --- {_ident('n', net)}" for cid, _, c in _nodes(graph) for net, _ in c.endpoints
    ]
    for link in links(graph):
        arrow = "<-->" if link.both else "-->"
        a, b = _vtep_id(graph, link.a), _vtep_id(graph, link.b)
        out.append(f"  {a} {arrow}|{_mq(link.network)}| {b}")
    for s in graph.services:
        sid = _ident("s", s.name)
        out.append(f"  {sid}([{_mq(f'service {s.name}<br/>{_service_line(s)}')}])")
        out += [f"  {sid} -.- {cid}" for cid, _, c in _nodes(graph) if c.service == s.name]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------- dot


NL = "\n"  # a line break inside a Graphviz label (escaped by _dq)


def _dq(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace(NL, "\\n") + '"'


def to_dot(graph: LabGraph) -> str:
    out = [f"digraph {_dq(graph.lab)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for h in graph.hosts:
        out.append(f"  subgraph {_dq('cluster_' + h.name)} {{")
        out.append(f"    label={_dq(h.name)};")
        out.append(f"    {_dq('host:' + h.name)} [shape=box3d, label={_dq(_host_line(h))}];")
        for cid, hh, c in _nodes(graph):
            if hh is h:
                label = _dq(NL.join([c.name] + [ip for _, ip in c.endpoints]))
                out.append(f"    {_dq(cid)} [label={label}];")
        out.append("  }")
    for v in graph.external_vteps:
        out.append(f"  {_dq('host:' + v)} [shape=box3d, style=dashed, label={_dq('VTEP ' + v)}];")
    for n in graph.networks:
        label = _dq(n.name + NL + _net_line(n))
        out.append(f"  {_dq('net:' + n.name)} [shape=hexagon, label={label}];")
    for cid, _, c in _nodes(graph):
        for net, _ in c.endpoints:
            out.append(f"  {_dq(cid)} -> {_dq('net:' + net)} [dir=none];")
    for link in links(graph):
        ends = f"{_dq('host:' + link.a)} -> {_dq('host:' + link.b)}"
        out.append(
            f"  {ends} [label={_dq(link.network)}, dir={'both' if link.both else 'forward'}];"
        )
    for s in graph.services:
        sid = _dq("svc:" + s.name)
        label = _dq(f"service {s.name}" + NL + _service_line(s))
        out.append(f"  {sid} [shape=ellipse, label={label}];")
        out += [f"  {sid} -> {_dq(cid)} [style=dashed];" for cid, _, c in _nodes(graph)
                if c.service == s.name]  # fmt: skip
    out.append("}")
    return "\n".join(out) + "\n"


RENDERERS: dict[str, Callable[[LabGraph], str]] = {
    "text": to_text,
    "mermaid": to_mermaid,
    "dot": to_dot,
}
