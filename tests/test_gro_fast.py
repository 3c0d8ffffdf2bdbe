"""Receive coalescing for ESP (vxnet/dataplane/gro.py), without a kernel: segments built by
scapy go in, super-frames with the kernel's GRO shape come out, in order."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from vxnet.dataplane.gro import Coalescer
from vxnet.dataplane.switch import Switch
from vxnet.dataplane.tables import AddNetwork, AddPeer, AddPort, NetworkSpec, endpoint_mac
from vxnet.dataplane.vnet import GSO_TCPV4, HDR, NEEDS_CSUM, PLAIN
from vxnet.esp.sadb import SADB

MSS = 1364
SRC, DST = "10.0.3.9", "10.0.3.2"
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]


def segment(seq: int, size: int = MSS, flags: str = "A", ack: int = 7, **kw: Any) -> bytes:
    payload = bytes((seq + i) & 0xFF for i in range(size))
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=ack, flags=flags, window=500, options=OPTS)
    ip = IP(src=kw.pop("src", SRC), dst=DST, id=seq & 0xFFFF, flags="DF", **kw)
    return bytes(Ether(dst="02:42:0a:00:03:02", src="02:42:0a:00:03:09") / ip / tcp / payload)


class Out:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes, bytes]] = []

    def emit(self, port: Any, vh: Any, frame: Any) -> None:
        self.frames.append((port, bytes(vh), bytes(frame)))


def test_a_run_of_segments_becomes_one_super_frame_like_the_kernels_gro() -> None:
    out = Out()
    gro = Coalescer(out.emit)
    segs = [segment(1000 + i * MSS) for i in range(10)] + [segment(1000 + 10 * MSS, 100, "PA")]
    for s in segs:
        gro.push("p", s)
    assert len(out.frames) == 1  # the PSH segment closed the run at once
    _, vh, sf = out.frames[0]
    flags, gso_type, hdr_len, gso_size, start, offset = HDR.unpack(vh)
    assert (flags, gso_type, gso_size, start, offset) == (NEEDS_CSUM, GSO_TCPV4, MSS, 34, 16)
    pkt = Ether(sf)
    assert hdr_len == 14 + 20 + len(pkt[TCP]) - len(pkt[TCP].payload)
    assert pkt[IP].len == len(sf) - 14
    reparsed = IP(bytes(pkt[IP]))
    del reparsed.chksum
    assert IP(bytes(reparsed)).chksum == pkt[IP].chksum  # the IP header checksum is final
    assert pkt[TCP].seq == 1000 and pkt[TCP].flags == "PA" and pkt[TCP].options == OPTS
    assert bytes(pkt[TCP].payload) == b"".join(bytes(Ether(s)[TCP].payload) for s in segs)
    # the checksum field holds the pseudo-header sum (NEEDS_CSUM), as Linux leaves it
    tcp_len = len(sf) - 34
    words = ipaddress.IPv4Address(SRC).packed + ipaddress.IPv4Address(DST).packed
    s = (int.from_bytes(words, "big") % 0xFFFF + 6 + tcp_len) % 0xFFFF or 0xFFFF
    assert pkt[TCP].chksum == s
    assert (gro.merged, gro.superframes) == (11, 1)


def test_flush_ends_a_run_and_a_lone_segment_goes_out_untouched() -> None:
    out = Out()
    gro = Coalescer(out.emit)
    one = segment(5)
    gro.push("p", one)
    assert out.frames == []
    gro.flush()
    assert out.frames == [("p", PLAIN, one)]  # its own checksum, no offload state


def test_anything_else_flushes_first_so_order_to_a_port_never_changes() -> None:
    out = Out()
    gro = Coalescer(out.emit)
    ping = bytes(Ether() / IP(src=SRC, dst=DST) / ICMP())
    udp = bytes(Ether() / IP(src=SRC, dst=DST) / UDP() / b"x")
    syn = segment(1, 0, "S")
    a, b = segment(100), segment(100 + MSS)
    for f in (a, b, ping, udp, syn):
        gro.push("p", f)
    assert [HDR.unpack(vh)[1] for _, vh, _ in out.frames] == [GSO_TCPV4, 0, 0, 0]
    assert [f for _, _, f in out.frames[1:]] == [ping, udp, syn]


def test_only_what_the_kernel_would_merge_is_merged() -> None:
    cases = {
        "a gap in sequence": segment(100 + 2 * MSS),
        "another ACK": segment(100 + MSS, ack=8),
        "another source": segment(100 + MSS, src="10.0.3.10"),
        "ECN CE": segment(100 + MSS, tos=3),
        "FIN": segment(100 + MSS, flags="FA"),
    }
    for why, second in cases.items():
        out = Out()
        gro = Coalescer(out.emit)
        gro.push("p", segment(100))
        gro.push("p", second)
        gro.flush()
        assert [vh for _, vh, _ in out.frames] == [PLAIN, PLAIN], why


def test_a_short_segment_closes_the_run_and_ports_are_separate() -> None:
    out = Out()
    gro = Coalescer(out.emit)
    gro.push("p", segment(0))
    gro.push("q", segment(0))
    gro.push("p", segment(MSS, 10))  # short: the run is complete
    assert [p for p, _, _ in out.frames] == ["p"]
    gro.push("p", segment(MSS + 10))  # after a short one: a new run
    gro.flush()
    assert sorted(p for p, _, _ in out.frames) == ["p", "p", "q"]


def test_a_run_stops_short_of_one_ip_datagram() -> None:
    out = Out()
    gro = Coalescer(out.emit)
    for i in range(60):
        gro.push("p", segment(i * MSS))
    gro.flush()
    assert all(len(f) <= 14 + 65535 for _, _, f in out.frames)
    assert sum(len(Ether(f)[TCP].payload) for _, _, f in out.frames) == 60 * MSS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["next", "gap", "ping", "psh", "flush", "short"]), max_size=30))
def test_every_payload_byte_arrives_once_and_in_order(steps: list[str]) -> None:
    out = Out()
    gro = Coalescer(out.emit)
    seq, sent = 0, []
    for step in steps:
        if step == "flush":
            gro.flush()
            continue
        if step == "ping":
            f = bytes(Ether() / IP(src=SRC, dst=DST) / ICMP())
        else:
            seq += MSS if step == "gap" else 0
            size = 50 if step == "short" else MSS
            f = segment(seq, size, "PA" if step == "psh" else "A")
            seq += size
        sent.append(f)
        gro.push("p", f)
    gro.flush()
    got = b"".join(bytes(Ether(f)[TCP].payload) for _, _, f in out.frames if TCP in Ether(f))
    want = b"".join(bytes(Ether(f)[TCP].payload) for f in sent if TCP in Ether(f))
    assert got == want
    assert sum(1 for f in sent if TCP not in Ether(f)) == sum(
        1 for _, _, f in out.frames if TCP not in Ether(f)
    )


def test_the_switch_merges_decrypted_segments_and_counts_every_one() -> None:
    secret = NetworkSpec(
        "secret",
        4099,
        ipaddress.IPv4Network("10.0.3.0/24"),
        ipaddress.IPv4Address("10.0.3.1"),
        mtu=1416,
        encrypted=True,
    )
    here, there = ipaddress.IPv4Address("192.168.100.11"), ipaddress.IPv4Address("192.168.100.12")
    keys = [(1, bytes(range(16))), (2, bytes(range(1, 17))), (3, bytes(range(2, 18)))]
    sender = SADB(there)
    sender.set_keys(keys)
    sender.add_peer(here)
    writes: list[tuple[int, bytes, bytes]] = []

    def write(fd: int, vh: Any, frame: Any) -> int:
        writes.append((fd, bytes(vh), bytes(frame)))
        return len(frame)

    sw = Switch(write, lambda parts, addr: 0, is_vnet=lambda fd: True)
    sw.coalesce_rx()
    sw.apply(AddNetwork(secret))
    dst = ipaddress.IPv4Address(DST)
    sw.apply(AddPort(secret.vni, "s1", 10, endpoint_mac(dst), dst))
    src = ipaddress.IPv4Address(SRC)
    sw.apply(AddPeer(secret.vni, endpoint_mac(src), src, there, "gossip"))
    sw.sadb = SADB(here)
    sw.sadb.set_keys(keys)
    sw.sadb.add_peer(there)
    vxlan = b"\x08\x00\x00\x00" + secret.vni.to_bytes(3, "big") + b"\x00"
    for i in range(5):
        inner = vxlan + segment(i * MSS)
        udp = (4789).to_bytes(2, "big") * 2 + (8 + len(inner)).to_bytes(2, "big") + b"\0\0"
        esp = sender.tx(here).encrypt(udp + inner)
        sw.from_esp(memoryview(b"\x45" + bytes(19) + esp), str(there))
    assert writes == []
    sw.flush_rx()
    c = sw.nets[secret.vni].counters
    assert len(writes) == 1 and HDR.unpack(writes[0][1])[1] == GSO_TCPV4
    assert (c.rx_frames, c.esp_rx, c.gso_rx, c.drops) == (5, 5, 1, {})
