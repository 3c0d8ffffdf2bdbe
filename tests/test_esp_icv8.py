"""Docker's 8-byte ESP ICV, chosen at `swarm init` (root).

Docker's SPI does not include the ICV length, so it is a swarm-wide setting
(``swarm init --esp-icv-length 8``, ``[swarm] esp_icv_length = 8`` in a lab file): the manager
hands it to every agent with the keys, and encrypted networks get Docker's MTU, 1424
(1500 - 50 - 26).  Shown here: the MTU, a full-size ping across hosts, and scapy decrypting what
the fabric carried with an 8-byte ICV and nothing else.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from scapy.layers import ipsec
from scapy.layers.inet import IP
from scapy.layers.ipsec import ESP

from tests.conftest import unique_lab_name
from tests.esp.test_scapy_esp import _short_icv_algo  # noqa: F401  (autouse: scapy short ICV)
from tests.test_esp_lab import esp_payloads, esp_spi, in_ns, ipsec_keys, ping_counts
from vxnet import netns
from vxnet.capture import finish_capture, start_capture
from vxnet.esp.spi import derive_spi, salt_for_spi
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec

pytestmark = pytest.mark.root

DOCKER_MTU = 1424  # 1500 - 50 - 26, a multiple of 4


def scapy_sa_icv8(spi: int, key: bytes) -> Any:
    return ipsec.SecurityAssociation(  # type: ignore[no-untyped-call]
        ESP,
        spi=spi,
        crypt_algo="AES-GCM-SHORT-ICV",
        crypt_key=key + salt_for_spi(spi),
        crypt_icv_size=8,
        esn_en=True,
        esn=0,
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("i")
    spec = dataclasses.replace(default_spec(name, 2, True), esp_icv_length=8)
    lab = Lab(spec=spec)
    try:
        lab.manager.post(
            "/swarm/networks", {"name": "secret8", "attachable": True, "options": ["encrypted"]}
        )
        lab.run("h1", "e1", "secret8", "idle")
        lab.run("h2", "e2", "secret8", "idle")
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def test_icv8_swarm_gives_docker_mtu_and_scapy_decrypts_with_an_8_byte_icv(lab: Lab) -> None:
    net = next(n for n in lab.manager.get("/swarm/networks") if n["name"] == "secret8")
    assert net["encrypted"] and net["mtu"] == DOCKER_MTU
    link = lab.exec("e1", ["ip", "-o", "link", "show", "eth0"]).stdout
    assert f"mtu {DOCKER_MTU} " in link, link

    # the SAs exist once the keys and the peers are programmed: wait for a first echo
    deadline = time.monotonic() + 30
    while lab.exec("e1", ["ping", "-c", "1", "-W", "1", lab.ip("e2")]).returncode != 0:
        assert time.monotonic() < deadline, "no echo across the encrypted network"
    keys = ipsec_keys(lab)
    a1, a2 = IPv4Address(lab.data_address("h1")), IPv4Address(lab.data_address("h2"))
    cap = start_capture(lab.fabric_netns, "h1", count=10_000, timeout=3, udp_port=None)
    # the largest ping the MTU allows (1424 - 20 - 8), DF set, crosses whole both ways
    ping = subprocess.run(
        in_ns(lab, "e1", ["ping", "-c", "3", "-i", "0.1", "-W", "2", "-M", "do", "-s", "1396",
                          lab.ip("e2")]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    frames = finish_capture(cap, 3)
    assert ping_counts(ping.stdout) == (3, 3), ping.stdout + ping.stderr

    sent = esp_payloads(frames, a1, a2)
    assert len(sent) >= 3, "no ESP from h1 to h2 on the fabric"
    by_spi = {derive_spi(a1, a2, tag): key for tag, key in keys.items()}
    decrypted = 0
    for esp in sent:
        key = by_spi[esp_spi(esp)]
        outer = IP(src=str(a1), dst=str(a2), proto=50) / ESP(esp)
        inner = scapy_sa_icv8(esp_spi(esp), key).decrypt(outer)
        udp = bytes(inner.payload)
        assert int.from_bytes(udp[2:4], "big") == 4789
        assert udp[8] & 0x08 and int.from_bytes(udp[12:15], "big") == net["vni"]
        decrypted += 1
    assert decrypted == len(sent)
    # and the packets really end in an 8-byte tag: 1424-byte frames fit a 1500-byte underlay
    # (20 IP + 8 SPI/seq + 8 IV + 8 UDP + 8 VXLAN + 14 + 1424 + 2 pad-length/next-header + 8)
    assert max(len(esp) for esp in sent) + 20 == 1500
