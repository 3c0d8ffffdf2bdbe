"""Offloads on and off give the same overlay (root, netns): ping, a 200 KB TCP echo, iperf3,
counters without drops; with offloads on, TCP really crosses as super-frames."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import need, unique_lab_name
from tests.test_esp_lab import ECHO_CLIENT  # 200 KB through the echo server, checked
from vxnet.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["tunnel-gso", "segment", "per-frame"])
def lab(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, str]]:
    """A 2-host lab whose daemons run one path (the environment reaches the daemons)."""
    path = request.param
    env = {"segment": {"VXNET_GSO": "segment"}, "per-frame": {"VXNET_NO_OFFLOAD": "1"}}
    saved = dict(os.environ)
    os.environ.update(env.get(path, {}))
    try:
        lab = Lab(hosts=2, name=unique_lab_name("o"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        lab.run("h1", "srv", "front", "echo")
        lab.run("h1", "perf", "front", "iperf3")
        lab.run("h2", "cli", "front", "idle")
        yield lab, path
    finally:
        lab.down()


def test_the_daemon_says_which_path_runs(lab: tuple[Lab, str]) -> None:
    the_lab, path = lab
    info = the_lab.client("h1").get("/info")
    assert info["dataplane_path"] == path
    assert the_lab.stats("h2")["path"] == path


def test_ping_and_a_200_kb_tcp_echo(lab: tuple[Lab, str]) -> None:
    the_lab, path = lab
    r = the_lab.exec("cli", ["ping", "-c", "3", "-i", "0.2", "-W", "2", the_lab.ip("srv")])
    assert r.returncode == 0, r.stdout + r.stderr
    r = the_lab.exec("cli", [sys.executable, "-c", ECHO_CLIENT, the_lab.ip("srv")])
    assert r.stdout.split() == ["204800", "True"], r.stdout + r.stderr
    for host in ("h1", "h2"):
        front = the_lab.stats(host)["networks"]["front"]
        assert front["drops"] == {}, (host, front)
        if path == "per-frame":
            assert front["gso_tx"] == front["gso_rx"] == 0


def test_iperf3_short_run(lab: tuple[Lab, str]) -> None:
    need("iperf3")
    the_lab, path = lab
    before = the_lab.stats("h2")["networks"]["front"]
    argv = ["iperf3", "-c", the_lab.ip("perf"), "-t", "2", "-J"]
    r = the_lab.exec("cli", argv, timeout=60)
    report = json.loads(r.stdout)
    assert report["end"]["sum_received"]["bytes"] > 1_000_000, r.stdout[-500:]
    after = the_lab.stats("h2")["networks"]["front"]
    sent = after["tx_bytes"] - before["tx_bytes"]
    assert sent >= report["end"]["sum_received"]["bytes"]
    frames = after["tx_frames"] - before["tx_frames"]
    if path == "per-frame":  # one datagram per inner packet, as a capture shows it
        assert after["gso_tx"] == before["gso_tx"]
        assert frames * 1464 >= sent  # at most MTU + Ethernet header each
    else:  # most data was read as super-frames (cut in the kernel, or in Python)
        assert after["gso_tx"] > before["gso_tx"]
        assert frames * 1464 < sent
