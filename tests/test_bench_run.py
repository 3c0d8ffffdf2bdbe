"""``vxnet bench``'s report: what it says about the topology it measured (no root)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from bench.measure import Side
from bench.run import render
from vxnet.manager.networks import mtu_ceilings

MACHINE = {"nproc": 2, "cpu": "", "kernel": "6.18", "python": "CPython 3.11"}


@pytest.mark.parametrize(
    ("underlay", "plain", "secret"), [(1500, 1450, 1416), (9000, 8950, 8916), (1280, 1230, 1196)]
)
def test_network_mtus_are_the_largest_the_underlay_carries(
    underlay: int, plain: int, secret: int
) -> None:
    assert mtu_ceilings(underlay) == (plain, secret)


def test_the_report_states_the_underlay_and_network_mtus_and_no_unmeasured_figure() -> None:
    kernel = Side("kernel VXLAN", tcp1_bps=[10e9])
    vxnet = Side("vxnet", tcp1_bps=[5e9])
    text = render(MACHINE, [kernel, vxnet], 1, 1, 4, None, underlay_mtu=9000)
    assert "underlay MTU 9000; network MTU 8950, encrypted: 8916" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("TCP 1 stream"))
    assert row.split()[-3:] == ["10.000", "5.000", "0.50"]
    assert "UDP" not in text.split("ping:")[1]  # nothing measured: no UDP row at all


def test_hops_are_differences_of_one_echos_timestamps_at_three_points() -> None:
    from bench.hops import ECHO_REPLY, ECHO_REQUEST, Point, hop_samples, render_hops, summarize

    client, fabric, server = Point("c", "eth0"), Point("f", "h2", 4789), Point("s", "eth0")
    t = 1000.0
    for seq in (1, 2):  # request: c 0, f +30 us, s +55; reply: s +65, f +72, c +80
        req, rep = (ECHO_REQUEST, 7, seq), (ECHO_REPLY, 7, seq)
        client.seen[req], fabric.seen[req], server.seen[req] = t, t + 30e-6, t + 55e-6
        server.seen[rep], fabric.seen[rep], client.seen[rep] = t + 65e-6, t + 72e-6, t + 80e-6
    client.seen[(ECHO_REQUEST, 7, 3)] = t  # lost on the way: not a sample
    samples = hop_samples([client, fabric, server])
    rounded = {name: [round(v, 3) for v in vs] for name, vs in samples.items()}
    assert rounded == {
        "h2 sends (client eth0 -> fabric)": [30.0, 30.0],
        "h1 receives (fabric -> server eth0)": [25.0, 25.0],
        "server's kernel replies": [10.0, 10.0],
        "h1 sends (server eth0 -> fabric)": [7.0, 7.0],
        "h2 receives (fabric -> client eth0)": [8.0, 8.0],
        "round trip at the client's eth0": [80.0, 80.0],
    }
    text = render_hops([("kernel VXLAN", summarize(samples))])
    assert "80.0 / 80.0" in text and text.splitlines()[-1].split()[-1] == "2"


def test_a_vxlan_frame_on_the_fabric_is_matched_by_its_inner_echo() -> None:
    from bench.hops import Point
    from vxnet.wire import ETH_P_IP, Ethernet, IcmpEcho, IPv4, Udp, Vxlan

    def ip_frame(payload: bytes, proto: int) -> bytes:
        ip = IPv4(IPv4Address("10.0.1.3"), IPv4Address("10.0.1.2"), proto, payload)
        return Ethernet(b"\x02" * 6, b"\x04" * 6, ETH_P_IP, ip.encode()).encode()

    inner = ip_frame(IcmpEcho(8, 0, 9, 5, b"x" * 8).encode(), 1)
    udp = Udp(40000, 4789, Vxlan(4097, inner).encode()).encode()
    outer = ip_frame(udp, 17)
    assert Point("f", "h2", vxlan_port=4789)._echo(outer) == (8, 9, 5)
    assert Point("c", "eth0")._echo(inner) == (8, 9, 5)
    assert Point("f", "h2", vxlan_port=4789)._echo(outer[:30]) is None  # truncated: no echo
