from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from vxnet.errors import BadPacket, UsageError
from vxnet.wire.ethernet import (
    BROADCAST_MAC,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    Ethernet,
    Vlan,
    decode_ethernet_untrusted,
    ethertype_of_untrusted,
    is_broadcast,
    is_multicast,
    mac_from_str,
    mac_to_str,
)

from .strategies import SCAPY, macs, payloads, uint

# Ethertypes that are not VLAN TPIDs, so the tag walk stops at them.
inner_types = uint(16).filter(lambda t: t not in (ETH_P_8021Q, ETH_P_8021AD))
vlans = st.builds(Vlan, uint(3), uint(1), uint(12), st.sampled_from([ETH_P_8021Q, ETH_P_8021AD]))
frames = st.builds(
    Ethernet, macs, macs, inner_types, payloads, st.lists(vlans, max_size=3).map(tuple)
)


def test_untagged_vector() -> None:
    raw = bytes.fromhex("ffffffffffff 02420a000002 0806") + b"arp"
    frame = decode_ethernet_untrusted(raw)
    assert frame == Ethernet(BROADCAST_MAC, mac_from_str("02:42:0a:00:00:02"), ETH_P_ARP, b"arp")
    assert frame.encode() == raw
    assert frame.header_len == 14


def test_qinq_vector() -> None:
    raw = bytes.fromhex("020000000001 020000000002 88a8 a064 8100 300a 0800") + b"ip"
    frame = decode_ethernet_untrusted(raw)
    assert frame.vlans == (Vlan(5, 0, 100, ETH_P_8021AD), Vlan(1, 1, 10, ETH_P_8021Q))
    assert frame.ethertype == ETH_P_IP
    assert frame.payload == b"ip"
    assert frame.encode() == raw
    assert ethertype_of_untrusted(raw) == ETH_P_IP


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00" * 13, "eth_truncated"),
        (bytes(12) + b"\x81\x00\x00\x01", "vlan_truncated"),
        (bytes(12) + b"\x81\x00\x00\x01\x81\x00\x00\x02\x08", "vlan_truncated"),
    ],
)
def test_truncated(raw: bytes, reason: str) -> None:
    for decode in (decode_ethernet_untrusted, ethertype_of_untrusted):
        with pytest.raises(BadPacket) as info:
            decode(raw)
        assert info.value.reason == reason


def test_mac_helpers() -> None:
    assert mac_to_str(b"\x02\x42\x0a\x00\x00\x02") == "02:42:0a:00:00:02"
    assert mac_from_str("02-42-0A-00-00-02") == b"\x02\x42\x0a\x00\x00\x02"
    assert is_multicast(BROADCAST_MAC) and is_broadcast(BROADCAST_MAC)
    assert is_multicast(mac_from_str("33:33:00:00:00:01"))
    assert not is_multicast(mac_from_str("02:42:0a:00:00:02"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "02:42:0a:00:00",
        "02:42:0a:00:00:02:03",
        "02:42-0a:00:00:02",
        "0g:42:0a:00:00:02",
        "2:42:a:0:0:2",
        " 02:42:0a:00:00:02",
    ],
)
def test_bad_mac_text(text: str) -> None:
    with pytest.raises(UsageError):
        mac_from_str(text)


@given(macs)
def test_mac_text_round_trip(mac: bytes) -> None:
    assert mac_from_str(mac_to_str(mac)) == mac


@pytest.mark.parametrize(
    "frame",
    [
        Ethernet(b"\x00" * 5, b"\x00" * 6, ETH_P_IP, b""),
        Ethernet(b"\x00" * 6, b"\x00" * 6, 0x10000, b""),
        Ethernet(b"\x00" * 6, b"\x00" * 6, ETH_P_IP, b"", (Vlan(0, 0, 4096),)),
        Ethernet(b"\x00" * 6, b"\x00" * 6, ETH_P_IP, b"", (Vlan(8, 0, 1),)),
        Ethernet(b"\x00" * 6, b"\x00" * 6, ETH_P_IP, b"", (Vlan(0, 0, 1, ETH_P_IP),)),
    ],
)
def test_encode_rejects_bad_fields(frame: Ethernet) -> None:
    with pytest.raises(UsageError):
        frame.encode()


@given(frames)
def test_round_trip(frame: Ethernet) -> None:
    raw = frame.encode()
    assert decode_ethernet_untrusted(raw) == frame
    assert decode_ethernet_untrusted(memoryview(bytearray(raw))) == frame
    assert ethertype_of_untrusted(raw) == frame.ethertype
    assert len(raw) == frame.header_len + len(frame.payload)


def to_scapy(frame: Ethernet) -> Packet:
    types = [vlan.ethertype for vlan in frame.vlans] + [frame.ethertype]
    packet: Packet = Ether(dst=mac_to_str(frame.dst), src=mac_to_str(frame.src), type=types[0])
    for vlan, next_type in zip(frame.vlans, types[1:], strict=True):
        layer = Dot1AD if vlan.ethertype == ETH_P_8021AD else Dot1Q
        packet = packet / layer(prio=vlan.pcp, dei=vlan.dei, vlan=vlan.vid, type=next_type)
    return packet / Raw(frame.payload)


@SCAPY
@given(frames)
def test_matches_scapy(frame: Ethernet) -> None:
    built = bytes(to_scapy(frame))
    assert frame.encode() == built
    assert decode_ethernet_untrusted(built) == frame
