"""VIP load balancing in the switch, no kernel: scapy builds the frames and checks the NAT."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, in4_chksum
from scapy.layers.l2 import ARP, Ether
from scapy.utils import checksum

from vxnet.dataplane.lb import LoadBalancer
from vxnet.dataplane.switch import Switch
from vxnet.dataplane.tables import (
    AddNetwork,
    AddPeer,
    AddPort,
    Backend,
    LbSettings,
    NetworkSpec,
    PortMap,
    RemoveService,
    SetLoadBalancer,
    SetService,
    endpoint_mac,
)
from vxnet.errors import UsageError
from vxnet.esp.sadb import SADB

NET = NetworkSpec(
    "front", 4097, ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Address("10.0.1.1")
)
VNI = NET.vni


def ip4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


IP_A, IP_A2, IP_L, IP_R1, IP_R2 = map(
    ip4, ("10.0.1.2", "10.0.1.4", "10.0.1.3", "10.0.1.9", "10.0.1.10")
)
VIP, LB = ip4("10.0.1.100"), ip4("10.0.1.200")
MAC_A, MAC_A2, MAC_L, MAC_R1, MAC_R2, VIP_MAC, LB_MAC = (
    endpoint_mac(ip) for ip in (IP_A, IP_A2, IP_L, IP_R1, IP_R2, VIP, LB)
)
FD_A, FD_A2, FD_L = 10, 14, 11
VTEP = "192.168.100.12"
VXLAN_HDR = bytes.fromhex("0800000000100100")  # I flag, VNI 4097


class Wire:
    def __init__(self) -> None:
        self.tap: list[tuple[int, bytes]] = []
        self.vnet: list[bytes] = []  # the virtio_net_hdr written with each TAP frame
        self.udp: list[tuple[bytes, tuple[str, int]]] = []
        self.esp: list[tuple[bytes, str]] = []

    def write(self, fd: int, vh: Any, data: Any) -> int:
        self.tap.append((fd, bytes(data)))
        self.vnet.append(bytes(vh))
        return len(data)

    def send(self, parts: Any, addr: tuple[str, int]) -> int:
        data = b"".join(bytes(p) for p in parts)
        self.udp.append((data, addr))
        return len(data)

    def send_esp(self, packet: bytes, vtep: str) -> int:
        self.esp.append((packet, vtep))
        return len(packet)

    def frames(self) -> list[bytes]:
        """Everything that left, as inner Ethernet frames, in order of kind (taps, then VXLAN)."""
        return [f for _, f in self.tap] + [d[8:] for d, _ in self.udp]

    def clear(self) -> None:
        self.tap.clear()
        self.udp.clear()
        self.esp.clear()


def make(
    backends: tuple[Backend, ...] = (Backend(IP_L),),
    ports: tuple[PortMap, ...] = (),
    lb_settings: LbSettings | None = None,
    spec: NetworkSpec = NET,
) -> tuple[Switch, Wire]:
    wire = Wire()
    sw = Switch(wire.write, wire.send, send_esp=wire.send_esp)
    sw.apply(AddNetwork(spec))
    sw.apply(AddPort(VNI, "a", FD_A, MAC_A, IP_A))
    sw.apply(AddPort(VNI, "a2", FD_A2, MAC_A2, IP_A2))
    sw.apply(AddPort(VNI, "l", FD_L, MAC_L, IP_L))
    sw.apply(AddPeer(VNI, MAC_R1, IP_R1, ip4(VTEP), "lab"))
    sw.apply(AddPeer(VNI, MAC_R2, IP_R2, ip4(VTEP), "lab"))
    if lb_settings is not None:
        sw.apply(lb_settings)
    sw.apply(SetLoadBalancer(VNI, LB))
    sw.apply(SetService(VNI, VIP, backends, ports))
    return sw, wire


def mac(b: bytes) -> str:
    return b.hex(":")


def tcp(
    src: tuple[bytes, ipaddress.IPv4Address, int],
    dst: tuple[bytes, ipaddress.IPv4Address, int],
    flags: str = "S",
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
) -> bytes:
    return bytes(
        Ether(src=mac(src[0]), dst=mac(dst[0]))
        / IP(src=str(src[1]), dst=str(dst[1]))
        / TCP(sport=src[2], dport=dst[2], flags=flags, seq=seq, ack=ack)
        / payload
    )


def udp(
    src: tuple[bytes, ipaddress.IPv4Address, int],
    dst: tuple[bytes, ipaddress.IPv4Address, int],
    payload: bytes = b"hello",
    chksum: int | None = None,
) -> bytes:
    return bytes(
        Ether(src=mac(src[0]), dst=mac(dst[0]))
        / IP(src=str(src[1]), dst=str(dst[1]))
        / UDP(sport=src[2], dport=dst[2], chksum=chksum)
        / payload
    )


def client(port: int = 40000, who: str = "a") -> tuple[bytes, ipaddress.IPv4Address, int]:
    return (MAC_A, IP_A, port) if who == "a" else (MAC_A2, IP_A2, port)


def vip(port: int = 80) -> tuple[bytes, ipaddress.IPv4Address, int]:
    return (VIP_MAC, VIP, port)


def assert_checksums_valid(frame: bytes) -> Any:
    """Both checksums verified independently by scapy: the header's and the pseudo header's."""
    pkt = Ether(frame)
    ip = pkt[IP]
    raw_ip = frame[14 : 14 + ip.len]
    assert checksum(raw_ip[: ip.ihl * 4]) == 0
    segment = raw_ip[ip.ihl * 4 :]
    if ip.proto == 17 and ip[UDP].chksum == 0:
        return pkt
    assert in4_chksum(ip.proto, ip, segment) == 0
    return pkt


def drops(sw: Switch) -> dict[str, int]:
    return sw.nets[VNI].counters.drops


def conn_rows(sw: Switch) -> list[dict[str, Any]]:
    return sw.conntrack()


# ------------------------------------------------------------------------------ forward


def test_syn_to_the_vip_is_translated_for_a_local_backend() -> None:
    sw, wire = make()
    syn = tcp(client(), vip(80), seq=123456)
    sw.from_tap(sw.ports["a"], syn)
    ((fd, out),) = wire.tap
    assert fd == FD_L
    pkt = assert_checksums_valid(out)
    assert (pkt.src, pkt.dst) == (mac(LB_MAC), mac(MAC_L))
    assert (pkt[IP].src, pkt[IP].dst) == (str(LB), str(IP_L))
    assert (pkt[TCP].sport, pkt[TCP].dport) == (40000, 80)  # a free client port is kept
    assert (pkt[TCP].seq, pkt[TCP].flags) == (123456, "S")
    assert pkt[IP].ttl == Ether(syn)[IP].ttl
    c = sw.nets[VNI].counters
    assert (c.lb_new, c.lb_active, c.local_frames) == (1, 1, 1)
    (row,) = conn_rows(sw)
    assert row["state"] == "SYN_SENT" and row["client"] == f"{IP_A}:40000"
    assert row["backend"] == f"{IP_L}:80" and row["snat"] == f"{LB}:40000"
    assert sw.stats()["networks"]["front"]["lb_active"] == 1


@settings(max_examples=200, deadline=None)
@given(
    proto=st.sampled_from(["tcp", "udp"]),
    sport=st.integers(1, 65535),
    dport=st.integers(1, 65535),
    seq=st.integers(0, 2**32 - 1),
    ident=st.integers(0, 65535),
    ttl=st.integers(1, 255),
    tos=st.integers(0, 255),
    options=st.sampled_from([[], [b"\x01\x01\x01\x00"]]),
    payload=st.binary(max_size=64),
    backend=st.sampled_from([IP_L, IP_R1]),
)
def test_the_rewrite_keeps_every_checksum_valid(
    proto: str,
    sport: int,
    dport: int,
    seq: int,
    ident: int,
    ttl: int,
    tos: int,
    options: list[bytes],
    payload: bytes,
    backend: ipaddress.IPv4Address,
) -> None:
    sw, wire = make((Backend(backend),))
    l4: Any = (
        TCP(sport=sport, dport=dport, flags="S", seq=seq)
        if proto == "tcp"
        else UDP(sport=sport, dport=dport)
    )
    ip_opts: Any = options[0] if options else []
    frame = bytes(
        Ether(src=mac(MAC_A), dst=mac(VIP_MAC))
        / IP(src=str(IP_A), dst=str(VIP), id=ident, ttl=ttl, tos=tos, options=ip_opts)
        / l4
        / payload
    )
    sw.from_tap(sw.ports["a"], frame)
    (out,) = wire.frames()
    pkt = assert_checksums_valid(out)
    layer = pkt[TCP] if proto == "tcp" else pkt[UDP]
    assert (pkt[IP].src, pkt[IP].dst, layer.dport) == (str(LB), str(backend), dport)
    assert bytes(layer.payload) == payload and pkt[IP].id == ident and pkt[IP].ttl == ttl
    # and the way back, from whichever backend port and SNAT port were chosen
    reply_l4: Any = (
        TCP(sport=dport, dport=layer.sport, flags="SA", seq=7, ack=(seq + 1) % 2**32)
        if proto == "tcp"
        else UDP(sport=dport, dport=layer.sport)
    )
    reply = bytes(
        Ether(src=mac(endpoint_mac(backend)), dst=mac(LB_MAC))
        / IP(src=str(backend), dst=str(LB), id=ident, options=ip_opts)
        / reply_l4
        / payload
    )
    wire.clear()
    if backend == IP_L:
        sw.from_tap(sw.ports["l"], reply)
    else:
        sw.from_underlay(memoryview(VXLAN_HDR + reply), (VTEP, 4789))
    ((fd, back),) = wire.tap
    assert fd == FD_A
    pkt = assert_checksums_valid(back)
    layer = pkt[TCP] if proto == "tcp" else pkt[UDP]
    assert (pkt[IP].src, pkt[IP].dst, layer.sport, layer.dport) == (
        str(VIP),
        str(IP_A),
        dport,
        sport,
    )
    assert (pkt.src, pkt.dst) == (mac(VIP_MAC), mac(MAC_A))


def test_a_reply_is_translated_back_and_the_handshake_tracked() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), seq=1000))
    snat = Ether(wire.tap[0][1])[TCP].sport
    wire.clear()
    sw.from_tap(sw.ports["l"], tcp((MAC_L, IP_L, 80), (LB_MAC, LB, snat), "SA", 5000, 1001))
    ((fd, out),) = wire.tap
    pkt = assert_checksums_valid(out)
    assert fd == FD_A and (pkt.src, pkt.dst) == (mac(VIP_MAC), mac(MAC_A))
    assert (pkt[IP].src, pkt[IP].dst) == (str(VIP), str(IP_A))
    assert (pkt[TCP].sport, pkt[TCP].dport, pkt[TCP].flags) == (80, 40000, "SA")
    assert conn_rows(sw)[0]["state"] == "SYN_RECV"
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), "A", 1001, 5001))
    assert conn_rows(sw)[0]["state"] == "ESTABLISHED"


def test_a_remote_backend_is_reached_over_vxlan_and_answers_from_the_underlay() -> None:
    sw, wire = make((Backend(IP_R1),))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    ((data, addr),) = wire.udp
    assert addr == (VTEP, 4789) and data[:8] == VXLAN_HDR
    pkt = assert_checksums_valid(data[8:])
    assert (pkt.dst, pkt[IP].dst, pkt[IP].src) == (mac(MAC_R1), str(IP_R1), str(LB))
    reply = tcp((MAC_R1, IP_R1, 80), (LB_MAC, LB, pkt[TCP].sport), "SA", 1, 1001)
    sw.from_underlay(memoryview(VXLAN_HDR + reply), (VTEP, 4789))
    ((fd, out),) = wire.tap
    assert fd == FD_A and Ether(out)[IP].src == str(VIP)
    c = sw.nets[VNI].counters
    assert (c.tx_frames, c.rx_frames) == (1, 1)


def test_an_encrypted_network_sends_the_translated_frame_as_esp() -> None:
    spec = NetworkSpec(NET.name, VNI, NET.subnet, NET.gateway, encrypted=True)
    sw, wire = make((Backend(IP_R1),), spec=spec)
    keys = [(1, bytes(16)), (2, bytes([1]) * 16), (3, bytes([2]) * 16)]
    local, peer = ip4("192.168.100.11"), ip4(VTEP)
    sw.sadb = SADB(local)
    sw.sadb.set_keys(keys)
    sw.sadb.add_peer(peer)
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    assert not wire.udp
    ((packet, vtep),) = wire.esp
    assert vtep == VTEP
    theirs = SADB(peer)
    theirs.set_keys(keys)
    theirs.add_peer(local)
    sa = theirs.rx(int.from_bytes(packet[0:4], "big"))
    assert sa is not None
    next_header, payload = sa.decrypt_untrusted(packet)
    assert next_header == 17 and payload[8:16] == VXLAN_HDR
    pkt = assert_checksums_valid(payload[16:])
    assert (pkt[IP].src, pkt[IP].dst) == (str(LB), str(IP_R1))


# ---------------------------------------------------------------------------- scheduling


def test_round_robin_spreads_30_connections_evenly_over_3_backends() -> None:
    sw, wire = make((Backend(IP_L), Backend(IP_R1), Backend(IP_R2)))
    for i in range(30):
        sw.from_tap(sw.ports["a"], tcp(client(41000 + i), vip()))
    hits = Counter(Ether(f)[IP].dst for f in wire.frames())
    assert hits == {str(IP_L): 10, str(IP_R1): 10, str(IP_R2): 10}
    (svc,) = sw.lb_table()
    assert [(b["ip"], b["weight"], b["active"]) for b in svc["backends"]] == [
        (str(IP_L), 1, 10),
        (str(IP_R1), 1, 10),
        (str(IP_R2), 1, 10),
    ]
    assert svc["vip"] == str(VIP) and svc["network"] == "front" and svc["ports"] == []


def test_weights_interleave_like_ipvs_wrr() -> None:
    sw, wire = make((Backend(IP_L, 2), Backend(IP_R1, 1)))
    for i in range(6):
        sw.from_tap(sw.ports["a"], tcp(client(41000 + i), vip()))
    hits = Counter(Ether(f)[IP].dst for f in wire.frames())
    assert hits == {str(IP_L): 4, str(IP_R1): 2}


def test_weight_zero_drains_a_backend_without_breaking_its_connections() -> None:
    sw, wire = make((Backend(IP_L), Backend(IP_R1)))
    sw.from_tap(sw.ports["a"], tcp(client(41000), vip()))  # -> L
    sw.from_tap(sw.ports["a"], tcp(client(41001), vip()))  # -> R1
    sw.apply(SetService(VNI, VIP, (Backend(IP_L), Backend(IP_R1, 0))))
    wire.clear()
    for i in range(4):
        sw.from_tap(sw.ports["a"], tcp(client(42000 + i), vip()))
    assert {Ether(f)[IP].dst for f in wire.frames()} == {str(IP_L)}
    wire.clear()
    sw.from_tap(sw.ports["a"], tcp(client(41001), vip(), "A", 1001, 1, b"still here"))
    ((data, _),) = wire.udp  # the drained backend still gets its old connection's data
    assert Ether(data[8:])[IP].dst == str(IP_R1) and not wire.tap
    backends = {b["ip"]: b for b in sw.lb_table()[0]["backends"]}
    assert backends[str(IP_R1)]["weight"] == 0 and backends[str(IP_R1)]["active"] == 1


def test_a_service_without_live_backends_drops_new_connections() -> None:
    sw, wire = make((Backend(IP_L, 0),))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    assert not wire.frames() and drops(sw) == {"lb_no_backend": 1}


# ------------------------------------------------------------------------------ resets


def _established(sw: Switch, wire: Wire, port: int = 40000) -> int:
    """Open client:port -> VIP:80 -> L, handshake done; return the SNAT port."""
    sw.from_tap(sw.ports["a"], tcp(client(port), vip(), seq=1000))
    snat = int(Ether(wire.tap[-1][1])[TCP].sport)
    sw.from_tap(sw.ports["l"], tcp((MAC_L, IP_L, 80), (LB_MAC, LB, snat), "SA", 5000, 1001))
    sw.from_tap(sw.ports["a"], tcp(client(port), vip(), "A", 1001, 5001))
    sw.from_tap(sw.ports["l"], tcp((MAC_L, IP_L, 80), (LB_MAC, LB, snat), "PA", 5001, 1001, b"hi"))
    sw.from_tap(sw.ports["a"], tcp(client(port), vip(), "A", 1001, 5003))
    wire.clear()
    return snat


def test_a_removed_backend_resets_its_clients() -> None:
    sw, wire = make((Backend(IP_L), Backend(IP_R1)))
    _established(sw, wire)
    sw.from_tap(sw.ports["a"], tcp(client(41000), vip()))  # -> R1, not touched below
    wire.clear()
    sw.apply(SetService(VNI, VIP, (Backend(IP_R1),)))
    ((fd, rst),) = wire.tap
    pkt = assert_checksums_valid(rst)
    assert fd == FD_A and (pkt.src, pkt.dst) == (mac(VIP_MAC), mac(MAC_A))
    assert (pkt[IP].src, pkt[IP].dst) == (str(VIP), str(IP_A))
    assert (pkt[TCP].sport, pkt[TCP].dport) == (80, 40000)
    assert pkt[TCP].flags == "R" and pkt[TCP].seq == 5003  # the client's last ACK
    assert [r["backend"] for r in sw.conntrack()] == [f"{IP_R1}:80"]
    wire.clear()
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), "A", 1001, 5003))
    assert not wire.frames() and drops(sw)["lb_no_conn"] == 1


def test_a_reset_before_the_handshake_acknowledges_the_syn() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), seq=777))
    wire.clear()
    sw.apply(RemoveService(VNI, VIP))
    ((fd, rst),) = wire.tap
    pkt = assert_checksums_valid(rst)
    assert fd == FD_A and pkt[TCP].flags == "RA" and pkt[TCP].ack == 778
    assert sw.conntrack() == [] and sw.nets[VNI].counters.lb_active == 0
    assert VIP.packed not in sw.nets[VNI].neigh


def test_removed_udp_flows_are_dropped_silently() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], udp(client(), vip(53)))
    wire.clear()
    sw.apply(SetService(VNI, VIP, ()))
    assert not wire.frames() and sw.conntrack() == []


# ------------------------------------------------------------------------------ SNAT


def test_two_clients_with_the_same_port_get_distinct_snat_ports() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], tcp(client(40000, "a"), vip()))
    sw.from_tap(sw.ports["a2"], tcp(client(40000, "a2"), vip()))
    first, second = (Ether(f)[TCP].sport for f in wire.frames())
    assert first == 40000 and second != first
    wire.clear()
    for snat in (first, second):
        reply = tcp((MAC_L, IP_L, 80), (LB_MAC, LB, snat), "SA", 1, 1001)
        sw.from_tap(sw.ports["l"], reply)
    assert [fd for fd, _ in wire.tap] == [FD_A, FD_A2]
    assert all(Ether(f)[TCP].dport == 40000 for _, f in wire.tap)


def test_udp_checksum_zero_stays_zero_and_a_real_one_is_updated() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], udp(client(5000), vip(53), chksum=0))
    sw.from_tap(sw.ports["a"], udp(client(5001), vip(53)))
    none, real = (Ether(f)[UDP] for f in wire.frames())
    assert none.chksum == 0 and real.chksum != 0
    assert_checksums_valid(wire.frames()[1])
    wire.clear()
    sw.from_tap(sw.ports["l"], udp((MAC_L, IP_L, 53), (LB_MAC, LB, 5000), b"answer", chksum=0))
    (out,) = wire.frames()
    assert Ether(out)[UDP].chksum == 0 and Ether(out)[IP].src == str(VIP)
    assert {r["state"] for r in sw.conntrack()} == {"UDP", "UDP_ASSURED"}


# ---------------------------------------------------------------------- routing mesh ports


def test_ingress_port_map_translates_published_to_target() -> None:
    sw, wire = make(ports=(PortMap("tcp", 8080, 80),))
    sw.from_tap(sw.ports["a"], tcp(client(), vip(8080)))
    (out,) = wire.frames()
    pkt = assert_checksums_valid(out)
    assert pkt[TCP].dport == 80
    wire.clear()
    sw.from_tap(sw.ports["l"], tcp((MAC_L, IP_L, 80), (LB_MAC, LB, pkt[TCP].sport), "SA", 1, 1001))
    back = assert_checksums_valid(wire.frames()[0])
    assert (back[TCP].sport, back[TCP].dport) == (8080, 40000)
    wire.clear()
    sw.from_tap(sw.ports["a"], tcp(client(40001), vip(9090)))  # not published
    sw.from_tap(sw.ports["a"], udp(client(40002), vip(8080)))  # published for TCP only
    assert not wire.frames() and drops(sw) == {"lb_port_not_published": 2}
    assert sw.lb_table()[0]["ports"] == [{"protocol": "tcp", "published": 8080, "target": 80}]


def test_replies_no_connection_claims_go_to_the_port_that_owns_the_lb_address() -> None:
    """The ingress sandbox is its own LB address: its other traffic still reaches it."""
    sw, wire = make()
    ip_s = ip4("10.0.1.50")
    mac_s = endpoint_mac(ip_s)
    sw.apply(AddPort(VNI, "ingress-sbox", 20, mac_s, ip_s))
    sw.apply(SetLoadBalancer(VNI, ip_s))
    stray = tcp((MAC_R1, IP_R1, 80), (mac_s, ip_s, 3333), "A", 1, 1)
    sw.from_underlay(memoryview(VXLAN_HDR + stray), (VTEP, 4789))
    sw.from_tap(sw.ports["l"], stray)
    assert wire.tap == [(20, stray), (20, stray)]
    # a connection through the sandbox's address is still translated
    wire.clear()
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    pkt = Ether(wire.frames()[0])
    assert (pkt.src, pkt[IP].src) == (mac(mac_s), str(ip_s))
    sw.apply(AddPort(VNI, "x", 21, endpoint_mac(ip4("10.0.1.51")), ip4("10.0.1.51")))
    # the sandbox going away leaves the LB address answered (it is still the LB's)
    from vxnet.dataplane.tables import RemovePort

    sw.apply(RemovePort("ingress-sbox"))
    assert sw.nets[VNI].neigh[ip_s.packed] == mac_s


def test_a_virtual_lb_address_drops_what_no_connection_claims() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["l"], tcp((MAC_L, IP_L, 80), (LB_MAC, LB, 3333), "A", 1, 1))
    sw.from_underlay(memoryview(VXLAN_HDR + tcp(client(), vip())), (VTEP, 4789))  # VIP from afar
    assert not wire.frames() and drops(sw) == {"lb_no_conn": 2}


# ----------------------------------------------------------------------------- expiry

SHORT = LbSettings(
    tcp_established_idle=1000,
    tcp_half_closed_idle=500,
    tcp_transitory=100,
    tcp_closed=10,
    udp_idle=30,
    udp_assured_idle=180,
)


def _alive_after(sw: Switch, t: float) -> bool:
    sw.tick(t)
    return bool(sw.conntrack())


def test_udp_flows_expire_sooner_until_a_reply_was_seen() -> None:
    sw, _ = make(lb_settings=SHORT)
    sw.tick(1000.0)
    sw.from_tap(sw.ports["a"], udp(client(), vip(53)))
    assert _alive_after(sw, 1029) and not _alive_after(sw, 1031)
    sw.from_tap(sw.ports["a"], udp(client(), vip(53)))
    sw.from_tap(sw.ports["l"], udp((MAC_L, IP_L, 53), (LB_MAC, LB, 40000)))
    assert _alive_after(sw, 1031 + 179) and not _alive_after(sw, 1031 + 181)
    assert sw.nets[VNI].counters.lb_active == 0
    assert sw.lb_table()[0]["backends"][0]["active"] == 0


@pytest.mark.parametrize(
    ("steps", "state", "timeout"),
    [
        (["syn"], "SYN_SENT", 100),  # a retransmitted SYN
        (["sa", "a"], "ESTABLISHED", 1000),
        (["sa", "a", "fin"], "FIN_WAIT", 500),
        (["sa", "a", "rfin"], "CLOSE_WAIT", 500),
        (["sa", "a", "fin", "rfin"], "TIME_WAIT", 100),
        (["sa", "a", "rst"], "CLOSED", 10),
    ],
)
def test_tcp_entries_expire_by_state(steps: list[str], state: str, timeout: float) -> None:
    sw, _ = make(lb_settings=SHORT)
    sw.tick(50.0)
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    sw.tick(60.0)  # the deadline is counted from the last packet
    back = (MAC_L, IP_L, 80), (LB_MAC, LB, 40000)
    for step in steps:
        if step == "sa":
            sw.from_tap(sw.ports["l"], tcp(*back, "SA", 5000, 1001))
        elif step == "rfin":
            sw.from_tap(sw.ports["l"], tcp(*back, "FA", 5001, 1001))
        else:
            flags = {"syn": "S", "a": "A", "fin": "FA", "rst": "R"}[step]
            sw.from_tap(sw.ports["a"], tcp(client(), vip(), flags, 1001, 5001))
    assert sw.conntrack()[0]["state"] == state
    assert _alive_after(sw, 60 + timeout - 1) and not _alive_after(sw, 60 + timeout + 1)


def test_traffic_keeps_an_entry_alive_and_a_shorter_state_expires_it_early() -> None:
    sw, wire = make(lb_settings=SHORT)
    _established(sw, wire)  # at t=0, established: deadline 1000
    sw.tick(900.0)
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), "A", 1001, 5003))  # now 1900
    assert _alive_after(sw, 1500) and _alive_after(sw, 1899)
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), "R", 1001, 0))  # closed: 1899 + 10
    assert not _alive_after(sw, 1910)


def test_a_new_syn_on_a_closing_entry_opens_a_new_connection() -> None:
    sw, wire = make((Backend(IP_L), Backend(IP_R1)))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), "R", 1001))
    sw.from_tap(sw.ports["a"], tcp(client(), vip(), seq=99))  # port reuse: scheduled again
    assert sw.nets[VNI].counters.lb_new == 2
    assert [Ether(f)[IP].dst for f in wire.frames()] == [str(IP_L), str(IP_L), str(IP_R1)]
    assert not [f for _, f in wire.tap if Ether(f).dst == mac(MAC_A)]  # no RST on reuse


def test_entries_of_ended_connections_do_not_pile_up(monkeypatch: Any) -> None:
    from vxnet.dataplane import lb as lb_mod

    monkeypatch.setattr(lb_mod, "HEAP_SLACK", 0)
    sw, _ = make((Backend(IP_L), Backend(IP_R1), Backend(IP_R2)))
    for i in range(21):
        sw.from_tap(sw.ports["a"], udp(client(41000 + i), vip(53)))
    sw.apply(SetService(VNI, VIP, (Backend(IP_R1),)))  # two thirds of them end now
    lb = sw.nets[VNI].lb
    assert lb is not None and len(lb._heap) == 21 and len(lb.fwd) == 7
    sw.tick(1.0)
    assert len(lb._heap) == 7  # rebuilt from the live connections only
    sw.tick(31.0)
    assert not lb.fwd and not lb._heap


def test_a_service_before_the_lb_address_drops_until_it_is_set() -> None:
    wire = Wire()
    sw = Switch(wire.write, wire.send)
    sw.apply(AddNetwork(NET))
    sw.apply(AddPort(VNI, "a", FD_A, MAC_A, IP_A))
    sw.apply(AddPort(VNI, "l", FD_L, MAC_L, IP_L))
    sw.apply(SetService(VNI, VIP, (Backend(IP_L),)))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    assert not wire.tap and drops(sw) == {"lb_no_address": 1}
    sw.apply(SetLoadBalancer(VNI, LB))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    assert [fd for fd, _ in wire.tap] == [FD_L]


def test_a_full_table_drops_new_connections() -> None:
    sw, wire = make(lb_settings=LbSettings(max_connections=3))
    for i in range(4):
        sw.from_tap(sw.ports["a"], tcp(client(41000 + i), vip()))
    assert len(wire.frames()) == 3 and drops(sw) == {"lb_table_full": 1}
    assert sw.nets[VNI].counters.lb_active == 3


# ------------------------------------------------------------------------------ drops


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (tcp(client(), vip(), "A", 1, 1), "lb_no_conn"),
        (tcp(client(), vip(), "SA", 1, 1), "lb_no_conn"),
        (
            bytes(
                Ether(src=mac(MAC_A), dst=mac(VIP_MAC)) / IP(src=str(IP_A), dst=str(VIP)) / ICMP()
            ),
            "lb_unsupported_proto",
        ),
        (
            bytes(
                Ether(src=mac(MAC_A), dst=mac(VIP_MAC))
                / IP(src=str(IP_A), dst=str(VIP), flags="MF")
                / UDP(sport=1, dport=53)
            ),
            "lb_fragment",
        ),
        (
            bytes(
                Ether(src=mac(MAC_A), dst=mac(VIP_MAC))
                / IP(src=str(IP_A), dst=str(VIP), frag=100, proto=17)
                / (b"x" * 20)
            ),
            "lb_fragment",
        ),
        (tcp(client(), (VIP_MAC, ip4("10.0.1.101"), 80)), "lb_not_vip"),
        (tcp(client(), vip())[:40], "lb_truncated"),
        (VIP_MAC + MAC_A + b"\x86\xdd" + bytes(60), "lb_not_ipv4"),
    ],
)
def test_what_the_vip_does_not_serve_is_dropped_and_counted(frame: bytes, reason: str) -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], frame)
    assert not wire.frames() and drops(sw) == {reason: 1}


def test_an_unknown_backend_is_dropped() -> None:
    sw, wire = make((Backend(ip4("10.0.1.77")),))
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    assert not wire.frames() and drops(sw) == {"lb_backend_unknown": 1}
    assert sw.nets[VNI].counters.lb_active == 0


# ----------------------------------------------------------------- ARP and the tables


def test_proxy_arp_answers_the_vip_and_the_lb_address_even_unicast() -> None:
    sw, wire = make()
    for target, dst in ((VIP, "ff:ff:ff:ff:ff:ff"), (LB, "ff:ff:ff:ff:ff:ff"), (VIP, mac(VIP_MAC))):
        req = Ether(src=mac(MAC_A), dst=dst) / ARP(
            op=1, hwsrc=mac(MAC_A), psrc=str(IP_A), pdst=str(target)
        )
        sw.from_tap(sw.ports["a"], bytes(req))
    answers = [Ether(f)[ARP] for _, f in wire.tap]
    assert [(a.op, a.psrc, a.hwsrc) for a in answers] == [
        (2, str(VIP), mac(VIP_MAC)),
        (2, str(LB), mac(LB_MAC)),
        (2, str(VIP), mac(VIP_MAC)),
    ]


def test_invalid_services_are_refused() -> None:
    sw, _ = make()
    with pytest.raises(UsageError):
        sw.apply(SetService(VNI, ip4("10.0.1.60"), (Backend(IP_L, 256),)))
    with pytest.raises(UsageError):
        sw.apply(SetService(VNI, IP_L, (Backend(IP_R1),)))  # a local endpoint's address
    with pytest.raises(UsageError):
        sw.apply(SetService(VNI, LB, (Backend(IP_R1),)))
    with pytest.raises(UsageError):
        sw.apply(SetService(VNI, VIP, (), (PortMap("tcp", 80, 0),)))
    with pytest.raises(UsageError):
        sw.apply(LbSettings(udp_idle=0))
    with pytest.raises(UsageError):
        sw.apply(SetService(999, VIP, ()))


def test_reprogramming_the_network_keeps_the_load_balancer() -> None:
    sw, wire = make()
    sw.from_tap(sw.ports["a"], tcp(client(), vip()))
    sw.apply(AddNetwork(NET))
    assert isinstance(sw.nets[VNI].lb, LoadBalancer) and len(sw.conntrack()) == 1
    sw.from_tap(sw.ports["a"], tcp(client(40001), vip()))
    assert len(wire.frames()) == 2


def test_moving_the_lb_address_resets_its_connections() -> None:
    sw, wire = make()
    _established(sw, wire)
    sw.apply(SetLoadBalancer(VNI, ip4("10.0.1.201")))
    ((fd, rst),) = wire.tap
    assert fd == FD_A and Ether(rst)[TCP].flags == "R"
    assert LB.packed not in sw.nets[VNI].neigh and sw.conntrack() == []


# ----------------------------------------------------------------------------- fuzzing


def _accounted(sw: Switch, wire: Wire) -> int:
    total = len(wire.tap) + len(wire.udp) + sum(sw.counters.drops.values())
    return total + sum(sum(n.counters.drops.values()) for n in sw.nets.values())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["vip", "lb-tap", "lb-wire"]),
            st.sampled_from([b"\x08\x00", b"\x08\x06", b"\x86\xdd"]),
            st.binary(max_size=80),
        ),
        max_size=20,
    )
)
def test_random_frames_to_the_vip_and_lb_never_raise(
    frames: list[tuple[str, bytes, bytes]],
) -> None:
    """Every frame is forwarded, answered or counted as a drop: exactly one of them."""
    sw, wire = make()
    for i, (where, etype, body) in enumerate(frames, start=1):
        if where == "vip":
            sw.from_tap(sw.ports["a"], VIP_MAC + MAC_A + etype + body)
        elif where == "lb-tap":
            sw.from_tap(sw.ports["l"], LB_MAC + MAC_L + etype + body)
        else:
            sw.from_underlay(memoryview(VXLAN_HDR + LB_MAC + MAC_R1 + etype + body), (VTEP, 4789))
        assert _accounted(sw, wire) == i


_SEEDS = (
    tcp(client(), vip(), "S"),
    udp(client(), vip(53)),
    tcp((MAC_L, IP_L, 80), (LB_MAC, LB, 40000), "SA", 1, 1001),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(range(len(_SEEDS))),
            st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=3),
            st.integers(20, 80),
        ),
        max_size=10,
    )
)
def test_mutated_frames_never_raise(frames: list[tuple[int, list[tuple[int, int]], int]]) -> None:
    """Valid frames with a few bytes changed and cut short reach deeper than random bytes."""
    sw, wire = make()
    for i, (seed, changes, cut) in enumerate(frames, start=1):
        frame = bytearray(_SEEDS[seed])
        for at, value in changes:
            if 12 <= at < len(frame):  # keep the MACs: the frame must reach the LB
                frame[at] = value
        port = sw.ports["l"] if seed == 2 else sw.ports["a"]
        sw.from_tap(port, bytes(frame[: max(14, len(frame) - cut % 30)]))
        assert _accounted(sw, wire) == i


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1024, 1100), st.sampled_from(["S", "A", "R", "F", "SA"]))))
def test_random_flag_sequences_keep_the_table_consistent(steps: list[tuple[int, str]]) -> None:
    sw, _wire = make(lb_settings=SHORT)
    for t, (port, flags) in enumerate(steps):
        sw.tick(float(t))
        sw.from_tap(sw.ports["a"], tcp(client(port), vip(), flags, 1, 1))
    lb = sw.nets[VNI].lb
    assert lb is not None
    assert len(lb.fwd) == len(lb.rev) == sw.nets[VNI].counters.lb_active
    assert sum(b.active for v in lb.vips.values() for b in v.backends.values()) == len(lb.fwd)
    sw.tick(10_000.0)
    assert not lb.fwd and not lb.rev and sw.nets[VNI].counters.lb_active == 0
