from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.packet import Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.checksum import internet_checksum
from vxnet.wire.ipv4 import IPPROTO_UDP, IPv4, decode_ipv4_untrusted

from .strategies import SCAPY, ipv4s, payloads, uint

options = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
packets = st.builds(
    IPv4,
    ipv4s,
    ipv4s,
    uint(8),
    payloads,
    ttl=uint(8),
    ident=uint(16),
    flags=uint(3),
    frag_offset=uint(13),
    tos=uint(8),
    options=options,
)

# A classic example header: 192.168.0.1 -> 192.168.0.199, UDP, DF, total length 0x73.
HEADER = bytes.fromhex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")
PAYLOAD = bytes(range(0x73 - 20))


def test_known_header() -> None:
    packet = decode_ipv4_untrusted(HEADER + PAYLOAD + b"\x00" * 6)  # Ethernet padding dropped
    assert packet == IPv4(
        IPv4Address("192.168.0.1"), IPv4Address("192.168.0.199"), IPPROTO_UDP, PAYLOAD
    )
    assert not packet.is_fragment
    assert packet.encode() == HEADER + PAYLOAD


def test_fragment_flags() -> None:
    packet = decode_ipv4_untrusted(HEADER + PAYLOAD)
    assert replace(packet, flags=1).is_fragment
    assert replace(packet, flags=0, frag_offset=3).is_fragment


def with_checksum(header: bytes) -> bytes:
    header = header[:10] + b"\x00\x00" + header[12:]
    return header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (HEADER[:19], "ipv4_truncated"),
        (with_checksum(b"\x65" + HEADER[1:]) + PAYLOAD, "ipv4_bad_version"),
        (with_checksum(b"\x44" + HEADER[1:]) + PAYLOAD, "ipv4_bad_ihl"),
        (with_checksum(b"\x4f" + HEADER[1:]) + PAYLOAD[:30], "ipv4_truncated"),
        (with_checksum(HEADER[:2] + b"\x00\x13" + HEADER[4:]) + PAYLOAD, "ipv4_bad_total_length"),
        (HEADER + PAYLOAD[:-1], "ipv4_truncated"),
        (HEADER[:11] + b"\x62" + HEADER[12:] + PAYLOAD, "ipv4_bad_checksum"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_ipv4_untrusted(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "changes",
    [
        {"ttl": 256},
        {"flags": 8},
        {"frag_offset": 1 << 13},
        {"options": b"\x01"},
        {"options": b"\x01" * 44},
        {"payload": bytes(65516)},
        {"src": "10.0.0.1"},
    ],
)
def test_encode_rejects_bad_fields(changes: dict[str, object]) -> None:
    packet = IPv4(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPPROTO_UDP, b"")
    with pytest.raises(UsageError):
        replace(packet, **changes).encode()  # type: ignore[arg-type]


@given(packets)
def test_round_trip(packet: IPv4) -> None:
    raw = packet.encode()
    assert decode_ipv4_untrusted(raw) == packet
    assert decode_ipv4_untrusted(bytearray(raw) + b"\x00\x00") == packet


@SCAPY
@given(packets)
def test_matches_scapy(packet: IPv4) -> None:
    built = IP(
        src=str(packet.src),
        dst=str(packet.dst),
        proto=packet.proto,
        ttl=packet.ttl,
        id=packet.ident,
        flags=packet.flags,
        frag=packet.frag_offset,
        tos=packet.tos,
        options=packet.options,
    ) / Raw(packet.payload)
    assert packet.encode() == bytes(built)
    assert decode_ipv4_untrusted(bytes(built)) == packet
    parsed = IP(packet.encode())
    assert parsed.chksum == int.from_bytes(packet.encode()[10:12], "big")
