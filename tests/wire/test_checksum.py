from __future__ import annotations

from array import array
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.wire.checksum import (
    checksum_adjust,
    checksum_adjust32,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_v4,
    pseudo_header_v6,
    transport_checksum,
)

from .strategies import ipv4s, ipv6s, uint


def reference_checksum(data: bytes) -> int:
    """The textbook RFC 1071 loop, as an independent oracle."""
    if len(data) % 2:
        data += b"\x00"
    total = sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def equivalent(a: int, b: int) -> bool:
    """Equal as one's-complement numbers (0x0000 and 0xFFFF are both zero)."""
    return a % 0xFFFF == b % 0xFFFF


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries folded).
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_known_ipv4_header() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861
    assert internet_checksum(header[:10] + b"\xb8\x61" + header[12:]) == 0


def test_edge_values() -> None:
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\x00\x00\x00") == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0
    assert internet_checksum(b"\xff\xff\xff\xff") == 0
    assert internet_checksum(b"\x01") == 0xFEFF  # odd length: padded with a zero byte


@given(st.binary(max_size=300))
def test_matches_reference(data: bytes) -> None:
    expected = reference_checksum(data)
    assert internet_checksum(data) == expected
    assert internet_checksum(bytearray(data)) == expected
    assert internet_checksum(memoryview(data)) == expected


@given(st.binary(max_size=100).map(lambda b: b[: len(b) // 2 * 2]), st.binary(max_size=100))
def test_sums_chain(first: bytes, second: bytes) -> None:
    assert internet_checksum(second, ones_complement_sum(first)) == reference_checksum(
        first + second
    )


def test_memoryview_of_wide_items_counts_bytes() -> None:
    words = array("H", [0x0102, 0x0304])
    assert internet_checksum(memoryview(words)) == reference_checksum(words.tobytes())
    odd = memoryview(b"\x01\x02\x03")[::2]  # non-contiguous: b"\x01\x03"
    assert internet_checksum(odd) == reference_checksum(b"\x01\x03")


@given(st.binary(min_size=4, max_size=60), st.data())
def test_adjust16_matches_recompute(data: bytes, draw: st.DataObject) -> None:
    data = data[: len(data) // 2 * 2]
    index = draw.draw(st.integers(0, len(data) // 2 - 1)) * 2
    new = draw.draw(uint(16))
    old = int.from_bytes(data[index : index + 2], "big")
    changed = data[:index] + new.to_bytes(2, "big") + data[index + 2 :]
    adjusted = checksum_adjust(internet_checksum(data), old, new)
    assert equivalent(adjusted, internet_checksum(changed))


@given(st.binary(min_size=8, max_size=60), st.data())
def test_adjust32_matches_recompute(data: bytes, draw: st.DataObject) -> None:
    data = data[: len(data) // 2 * 2]
    index = draw.draw(st.integers(0, len(data) // 2 - 2)) * 2
    new = draw.draw(uint(32))
    old = int.from_bytes(data[index : index + 4], "big")
    changed = data[:index] + new.to_bytes(4, "big") + data[index + 4 :]
    adjusted = checksum_adjust32(internet_checksum(data), old, new)
    assert equivalent(adjusted, internet_checksum(changed))
    assert adjusted == checksum_adjust(
        checksum_adjust(internet_checksum(data), old >> 16, new >> 16), old & 0xFFFF, new & 0xFFFF
    )


def test_adjust_rfc1624_example() -> None:
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
    assert checksum_adjust(0xDD2F, 0x5555, 0x3285) == 0x0000


def test_nat_rewrite_of_ipv4_source() -> None:
    header = bytearray.fromhex("45000073000040004011b861c0a80001c0a800c7")
    new_src = int(IPv4Address("10.0.0.9"))
    csum = checksum_adjust32(0xB861, int.from_bytes(header[12:16], "big"), new_src)
    header[12:16] = new_src.to_bytes(4, "big")
    header[10:12] = csum.to_bytes(2, "big")
    assert internet_checksum(header) == 0


def test_pseudo_header_v4_vector() -> None:
    got = pseudo_header_v4(IPv4Address("192.0.2.1"), IPv4Address("198.51.100.2"), 17, 0x1234)
    assert got == bytes.fromhex("c0000201 c6336402 00 11 1234")


def test_pseudo_header_v6_vector() -> None:
    got = pseudo_header_v6(IPv6Address("2001:db8::1"), IPv6Address("fe80::2"), 58, 0x10203)
    assert got == bytes.fromhex(
        "20010db8000000000000000000000001 fe800000000000000000000000000002 00010203 000000 3a"
    )


@given(ipv4s, ipv6s)
def test_mixed_families_are_a_usage_error(v4: IPv4Address, v6: IPv6Address) -> None:
    with pytest.raises(UsageError):
        transport_checksum(v4, v6, 17, b"")
    with pytest.raises(UsageError):
        transport_checksum(v6, v4, 17, b"")
