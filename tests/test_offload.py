"""Offload codecs without the kernel: the virtio_net_hdr, segmentation (against scapy), the
switch's handling of partial checksums and super-frames, and the LB's partial rewrite."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from vxnet.dataplane.gso import finish_checksum, segment_tcp
from vxnet.dataplane.nat import delta, fold, l4_offset, rewrite
from vxnet.dataplane.switch import Switch
from vxnet.dataplane.tables import AddNetwork, AddPeer, AddPort, NetworkSpec, endpoint_mac
from vxnet.dataplane.vnet import (
    GSO_TCPV4,
    GSO_TCPV6,
    HDR,
    NEEDS_CSUM,
    PLAIN,
    VnetHdr,
    decode_untrusted,
    pseudo_sum_v4,
    pseudo_sum_v6,
)
from vxnet.errors import BadPacket

MAC_A, MAC_B = b"\x02\x42\x0a\x00\x01\x02", b"\x02\x42\x0a\x00\x01\x03"


# ------------------------------------------------------------------------ virtio_net_hdr


@given(
    st.builds(
        VnetHdr,
        st.sampled_from([0, NEEDS_CSUM]),
        st.sampled_from([0, GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | 0x80]),
        st.integers(0, 0xFFFF),
        st.integers(1, 0xFFFF),
        st.integers(0, 1000),
        st.integers(0, 100),
    )
)
def test_vnet_hdr_round_trips(hdr: VnetHdr) -> None:
    if hdr.gso_type and not hdr.flags:
        return  # refused: a super-frame always has an unfinished checksum
    assert decode_untrusted(hdr.encode(), 2000) == hdr
    assert len(hdr.encode()) == 10
    assert hdr.is_gso == bool(hdr.gso_type)


def test_vnet_hdr_layout_is_little_endian() -> None:
    raw = VnetHdr(NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16).encode()
    assert raw == bytes([1, 1, 66, 0, 0x76, 0x05, 34, 0, 16, 0])


@given(st.binary(max_size=12), st.integers(0, 70000))
def test_vnet_decoder_returns_or_raises_bad_packet(data: bytes, frame_len: int) -> None:
    try:
        decode_untrusted(data, frame_len)
    except BadPacket as exc:
        assert exc.reason.startswith("vnet_")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (VnetHdr(4).encode(), "vnet_bad_flags"),
        (VnetHdr(NEEDS_CSUM, 9, 0, 1).encode(), "vnet_bad_gso_type"),
        (VnetHdr(NEEDS_CSUM, 0, 0, 0, 90, 16).encode(), "vnet_bad_csum_offset"),
        (VnetHdr(NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16).encode(), "vnet_bad_gso"),
        (b"\x00" * 4, "vnet_truncated"),
    ],
)
def test_vnet_decoder_refuses(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        decode_untrusted(raw, 100)
    assert info.value.reason == reason


# ---------------------------------------------------------- partial checksums, segmentation


def _partial(pkt: Any) -> bytearray:
    """scapy's frame with its L4 checksum replaced by the pseudo-header sum (as Linux leaves it)."""
    frame = bytearray(bytes(pkt))
    if frame[12:14] == b"\x08\x00":
        ihl = (frame[14] & 15) * 4
        l4_len = int.from_bytes(frame[16:18], "big") - ihl
        start, proto, s = 14 + ihl, frame[23], pseudo_sum_v4
    else:
        start, proto, s = 54, frame[20], pseudo_sum_v6
        l4_len = int.from_bytes(frame[18:20], "big")
    at = start + (16 if proto == 6 else 6)
    frame[at : at + 2] = s(frame, l4_len, proto).to_bytes(2, "big")
    return frame


payloads = st.binary(min_size=0, max_size=3000)


@given(payloads, st.sampled_from(["tcp", "udp", "tcp6"]))
def test_finishing_a_partial_checksum_gives_scapys(payload: bytes, kind: str) -> None:
    if kind == "tcp6":
        pkt = (
            Ether(src=MAC_A, dst=MAC_B)
            / IPv6(src="fd00::1", dst="fd00::2")
            / TCP(sport=1, dport=2)
            / payload
        )
    else:
        l4 = TCP(sport=1, dport=2, flags="PA") if kind == "tcp" else UDP(sport=5, dport=6)
        pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.1.2", dst="10.0.1.3") / l4 / Raw(payload)
    want = bytes(pkt)
    frame = _partial(pkt)
    start = 54 if kind == "tcp6" else 34
    finish_checksum(frame, start, 6 if kind == "udp" else 16)
    assert bytes(frame) == want


@given(
    st.binary(min_size=1, max_size=9000),
    st.sampled_from([536, 1398, 1410, 4000]),
    st.sampled_from(["PA", "FPA", "A", "PAC"]),
    st.booleans(),
)
def test_segments_match_scapy(payload: bytes, mss: int, flags: str, v6: bool) -> None:
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (7, 9))]
    tcp = TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=77, flags=flags, options=opts)
    if v6:
        super_frame = (
            Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::1", dst="fd00::2") / tcp / payload
        )
    else:
        super_frame = (
            Ether(src=MAC_A, dst=MAC_B)
            / IP(src="10.0.1.3", dst="10.0.1.2", id=0xFFFE, flags="DF")
            / tcp
        )
        super_frame = super_frame / payload
    segments = list(segment_tcp(_partial(super_frame), mss))
    assert len(segments) == -(-len(payload) // mss)
    for i, seg in enumerate(segments):
        got = Ether(bytes(seg))
        chunk = payload[i * mss : (i + 1) * mss]
        last = i == len(segments) - 1
        want_flags = int(tcp.flags) if last else int(tcp.flags) & ~0x09
        if i:
            want_flags &= ~0x80
        assert bytes(got[TCP].payload) == chunk
        assert got[TCP].seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        assert int(got[TCP].flags) == want_flags
        # checksums as scapy computes them from scratch
        clean = got.copy()
        del clean[TCP].chksum
        if not v6:
            del clean[IP].chksum, clean[IP].len
            assert got[IP].id == (0xFFFE + i) & 0xFFFF
        assert bytes(Ether(bytes(clean))) == bytes(seg)


def test_segment_refuses_what_is_not_tcp() -> None:
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP() / UDP() / Raw(b"x" * 100))
    with pytest.raises(BadPacket):
        list(segment_tcp(frame, 50))


# --------------------------------------------------------------------------- the switch


class Wire:
    def __init__(self) -> None:
        self.tap: list[tuple[int, bytes, bytes]] = []
        self.udp: list[bytes] = []
        self.offload: list[tuple[bytes, bytes]] = []

    def write(self, fd: int, vh: Any, data: Any) -> int:
        self.tap.append((fd, bytes(vh), bytes(data)))
        return len(data)

    def send(self, parts: Any, addr: tuple[str, int]) -> int:
        self.udp.append(b"".join(bytes(p) for p in parts))
        return 1

    def send_offload(self, vh: Any, frame: Any, vtep: tuple[str, int], vxlan: bytes) -> int:
        self.offload.append((bytes(vh), bytes(frame)))
        return 1


FRONT = NetworkSpec(
    "front", 4097, ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Address("10.0.1.1")
)


def _rig(offload: bool, send_offload: bool = True) -> tuple[Switch, Wire]:
    wire = Wire()
    sw = Switch(
        wire.write,
        wire.send,
        offload=offload,
        send_offload=wire.send_offload if send_offload else None,
        is_vnet=lambda fd: True,
    )
    sw.apply(AddNetwork(FRONT))
    sw.apply(AddPort(4097, "a", 10, MAC_A, ipaddress.IPv4Address("10.0.1.2")))
    sw.apply(
        AddPeer(4097, MAC_B, ipaddress.IPv4Address("10.0.1.3"), ipaddress.IPv4Address("192.0.2.2"))
    )
    return sw, wire


def _super_frame(size: int = 20000) -> tuple[bytearray, bytes]:
    pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.1.2", dst="10.0.1.3") / TCP(flags="PA")
    frame = _partial(pkt / Raw(bytes(range(256)) * (size // 256)))
    return frame, HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1398, 34, 16)


def test_a_super_frame_leaves_whole_with_its_header() -> None:
    sw, wire = _rig(offload=True)
    frame, vh = _super_frame()
    sw.from_tap(sw.ports["a"], frame, vh)
    assert wire.offload == [(vh, bytes(frame))]
    c = sw.nets[4097].counters
    assert (c.tx_frames, c.gso_tx, c.drops) == (1, 1, {})


def test_without_a_sender_super_frames_are_cut_into_complete_segments() -> None:
    sw, wire = _rig(offload=True, send_offload=False)
    frame, vh = _super_frame(5000)
    sw.from_tap(sw.ports["a"], frame, vh)
    assert len(wire.udp) == 4
    for datagram in wire.udp:
        inner = Ether(datagram[8:])
        clean = inner.copy()
        del clean[TCP].chksum, clean[IP].chksum
        assert bytes(Ether(bytes(clean))) == datagram[8:]


def test_a_super_frame_from_the_wire_goes_in_whole_with_needs_csum() -> None:
    sw, wire = _rig(offload=True)
    pkt = Ether(src=MAC_B, dst=MAC_A) / IP(src="10.0.1.3", dst="10.0.1.2") / TCP() / (b"z" * 5000)
    data = bytearray(b"\x08\x00\x00\x00\x00\x10\x01\x00" + bytes(pkt))  # complete checksum
    sw.from_underlay(memoryview(data), ("192.0.2.2", 4789))
    (_fd, vh, frame) = wire.tap[0]
    assert HDR.unpack(vh) == (NEEDS_CSUM, GSO_TCPV4, 0, 1450 - 40, 34, 16)
    want = _partial(pkt)
    assert frame == bytes(want)
    assert sw.nets[4097].counters.gso_rx == 1


def test_without_offload_a_big_frame_is_too_big_and_small_ones_go_in_plain() -> None:
    sw, wire = _rig(offload=False)
    pkt = Ether(src=MAC_B, dst=MAC_A) / IP(src="10.0.1.3", dst="10.0.1.2") / TCP() / (b"z" * 5000)
    sw.from_underlay(memoryview(bytearray(b"\x08\0\0\0\0\x10\x01\0" + bytes(pkt))), ("x", 1))
    assert sw.nets[4097].counters.drops == {"too_big": 1}
    small = Ether(src=MAC_B, dst=MAC_A) / IP(src="10.0.1.3", dst="10.0.1.2") / UDP() / b"hi"
    sw.from_underlay(memoryview(bytearray(b"\x08\0\0\0\0\x10\x01\0" + bytes(small))), ("x", 1))
    assert wire.tap == [(10, PLAIN, bytes(small))]


# -------------------------------------------------------------- the LB's partial rewrite


@given(st.binary(max_size=2000), st.sampled_from(["tcp", "udp"]))
def test_a_partial_rewrite_then_finishing_equals_a_full_rewrite(payload: bytes, kind: str) -> None:
    l4 = TCP(sport=40000, dport=80) if kind == "tcp" else UDP(sport=40000, dport=80)
    pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.1.5", dst="10.0.1.100") / l4 / Raw(payload)
    full = bytes(pkt)
    off = l4_offset(full)
    ips, ports = (
        ipaddress.IPv4Address("10.0.1.9").packed + bytes([10, 0, 1, 7]),
        b"\x04\x01\x1f\x90",
    )
    ipd = delta(full[26:34], ips)
    l4d = fold(ipd + delta(full[off : off + 4], ports))
    want = rewrite(full, off, b"\x02" * 12, ips, ports, ipd, l4d)
    got = rewrite(bytes(_partial(pkt)), off, b"\x02" * 12, ips, ports, ipd, ipd, partial=True)
    finish_checksum(got, off, 16 if kind == "tcp" else 6)
    assert got == want


def test_pseudo_sum_matches_scapy_layout() -> None:
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="1.2.3.4", dst="5.6.7.8") / TCP())
    words = struct.unpack("!4H", frame[26:34])
    assert pseudo_sum_v4(frame, 20, 6) == fold(sum(words) + 6 + 20)
    assert endpoint_mac(ipaddress.IPv4Address("10.0.1.2")) == MAC_A
