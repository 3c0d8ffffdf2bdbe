from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet, Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire import ipv6 as v6
from vxnet.wire.ipv6 import (
    EXT_AH,
    EXT_DEST_OPTS,
    EXT_FRAGMENT,
    EXT_HOP_BY_HOP,
    EXT_ROUTING,
    EXTENSION_HEADERS,
    decode_ipv6_untrusted,
)

from .strategies import SCAPY, ipv6s, payloads, uint

# An extension header drawn for a test: its type, its bytes after the next-header byte, and
# a function building the same header as a scapy layer given its next-header value.
Spec = tuple[int, bytes, Callable[[int], Packet]]


@st.composite
def options_header(draw: st.DrawFn, kind: int) -> Spec:
    units = draw(st.integers(0, 3))
    data = draw(st.binary(min_size=8 * units + 4, max_size=8 * units + 4))
    layer = IPv6ExtHdrHopByHop if kind == EXT_HOP_BY_HOP else IPv6ExtHdrDestOpt
    body = bytes((units, 1, len(data))) + data
    return kind, body, lambda nh: layer(nh=nh, len=units, autopad=0, options=[PadN(optdata=data)])


@st.composite
def routing_header(draw: st.DrawFn) -> Spec:
    addresses = draw(st.lists(ipv6s, max_size=3))
    kind, segleft, reserved = draw(uint(8)), draw(uint(8)), draw(uint(32))
    body = struct.pack("!BBBI", 2 * len(addresses), kind, segleft, reserved)
    body += b"".join(a.packed for a in addresses)
    texts = [str(a) for a in addresses]
    return (
        EXT_ROUTING,
        body,
        lambda nh: IPv6ExtHdrRouting(
            nh=nh, type=kind, segleft=segleft, reserved=reserved, addresses=texts
        ),
    )


@st.composite
def fragment_header(draw: st.DrawFn) -> Spec:
    res1, offset, res2, more, ident = (draw(uint(b)) for b in (8, 13, 2, 1, 32))
    body = struct.pack("!BHI", res1, offset << 3 | res2 << 1 | more, ident)
    return (
        EXT_FRAGMENT,
        body,
        lambda nh: IPv6ExtHdrFragment(nh=nh, res1=res1, offset=offset, res2=res2, m=more, id=ident),
    )


@st.composite
def ah_header(draw: st.DrawFn) -> Spec:
    icv = draw(
        st.integers(0, 2).flatmap(lambda j: st.binary(min_size=4 + 8 * j, max_size=4 + 8 * j))
    )
    reserved, spi, seq = draw(uint(16)), draw(uint(32)), draw(uint(32))
    plen = (12 + len(icv)) // 4 - 2
    body = struct.pack("!BHII", plen, reserved, spi, seq) + icv
    return (
        EXT_AH,
        body,
        lambda nh: AH(nh=nh, payloadlen=plen, reserved=reserved, spi=spi, seq=seq, icv=icv),
    )


ext_specs = st.one_of(
    options_header(EXT_HOP_BY_HOP),
    options_header(EXT_DEST_OPTS),
    routing_header(),
    fragment_header(),
    ah_header(),
)
upper_types = uint(8).filter(lambda t: t not in EXTENSION_HEADERS)


@st.composite
def packets_with_specs(draw: st.DrawFn) -> tuple[v6.IPv6, list[Spec]]:
    specs = draw(st.lists(ext_specs, max_size=4))
    upper = draw(upper_types)
    chain = [kind for kind, _, _ in specs] + [upper]
    extensions = tuple(
        (kind, bytes((chain[i + 1],)) + body) for i, (kind, body, _) in enumerate(specs)
    )
    packet = v6.IPv6(
        draw(ipv6s),
        draw(ipv6s),
        upper,
        draw(payloads),
        hop_limit=draw(uint(8)),
        traffic_class=draw(uint(8)),
        flow_label=draw(uint(20)),
        extensions=extensions,
    )
    return packet, specs


packets = packets_with_specs().map(lambda pair: pair[0])

SRC, DST = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
# Hop-by-hop (PadN 4) then a fragment header (offset 0, M=1, id 5), then 8 bytes of UDP.
VECTOR = bytes.fromhex(
    "6000 0000 0018 00 40 20010db8000000000000000000000001 20010db8000000000000000000000002"
    "2c00 0104 00000000"
    "1100 0001 00000005"
    "1234 5678 0008 0000"
)


def test_known_chain() -> None:
    packet = decode_ipv6_untrusted(VECTOR + b"\x00\x00")  # trailing padding dropped
    assert packet == v6.IPv6(
        SRC,
        DST,
        17,
        bytes.fromhex("1234 5678 0008 0000"),
        extensions=(
            (EXT_HOP_BY_HOP, bytes.fromhex("2c00 0104 00000000")),
            (EXT_FRAGMENT, bytes.fromhex("1100 0001 00000005")),
        ),
    )
    assert packet.encode() == VECTOR


def test_encode_rechains_extensions() -> None:
    stale = ((EXT_DEST_OPTS, bytes(8)), (EXT_FRAGMENT, bytes(8)))
    raw = v6.IPv6(SRC, DST, 6, b"", extensions=stale).encode()
    assert raw[6] == EXT_DEST_OPTS and raw[40] == EXT_FRAGMENT and raw[48] == 6


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (VECTOR[:39], "ipv6_truncated"),
        (b"\x40" + VECTOR[1:], "ipv6_bad_version"),
        (VECTOR[:-1], "ipv6_bad_payload_length"),
        (VECTOR[:5] + b"\x04" + VECTOR[6:], "ipv6_ext_truncated"),
        (VECTOR[:5] + b"\x01" + VECTOR[6:], "ipv6_ext_truncated"),
        (VECTOR[:5] + b"\x0c" + VECTOR[6:], "ipv6_ext_truncated"),
        (VECTOR[:41] + b"\x02" + VECTOR[42:], "ipv6_ext_truncated"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_ipv6_untrusted(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "changes",
    [
        {"flow_label": 1 << 20},
        {"next_header": 256},
        {"extensions": ((17, bytes(8)),)},
        {"extensions": ((EXT_ROUTING, bytes(7)),)},
        {"extensions": ((EXT_ROUTING, b"\x00\x01" + bytes(6)),)},
        {"extensions": ((EXT_AH, bytes(12)),)},
        {"extensions": ((EXT_FRAGMENT, b"\x00"),)},
        {"payload": bytes(65536)},
        {"dst": "::1"},
    ],
)
def test_encode_rejects_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        replace(v6.IPv6(SRC, DST, 59, b""), **changes).encode()  # type: ignore[arg-type]


@given(packets)
def test_round_trip(packet: v6.IPv6) -> None:
    assert decode_ipv6_untrusted(packet.encode()) == packet


@SCAPY
@given(packets_with_specs())
def test_matches_scapy(pair: tuple[v6.IPv6, list[Spec]]) -> None:
    packet, specs = pair
    chain = [kind for kind, _, _ in specs] + [packet.next_header]
    built: Packet = IPv6(
        src=str(packet.src),
        dst=str(packet.dst),
        nh=chain[0],
        hlim=packet.hop_limit,
        tc=packet.traffic_class,
        fl=packet.flow_label,
    )
    for i, (_, _, make) in enumerate(specs):
        built = built / make(chain[i + 1])
    raw = bytes(built / Raw(packet.payload))
    assert packet.encode() == raw
    assert decode_ipv6_untrusted(raw) == packet
