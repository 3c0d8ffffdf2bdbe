from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.tcp import ACK, SYN, Tcp, decode_tcp_untrusted, verify_tcp_checksum_untrusted

from .strategies import SCAPY, ipv4s, ipv6s, payloads, uint

options = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
segments = st.builds(
    Tcp,
    uint(16),
    uint(16),
    uint(32),
    uint(32),
    uint(12),
    uint(16),
    payloads,
    urgent=uint(16),
    options=options,
)
addresses = st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s))

SRC, DST = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
# SYN from port 12345 to 80, seq 1, window 65535, MSS 1460 option; checksum left zero.
SYN_BYTES = bytes.fromhex("3039 0050 00000001 00000000 6002 ffff 0000 0000 020405b4")


def test_known_syn() -> None:
    syn = Tcp(12345, 80, 1, 0, SYN, 0xFFFF, b"", options=bytes.fromhex("020405b4"))
    assert syn.encode() == SYN_BYTES
    assert decode_tcp_untrusted(SYN_BYTES) == replace(syn, checksum=0)


def test_checksum_and_verify() -> None:
    segment = Tcp(1, 2, 3, 4, SYN | ACK, 5, b"hello")
    raw = segment.encode(SRC, DST)
    assert (
        raw
        == bytes(
            IP(src=str(SRC), dst=str(DST))
            / TCP(sport=1, dport=2, seq=3, ack=4, flags="SA", window=5)
            / Raw(b"hello")
        )[20:]
    )
    decoded = decode_tcp_untrusted(raw)
    assert decoded.verify_checksum(SRC, DST)
    assert verify_tcp_checksum_untrusted(raw, SRC, DST)
    assert not decoded.verify_checksum(SRC, DST + 1)
    assert not segment.verify_checksum(SRC, DST)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (SYN_BYTES[:19], "tcp_truncated"),
        (SYN_BYTES[:12] + b"\x40" + SYN_BYTES[13:], "tcp_bad_offset"),
        (SYN_BYTES[:12] + b"\x70" + SYN_BYTES[13:], "tcp_truncated"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_tcp_untrusted(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": 1 << 32},
        {"flags": 1 << 12},
        {"options": b"\x01\x01"},
        {"options": bytes(44)},
        {"checksum": 1 << 16},
    ],
)
def test_encode_rejects_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        replace(Tcp(1, 2, 3, 4, SYN, 5, b""), **changes).encode()  # type: ignore[arg-type]


@given(segments, addresses)
def test_round_trip_and_verify(
    segment: Tcp, ips: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address]
) -> None:
    raw = segment.encode(*ips)
    decoded = decode_tcp_untrusted(raw)
    assert replace(decoded, checksum=None) == segment
    assert decoded.encode() == raw
    assert decoded.verify_checksum(*ips)
    assert verify_tcp_checksum_untrusted(raw, *ips)


@SCAPY
@given(segments, addresses)
def test_matches_scapy(
    segment: Tcp, ips: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address]
) -> None:
    src, dst = ips
    ip = IP if isinstance(src, IPv4Address) else IPv6
    header_len = 20 if isinstance(src, IPv4Address) else 40
    layer = TCP(
        sport=segment.sport,
        dport=segment.dport,
        seq=segment.seq,
        ack=segment.ack,
        dataofs=5 + len(segment.options) // 4,
        reserved=segment.flags >> 9,
        flags=segment.flags & 0x1FF,
        window=segment.window,
        urgptr=segment.urgent,
    )
    raw = bytes(ip(src=str(src), dst=str(dst)) / layer / Raw(segment.options + segment.payload))
    built = raw[header_len:]
    assert segment.encode(src, dst) == built
    decoded = decode_tcp_untrusted(built)
    assert replace(decoded, checksum=None) == segment
    assert decoded.checksum == TCP(built).chksum
