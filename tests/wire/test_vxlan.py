from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.ethernet import ETH_P_IP, Ethernet, decode_ethernet_untrusted, mac_to_str
from vxnet.wire.vxlan import (
    VNI_MAX,
    VNI_MIN_DOCKER,
    VXLAN_FLAG_I,
    VXLAN_HEADER_LEN,
    VXLAN_PORT,
    VXLAN_STRUCT,
    Vxlan,
    decode_vxlan_untrusted,
    pack_vxlan_header_into,
    vxlan_header,
    vxlan_vni_untrusted,
)

from .strategies import SCAPY, macs, payloads, uint

vnis = uint(24)
# Flags with I set; scapy lays out the next 24 bits differently when G (0x80) or P (0x04) is set.
plain_flags = uint(8).map(lambda f: (f | VXLAN_FLAG_I) & ~0x84)
packets = st.builds(
    Vxlan, vnis, payloads, uint(8).map(lambda f: f | VXLAN_FLAG_I), uint(24), uint(8)
)


def test_constants() -> None:
    assert (VXLAN_PORT, VXLAN_HEADER_LEN, VNI_MIN_DOCKER, VNI_MAX) == (4789, 8, 4096, 0xFFFFFF)
    assert VXLAN_STRUCT.size == VXLAN_HEADER_LEN


def test_known_header() -> None:
    raw = bytes.fromhex("08 000000 001234 00") + b"frame"
    assert vxlan_header(0x1234) == raw[:8]
    assert Vxlan(0x1234, b"frame").encode() == raw
    assert decode_vxlan_untrusted(raw) == Vxlan(0x1234, b"frame")
    assert vxlan_vni_untrusted(raw) == 0x1234
    assert vxlan_vni_untrusted(memoryview(raw)[:8]) == 0x1234


def test_reserved_bits_are_kept() -> None:
    raw = bytes.fromhex("0c abcdef 001000 7f")
    assert decode_vxlan_untrusted(raw) == Vxlan(4096, b"", 0x0C, 0xABCDEF, 0x7F)
    assert decode_vxlan_untrusted(raw).encode() == raw


def test_pack_into_preallocated_buffer() -> None:
    buffer = bytearray(b"\xee" * 20)
    pack_vxlan_header_into(buffer, 4, VNI_MAX)
    assert buffer == b"\xee" * 4 + bytes.fromhex("08000000 ffffff00") + b"\xee" * 8
    pack_vxlan_header_into(memoryview(buffer)[4:], 0, VNI_MIN_DOCKER)
    assert buffer[4:12] == bytes.fromhex("08000000 00100000")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (bytes.fromhex("08 000000 001234"), "vxlan_truncated"),
        (b"", "vxlan_truncated"),
        (bytes.fromhex("00 000000 001234 00"), "vxlan_no_i_flag"),
        (bytes.fromhex("f7 ffffff ffffff ff"), "vxlan_no_i_flag"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    for decode in (decode_vxlan_untrusted, vxlan_vni_untrusted):
        with pytest.raises(BadPacket) as info:
            decode(raw)
        assert info.value.reason == reason


def test_odd_buffers_are_bad_packets() -> None:
    with pytest.raises(BadPacket):
        vxlan_vni_untrusted(memoryview(bytes(32))[::2])


@pytest.mark.parametrize("vni", [-1, VNI_MAX + 1])
def test_vni_range_is_a_usage_error(vni: int) -> None:
    with pytest.raises(UsageError):
        Vxlan(vni, b"").encode()
    with pytest.raises(UsageError):
        vxlan_header(vni)
    with pytest.raises(UsageError):
        pack_vxlan_header_into(bytearray(8), 0, vni)


def test_other_fields_are_checked() -> None:
    for packet in (
        Vxlan(1, b"", flags=256),
        Vxlan(1, b"", reserved1=1 << 24),
        Vxlan(1, b"", reserved2=-1),
    ):
        with pytest.raises(UsageError):
            packet.encode()


@given(packets)
def test_round_trip(packet: Vxlan) -> None:
    raw = packet.encode()
    assert decode_vxlan_untrusted(raw) == packet
    assert vxlan_vni_untrusted(raw) == packet.vni


@given(vnis, payloads)
def test_header_helpers_agree(vni: int, payload: bytes) -> None:
    assert vxlan_header(vni) + payload == Vxlan(vni, payload).encode()


@SCAPY
@given(vnis, plain_flags, uint(24), uint(8), payloads)
def test_matches_scapy(
    vni: int, flags: int, reserved1: int, reserved2: int, payload: bytes
) -> None:
    packet = Vxlan(vni, payload, flags, reserved1, reserved2)
    built = bytes(
        VXLAN(flags=flags, reserved1=reserved1, vni=vni, reserved2=reserved2) / Raw(payload)
    )
    assert packet.encode() == built
    assert decode_vxlan_untrusted(built) == packet


@SCAPY
@given(vnis, uint(8), uint(16))
def test_decodes_scapy_group_policy_header(vni: int, gpflags: int, gpid: int) -> None:
    built = bytes(VXLAN(flags=0x88, gpflags=gpflags, gpid=gpid, vni=vni))
    assert decode_vxlan_untrusted(built) == Vxlan(vni, b"", 0x88, gpflags << 16 | gpid, 0)


@SCAPY
@given(vnis, macs, macs, payloads)
def test_full_encapsulation_matches_scapy(vni: int, dst: bytes, src: bytes, data: bytes) -> None:
    inner = Ethernet(dst, src, ETH_P_IP, data)
    outer = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=50000, dport=VXLAN_PORT)
    scapy_inner = Ether(dst=mac_to_str(dst), src=mac_to_str(src), type=ETH_P_IP) / Raw(data)
    built = bytes(outer / VXLAN(flags=0x08, vni=vni) / scapy_inner)
    vxlan = decode_vxlan_untrusted(built[28:])
    assert vxlan == Vxlan(vni, inner.encode())
    assert decode_ethernet_untrusted(vxlan.payload) == inner
