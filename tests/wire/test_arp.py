from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import ARP
from scapy.packet import Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.arp import (
    OP_REPLY,
    OP_REQUEST,
    Arp,
    arp_reply_for,
    arp_request,
    decode_arp_untrusted,
)
from vxnet.wire.ethernet import mac_from_str, mac_to_str

from .strategies import SCAPY, ipv4s, macs, uint

arps = st.builds(Arp, uint(16), macs, ipv4s, macs, ipv4s)

# who-has 192.168.1.1 tell 192.168.1.100, from 00:11:22:33:44:55 (RFC 826 layout)
REQUEST = bytes.fromhex("0001 0800 06 04 0001 001122334455 c0a80164 000000000000 c0a80101")


def test_known_request() -> None:
    arp = decode_arp_untrusted(REQUEST + bytes(18))  # with Ethernet padding to 60 bytes
    assert arp == Arp(
        OP_REQUEST,
        mac_from_str("00:11:22:33:44:55"),
        IPv4Address("192.168.1.100"),
        bytes(6),
        IPv4Address("192.168.1.1"),
    )
    assert arp.encode() == REQUEST
    assert arp == arp_request(arp.sender_mac, arp.sender_ip, arp.target_ip)


def test_reply_for_request() -> None:
    request = decode_arp_untrusted(REQUEST)
    mac = mac_from_str("02:42:c0:a8:01:01")
    reply = arp_reply_for(request, mac)
    assert reply == Arp(OP_REPLY, mac, request.target_ip, request.sender_mac, request.sender_ip)
    assert reply.encode() == bytes.fromhex(
        "0001 0800 06 04 0002 0242c0a80101 c0a80101 001122334455 c0a80164"
    )
    with pytest.raises(UsageError):
        arp_reply_for(reply, mac)
    with pytest.raises(UsageError):
        arp_reply_for(request, b"\x02")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (REQUEST[:27], "arp_truncated"),
        (b"\x00\x06" + REQUEST[2:], "arp_unsupported"),
        (REQUEST[:2] + b"\x86\xdd" + REQUEST[4:], "arp_unsupported"),
        (REQUEST[:4] + b"\x08\x04" + REQUEST[6:], "arp_unsupported"),
        (REQUEST[:4] + b"\x06\x10" + REQUEST[6:], "arp_unsupported"),
    ],
)
def test_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_arp_untrusted(raw)
    assert info.value.reason == reason


def test_encode_rejects_bad_fields() -> None:
    ip = IPv4Address("10.0.0.1")
    with pytest.raises(UsageError):
        Arp(OP_REQUEST, b"\x00" * 5, ip, bytes(6), ip).encode()
    with pytest.raises(UsageError):
        Arp(0x10000, bytes(6), ip, bytes(6), ip).encode()
    with pytest.raises(UsageError):
        Arp(OP_REQUEST, bytes(6), "10.0.0.1", bytes(6), ip).encode()  # type: ignore[arg-type]


@given(arps)
def test_round_trip(arp: Arp) -> None:
    assert decode_arp_untrusted(arp.encode()) == arp


@SCAPY
@given(arps)
def test_matches_scapy(arp: Arp) -> None:
    packet = ARP(
        op=arp.op,
        hwsrc=mac_to_str(arp.sender_mac),
        psrc=str(arp.sender_ip),
        hwdst=mac_to_str(arp.target_mac),
        pdst=str(arp.target_ip),
    )
    assert arp.encode() == bytes(packet)
    assert decode_arp_untrusted(bytes(packet / Raw(b"\x00" * 18))) == arp
    parsed = ARP(arp.encode())
    assert (parsed.op, parsed.psrc, parsed.pdst) == (arp.op, str(arp.sender_ip), str(arp.target_ip))
