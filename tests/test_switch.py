"""The hot-path switch, without a kernel: fake TAP writes and UDP sends recorded in lists."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vxnet.dataplane.model import Counters
from vxnet.dataplane.switch import Switch
from vxnet.dataplane.tables import (
    AddNetwork,
    AddPeer,
    AddPort,
    NetworkSpec,
    RemoveNetwork,
    RemovePeer,
    RemovePort,
    endpoint_mac,
)
from vxnet.errors import UsageError
from vxnet.wire import decode_vxlan_untrusted

FRONT = NetworkSpec(
    "front", 4097, ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Address("10.0.1.1")
)
BACK = NetworkSpec(
    "back", 4098, ipaddress.IPv4Network("10.0.2.0/24"), ipaddress.IPv4Address("10.0.2.1")
)
IP_A, IP_B, IP_R = (ipaddress.IPv4Address(f"10.0.1.{i}") for i in (2, 3, 9))
MAC_A, MAC_B, MAC_R = (endpoint_mac(ip) for ip in (IP_A, IP_B, IP_R))
VTEP = ipaddress.IPv4Address("192.168.100.12")


class Wire:
    def __init__(self) -> None:
        self.tap: list[tuple[int, bytes]] = []
        self.vnet: list[bytes] = []  # the virtio_net_hdr written with each TAP frame
        self.udp: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, fd: int, vh: Any, data: Any) -> int:
        self.tap.append((fd, bytes(data)))
        self.vnet.append(bytes(vh))
        return len(data)

    def send(self, parts: Any, addr: tuple[str, int]) -> int:
        data = b"".join(bytes(p) for p in parts)
        self.udp.append((data, addr))
        return len(data)


@pytest.fixture
def rig() -> tuple[Switch, Wire]:
    wire = Wire()
    sw = Switch(wire.write, wire.send)
    sw.apply(AddNetwork(FRONT))
    sw.apply(AddNetwork(BACK))
    sw.apply(AddPort(FRONT.vni, "a", 10, MAC_A, IP_A))
    sw.apply(AddPort(FRONT.vni, "b", 11, MAC_B, IP_B))
    sw.apply(AddPeer(FRONT.vni, MAC_R, IP_R, VTEP, "lab"))
    return sw, wire


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 50, etype: bytes = b"\x08\x00") -> bytes:
    return dst + src + etype + payload


def drops(c: Counters) -> dict[str, int]:
    return c.drops


def test_local_ports_switch_directly(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    f = frame(MAC_B, MAC_A)
    sw.from_tap(sw.ports["a"], f)
    assert wire.tap == [(11, f)] and not wire.udp
    assert sw.nets[FRONT.vni].counters.local_frames == 1


def test_remote_mac_is_encapsulated_to_its_vtep(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    f = frame(MAC_R, MAC_A)
    sw.from_tap(sw.ports["a"], f)
    ((data, addr),) = wire.udp
    assert addr == (str(VTEP), 4789)
    assert data[:8] == bytes.fromhex("0800000000100100")  # I flag, VNI 4097 = 0x001001
    vx = decode_vxlan_untrusted(data)
    assert (vx.vni, vx.payload) == (4097, f)
    c = sw.nets[FRONT.vni].counters
    assert (c.tx_frames, c.tx_bytes) == (1, len(f))


def test_decap_delivers_to_the_local_mac(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    f = frame(MAC_A, MAC_R)
    sw.from_underlay(memoryview(bytes.fromhex("0800000000100100") + f), (str(VTEP), 4789))
    assert wire.tap == [(10, f)]
    assert sw.nets[FRONT.vni].counters.rx_frames == 1


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"\x08\x00\x00", "vxlan_truncated"),
        (bytes.fromhex("0800000000100100") + b"\x00" * 5, "inner_truncated"),
        (bytes.fromhex("0000000000100100") + frame(MAC_A, MAC_R), "vxlan_no_i_flag"),
        (bytes.fromhex("0800000000ABCD00") + frame(MAC_A, MAC_R), "unknown_vni"),
    ],
)
def test_bad_vxlan_is_dropped_and_counted(
    rig: tuple[Switch, Wire], datagram: bytes, reason: str
) -> None:
    sw, wire = rig
    sw.from_underlay(memoryview(datagram), ("192.168.100.99", 4789))
    assert not wire.tap and sw.counters.drops == {reason: 1}


def test_reserved_bits_are_ignored_on_receipt(rig: tuple[Switch, Wire]) -> None:
    """RFC 7348 section 5: reserved fields MUST be ignored by the receiver."""
    sw, wire = rig
    f = frame(MAC_A, MAC_R)
    sw.from_underlay(memoryview(bytes.fromhex("0Cffffff001001ff") + f), (str(VTEP), 4789))
    assert wire.tap == [(10, f)]


def test_unknown_destination_oversize_and_broadcast_are_dropped(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    port = sw.ports["a"]
    sw.from_tap(port, frame(b"\x02\x42\x0a\x00\x01\x63", MAC_A))
    sw.from_tap(port, frame(MAC_R, MAC_A, b"x" * (FRONT.mtu + 1)))
    sw.from_tap(port, frame(b"\xff" * 6, MAC_A))
    sw.from_tap(port, frame(FRONT.gateway_mac, MAC_A))
    sw.from_tap(port, b"\x00" * 10)
    assert not wire.tap and not wire.udp
    assert drops(sw.nets[FRONT.vni].counters) == {
        "unknown_dst": 1,
        "too_big": 1,
        "flood_suppressed": 1,
        "no_route_out": 1,
        "runt": 1,
    }


def test_a_full_mtu_frame_passes(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    sw.from_tap(sw.ports["a"], frame(MAC_R, MAC_A, b"x" * FRONT.mtu))
    assert len(wire.udp) == 1


def test_vnis_are_isolated(rig: tuple[Switch, Wire]) -> None:
    """A port on BACK cannot reach a MAC that only FRONT knows, even if it names it."""
    sw, wire = rig
    ip_c = ipaddress.IPv4Address("10.0.2.2")
    sw.apply(AddPort(BACK.vni, "c", 12, endpoint_mac(ip_c), ip_c))
    sw.from_tap(sw.ports["c"], frame(MAC_A, endpoint_mac(ip_c)))
    sw.from_tap(sw.ports["c"], frame(MAC_R, endpoint_mac(ip_c)))
    assert not wire.tap and not wire.udp
    assert drops(sw.nets[BACK.vni].counters) == {"unknown_dst": 2}
    # and a FRONT frame arriving from the wire is never given to a BACK port
    sw.from_underlay(memoryview(bytes.fromhex("0800000000100200") + frame(MAC_A, MAC_R)), ("x", 1))
    assert not wire.tap


def test_arp_is_answered_from_the_neighbour_table(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    req = bytes(
        Ether(src=MAC_A.hex(":"), dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=MAC_A.hex(":"), psrc=str(IP_A), pdst=str(IP_R))
    )
    sw.from_tap(sw.ports["a"], req)
    ((fd, reply),) = wire.tap
    parsed = Ether(reply)
    assert fd == 10 and parsed.dst == MAC_A.hex(":") and parsed.src == MAC_R.hex(":")
    arp = parsed[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (
        2,
        MAC_R.hex(":"),
        str(IP_R),
        MAC_A.hex(":"),
        str(IP_A),
    )
    assert sw.nets[FRONT.vni].counters.arp_replies == 1


def test_arp_for_the_gateway_and_for_unknowns(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig

    def ask(ip: str) -> None:
        sw.from_tap(
            sw.ports["a"],
            bytes(
                Ether(src=MAC_A.hex(":"), dst="ff:ff:ff:ff:ff:ff")
                / ARP(op=1, hwsrc=MAC_A.hex(":"), psrc=str(IP_A), pdst=ip)
            ),
        )

    ask("10.0.1.1")
    assert Ether(wire.tap[0][1])[ARP].hwsrc == FRONT.gateway_mac.hex(":")
    ask("10.0.1.77")
    ask(str(IP_A))  # gratuitous
    assert len(wire.tap) == 1
    assert drops(sw.nets[FRONT.vni].counters) == {"arp_unknown_target": 1, "arp_gratuitous": 1}


def test_neighbour_solicitation_is_answered(rig: tuple[Switch, Wire]) -> None:
    sw, wire = rig
    target = ipaddress.IPv6Address("fd00::9")
    sw.apply(AddPeer(FRONT.vni, MAC_R, target, VTEP, "manual"))
    ns = (
        Ether(src=MAC_A.hex(":"), dst="33:33:ff:00:00:09")
        / IPv6(src="fd00::2", dst="ff02::1:ff00:9", hlim=255)
        / ICMPv6ND_NS(tgt=str(target))
    )
    sw.from_tap(sw.ports["a"], bytes(ns))
    ((_, reply),) = wire.tap
    parsed = Ether(reply)
    na = parsed[ICMPv6ND_NA]
    assert parsed[IPv6].dst == "fd00::2" and parsed[IPv6].hlim == 255
    assert na.tgt == str(target) and na.S == 1 and na.O == 1
    assert parsed[ICMPv6NDOptDstLLAddr].lladdr == MAC_R.hex(":")
    # scapy recomputes the checksum: ours must be the same
    chk = na.cksum
    del na.cksum
    assert Ether(bytes(parsed))[ICMPv6ND_NA].cksum == chk


def test_peer_and_port_removal(rig: tuple[Switch, Wire]) -> None:
    sw, _wire = rig
    sw.apply(RemovePeer(FRONT.vni, MAC_R))
    assert sw.fdb() == []
    assert IP_R.packed not in sw.nets[FRONT.vni].neigh
    assert sw.apply(RemovePort("a")) == [10]
    assert sw.apply(RemoveNetwork(FRONT.vni)) == [11]
    assert FRONT.vni not in sw.nets


def test_updates_for_unknown_networks_are_refused(rig: tuple[Switch, Wire]) -> None:
    sw, _ = rig
    with pytest.raises(UsageError):
        sw.apply(AddPeer(999, MAC_R, IP_R, VTEP))
    with pytest.raises(UsageError):
        sw.apply(AddPort(999, "z", 99, MAC_R, IP_R))


def test_a_moved_mac_follows_its_new_vtep(rig: tuple[Switch, Wire]) -> None:
    """Stale FDB after IP reuse sent traffic to the wrong node in Docker (moby#35401)."""
    sw, wire = rig
    sw.apply(AddPeer(FRONT.vni, MAC_R, IP_R, ipaddress.IPv4Address("192.168.100.13"), "lab"))
    sw.from_tap(sw.ports["a"], frame(MAC_R, MAC_A))
    assert wire.udp[0][1] == ("192.168.100.13", 4789)


def _accounted(sw: Switch, wire: Wire) -> int:
    total = len(wire.tap) + len(wire.udp) + sum(sw.counters.drops.values())
    for net in sw.nets.values():
        total += sum(net.counters.drops.values())
    return total


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=20))
def test_every_frame_is_forwarded_answered_or_counted(frames: list[tuple[bool, bytes]]) -> None:
    wire = Wire()
    sw = Switch(wire.write, wire.send)
    sw.apply(AddNetwork(FRONT))
    sw.apply(AddPort(FRONT.vni, "a", 10, MAC_A, IP_A))
    sw.apply(AddPeer(FRONT.vni, MAC_R, IP_R, VTEP, "lab"))
    for i, (from_wire, data) in enumerate(frames, start=1):
        if from_wire:
            sw.from_underlay(memoryview(data), ("192.168.100.12", 4789))
        else:
            sw.from_tap(sw.ports["a"], data)
        assert _accounted(sw, wire) == i


def test_spoofed_esp_sources_cannot_grow_the_sa_table_without_bound(
    rig: tuple[Switch, Wire],
) -> None:
    from vxnet.dataplane import switch as sw_mod
    from vxnet.esp.sadb import SADB

    sw, _ = rig
    sw.sadb = SADB(ipaddress.IPv4Address("192.168.100.11"))
    sw.sadb.set_keys([(1, bytes(16)), (2, bytes([1]) * 16), (3, bytes([2]) * 16)])
    packet = bytes([0x45]) + bytes(19) + bytes.fromhex("deadbeef00000001") + bytes(40)
    for i in range(sw_mod.LAZY_ESP_PEERS + 50):
        sw.from_esp(memoryview(packet), f"10.99.{i // 250}.{i % 250 + 1}")
    assert len(sw._lazy_esp_peers) == sw_mod.LAZY_ESP_PEERS
    assert sw.counters.drops["esp_unknown_spi"] == sw_mod.LAZY_ESP_PEERS + 50
    sw.from_esp(memoryview(packet), "192.168.100.11")  # our own address: never derived
    assert "192.168.100.11" not in sw._lazy_esp_peers
