"""``vxnet trace`` on a live 2-host lab: the real command, real traffic, real names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need, unique_lab_name
from vxnet.lab import Lab, builder

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("tr")
    lab = Lab(hosts=2, name=name)
    try:
        lab.manager.post(
            "/swarm/networks", {"name": "secret", "attachable": True, "options": ["encrypted"]}
        )
        lab.run("h1", "c1", "front", "idle")
        lab.run("h2", "c2", "front", "idle")
        lab.run("h1", "s1", "secret", "idle")
        lab.run("h2", "s2", "secret", "idle")
        yield lab
    finally:
        lab.down()
        assert not builder.run_dir(name).exists()


def trace(lab: Lab, args: list[str], traffic: Callable[[], object] = lambda: None) -> str:
    """Run ``vxnet trace`` until it is capturing, make ``traffic``, return what it printed."""
    argv = [sys.executable, "-m", "vxnet", "--lab", lab.name, "trace", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert ready.startswith("tracing on"), ready + proc.stderr.read()
        traffic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out


def ping(lab: Lab, src: str, dst: str, count: int = 2) -> Callable[[], None]:
    def go() -> None:
        r = lab.exec(src, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", lab.ip(dst)])
        assert r.returncode == 0, r.stdout + r.stderr

    return go


def test_fabric_shows_network_containers_and_hosts(lab: Lab) -> None:
    args = ["--on", "fabric", "--proto", "icmp", "--network", "front", "--count", "4"]
    out = trace(lab, [*args, "--timeout", "20"], ping(lab, "c1", "c2"))
    assert out.count("ICMP      echo-request") == 2
    assert out.count("ICMP      echo-reply") == 2
    assert "= network front" in out
    assert "(c1 on h1) -> " in out
    assert "(c2 on h2) -> " in out
    assert re.search(r"192\.168\.100\.\d+ \(h1\) -> 192\.168\.100\.\d+ \(h2\)", out)
    assert "fabric, from h1" in out
    assert "fabric, from h2" in out


def test_decrypt_opens_esp_down_to_the_inner_icmp(lab: Lab) -> None:
    closed = trace(
        lab, ["--proto", "esp", "--count", "2", "--timeout", "20"], ping(lab, "s1", "s2", 1)
    )
    assert "payload encrypted (add --decrypt to open it)" in closed
    assert "echo-request" not in closed
    opened = trace(
        lab,
        ["--proto", "esp", "--decrypt", "--count", "2", "--timeout", "20"],
        ping(lab, "s1", "s2", 1),
    )
    assert re.search(r"ESP       SPI 0x[0-9a-f]{8} seq \d+ = h1 -> h2, key tag \d+", opened)
    assert "decrypted (AES-GCM, ICV 16 bytes)" in opened
    assert "= network secret, an encrypted network" in opened
    assert "(s1 on h1) -> " in opened
    assert "ICMP      echo-request" in opened


def test_gossip_messages_with_member_names(lab: Lab) -> None:
    out = trace(lab, ["--proto", "gossip", "--count", "4", "--timeout", "20"])
    assert "decrypted with networking:gossip key tag" in out
    members = {m["name"] for m in lab.client("h1").get("/gossip")["members"]}
    assert re.search(r"gossip    (ping seq \d+ to|ack seq \d+)", out)
    assert any(f"{m} (h1)" in out or f"{m} (h2)" in out for m in members)


def test_dns_in_a_container_and_json(lab: Lab) -> None:
    def dig() -> None:
        assert lab.exec("c1", ["dig", "@127.0.0.11", "+short", "c2"]).stdout.strip()

    need("dig")
    args = ["--on", "c1", "--proto", "dns", "--count", "2", "--timeout", "20"]
    out = trace(lab, [*args, "--format", "json"], dig)
    packets = [json.loads(line) for line in out.splitlines()]
    texts = [layer["text"] for p in packets for layer in p["layers"]]
    assert any(t.endswith("A c2?") for t in texts)
    assert any(re.search(r"c2 A 10\.0\.\d+\.\d+ \(c2 on h2\)", t) for t in texts)
    assert {p["interface"] for p in packets} == {"lo"}


def test_write_makes_a_pcap_tshark_reads(lab: Lab, tmp_path: Path) -> None:
    need("tshark")
    pcap = tmp_path / "trace.pcap"
    args = ["--proto", "icmp", "--count", "2", "--timeout", "20", "--write", str(pcap)]
    trace(lab, args, ping(lab, "c2", "c1", 1))
    r = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", "udp.port==4789,vxlan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "Echo (ping) request" in lines[0]
    assert "Echo (ping) reply" in lines[1]


def test_unknown_names_are_usage_errors(lab: Lab) -> None:
    for args, word in ((["--on", "nobody"], "--on nobody"), (["--network", "x"], "--network x")):
        r = subprocess.run(
            [sys.executable, "-m", "vxnet", "--lab", lab.name, "trace", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 1
        assert word in r.stderr
