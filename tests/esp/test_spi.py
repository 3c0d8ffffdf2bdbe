"""Docker's SPI and salt derivation (moby ``encryption.go`` ``buildSPI`` / ``buildAeadAlgo``)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.esp.spi import (
    addr16,
    derive_spi,
    fnv1a_32,
    is_reserved_spi,
    salt_for_spi,
)

# Computed with Go's hash/fnv (go1.19.8) by moby's own ``legacyBuildSPI`` from TestBuildSPI, which
# hashes ``net.ParseIP`` results, i.e. the 16-byte forms.  The rows from moby's TestBuildSPI cases
# are here with their values; that test compares two implementations and fixes no values itself.
GO_VECTORS = [
    ("1.2.3.4", "5.6.7.8", 1234, 0x5DE62C5B),
    ("5.6.7.8", "1.2.3.4", 1234, 0xFBE6142B),
    ("::ffff:1.2.3.4", "::ffff:5.6.7.8", 1234, 0x5DE62C5B),
    ("10.0.0.1", "2001:db8::1", 5678, 0x8C1EA943),
    ("2002::abcd:1", "172.15.14.13", 54321, 0x40799B91),
    ("2002:db8::42", "2002:db8::69", 9999, 0x342A609E),
    ("192.168.99.2", "192.168.99.3", 0, 0xA70BB3CA),
    ("192.168.99.2", "192.168.99.3", 0xFFFFFFFF, 0x3E8EDBD6),
    ("10.0.0.2", "10.0.0.3", 7, 0x8F3BDEC7),
]


@pytest.mark.parametrize(("src", "dst", "tag", "spi"), GO_VECTORS)
def test_go_vectors(src: str, dst: str, tag: int, spi: int) -> None:
    assert derive_spi(ip_address(src), ip_address(dst), tag) == spi


def test_fnv1a_reference_vectors() -> None:
    # The FNV reference test suite (Landon Curt Noll's fnv32a vectors).
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def _fnv_by_hand(data: bytes) -> int:
    """FNV-1a written out from its definition, independently of vxnet."""
    h = 2166136261
    for b in data:
        h ^= b
        h = (h * 16777619) % 2**32
    return h


def test_hand_computed_layout() -> None:
    src, dst = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
    # src as ::ffff:10.0.0.2, the tag as uint32 big-endian, dst as ::ffff:10.0.0.3
    data = bytes(10) + b"\xff\xff\x0a\x00\x00\x02" + b"\x00\x00\x00\x07"
    data += bytes(10) + b"\xff\xff\x0a\x00\x00\x03"
    assert len(data) == 36
    assert derive_spi(src, dst, 7) == _fnv_by_hand(data) == 0x8F3BDEC7


def test_ipv4_and_mapped_ipv6_agree() -> None:
    assert addr16(IPv4Address("1.2.3.4")) == IPv6Address("::ffff:1.2.3.4").packed
    a, b = IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8")
    mapped = IPv6Address("::ffff:1.2.3.4"), IPv6Address("::ffff:5.6.7.8")
    assert derive_spi(a, b, 1234) == derive_spi(*mapped, 1234)


def test_each_direction_and_key_has_its_own_spi() -> None:
    a, b = IPv4Address("192.168.99.2"), IPv4Address("192.168.99.3")
    spis = {derive_spi(x, y, t) for x, y in ((a, b), (b, a)) for t in (100, 101, 102)}
    assert len(spis) == 6


def test_tag_uses_docker_uint32_truncation() -> None:
    a, b = IPv4Address("192.168.99.2"), IPv4Address("192.168.99.3")
    assert derive_spi(a, b, 5 + (1 << 32)) == derive_spi(a, b, 5)
    assert derive_spi(a, b, (1 << 64) - 1) == derive_spi(a, b, 0xFFFFFFFF)
    for bad in (-1, 1 << 64):
        with pytest.raises(UsageError):
            derive_spi(a, b, bad)


@given(st.integers(0, 2**32 - 1))
def test_salt_is_the_spi_big_endian(spi: int) -> None:
    assert salt_for_spi(spi) == spi.to_bytes(4, "big")
    assert int.from_bytes(salt_for_spi(spi), "big") == spi


def test_salt_rejects_non_uint32() -> None:
    for bad in (-1, 1 << 32):
        with pytest.raises(UsageError):
            salt_for_spi(bad)


def test_reserved_spis() -> None:
    assert is_reserved_spi(0) and is_reserved_spi(255)
    assert not is_reserved_spi(256) and not is_reserved_spi(0xFFFFFFFF)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_matches_independent_fnv(src: int, dst: int, tag: int) -> None:
    a, b = IPv4Address(src), IPv4Address(dst)
    data = addr16(a) + tag.to_bytes(4, "big") + addr16(b)
    assert derive_spi(a, b, tag) == _fnv_by_hand(data)
