"""``vxnet trace``'s dissector, without a lab: frames built with scapy and with vxnet's own codecs
(ESP SAs, memberlist packets, networkdb, dnspython), described against a hand-made context."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers import ipsec
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import rdpcap

from vxnet.esp.sa import SecurityAssociation
from vxnet.esp.spi import derive_spi, salt_for_spi
from vxnet.gossip import messages as m
from vxnet.gossip.networkdb import NetworkDB, PeerRecord
from vxnet.gossip.packet import Keyring, encode_packet, encode_stream
from vxnet.trace.capture import PACKET_OUTGOING, Where, pcap_header, pcap_record
from vxnet.trace.context import Endpoint, NetworkInfo, TraceContext
from vxnet.trace.dissect import describe
from vxnet.trace.layers import Layer, Packet, TraceFilter, render_json, render_text
from vxnet.wire import vxlan_header

H1, H2 = "192.168.100.11", "192.168.100.12"
H1_MAC, H2_MAC = "02:00:00:00:00:11", "02:00:00:00:00:12"
GOSSIP_KEYS = [(10, bytes(range(16))), (11, bytes(range(16, 32))), (12, bytes(range(32, 48)))]
IPSEC_KEYS = [
    (20, bytes.fromhex("00112233445566778899aabbccddeeff")),
    (21, bytes(16)),
    (22, b"\x42" * 16),
]
PRIMARY_IPSEC = IPSEC_KEYS[1]
MEMBER1, MEMBER2 = "ppfrtwem7dak-9d9e3b87", "qmmf30sb1ckl-b916d218"

APP = NetworkInfo("app", 4099, "10.0.3.0/24", id="dn5sb7zz95h8")
SEC = NetworkInfo("sec", 4100, "10.0.4.0/24", encrypted=True, id="9ql99vp059ph")
C1 = Endpoint("container", "c1", "app", "10.0.3.7", "02:42:0a:00:03:07", "h1")
C2 = Endpoint("container", "c2", "app", "10.0.3.8", "02:42:0a:00:03:08", "h2")
WEB = Endpoint("task", "web.1.abc", "app", "10.0.3.3", "02:42:0a:00:03:03", "h2", "web")
VIP = Endpoint("vip", "web", "app", "10.0.3.2", "02:42:0a:00:03:02", service="web")
LB1 = Endpoint("lb", "h1", "app", "10.0.3.5", "02:42:0a:00:03:05", "h1")
S1 = Endpoint("container", "s1", "sec", "10.0.4.2", "02:42:0a:00:04:02", "h1")
S2 = Endpoint("container", "s2", "sec", "10.0.4.4", "02:42:0a:00:04:04", "h2")


def context(decrypt: bool = False) -> TraceContext:
    return TraceContext.build(
        networks=[APP, SEC],
        endpoints=[C1, C2, WEB, VIP, LB1, S1, S2],
        hosts={H1: "h1", H2: "h2"},
        host_macs={H1_MAC: "h1", H2_MAC: "h2"},
        members={MEMBER1: "h1", MEMBER2: "h2"},
        ipsec_keys=IPSEC_KEYS,
        gossip_keys=GOSSIP_KEYS,
        decrypt_esp=decrypt,
    )


def texts(layers: list[Layer]) -> str:
    return "\n".join(f"{layer.proto}:{layer.depth}: {layer.text}" for layer in layers)


def underlay(src: str, dst: str) -> Ether:
    macs = {H1: H1_MAC, H2: H2_MAC}
    return Ether(src=macs[src], dst=macs[dst]) / IP(src=src, dst=dst)


def ping_frame(a: Endpoint, b: Endpoint, seq: int = 1) -> bytes:
    return bytes(
        Ether(src=a.mac, dst=b.mac) / IP(src=a.ip, dst=b.ip) / ICMP(id=7, seq=seq) / (b"x" * 16)
    )


def vxlan_frame(src: str, dst: str, vni: int, inner: bytes) -> bytes:
    return bytes(underlay(src, dst) / UDP(sport=40000, dport=4789) / Raw(vxlan_header(vni) + inner))


def vxlan_datagram(vni: int, inner: bytes) -> bytes:
    """UDP + VXLAN, the VXLAN header from vxnet's own codec."""
    return bytes(UDP(sport=40000, dport=4789) / Raw(vxlan_header(vni) + inner))


# ----------------------------------------------------------------------------------- VXLAN


def test_vxlan_names_network_hosts_and_containers() -> None:
    frame = vxlan_frame(H2, H1, 4099, ping_frame(C2, C1))
    layers = describe(frame, context())
    assert [(layer.proto, layer.depth) for layer in layers] == [
        ("eth", 0),
        ("ipv4", 0),
        ("udp", 0),
        ("vxlan", 0),
        ("eth", 1),
        ("ipv4", 1),
        ("icmp", 1),
    ]
    out = texts(layers)
    assert f"{H2_MAC} (h2) -> {H1_MAC} (h1)" in out
    assert f"{H2} (h2) -> {H1} (h1)" in out
    assert "40000 -> 4789 (VXLAN)" in out
    assert "flags 0x08 (I: VNI valid)  VNI 4099 = network app" in out
    assert "10.0.3.8 (c2 on h2) -> 10.0.3.7 (c1 on h1)" in out
    assert "echo-request  id 7 seq 1" in out
    refs = {ref for layer in layers for ref in layer.refs}
    assert {("network", "app"), ("container", "c1"), ("container", "c2"), ("host", "h1")} <= refs


def test_vxlan_built_by_scapy_and_odd_flags() -> None:
    frame = underlay(H1, H2) / UDP(sport=1, dport=4789) / VXLAN(vni=77, flags=0x00)
    out = texts(describe(bytes(frame / Raw(ping_frame(C1, C2))), context()))
    assert "I flag clear: a VTEP drops this" in out
    assert "VNI 77 (no network in this lab)" in out


def test_arp_for_a_vip_inside_vxlan() -> None:
    arp = Ether(src=C1.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=C1.mac, psrc=C1.ip, pdst=VIP.ip
    )
    frame = vxlan_frame(H1, H2, 4099, bytes(arp))
    out = texts(describe(frame, context()))
    assert "ff:ff:ff:ff:ff:ff (broadcast)" in out
    assert "arp:1: who has 10.0.3.2 (VIP of service web)? tell 10.0.3.7 (c1 on h1)" in out
    reply = Ether(src=VIP.mac, dst=C1.mac) / ARP(op=2, hwsrc=VIP.mac, psrc=VIP.ip, pdst=C1.ip)
    out = texts(describe(bytes(reply), context()))
    assert f"10.0.3.2 (VIP of service web) is at {VIP.mac}" in out


# ----------------------------------------------------------------------------------- ESP


def esp_frame(src: str, dst: str, datagram: bytes, key: tuple[int, bytes], **sa: Any) -> bytes:
    """IPv4 protocol 50 from ``src`` to ``dst``: vxnet's own SA, Docker's SPI and salt."""
    spi = derive_spi(IPv4Address(src), IPv4Address(dst), key[0])
    esp = SecurityAssociation(spi, key[1], salt_for_spi(spi), **sa).encrypt(datagram)
    macs = {H1: H1_MAC, H2: H2_MAC}
    return bytes(Ether(src=macs[src], dst=macs[dst]) / IP(src=src, dst=dst, proto=50) / Raw(esp))


def test_esp_names_the_sa_and_stays_closed_without_decrypt() -> None:
    frame = esp_frame(H2, H1, vxlan_datagram(4100, ping_frame(S2, S1)), PRIMARY_IPSEC)
    layers = describe(frame, context())
    out = texts(layers)
    spi = derive_spi(IPv4Address(H2), IPv4Address(H1), 21)
    assert f"esp:0: SPI 0x{spi:08x} seq 1 = h2 -> h1, key tag 21, the primary" in out
    assert "add --decrypt" in out
    assert layers[-1].proto == "esp"


@pytest.mark.parametrize(("icv_len", "esn"), [(16, True), (8, True), (8, False), (16, False)])
def test_esp_decrypts_down_to_the_inner_icmp(icv_len: int, esn: bool) -> None:
    datagram = vxlan_datagram(4100, ping_frame(S2, S1, seq=9))
    frame = esp_frame(H2, H1, datagram, IPSEC_KEYS[2], icv_len=icv_len, esn=esn)
    layers = describe(frame, context(decrypt=True))
    out = texts(layers)
    assert f"key tag 22; decrypted (AES-GCM, ICV {icv_len} bytes)" in out
    assert "vxlan:1: flags 0x08 (I: VNI valid)  VNI 4100 = network sec, an encrypted network" in out
    assert "ipv4:2: 10.0.4.4 (s2 on h2) -> 10.0.4.2 (s1 on h1)" in out
    assert "icmp:2: echo-request  id 7 seq 9" in out


def test_esp_made_by_scapy_is_opened_by_trace() -> None:
    """Cross-check: scapy's own ESP (AES-GCM, ESN) with Docker's SPI and salt, trace decrypts."""
    tag, key = PRIMARY_IPSEC
    spi = derive_spi(IPv4Address(H1), IPv4Address(H2), tag)
    sa = ipsec.SecurityAssociation(  # type: ignore[no-untyped-call]
        ipsec.ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key + salt_for_spi(spi), esn_en=True
    )
    inner = IP(src=H1, dst=H2) / UDP(sport=5000, dport=4789) / VXLAN(vni=4100)
    inner = inner / Ether(ping_frame(S1, S2, seq=3))
    encrypted = sa.encrypt(IP(bytes(inner)), seq_num=5)  # type: ignore[no-untyped-call]
    frame = bytes(Ether(src=H1_MAC, dst=H2_MAC) / encrypted)
    out = texts(describe(frame, context(decrypt=True)))
    assert f"SPI 0x{spi:08x} seq 5 = h1 -> h2, key tag 21, the primary; decrypted" in out
    assert "10.0.4.2 (s1 on h1) -> 10.0.4.4 (s2 on h2)" in out
    assert "echo-request  id 7 seq 3" in out


def test_esp_that_no_key_opens() -> None:
    spi = derive_spi(IPv4Address(H2), IPv4Address(H1), 21)
    forged = SecurityAssociation(spi, b"\x99" * 16, salt_for_spi(spi)).encrypt(b"\x00" * 40)
    frame = bytes(Ether() / IP(src=H2, dst=H1, proto=50) / Raw(forged))
    assert "could not decrypt: esp_auth_failed" in texts(describe(frame, context(decrypt=True)))
    unknown = bytes(Ether() / IP(src=H2, dst=H1, proto=50) / Raw(b"\x00\x00\x01\x00" * 10))
    assert "no swarm key gives this SPI" in texts(describe(unknown, context(decrypt=True)))
    short = bytes(Ether() / IP(src=H2, dst=H1, proto=50) / Raw(b"\x01\x02"))
    assert "undecodable: esp_truncated" in texts(describe(short, context(decrypt=True)))


# ----------------------------------------------------------------------------------- gossip


def gossip_ring() -> Keyring:
    keys = [k for _, k in GOSSIP_KEYS]
    return Keyring(keys, primary=keys[1])


def gossip_frame(payload: bytes, src: str = H1, dst: str = H2, tcp: bool = False) -> bytes:
    l4 = TCP(sport=7946, dport=41000, flags="PA") if tcp else UDP(sport=7946, dport=7946)
    return bytes(underlay(src, dst) / l4 / Raw(payload))


@pytest.mark.parametrize("compress", [False, True])
def test_gossip_swim_messages_with_member_names(compress: bool) -> None:
    msgs: list[m.Message] = [
        m.Ping(12, MEMBER2, IPv4Address(H1).packed, 7946, MEMBER1),
        m.Ack(12),
        m.Alive(3, MEMBER2, IPv4Address(H2).packed, 7946),
        m.Suspect(2, MEMBER2, MEMBER1),
        m.Dead(4, MEMBER1, MEMBER1),
        m.IndirectPing(13, IPv4Address(H2).packed, 7946, MEMBER2, True, b"", 0, MEMBER1),
    ]
    payload = encode_packet(
        [m.encode_message(x) for x in msgs], crc=True, compress=compress, keyring=gossip_ring()
    )
    layers = describe(gossip_frame(payload), context())
    out = texts(layers)
    assert "decrypted with networking:gossip key tag 11, the primary: 6 messages" in out
    assert f"gossip:1: ping seq 12 to {MEMBER2} (h2) from {MEMBER1} (h1)" in out
    assert "gossip:1: ack seq 12" in out
    assert f"alive {MEMBER2} (h2) at {H2}:7946 incarnation 3" in out
    assert f"suspect {MEMBER2} (h2) incarnation 2, says {MEMBER1} (h1)" in out
    assert f"leave: {MEMBER1} (h1) leaves" in out
    assert f"indirect ping seq 13: please ping {MEMBER2} (h2) at {H2}:7946 for {MEMBER1}" in out
    assert [la.fields.get("type") for la in layers if la.depth == 1] == [
        "ping",
        "ack",
        "alive",
        "suspect",
        "dead",
        "indirect_ping",
    ]


def test_gossip_with_an_older_key_and_with_none() -> None:
    old = Keyring([GOSSIP_KEYS[0][1]])
    payload = encode_packet([m.encode_message(m.Ack(1))], crc=False, compress=False, keyring=old)
    assert "key tag 10: 1 message" in texts(describe(gossip_frame(payload), context()))
    stranger = Keyring([b"\x07" * 16])
    payload = encode_packet(
        [m.encode_message(m.Ack(1))], crc=False, compress=False, keyring=stranger
    )
    out = texts(describe(gossip_frame(payload), context()))
    assert "undecodable: no_installed_key_decrypts" in out


def test_gossip_push_pull_over_tcp() -> None:
    nodes = (
        m.PushNodeState(MEMBER1, IPv4Address(H1).packed, 7946, None, 1, m.NodeState.ALIVE),
        m.PushNodeState(MEMBER2, IPv4Address(H2).packed, 7946, None, 5, m.NodeState.SUSPECT),
    )
    db = NetworkDB(
        MEMBER1, lambda n, p: True, lambda n, p: None, lambda p, k: None, random.Random(1)
    )
    db.join_network(APP.id, 0.0)
    message = m.encode_message(m.PushPull(True, nodes, db.local_state()))
    stream = encode_stream(message, compress=True, keyring=gossip_ring())
    out = texts(describe(gossip_frame(stream, tcp=True), context()))
    assert "memberlist stream message" in out
    assert "push/pull (join): full state of 2 member(s)" in out
    assert f"gossip:2: {MEMBER2} (h2) at {H2}:7946: suspect, incarnation 5" in out
    assert "network attachments: app (1 nodes)" in out
    partial = describe(gossip_frame(stream[:20], tcp=True), context())
    assert "gossip_stream_continues" in texts(partial)


def test_networkdb_table_events_inside_user_messages() -> None:
    """Real networkdb output (a join, a gossip batch, a bulk sync), read back by trace."""
    udp: list[bytes] = []
    tcp: list[bytes] = []
    broadcasts: list[bytes] = []

    def send_udp(node: str, payload: bytes) -> bool:
        udp.append(payload)
        return True

    a = NetworkDB(
        MEMBER2,
        send_udp,
        lambda n, p: tcp.append(p),
        lambda p, k: broadcasts.append(p),
        random.Random(1),
    )
    b = NetworkDB(
        MEMBER1,
        lambda n, p: True,
        lambda n, p: None,
        lambda p, k: broadcasts.append(p),
        random.Random(2),
    )
    a.join_network(APP.id, 0.0)
    b.join_network(APP.id, 0.0)
    a.handle_message(broadcasts[1], 0.0)
    a.node_alive(MEMBER1)
    record = PeerRecord("10.0.3.8/24", C2.mac, H2).encode()
    a.create_entry(APP.id, "overlay_peer_table", "ep-c2", record, 0.0)
    a.handle_timer(1.0)
    expected = {
        udp[0]: [
            "networkdb:1: 1 table event(s)",
            f"networkdb:2: create overlay_peer_table on app by {MEMBER2} (h2): "
            f"10.0.3.8/24 {C2.mac} behind VTEP {H2} (h2)",
        ],
        # a pushes its table to b as soon as it hears b join (a bulk sync flagged as a reply,
        # so b does not answer it), then syncs with b on its timer
        tcp[0]: [
            f"networkdb:1: reply to a bulk sync of network app from {MEMBER2} (h2): 0 entries"
        ],
        tcp[1]: [f"networkdb:1: bulk sync of network app from {MEMBER2} (h2): 1 entries"],
        broadcasts[0]: [f"networkdb:1: {MEMBER2} (h2) joins network app (Lamport 1)"],
    }
    for payload, lines in expected.items():
        msg = encode_packet(
            [m.encode_message(m.User(payload))], crc=False, compress=False, keyring=gossip_ring()
        )
        layers = describe(gossip_frame(msg, src=H2, dst=H1), context())
        for line in lines:
            assert line in texts(layers)
        assert TraceFilter(networks=frozenset({"app"}), hosts=frozenset({"h2"})).matches(layers)
    plain = encode_packet(
        [m.encode_message(m.User(b"hello"))], crc=False, compress=False, keyring=gossip_ring()
    )
    assert "user message, 5 bytes (not networkdb)" in texts(
        describe(gossip_frame(plain), context())
    )


# ----------------------------------------------------------------------------------- DNS


def dns_frame(message: dns.message.Message, query: bool) -> bytes:
    ports = (40000, 53) if query else (53, 40000)
    ips = ("127.0.0.1", "127.0.0.11") if query else ("127.0.0.11", "127.0.0.1")
    udp = UDP(sport=ports[0], dport=ports[1]) / Raw(message.to_wire())
    return bytes(
        Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00") / IP(src=ips[0], dst=ips[1]) / udp
    )


def test_dns_query_and_answer_name_the_vip() -> None:
    query = dns.message.make_query("web", "A")
    out = texts(describe(dns_frame(query, True), context()))
    assert f"dns:0: query id 0x{query.id:04x}: A web?" in out
    answer = dns.message.make_response(query)
    answer.flags |= dns.flags.AA
    answer.answer.append(dns.rrset.from_text("web.", 600, "IN", "A", VIP.ip))
    layers = describe(dns_frame(answer, False), context())
    out = texts(layers)
    assert f"answer id 0x{query.id:04x} NOERROR, authoritative: A web" in out
    assert "dns:1: web A 10.0.3.2 (VIP of service web)  ttl 600" in out
    assert TraceFilter(protos=frozenset({"dns"})).matches(layers)


def test_dns_over_tcp_and_garbage_on_port_53() -> None:
    query = dns.message.make_query("tasks.web", "A").to_wire()
    seg = TCP(sport=40000, dport=53, flags="PA") / Raw(len(query).to_bytes(2, "big") + query)
    frame = bytes(Ether() / IP(src="127.0.0.1", dst="127.0.0.11") / seg)
    assert "A tasks.web?" in texts(describe(frame, context()))
    junk = bytes(Ether() / IP() / UDP(sport=1, dport=53) / Raw(b"\x12\x34\x01"))
    assert "undecodable: dns_" in texts(describe(junk, context()))


# ----------------------------------------------------------------------------------- LB


def test_a_frame_to_a_vip_and_the_snat_behind_it() -> None:
    syn = Ether(src=C1.mac, dst=VIP.mac) / IP(src=C1.ip, dst=VIP.ip) / TCP(sport=5555, dport=80)
    layers = describe(bytes(syn), context())
    lb = [la for la in layers if la.proto == "lb"]
    assert lb[0].text.startswith("VIP 10.0.3.2 (service web) -> will be NATed by h1's load bal")
    assert "SNAT to 10.0.3.5" in lb[0].text
    assert f"{VIP.mac} (VIP of service web)" in texts(layers)
    natted = Ether(src=LB1.mac, dst=WEB.mac) / IP(src=LB1.ip, dst=WEB.ip) / TCP(sport=30001)
    frame = vxlan_frame(H1, H2, 4099, bytes(natted))
    out = texts(describe(frame, context()))
    assert "lb:1: SNAT 10.0.3.5 = h1's load-balancer address on app" in out
    assert "(web.1.abc on h2, task of web)" in out
    reply = IP(src=WEB.ip, dst=LB1.ip) / TCP(sport=80, dport=30001, flags="SA")
    out = texts(describe(bytes(Ether() / reply), context()))
    assert "to 10.0.3.5 = h1's load-balancer address on app: a task's reply" in out


# ----------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("cut", [0, 5, 14, 20, 34, 40, 42, 50, 60, 70])
def test_truncated_frames_say_why(cut: int) -> None:
    frame = vxlan_frame(H2, H1, 4099, ping_frame(C2, C1))[:cut]
    layers = describe(frame, context())
    assert layers
    assert layers[-1].proto == "undecodable"
    assert layers[-1].text.startswith("undecodable: ")


def frames_to_mutate() -> list[bytes]:
    gossip = encode_packet(
        [m.encode_message(m.Ack(1))], crc=True, compress=True, keyring=gossip_ring()
    )
    return [
        vxlan_frame(H2, H1, 4099, ping_frame(C2, C1)),
        esp_frame(H2, H1, vxlan_datagram(4100, ping_frame(S2, S1)), PRIMARY_IPSEC),
        gossip_frame(gossip),
        dns_frame(dns.message.make_query("web", "A"), True),
    ]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    for ctx in (context(), context(decrypt=True)):
        layers = describe(data, ctx)
        assert all(isinstance(layer, Layer) for layer in layers)
        render_text(Packet(1, 0.0, "x", "in", len(data), tuple(layers)))


@FUZZ
@given(st.sampled_from(range(4)), st.data())
def test_damaged_real_frames_never_raise(which: int, data: st.DataObject) -> None:
    frame = bytearray(frames_to_mutate()[which])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    for payload in (bytes(frame), bytes(frame[:cut]), bytes(frame) + b"\x00" * 7):
        describe(payload, context(decrypt=True))


@FUZZ
@given(st.binary(max_size=200))
def test_random_payloads_on_every_port_never_raise(payload: bytes) -> None:
    for l4 in (UDP(dport=4789), UDP(dport=7946), UDP(dport=53), TCP(dport=7946), TCP(dport=53)):
        describe(bytes(underlay(H1, H2) / l4 / Raw(payload)), context(decrypt=True))
    describe(bytes(Ether() / IP(src=H1, dst=H2, proto=50) / Raw(payload)), context(decrypt=True))


# ----------------------------------------------------------------------------------- output


def test_filters() -> None:
    layers = describe(vxlan_frame(H2, H1, 4099, ping_frame(C2, C1)), context())
    assert TraceFilter().matches(layers)
    assert TraceFilter(networks=frozenset({"app"}), containers=frozenset({"c1"})).matches(layers)
    assert not TraceFilter(networks=frozenset({"sec"})).matches(layers)
    assert TraceFilter(hosts=frozenset({"h2"}), protos=frozenset({"icmp"})).matches(layers)
    assert not TraceFilter(protos=frozenset({"gossip", "dns"})).matches(layers)


def test_text_and_json_rendering() -> None:
    layers = describe(vxlan_frame(H2, H1, 4099, ping_frame(C2, C1)), context())
    packet = Packet(3, 1.5, "h2", "in", 148, tuple(layers))
    lines = render_text(packet, "fabric, from h2")
    assert lines[0] == "#3  1.500s  fabric, from h2 (in)  148 bytes"
    assert lines[4].startswith("  VXLAN     flags 0x08")
    assert lines[5].startswith("    Ethernet  02:42:0a:00:03:08 (c2 on h2)")
    doc = json.loads(render_json(packet))
    assert doc["layers"][3]["fields"] == {"flags": 8, "vni": 4099, "network": "app"}
    assert doc["layers"][5]["refs"]["container"] == ["c2", "c1"]


def test_pcap_files_read_back(tmp_path: Path) -> None:
    frames = frames_to_mutate()
    path = tmp_path / "t.pcap"
    path.write_bytes(
        pcap_header() + b"".join(pcap_record(100.25 + i, f) for i, f in enumerate(frames))
    )
    back = rdpcap(str(path))
    assert [bytes(p) for p in back] == frames
    assert float(back[1].time) == pytest.approx(101.25)


def test_where_keeps_each_frame_once() -> None:
    fabric = Where("ns", "fabric", exclude=("fabric0",), ingress_only=True)
    assert fabric.keeps("h1", 3, 1)
    assert not fabric.keeps("h2", PACKET_OUTGOING, 1)
    assert not fabric.keeps("fabric0", 0, 1)
    container = Where("ns", "c1")
    assert container.keeps("eth0", PACKET_OUTGOING, 1)
    assert container.keeps("lo", 0, 772)
    assert not container.keeps("lo", PACKET_OUTGOING, 772)
    host = Where("ns", "h1", interfaces=("eth0",))
    assert host.keeps("eth0", PACKET_OUTGOING, 1)
    assert not host.keeps("docker_gwbridge", 0, 1)


# ----------------------------------------------------------------------------------- CLI


def test_cli_without_scapy_says_so_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from vxnet.cli import cli

    monkeypatch.delitem(sys.modules, "vxnet.trace.dissect", raising=False)
    monkeypatch.setitem(sys.modules, "scapy", None)
    monkeypatch.setitem(sys.modules, "scapy.layers", None)
    monkeypatch.setitem(sys.modules, "scapy.layers.inet", None)
    result = CliRunner().invoke(cli, ["--lab", "nosuchlab", "trace"])
    assert result.exit_code == 2
    assert "pip install 'vxnet[trace]'" in result.output


def test_vxnet_cli_does_not_import_scapy() -> None:
    code = (
        "import sys, vxnet.cli, vxnet.cli_trace;"
        "assert not [m for m in sys.modules if m.startswith('scapy')], 'scapy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
