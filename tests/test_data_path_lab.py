"""Control and data traffic apart: `--advertise-addr` on one underlay, `--data-path-addr` on
another (root).

A 2-host lab with ``[underlay] data_subnet``: every host has ``eth0`` on the control fabric
(manager 2377, gossip 7946) and ``eth1`` on a second fabric (VXLAN 4789, ESP).  Captures on
both of h1's fabric ports while containers on a plain and an encrypted network ping each other
show each kind of traffic only where it belongs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.conftest import unique_lab_name
from vxnet import netns
from vxnet.capture import finish_capture, start_capture
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec, parse_spec

pytestmark = pytest.mark.root

DATA_SUBNET = ipaddress.IPv4Network("192.168.200.0/24")


def kinds(frames: list[bytes]) -> Counter[str]:
    """What each IPv4 frame is: 'esp', 'udp:PORT'/'tcp:PORT' (the lower well-known port)."""
    out: Counter[str] = Counter()
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00":
            continue
        ihl = (f[14] & 0x0F) * 4
        proto, l4 = f[23], f[14 + ihl :]
        if proto == 50:
            out["esp"] += 1
        elif proto in (6, 17) and len(l4) >= 4:
            ports = {int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")}
            known = ports & {2377, 4789, 7946}
            out[f"{'tcp' if proto == 6 else 'udp'}:{min(known) if known else 'other'}"] += 1
    return out


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("d")
    spec = dataclasses.replace(default_spec(name, 2, True), data_subnet=DATA_SUBNET)
    lab = Lab(spec=spec)
    try:
        lab.manager.post(
            "/swarm/networks", {"name": "vault", "attachable": True, "options": ["encrypted"]}
        )
        for host, n in (("h1", "1"), ("h2", "2")):
            lab.run(host, f"f{n}", "front", "idle")
            lab.run(host, f"v{n}", "vault", "idle")
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def test_lab_file_takes_a_data_subnet() -> None:
    spec = parse_spec({"underlay": {"data_subnet": "192.168.200.0/24"}})
    assert spec.data_subnet == DATA_SUBNET
    with pytest.raises(Exception, match="data_subnet"):
        parse_spec({"underlay": {"data_subnet": "192.168.100.0/25"}})


def test_nodes_advertise_on_one_underlay_and_carry_data_on_the_other(lab: Lab) -> None:
    info = lab.client("h2").get("/swarm")
    assert info["advertise_addr"] == lab.host_address("h2")
    assert info["data_path_addr"] == lab.data_address("h2")
    assert ipaddress.IPv4Address(lab.data_address("h2")) in DATA_SUBNET
    vteps = {r["vtep"] for r in lab.client("h1").get("/fdb")}
    assert vteps and all(ipaddress.IPv4Address(v) in DATA_SUBNET for v in vteps), vteps

    fabric = lab.fabric_netns
    caps = {
        port: start_capture(fabric, port, count=100_000, timeout=4, udp_port=None)
        for port in ("h1", "h1d")
    }
    time.sleep(0.3)
    pings = [
        subprocess.Popen(netns.exec_argv(lab.find(src)["netns"], ["ping", "-c", "6", "-i", "0.2",
                         "-W", "2", lab.ip(dst)]), stdout=subprocess.PIPE, text=True)
        for src, dst in (("f1", "f2"), ("v1", "v2"))
    ]  # fmt: skip
    # and some control traffic while we listen: a manager request and gossip's probes
    lab.manager.post("/swarm/networks", {"name": "extra"})
    outs = [p.communicate(timeout=30)[0] for p in pings]
    assert all(", 0% packet loss" in o for o in outs), outs
    control, data = (kinds(finish_capture(caps[p], 4)) for p in ("h1", "h1d"))
    assert data["udp:4789"] >= 12 and data["esp"] >= 12, data
    assert data["udp:7946"] == data["tcp:7946"] == data["tcp:2377"] == 0, data
    assert control["udp:7946"] > 0, control  # gossip probes, every second
    assert control["udp:4789"] == control["esp"] == 0, control
