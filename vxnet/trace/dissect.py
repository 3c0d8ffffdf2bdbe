"""``describe(frame, context)``: one captured frame as the layers a learner reads.

scapy reads the standard headers (Ethernet, 802.1Q, ARP, IPv4, IPv6, ICMP, UDP, TCP, VXLAN),
one header at a time: each function here hands scapy the bytes that start at its header, reads
the fields, and cuts the payload itself from the header's own length fields, so nothing depends
on which of scapy's port bindings happen to be loaded.  What only vxnet knows (ESP with the
swarm's keys, gossip, networkdb) and DNS (dnspython) are in :mod:`vxnet.trace.payloads`.

Untrusted input has one way out: every reader raises :class:`~vxnet.errors.BadPacket`, and
:func:`describe` turns it into a last ``undecodable: reason`` layer.  scapy is GPL and optional;
this module is only imported by ``vxnet trace``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet as ScapyPacket

from vxnet.errors import BadPacket
from vxnet.trace import payloads
from vxnet.trace.context import DNS_PORT, GOSSIP_PORT, MANAGER_PORT, TraceContext
from vxnet.trace.layers import Layer, Ref, undecodable

ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q"}
IP_PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 50: "ESP (encrypted)", 58: "ICMPv6"}
PORT_NAMES = {
    GOSSIP_PORT: "gossip",
    MANAGER_PORT: "swarm manager, mutual TLS",
    DNS_PORT: "DNS",
    80: "HTTP",
}
HTTP_STARTS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"HTTP/1.")
MAX_DEPTH = 6  # VXLAN in ESP in VXLAN ... a real frame needs 2

Out = list[Layer]
T = TypeVar("T")


def describe(frame: bytes, context: TraceContext) -> list[Layer]:
    """The layers of an Ethernet frame, outermost first; never raises for any bytes."""
    out: Out = []
    _nested(_ethernet, bytes(frame), context, 0, out)
    return out


def _nested(
    reader: Callable[[bytes, TraceContext, int, Out], None],
    data: bytes,
    ctx: TraceContext,
    depth: int,
    out: Out,
) -> None:
    """Run a reader; what it cannot decode becomes a line at its depth."""
    if depth > MAX_DEPTH:
        out.append(undecodable("nested_too_deep", depth))
        return
    try:
        reader(data, ctx, depth, out)
    except BadPacket as exc:
        reason = f"{exc.reason} ({exc.detail})" if exc.detail else exc.reason
        out.append(undecodable(reason, depth))


def _scapy_untrusted(
    cls: type[ScapyPacket], data: bytes, need: int, read: Callable[[ScapyPacket], T]
) -> T:
    """``read(cls(data))``: scapy's dissection of one header and the fields wanted from it.

    scapy raises many exception types on odd input (struct.error, ValueError, IndexError, an
    AttributeError for a field a surprise subclass lacks, ...): this boundary, around both the
    dissection and the reads, folds them all into one BadPacket."""
    name = cls.__name__.lower()
    if len(data) < need:
        raise BadPacket(f"{name}_truncated", f"{len(data)} bytes, need {need}")
    try:
        return read(cls(data))
    except Exception as exc:
        raise BadPacket(f"{name}_undissectable", type(exc).__name__) from None


def _named(value: str, label: str | None) -> str:
    return f"{value} ({label})" if label else value


# ---------------------------------------------------------------------------- link layer


def _ethernet(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    src, dst = _scapy_untrusted(Ether, data, 14, lambda p: (str(p.src), str(p.dst)))
    etype = int.from_bytes(data[12:14], "big")
    refs = ctx.mac_refs(src) + ctx.mac_refs(dst)
    if etype < 0x0600:  # IEEE 802.3: a length, not an EtherType
        kind = f"802.3 frame, length {etype} (LLC, not Ethernet II)"
    else:
        kind = ETHERTYPES.get(etype, f"type 0x{etype:04x}")
    text = f"{_named(src, ctx.mac_label(src))} -> {_named(dst, ctx.mac_label(dst))}  {kind}"
    out.append(Layer("eth", text, depth, refs, {"src": src, "dst": dst, "type": etype}))
    payload = data[14:]
    if etype == 0x8100:
        vlan, etype = _scapy_untrusted(Dot1Q, payload, 4, lambda p: (int(p.vlan), int(p.type)))
        out.append(Layer("vlan", f"VLAN {vlan}", depth, fields={"vlan": vlan}))
        payload = payload[4:]
    _ethertype(etype, payload, ctx, depth, out)


def _ethertype(etype: int, data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    if etype == 0x0806:
        _arp(data, ctx, depth, out)
    elif etype == 0x0800:
        _ipv4(data, ctx, depth, out)
    elif etype == 0x86DD:
        _ipv6(data, ctx, depth, out)


def _arp(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    op, psrc, pdst, hwsrc = _scapy_untrusted(
        ARP, data, 28, lambda p: (int(p.op), str(p.psrc), str(p.pdst), str(p.hwsrc))
    )
    asker = _named(psrc, ctx.ip_label(psrc))
    if op == 1:
        text = f"who has {_named(pdst, ctx.ip_label(pdst))}? tell {asker}"
    elif op == 2:
        text = f"{asker} is at {hwsrc}"
    else:
        text = f"op {op} {psrc} -> {pdst}"
    refs = ctx.ip_refs(psrc) + ctx.ip_refs(pdst)
    out.append(Layer("arp", text, depth, refs, {"op": op, "psrc": psrc, "pdst": pdst}))


# ---------------------------------------------------------------------------- network layer


def _ipv4(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    f = _scapy_untrusted(IP, data, 20, _ipv4_fields)
    ihl, total, proto, ttl = f["ihl"] * 4, f["len"], f["proto"], f["ttl"]
    if ihl < 20 or total < ihl or total > len(data):
        raise BadPacket("ipv4_bad_length", f"header {ihl}, total {total}, have {len(data)}")
    src, dst = f["src"], f["dst"]
    offset, more = f["frag"] * 8, bool(f["flags"] & 1)
    text = (
        f"{_named(src, ctx.ip_label(src))} -> {_named(dst, ctx.ip_label(dst))}  "
        f"ttl {ttl}  {IP_PROTOS.get(proto, f'protocol {proto}')}"
    )
    if offset or more:
        text += f"  fragment at {offset}{', more follow' if more else ''}"
    refs = ctx.ip_refs(src) + ctx.ip_refs(dst)
    fields = {"src": src, "dst": dst, "proto": proto, "ttl": ttl}
    out.append(Layer("ipv4", text, depth, refs, fields))
    out.extend(_lb_notes(src, dst, ctx, depth))
    if offset:
        return  # a later fragment carries no transport header
    _transport(proto, data[ihl:total], src, dst, ctx, depth, out)


def _ipv4_fields(p: ScapyPacket) -> dict[str, Any]:
    ints = {k: int(getattr(p, k)) for k in ("ihl", "len", "proto", "ttl", "frag", "flags")}
    return {**ints, "src": str(p.src), "dst": str(p.dst)}


def _ipv6(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    nh, plen, hlim, src, dst, icmp_name = _scapy_untrusted(IPv6, data, 40, _ipv6_fields)
    if 40 + plen > len(data):
        raise BadPacket("ipv6_bad_length", f"payload {plen}, have {len(data) - 40}")
    text = (
        f"{_named(src, ctx.ip_label(src))} -> {_named(dst, ctx.ip_label(dst))}  "
        f"hop limit {hlim}  {IP_PROTOS.get(nh, f'next header {nh}')}"
    )
    out.append(Layer("ipv6", text, depth, ctx.ip_refs(src) + ctx.ip_refs(dst)))
    if nh == 58:
        name = icmp_name.removeprefix("ICMPv6 Neighbor Discovery - ")
        out.append(Layer("icmpv6", name, depth, fields={"type": data[40] if plen else -1}))
        return
    _transport(nh, data[40 : 40 + plen], src, dst, ctx, depth, out)


def _ipv6_fields(p: ScapyPacket) -> tuple[int, int, int, str, str, str]:
    name = str(p.payload.name)
    return int(p.nh), int(p.plen), int(p.hlim), str(p.src), str(p.dst), name


def _lb_notes(src: str, dst: str, ctx: TraceContext, depth: int) -> list[Layer]:
    """What the load balancer does, or did, to a packet to or from a VIP or an LB address."""
    notes = []
    to, frm = ctx.by_ip.get(dst), ctx.by_ip.get(src)
    if to is not None and to.kind == "vip":
        node = frm.host if frm is not None and frm.host else "the sender's node"
        lb = ctx.lb_address(node, to.network) or "its load-balancer address"
        text = (
            f"VIP {dst} (service {to.name}) -> will be NATed by {node}'s load balancer: "
            f"DNAT to a task, SNAT to {lb}"
        )
        notes.append(Layer("lb", text, depth, to.refs(), {"vip": dst, "service": to.name}))
    if frm is not None and frm.kind == "vip":
        text = f"from VIP {src} (service {frm.name}): a reply, NAT already undone"
        notes.append(Layer("lb", text, depth, frm.refs(), {"vip": src, "service": frm.name}))
    if frm is not None and frm.kind == "lb":
        task = ctx.by_ip.get(dst)
        via = f" to {task.label}" if task is not None and task.kind != "lb" else ""
        text = (
            f"SNAT {src} = {frm.host}'s load-balancer address on {frm.network}: a client on "
            f"{frm.host} reached a VIP, the load balancer sent it{via}"
        )
        notes.append(Layer("lb", text, depth, frm.refs(), {"snat": src, "host": frm.host}))
    if to is not None and to.kind == "lb":
        text = (
            f"to {dst} = {to.host}'s load-balancer address on {to.network}: a task's reply; "
            f"{to.host} undoes the NAT and hands it to the client from the VIP"
        )
        notes.append(Layer("lb", text, depth, to.refs(), {"snat": dst, "host": to.host}))
    return notes


# ---------------------------------------------------------------------------- transport


def _transport(
    proto: int, data: bytes, src: str, dst: str, ctx: TraceContext, depth: int, out: Out
) -> None:
    if proto == 17:
        _udp(data, ctx, depth, out)
    elif proto == 6:
        _tcp(data, ctx, depth, out)
    elif proto == 1:
        _icmp(data, depth, out)
    elif proto == 50:
        _esp(data, src, dst, ctx, depth, out)


def _icmp(data: bytes, depth: int, out: Out) -> None:
    kind, code, text, ident, seq, code_name = _scapy_untrusted(ICMP, data, 8, _icmp_fields)
    if kind in (0, 8):
        text += f"  id {ident} seq {seq}"
    elif code:
        text += f" ({code_name})"
    out.append(Layer("icmp", text, depth, fields={"type": kind, "code": code}))


def _icmp_fields(p: ScapyPacket) -> tuple[int, int, str, int, int, str]:
    names = str(p.sprintf("%ICMP.type%")), str(p.sprintf("%ICMP.code%"))
    return int(p.type), int(p.code), names[0], int(p.id), int(p.seq), names[1]


def _ports(sport: int, dport: int, vxlan_port: int) -> str:
    names = {**PORT_NAMES, vxlan_port: "VXLAN"}
    name = names.get(dport) or names.get(sport)
    return f"{sport} -> {dport}" + (f" ({name})" if name else "")


def _udp(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    sport, dport, length = _scapy_untrusted(
        UDP, data, 8, lambda p: (int(p.sport), int(p.dport), int(p.len))
    )
    if length < 8 or length > len(data):
        raise BadPacket("udp_bad_length", f"{length}, have {len(data)}")
    text = f"{_ports(sport, dport, ctx.vxlan_port)}  length {length}"
    out.append(Layer("udp", text, depth, fields={"sport": sport, "dport": dport}))
    payload = data[8:length]
    if dport == ctx.vxlan_port:
        _vxlan(payload, ctx, depth, out)
    elif GOSSIP_PORT in (sport, dport):
        out.extend(payloads.gossip_udp_untrusted(payload, ctx, depth))
    elif DNS_PORT in (sport, dport):
        out.extend(payloads.dns_untrusted(payload, ctx, depth))


def _tcp(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    sport, dport, offset, flags, seq, ack = _scapy_untrusted(TCP, data, 20, _tcp_fields)
    if offset < 20 or offset > len(data):
        raise BadPacket("tcp_bad_offset", f"{offset}, have {len(data)}")
    payload = data[offset:]
    text = (
        f"{_ports(sport, dport, ctx.vxlan_port)}  [{flags}] seq {seq}"
        + (f" ack {ack}" if "A" in flags else "")
        + f"  {len(payload)} bytes"
    )
    out.append(Layer("tcp", text, depth, fields={"sport": sport, "dport": dport, "flags": flags}))
    if not payload:
        return
    if GOSSIP_PORT in (sport, dport):
        out.extend(payloads.gossip_stream_untrusted(payload, ctx, depth))
    elif DNS_PORT in (sport, dport) and len(payload) > 2:
        out.extend(payloads.dns_untrusted(payload[2 : 2 + int.from_bytes(payload[:2])], ctx, depth))
    elif payload.startswith(HTTP_STARTS):
        line = payload.split(b"\r\n", 1)[0][:80].decode("ascii", "replace")
        out.append(Layer("http", line, depth))


def _tcp_fields(p: ScapyPacket) -> tuple[int, int, int, str, int, int]:
    return int(p.sport), int(p.dport), int(p.dataofs) * 4, str(p.flags), int(p.seq), int(p.ack)


# ---------------------------------------------------------------------------- overlay


def _vxlan(data: bytes, ctx: TraceContext, depth: int, out: Out) -> None:
    vni = _scapy_untrusted(VXLAN, data, 8, lambda p: int(p.vni))
    flags = data[0]
    name = ctx.network_name(vni)
    net = ctx.networks.get(vni)
    i_flag = "I: VNI valid" if flags & 0x08 else "I flag clear: a VTEP drops this"
    text = f"flags 0x{flags:02x} ({i_flag})  VNI {vni}" + (
        f" = network {name}" if name else " (no network in this lab)"
    )
    if net is not None and net.encrypted:
        text += ", an encrypted network"
    refs: tuple[Ref, ...] = (("network", name),) if name else ()
    out.append(Layer("vxlan", text, depth, refs, {"flags": flags, "vni": vni, "network": name}))
    _nested(_ethernet, data[8:], ctx, depth + 1, out)


def _esp(data: bytes, src: str, dst: str, ctx: TraceContext, depth: int, out: Out) -> None:
    info = payloads.esp_untrusted(data, src, dst, ctx)
    out.append(payloads.esp_layer(info, src, dst, ctx, depth))
    if info.plaintext is None:
        return
    if info.next_header == 17:
        _nested(_udp, info.plaintext, ctx, depth + 1, out)
    else:
        text = f"next header {info.next_header}, {len(info.plaintext)} bytes"
        out.append(Layer("data", text, depth + 1))
