from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.udp import Udp, decode_udp_untrusted, verify_udp_checksum_untrusted

from .strategies import SCAPY, ipv4s, ipv6s, payloads, uint

datagrams = st.builds(Udp, uint(16), uint(16), payloads)
addresses = st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s))

SRC, DST = IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")


def test_known_checksum() -> None:
    # pseudo c000 0201 c000 0202 0011 0008 + header 0001 0002 0008: sum 8428, checksum 7bd7
    raw = Udp(1, 2, b"").encode(SRC, DST)
    assert raw == bytes.fromhex("0001 0002 0008 7bd7")
    assert decode_udp_untrusted(raw) == Udp(1, 2, b"", 0x7BD7)
    assert decode_udp_untrusted(raw).verify_checksum(SRC, DST)
    assert verify_udp_checksum_untrusted(raw, SRC, DST)


def test_without_addresses_checksum_is_zero() -> None:
    assert Udp(0x1234, 4789, b"abcd").encode() == bytes.fromhex("1234 12b5 000c 0000 61626364")


def test_computed_zero_is_sent_as_ffff() -> None:
    base = Udp(7, 9, b"\x00\x00").encode(SRC, DST)
    datagram = Udp(7, 9, base[6:8])  # the payload cancels the rest of the sum
    raw = datagram.encode(SRC, DST)
    assert raw[6:8] == b"\xff\xff"
    assert (
        raw == bytes(IP(src=str(SRC), dst=str(DST)) / UDP(sport=7, dport=9) / Raw(base[6:8]))[20:]
    )
    assert decode_udp_untrusted(raw).verify_checksum(SRC, DST)


def test_zero_checksum_means_none_on_ipv4_only() -> None:
    raw = Udp(1, 2, b"x").encode()
    v6src, v6dst = IPv6Address("::1"), IPv6Address("::2")
    assert decode_udp_untrusted(raw).verify_checksum(SRC, DST)
    assert verify_udp_checksum_untrusted(raw, SRC, DST)
    assert not decode_udp_untrusted(raw).verify_checksum(v6src, v6dst)
    assert not verify_udp_checksum_untrusted(raw, v6src, v6dst)
    assert not Udp(1, 2, b"").verify_checksum(SRC, DST)
    assert not verify_udp_checksum_untrusted(raw[:7], SRC, DST)


def test_padding_dropped_and_explicit_checksum_kept() -> None:
    raw = bytes.fromhex("0001 0002 000a 1234 6162") + b"\x00" * 4
    datagram = decode_udp_untrusted(raw)
    assert datagram == Udp(1, 2, b"ab", 0x1234)
    assert datagram.encode(SRC, DST) == raw[:10]
    assert replace(datagram, checksum=None).encode() == raw[:6] + b"\x00\x00" + raw[8:10]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (bytes(7), "udp_truncated"),
        (bytes.fromhex("0001 0002 0007 0000"), "udp_bad_length"),
        (bytes.fromhex("0001 0002 000a 0000 61"), "udp_truncated"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_udp_untrusted(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "call",
    [
        lambda: Udp(65536, 1, b"").encode(),
        lambda: Udp(1, 1, b"", checksum=-1).encode(),
        lambda: Udp(1, 1, bytes(65528)).encode(),
        lambda: Udp(1, 1, b"").encode(SRC, None),
        lambda: Udp(1, 1, b"").encode(SRC, IPv6Address("::1")),
    ],
)
def test_encode_rejects_bad_fields(call: object) -> None:
    with pytest.raises(UsageError):
        call()  # type: ignore[operator]


@given(datagrams, addresses)
def test_round_trip_and_verify(
    datagram: Udp, ips: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address]
) -> None:
    raw = datagram.encode(*ips)
    decoded = decode_udp_untrusted(raw)
    assert replace(decoded, checksum=None) == datagram
    assert decoded.verify_checksum(*ips)
    assert verify_udp_checksum_untrusted(raw, *ips)
    if datagram.payload:  # a single flipped bit always changes the one's-complement sum
        flipped = raw[:-1] + bytes((raw[-1] ^ 0x01,))
        assert not verify_udp_checksum_untrusted(flipped, *ips)


@SCAPY
@given(datagrams, addresses)
def test_matches_scapy(
    datagram: Udp, ips: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address]
) -> None:
    src, dst = ips
    ip = IP if isinstance(src, IPv4Address) else IPv6
    header_len = 20 if isinstance(src, IPv4Address) else 40
    layer = UDP(sport=datagram.sport, dport=datagram.dport)
    built = bytes(ip(src=str(src), dst=str(dst)) / layer / Raw(datagram.payload))[header_len:]
    assert datagram.encode(src, dst) == built
    decoded = decode_udp_untrusted(built)
    assert replace(decoded, checksum=None) == datagram
    assert decoded.checksum == UDP(built).chksum
