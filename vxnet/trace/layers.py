"""The dissector's output: :class:`Layer` records, filters over them, and two renderers.

A packet is a list of layers, outermost first.  Each layer says what it is (``proto``), how deep
it is nested (``depth``: 0 on the wire, +1 inside VXLAN, ESP or gossip), one line for a learner
(``text``), the names it mentions (``refs``: network, host, container, service), and a few facts
for machines (``fields``).  Renderers turn packets into indented text or JSON; filters decide
from the layers alone.  No scapy here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Ref = tuple[str, str]  # ("network", "app"), ("host", "h1"), ("container", "c1"), ...

#: The column a layer's name takes in text output.
LABELS = {
    "eth": "Ethernet",
    "vlan": "802.1Q",
    "arp": "ARP",
    "ipv4": "IPv4",
    "ipv6": "IPv6",
    "icmp": "ICMP",
    "icmpv6": "ICMPv6",
    "udp": "UDP",
    "tcp": "TCP",
    "vxlan": "VXLAN",
    "esp": "ESP",
    "gossip": "gossip",
    "networkdb": "networkdb",
    "dns": "DNS",
    "lb": "LB",
    "http": "HTTP",
    "data": "data",
    "undecodable": "!",
}
LABEL_WIDTH = 9

#: What each ``--proto`` choice matches.
PROTO_CHOICES = {
    "vxlan": {"vxlan"},
    "esp": {"esp"},
    "gossip": {"gossip", "networkdb"},
    "dns": {"dns"},
    "arp": {"arp"},
    "icmp": {"icmp", "icmpv6"},
    "tcp": {"tcp"},
    "udp": {"udp"},
}


@dataclass(frozen=True, slots=True)
class Layer:
    proto: str
    text: str
    depth: int = 0
    refs: tuple[Ref, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        refs: dict[str, list[str]] = {}
        for kind, name in self.refs:
            if name not in refs.setdefault(kind, []):
                refs[kind].append(name)
        out: dict[str, Any] = {"proto": self.proto, "depth": self.depth, "text": self.text}
        if refs:
            out["refs"] = refs
        if self.fields:
            out["fields"] = self.fields
        return out


def undecodable(reason: str, depth: int = 0) -> Layer:
    """What a bad or truncated header becomes: a line, never a traceback."""
    return Layer("undecodable", f"undecodable: {reason}", depth, fields={"reason": reason})


# ------------------------------------------------------------------------------ filters


@dataclass(frozen=True, slots=True)
class TraceFilter:
    """Keep a packet when it matches every criterion given (an empty one matches all)."""

    networks: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    containers: frozenset[str] = frozenset()
    protos: frozenset[str] = frozenset()

    def matches(self, layers: Sequence[Layer]) -> bool:
        refs = {ref for layer in layers for ref in layer.refs}
        for kind, wanted in (
            ("network", self.networks),
            ("host", self.hosts),
            ("container", self.containers),
        ):
            if wanted and not any((kind, name) in refs for name in wanted):
                return False
        if self.protos:
            seen = {layer.proto for layer in layers}
            if not any(PROTO_CHOICES.get(p, {p}) & seen for p in self.protos):
                return False
        return True


# ------------------------------------------------------------------------------ rendering


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured frame and what the dissector made of it."""

    number: int
    time: float  # seconds since the capture started
    interface: str
    direction: str  # "in", "out" or "" (unknown)
    length: int
    layers: tuple[Layer, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "time": round(self.time, 6),
            "interface": self.interface,
            "direction": self.direction,
            "length": self.length,
            "layers": [layer.to_json() for layer in self.layers],
        }


def render_text(packet: Packet, where: str = "") -> list[str]:
    """A header line, then one indented line per layer."""
    place = where or packet.interface
    arrow = {"in": " (in)", "out": " (out)"}.get(packet.direction, "")
    lines = [f"#{packet.number}  {packet.time:.3f}s  {place}{arrow}  {packet.length} bytes"]
    lines += render_layers(packet.layers, indent="  ")
    return lines


def render_layers(layers: Iterable[Layer], indent: str = "") -> list[str]:
    return [
        f"{indent}{'  ' * layer.depth}{LABELS.get(layer.proto, layer.proto):<{LABEL_WIDTH}} "
        f"{layer.text}".rstrip()
        for layer in layers
    ]


def render_json(packet: Packet) -> str:
    """One line of JSON per packet (JSON Lines), so a pipe can read them as they come."""
    return json.dumps(packet.to_json(), separators=(",", ":"))
