"""Every ``*_untrusted`` function returns a value or raises BadPacket, whatever the bytes."""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import BadPacket
from vxnet.wire import (
    decode_arp_untrusted,
    decode_ethernet_untrusted,
    decode_icmp_echo_untrusted,
    decode_icmpv6_untrusted,
    decode_ipv4_untrusted,
    decode_ipv6_untrusted,
    decode_tcp_untrusted,
    decode_udp_untrusted,
    decode_vxlan_untrusted,
    ethertype_of_untrusted,
    internet_checksum,
    transport_checksum,
    verify_tcp_checksum_untrusted,
    verify_udp_checksum_untrusted,
    vxlan_vni_untrusted,
)

from . import (
    test_arp,
    test_ethernet,
    test_icmp,
    test_ipv4,
    test_ipv6,
    test_tcp,
    test_udp,
    test_vxlan,
)
from .strategies import FUZZ

REASON = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")
SRC4, DST4 = IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")
SRC6, DST6 = IPv6Address("fe80::1"), IPv6Address("ff02::1:ff00:1")

Fixer = Callable[[bytes], bytes]


def no_fix(raw: bytes) -> bytes:
    return raw


def fix_icmp(raw: bytes) -> bytes:
    if len(raw) < 4:
        return raw
    zeroed = raw[:2] + b"\x00\x00" + raw[4:]
    return raw[:2] + internet_checksum(zeroed).to_bytes(2, "big") + raw[4:]


def fix_icmpv6(raw: bytes) -> bytes:
    if len(raw) < 4:
        return raw
    zeroed = raw[:2] + b"\x00\x00" + raw[4:]
    return raw[:2] + transport_checksum(SRC6, DST6, 58, zeroed).to_bytes(2, "big") + raw[4:]


def fix_ipv4(raw: bytes) -> bytes:
    """Make the header checksum right, so the decoder gets past it to the length checks."""
    header_len = (raw[0] & 0xF) * 4 if raw else 0
    if len(raw) < max(header_len, 20):
        return raw
    zeroed = raw[:10] + b"\x00\x00" + raw[12:header_len]
    return raw[:10] + internet_checksum(zeroed).to_bytes(2, "big") + raw[12:]


# name: (decoder, strategy of valid encodings, checksum fixer)
DECODERS: dict[str, tuple[Callable[[bytes], object], st.SearchStrategy[bytes], Fixer]] = {
    "ethernet": (decode_ethernet_untrusted, test_ethernet.frames.map(lambda f: f.encode()), no_fix),
    "ethertype": (ethertype_of_untrusted, test_ethernet.frames.map(lambda f: f.encode()), no_fix),
    "arp": (decode_arp_untrusted, test_arp.arps.map(lambda a: a.encode()), no_fix),
    "ipv4": (decode_ipv4_untrusted, test_ipv4.packets.map(lambda p: p.encode()), fix_ipv4),
    "ipv6": (decode_ipv6_untrusted, test_ipv6.packets.map(lambda p: p.encode()), no_fix),
    "udp": (decode_udp_untrusted, test_udp.datagrams.map(lambda u: u.encode(SRC4, DST4)), no_fix),
    "udp_verify4": (
        lambda d: verify_udp_checksum_untrusted(d, SRC4, DST4),
        test_udp.datagrams.map(lambda u: u.encode(SRC4, DST4)),
        no_fix,
    ),
    "udp_verify6": (
        lambda d: verify_udp_checksum_untrusted(d, SRC6, DST6),
        test_udp.datagrams.map(lambda u: u.encode(SRC6, DST6)),
        no_fix,
    ),
    "tcp": (decode_tcp_untrusted, test_tcp.segments.map(lambda s: s.encode(SRC4, DST4)), no_fix),
    "tcp_verify": (
        lambda d: verify_tcp_checksum_untrusted(d, SRC6, DST6),
        test_tcp.segments.map(lambda s: s.encode(SRC6, DST6)),
        no_fix,
    ),
    "icmp": (decode_icmp_echo_untrusted, test_icmp.echoes.map(lambda e: e.encode()), fix_icmp),
    "icmpv6": (
        lambda d: decode_icmpv6_untrusted(d, SRC6, DST6),
        test_icmp.messages6.map(lambda m: m.encode(SRC6, DST6)),
        fix_icmpv6,
    ),
    "vxlan": (decode_vxlan_untrusted, test_vxlan.packets.map(lambda v: v.encode()), no_fix),
    "vxlan_vni": (vxlan_vni_untrusted, test_vxlan.packets.map(lambda v: v.encode()), no_fix),
}


def check(decode: Callable[[bytes], object], data: bytes) -> None:
    """Call ``decode`` on every buffer type; only BadPacket with a snake_case reason may escape."""
    for buffer in (data, bytearray(data), memoryview(data)):
        try:
            decode(buffer)  # type: ignore[arg-type]
        except BadPacket as exc:
            assert REASON.fullmatch(exc.reason), exc.reason


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes], fix: Fixer) -> bytes:
    raw = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
    raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=4))
    return fix(bytes(raw)) if draw(st.booleans()) else bytes(raw)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.data())
def test_random_bytes(name: str, data: st.DataObject) -> None:
    decode, _, fix = DECODERS[name]
    raw = data.draw(st.binary(max_size=120))
    check(decode, raw)
    check(decode, fix(raw))


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_packets(name: str, data: st.DataObject) -> None:
    decode, valid, fix = DECODERS[name]
    check(decode, data.draw(mutated(valid, fix)))


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.data())
def test_valid_packets_decode(name: str, data: st.DataObject) -> None:
    decode, valid, _ = DECODERS[name]
    result = decode(data.draw(valid))
    assert result is not False  # the verify helpers accept their own correct checksums


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_odd_memoryviews(name: str) -> None:
    decode, _, _ = DECODERS[name]
    raw = bytes(range(64))
    for view in (memoryview(raw)[::2], memoryview(raw).cast("H"), memoryview(raw).cast("I")):
        try:
            decode(view)  # type: ignore[arg-type]
        except BadPacket as exc:
            assert REASON.fullmatch(exc.reason), exc.reason
