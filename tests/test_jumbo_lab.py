"""A swarm on a jumbo-frame underlay (root): ``swarm init --underlay-mtu 9000``.

The lab file's ``[underlay] mtu = 9000`` reaches ``swarm init``; networks keep Docker's default
MTU unless they ask for more (``com.docker.network.driver.mtu``), up to what 9000 bytes carry
unfragmented: 8950 plain, 8916 encrypted.  Shown here: the MTUs, the largest pings that fit
crossing hosts with DF set, and on the fabric packets of exactly 9000 bytes, never more, never
a fragment.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from tests.conftest import unique_lab_name
from tests.test_esp_lab import esp_payloads, in_ns, ping_counts
from vxnet import netns
from vxnet.capture import finish_capture, start_capture
from vxnet.errors import VxnetError
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec
from vxnet.wire.ipv4 import IPv4, decode_ipv4_untrusted

pytestmark = pytest.mark.root

MTU = "com.docker.network.driver.mtu"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("j")
    lab = Lab(spec=default_spec(name, 2, True, underlay_mtu=9000))
    try:
        for net, options in (("big", [f"{MTU}=8950"]), ("bigsecret", ["encrypted", f"{MTU}=8916"])):
            lab.manager.post(
                "/swarm/networks", {"name": net, "attachable": True, "options": options}
            )
            lab.run("h1", f"{net}1", net, "idle")
            lab.run("h2", f"{net}2", net, "idle")
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def _largest_ping(lab: Lab, src: str, dst: str, mtu: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_ns(lab, src, ["ping", "-c", "3", "-i", "0.1", "-W", "2", "-M", "do",
                         "-s", str(mtu - 28), lab.ip(dst)]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _fabric_packets(frames: list[bytes]) -> list[IPv4]:
    return [decode_ipv4_untrusted(f[14:]) for f in frames if f[12:14] == b"\x08\x00"]


def test_the_swarm_knows_its_underlay_and_networks_ask_for_jumbo_mtus(lab: Lab) -> None:
    nets = {n["name"]: n for n in lab.manager.get("/swarm/networks")}
    assert (nets["big"]["mtu"], nets["bigsecret"]["mtu"]) == (8950, 8916)
    assert nets["front"]["mtu"] == 1450  # Docker's default, unless a network asks
    for container, mtu in (("big1", 8950), ("bigsecret2", 8916)):
        assert f"mtu {mtu} " in lab.exec(container, ["ip", "-o", "link", "show", "eth0"]).stdout
    with pytest.raises(VxnetError, match="576-8950 on a 9000-byte underlay"):
        lab.manager.post("/swarm/networks", {"name": "toobig", "options": [f"{MTU}=8951"]})


@pytest.mark.parametrize(("net", "mtu"), [("big", 8950), ("bigsecret", 8916)])
def test_the_largest_ping_crosses_in_9000_byte_packets(lab: Lab, net: str, mtu: int) -> None:
    lab.converge()
    assert lab.exec(f"{net}1", ["ping", "-c", "1", "-W", "5", lab.ip(f"{net}2")]).returncode == 0
    cap = start_capture(lab.fabric_netns, "h1", count=10_000, timeout=3, udp_port=None)
    ping = _largest_ping(lab, f"{net}1", f"{net}2", mtu)
    frames = finish_capture(cap, 3)
    assert ping_counts(ping.stdout) == (3, 3), ping.stdout + ping.stderr
    a1, a2 = IPv4Address(lab.data_address("h1")), IPv4Address(lab.data_address("h2"))
    packets = [
        p
        for p in _fabric_packets(frames)
        if (p.src, p.dst) == (a1, a2) and (p.proto == 50 or p.payload[2:4] == b"\x12\xb5")
    ]  # ESP, or UDP to 4789: the overlay's packets (not TCP on 2377 or 7946)
    assert packets, "no VXLAN or ESP from h1 to h2 on the fabric"
    largest = max(p.header_len + len(p.payload) for p in packets)
    assert not any(p.is_fragment for p in packets)
    if net == "big":  # 20 IP + 8 UDP + 8 VXLAN + 14 Ethernet + 8950: exactly the underlay
        assert largest == 9000
    else:  # the ESP packets carry the echo whole: 8916 + ESP's 34 (ICV 16) + 50 = 9000
        esp = esp_payloads(frames, a1, a2)
        assert largest == max(len(e) for e in esp) + 20 == 9000


def test_a_node_whose_underlay_carries_less_cannot_join_a_jumbo_swarm() -> None:
    name = unique_lab_name("jm")
    spec = dataclasses.replace(default_spec(name, 2, False, underlay_mtu=9000), networks=())
    lab = Lab(spec=spec)
    try:
        vxnet = [sys.executable, "-m", "vxnet", "--lab", name]
        init = subprocess.run(
            [*vxnet, "swarm", "init", "--underlay-mtu", "9000"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert init.returncode == 0, init.stderr
        token = lab.client("h1").get("/swarm/join-token/worker")["token"]
        join = [*vxnet, "-H", "h2", "swarm", "join", "--token", token,
                f"{lab.host_address('h1')}:2377"]  # fmt: skip
        netns.set_link(lab.host_netns("h2"), "eth0", mtu=1500)  # h2's cable is not jumbo
        refused = subprocess.run(join, capture_output=True, text=True, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert (
            f"this node's data path ({lab.host_address('h2')}) carries 1500 bytes, less than "
            "the swarm's underlay MTU 9000"
        ) in refused.stderr, refused.stderr
        assert [n["hostname"] for n in lab.client("h1").get("/nodes")] == ["h1"]  # not registered
        netns.set_link(lab.host_netns("h2"), "eth0", mtu=9000)
        joined = subprocess.run(join, capture_output=True, text=True, check=False)
        assert joined.returncode == 0, joined.stderr
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []
