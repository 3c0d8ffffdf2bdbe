"""Payloads only vxnet knows how to read: ESP with the swarm's keys, memberlist and networkdb
gossip, and DNS (with dnspython).  Each ``*_untrusted`` function returns layers or raises
:class:`~vxnet.errors.BadPacket`; the dissector turns that into an ``undecodable`` line.

No scapy here: ESP is opened by vxnet's own :class:`~vxnet.esp.sa.SecurityAssociation` and
gossip by :mod:`vxnet.gossip.packet`, the very code the dataplane and the daemon run.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import msgpack

from vxnet.dns.records import decode_endpoint_record_untrusted
from vxnet.errors import BadPacket
from vxnet.esp.sa import DEFAULT_ICV_LEN, DOCKER_ICV_LEN, SecurityAssociation
from vxnet.esp.spi import derive_spi, salt_for_spi
from vxnet.gossip import messages as m
from vxnet.gossip.networkdb import (
    MAGIC,
    as_map,
    decode_peer_record_untrusted,
    list_field,
    str_field,
)
from vxnet.gossip.packet import (
    Keyring,
    StreamReader,
    decode_packet_detailed_untrusted,
)
from vxnet.trace.context import Key, TraceContext
from vxnet.trace.layers import Layer, Ref

# ----------------------------------------------------------------------------------- ESP

ESP_HEADER = struct.Struct("!II")
#: (ICV length, ESN) in the order tried: vxnet's default first, then Docker's exact kernel SA.
SA_SHAPES = (
    (DEFAULT_ICV_LEN, True),
    (DOCKER_ICV_LEN, True),
    (DEFAULT_ICV_LEN, False),
    (DOCKER_ICV_LEN, False),
)


@dataclass(frozen=True, slots=True)
class EspInfo:
    spi: int
    seq: int
    key: Key | None  # the key whose SPI this is, if any
    plaintext: bytes | None = None  # set when decrypted
    next_header: int = 0
    icv_len: int = 0
    error: str = ""  # why decryption failed


def esp_untrusted(payload: bytes, src: str, dst: str, ctx: TraceContext) -> EspInfo:
    """Name an ESP packet's SA by its SPI (Docker's FNV-1a of src, tag, dst) and, when the
    context says so, decrypt it with a fresh SA (no replay state: one packet, one answer).

    Raises only for a packet too short to have an SPI; a failed decryption is in ``error``."""
    if len(payload) < ESP_HEADER.size:
        raise BadPacket("esp_truncated", f"{len(payload)} bytes, need 8")
    spi, seq = ESP_HEADER.unpack_from(payload)
    src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    key = next((k for k in ctx.ipsec_keys if derive_spi(src_ip, dst_ip, k.tag) == spi), None)
    if key is None or not ctx.decrypt_esp:
        return EspInfo(spi, seq, key)
    reason = "esp_auth_failed"
    for icv_len, esn in SA_SHAPES:
        sa = SecurityAssociation(spi, key.key, salt_for_spi(spi), icv_len=icv_len, esn=esn)
        try:
            next_header, plain = sa.decrypt_untrusted(payload)
        except BadPacket as exc:
            reason = exc.reason
            if reason != "esp_auth_failed":
                break
            continue
        return EspInfo(spi, seq, key, plain, next_header, icv_len)
    return EspInfo(spi, seq, key, error=reason)


def esp_layer(info: EspInfo, src: str, dst: str, ctx: TraceContext, depth: int) -> Layer:
    head = f"SPI 0x{info.spi:08x} seq {info.seq}"
    refs: list[Ref] = []
    if info.key is None:
        text = f"{head}: no swarm key gives this SPI for {src} -> {dst}"
    else:
        a, b = ctx.hosts.get(src, src), ctx.hosts.get(dst, dst)
        refs = [("host", a), ("host", b)]
        primary = ", the primary" if info.key.primary else ""
        text = f"{head} = {a} -> {b}, key tag {info.key.tag}{primary}"
        if info.error:
            text += f"; could not decrypt: {info.error}"
        elif info.plaintext is None:
            text += "; payload encrypted (add --decrypt to open it)"
        else:
            text += f"; decrypted (AES-GCM, ICV {info.icv_len} bytes)"
    fields: dict[str, Any] = {"spi": info.spi, "seq": info.seq}
    if info.key is not None:
        fields["tag"] = info.key.tag
    fields["decrypted"] = info.plaintext is not None
    return Layer("esp", text, depth, tuple(refs), fields)


# ------------------------------------------------------------------------------- gossip


def gossip_udp_untrusted(payload: bytes, ctx: TraceContext, depth: int) -> list[Layer]:
    """A memberlist datagram: decrypted with the first gossip key that opens it, then each
    message of its compound (ping, ack, suspect, alive, ...; networkdb inside user messages)."""
    key, decoded = _open_datagram_untrusted(payload, ctx.gossip_keys)
    how = _how(key, len(payload))
    count = len(decoded.messages)
    noun = "message" if count == 1 else "messages"
    layers = [Layer("gossip", f"memberlist packet, {how}: {count} {noun}", depth)]
    for reason in decoded.dropped:
        layers.append(Layer("gossip", f"a compound part was dropped: {reason}", depth + 1))
    for raw in decoded.messages:
        layers += _message_layers(raw, ctx, depth + 1)
    return layers


def _open_datagram_untrusted(payload: bytes, keys: tuple[Key, ...]) -> tuple[Key | None, Any]:
    if not keys:
        return None, decode_packet_detailed_untrusted(
            payload, keyring=None, require_encryption=False
        )
    last = BadPacket("no_installed_key_decrypts")
    for key in keys:
        try:
            return key, decode_packet_detailed_untrusted(
                payload, keyring=Keyring([key.key]), require_encryption=True
            )
        except BadPacket as exc:
            last = exc
            if exc.reason != "no_installed_key_decrypts":
                break
    raise BadPacket(last.reason, "with the swarm's networking:gossip keys")


def gossip_stream_untrusted(payload: bytes, ctx: TraceContext, depth: int) -> list[Layer]:
    """The start of a memberlist TCP stream (push/pull, a TCP ping, a networkdb bulk sync).

    trace does not reassemble TCP: a message is decoded when it starts and ends in this
    segment; a segment from the middle of a stream is reported as such."""
    key, message = _open_stream_untrusted(payload, ctx.gossip_keys)
    if message is None:
        raise BadPacket("gossip_stream_continues", "the message goes on in later segments")
    layers = [Layer("gossip", f"memberlist stream message, {_how(key, len(payload))}", depth)]
    return layers + _message_layers(message, ctx, depth + 1)


def _open_stream_untrusted(payload: bytes, keys: tuple[Key, ...]) -> tuple[Key | None, Any]:
    if not keys:
        return None, StreamReader().feed_untrusted(payload)
    last = BadPacket("no_installed_key_decrypts")
    for key in keys:
        reader = StreamReader(keyring=Keyring([key.key]), require_encryption=True)
        try:
            return key, reader.feed_untrusted(payload)
        except BadPacket as exc:
            if exc.reason != "no_installed_key_decrypts":
                raise
            last = exc
    raise last


def _how(key: Key | None, size: int) -> str:
    if key is None:
        return f"{size} bytes, not encrypted"
    primary = ", the primary" if key.primary else ""
    return f"{size} bytes, decrypted with networking:gossip key tag {key.tag}{primary}"


def _message_layers(raw: bytes, ctx: TraceContext, depth: int) -> list[Layer]:
    try:
        msg = m.decode_message_untrusted(raw)
    except BadPacket as exc:
        return [Layer("gossip", f"undecodable message: {exc.reason}", depth)]
    if isinstance(msg, m.User):
        return networkdb_layers(msg.payload, ctx, depth)
    if isinstance(msg, m.PushPull):
        return _push_pull_layers(msg, ctx, depth)
    text, names = _describe_message(msg, ctx)
    refs = tuple(("host", ctx.members[n]) for n in names if n in ctx.members)
    kind = m.message_type(msg).name.lower()
    return [Layer("gossip", text, depth, refs, {"type": kind})]


def _describe_message(msg: m.Message, ctx: TraceContext) -> tuple[str, list[str]]:
    """One line for a SWIM message, and the member names it mentions."""
    who = ctx.member
    if isinstance(msg, m.Ping):
        src = f" from {who(msg.source_node)}" if msg.source_node else ""
        return f"ping seq {msg.seq_no} to {who(msg.node)}{src}", [msg.node, msg.source_node]
    if isinstance(msg, m.IndirectPing):
        target = _addr(msg.target, msg.port)
        text = f"indirect ping seq {msg.seq_no}: please ping {who(msg.node)} at {target}"
        if msg.source_node:
            text += f" for {who(msg.source_node)}"
        return text, [msg.node, msg.source_node]
    if isinstance(msg, m.Ack):
        return f"ack seq {msg.seq_no}", []
    if isinstance(msg, m.Nack):
        return f"nack seq {msg.seq_no} (the target did not answer the indirect ping)", []
    if isinstance(msg, m.Suspect):
        text = f"suspect {who(msg.node)} incarnation {msg.incarnation}, says {who(msg.from_)}"
        return text, [msg.node, msg.from_]
    if isinstance(msg, m.Dead):
        if msg.node == msg.from_:
            return f"leave: {who(msg.node)} leaves (incarnation {msg.incarnation})", [msg.node]
        text = f"dead {who(msg.node)} incarnation {msg.incarnation}, says {who(msg.from_)}"
        return text, [msg.node, msg.from_]
    if isinstance(msg, m.Alive):
        text = f"alive {who(msg.node)} at {_addr(msg.addr, msg.port)} incarnation {msg.incarnation}"
        return text, [msg.node]
    if isinstance(msg, m.Err):
        return f"error: {msg.error}", []
    return type(msg).__name__, []  # pragma: no cover - every message type is handled above


def _push_pull_layers(msg: m.PushPull, ctx: TraceContext, depth: int) -> list[Layer]:
    join = " (join)" if msg.join else ""
    head = f"push/pull{join}: full state of {len(msg.nodes)} member(s)"
    layers = [Layer("gossip", head, depth, fields={"type": "push_pull"})]
    for n in msg.nodes:
        text = (
            f"{ctx.member(n.name)} at {_addr(n.addr, n.port)}: {n.state.name.lower()}, "
            f"incarnation {n.incarnation}"
        )
        refs = (("host", ctx.members[n.name]),) if n.name in ctx.members else ()
        layers.append(Layer("gossip", text, depth + 1, refs))
    if msg.user_state:
        layers += networkdb_layers(msg.user_state, ctx, depth + 1)
    return layers


def _addr(raw: bytes, port: int) -> str:
    try:
        return f"{ipaddress.ip_address(raw)}:{port}"
    except ValueError:
        return f"{raw.hex()}:{port}"


# ---------------------------------------------------------------------------- networkdb


def networkdb_layers(payload: bytes, ctx: TraceContext, depth: int) -> list[Layer]:
    """A memberlist user message: vxnet's networkdb (``vxdb1`` + msgpack) or opaque bytes."""
    if not payload.startswith(MAGIC):
        return [Layer("gossip", f"user message, {len(payload)} bytes (not networkdb)", depth)]
    try:
        msg = _networkdb_untrusted(payload)
        return _networkdb_message(msg, ctx, depth)
    except BadPacket as exc:
        return [Layer("networkdb", f"undecodable: {exc.reason}", depth)]


def _networkdb_untrusted(payload: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(payload[len(MAGIC) :], raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise BadPacket("networkdb_not_msgpack") from None
    return as_map(msg)


def _networkdb_message(msg: dict[str, Any], ctx: TraceContext, depth: int) -> list[Layer]:
    kind = msg.get("t")
    if kind == "net":
        net = ctx.network_of_id(str_field(msg, "net"))
        node = str_field(msg, "node")
        verb = "leaves" if msg.get("k") == "leave" else "joins"
        text = f"{ctx.member(node)} {verb} network {net} (Lamport {msg.get('l')})"
        return [Layer("networkdb", text, depth, (("network", net), *_host(ctx, node)))]
    if kind == "batch":
        events = list_field(msg, "m")
        layers = [Layer("networkdb", f"{len(events)} table event(s)", depth)]
        return layers + [_table_event(as_map(e), ctx, depth + 1) for e in events]
    if kind == "bulk":
        net = ctx.network_of_id(str_field(msg, "net"))
        entries = list_field(msg, "e")
        reply = "reply to a " if msg.get("resp") else ""
        text = (
            f"{reply}bulk sync of network {net} from {ctx.member(str_field(msg, 'from'))}: "
            f"{len(entries)} entries, {len(list_field(msg, 'nodes'))} node(s)"
        )
        layers = [Layer("networkdb", text, depth, (("network", net),))]
        return layers + [_table_event(as_map(e), ctx, depth + 1) for e in entries]
    if kind == "state":
        nets = as_map(msg.get("nets", {}))
        names = ", ".join(f"{ctx.network_of_id(str(n))} ({len(v)} nodes)" for n, v in nets.items())
        return [Layer("networkdb", f"network attachments: {names or 'none'}", depth)]
    raise BadPacket("networkdb_unknown_message", str(kind))


def _table_event(ev: dict[str, Any], ctx: TraceContext, depth: int) -> Layer:
    net = ctx.network_of_id(str_field(ev, "net"))
    table, owner = str_field(ev, "tbl"), str_field(ev, "node")
    value = ev.get("v")
    what = _table_value(table, value, ctx) if isinstance(value, bytes) and value else ""
    text = f"{ev.get('k', '?')} {table} on {net} by {ctx.member(owner)}"
    refs: tuple[Ref, ...] = (("network", net), *_host(ctx, owner))
    return Layer("networkdb", f"{text}: {what}" if what else text, depth, refs)


def _table_value(table: str, value: bytes, ctx: TraceContext) -> str:
    try:
        if table == "overlay_peer_table":
            peer = decode_peer_record_untrusted(value)
            vtep = peer.tunnel_endpoint_ip
            host = f" ({ctx.hosts[vtep]})" if vtep in ctx.hosts else ""
            return f"{peer.endpoint_ip} {peer.endpoint_mac} behind VTEP {vtep}{host}"
        if table == "endpoint_table":
            rec = decode_endpoint_record_untrusted(value)
            svc = f" of service {rec.service_name}" if rec.service_name else ""
            vip = f", VIP {rec.virtual_ip}" if rec.virtual_ip else ""
            return f"{rec.name}{svc} at {rec.endpoint_ip}{vip}"
    except BadPacket as exc:
        return f"value undecodable ({exc.reason})"
    return f"{len(value)} bytes"


def _host(ctx: TraceContext, member: str) -> tuple[Ref, ...]:
    return (("host", ctx.members[member]),) if member in ctx.members else ()


# ----------------------------------------------------------------------------------- DNS


def dns_untrusted(payload: bytes, ctx: TraceContext, depth: int) -> list[Layer]:
    """A DNS query or answer, read by dnspython; answers name the containers and VIPs."""
    msg = _dns_parse_untrusted(payload)
    questions = ", ".join(
        f"{dns.rdatatype.to_text(q.rdtype)} {q.name.to_text(omit_final_dot=True)}"
        for q in msg.question
    )
    if not msg.flags & dns.flags.QR:
        text = f"query id 0x{msg.id:04x}: {questions or 'no question'}?"
        return [Layer("dns", text, depth, fields={"id": msg.id, "query": questions})]
    rcode = dns.rcode.to_text(msg.rcode())
    aa = ", authoritative" if msg.flags & dns.flags.AA else ""
    head = f"answer id 0x{msg.id:04x} {rcode}{aa}: {questions}"
    layers = [Layer("dns", head, depth, fields={"id": msg.id, "rcode": rcode})]
    for rrset in msg.answer:
        for rdata in rrset:
            value = rdata.to_text()
            name = ctx.ip_label(value)
            refs = ctx.ip_refs(value)
            shown = f"{value} ({name})" if name else value
            text = (
                f"{rrset.name.to_text(omit_final_dot=True)} {dns.rdatatype.to_text(rrset.rdtype)}"
            )
            layers.append(Layer("dns", f"{text} {shown}  ttl {rrset.ttl}", depth + 1, refs))
    return layers


def _dns_parse_untrusted(data: bytes) -> dns.message.Message:
    """dnspython's parse, its many exceptions folded into :class:`BadPacket`."""
    try:
        return dns.message.from_wire(data)
    except dns.exception.DNSException as exc:
        raise BadPacket("dns_" + type(exc).__name__.lower()) from None
    except (ValueError, UnicodeError, IndexError, struct.error) as exc:
        raise BadPacket("dns_unparsable", type(exc).__name__) from None
