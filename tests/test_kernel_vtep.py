"""Interop with the Linux kernel's VXLAN: a vxnet container and kernel containers on one VNI.

The foundation issue's acceptance test.  One vxnet host (h1) runs two containers on ``front``
(VNI 4097); a kernel VTEP namespace on the fabric (192.168.100.200) bridges two kernel containers.
The vxnet side is peered with ``POST /fdb`` (container ``a``) and with the real CLI,
``vxnet fdb add`` (container ``b``); the kernel side with ``bridge fdb append`` and permanent
neighbour entries.  Then ICMP and TCP go both ways.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vxnet import netns
from vxnet.lab import Lab
from vxnet.lab.kernel import KernelContainer, KernelVtep, add_kernel_vtep_host

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TAP devices)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
]

KERNEL_VTEP = "192.168.100.200"
VNI_FRONT = 4097


@dataclass(frozen=True)
class Interop:
    lab: Lab
    vtep: KernelVtep
    echo: dict[str, Any]  # vxnet container running the echo image (TCP/UDP :7)
    perf: dict[str, Any]  # vxnet container running `iperf3 -s`
    ka: KernelContainer  # peered through the daemon API
    kb: KernelContainer  # peered through `vxnet fdb add`
    cli: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def interop() -> Iterator[Interop]:
    name = "k" + secrets.token_hex(3)
    lab = Lab(hosts=1, name=name)
    try:
        echo = lab.run("h1", "vecho", "front", "echo")
        perf = lab.run("h1", "vperf", "front", "iperf3")
        vtep = add_kernel_vtep_host(lab, "kv", KERNEL_VTEP, vni=VNI_FRONT)
        ka = vtep.add_container("a", "10.0.1.200/24")
        kb = vtep.add_container("b", "10.0.1.201/24")
        h1 = lab.host_address("h1")
        for c in (echo, perf):
            vtep.add_peer(c["mac"], c["ip"], h1)
        lab.client("h1").post(
            "/fdb", {"network": "front", "mac": ka.mac, "ip": ka.ip, "vtep": KERNEL_VTEP}
        )
        cli = subprocess.run(
            [sys.executable, "-m", "vxnet", "--lab", name, "-H", "h1", "fdb", "add",
             "--network", "front", "--mac", kb.mac, "--ip", kb.ip, "--vtep", KERNEL_VTEP],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        yield Interop(lab, vtep, echo, perf, ka, kb, cli)
    finally:
        lab.down()
        assert netns.list_with_prefix(f"vx-{name}-") == []


def _ping(run: Any, target: str) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = run(["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
    return r


def _vx(fx: Interop, container: str) -> Any:
    return lambda argv, **kw: fx.lab.exec(container, argv, timeout=30, **kw)


def test_cli_fdb_add(interop: Interop) -> None:
    assert interop.cli.returncode == 0, interop.cli.stderr
    assert KERNEL_VTEP in interop.cli.stdout and interop.kb.mac in interop.cli.stdout
    rows = interop.lab.client("h1").get("/fdb")
    mine = {(r["mac"], r["ip"], r["vtep"]) for r in rows if r["network"] == "front"}
    assert (interop.ka.mac, interop.ka.ip, KERNEL_VTEP) in mine
    assert (interop.kb.mac, interop.kb.ip, KERNEL_VTEP) in mine


@pytest.mark.parametrize("which", ["ka", "kb"])
def test_ping_vxnet_to_kernel(interop: Interop, which: str) -> None:
    kc: KernelContainer = getattr(interop, which)
    r = _ping(_vx(interop, "vecho"), kc.ip)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["ka", "kb"])
def test_ping_kernel_to_vxnet(interop: Interop, which: str) -> None:
    kc: KernelContainer = getattr(interop, which)
    r = _ping(lambda argv: kc.exec(argv, timeout=30), interop.echo["ip"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_tcp_echo_kernel_to_vxnet(interop: Interop) -> None:
    payload = secrets.token_hex(50_000)  # 100 kB: many full-MTU segments through both VTEPs
    r = subprocess.run(
        netns.exec_argv(interop.ka.namespace, ["nc", "-N", "-w", "5", interop.echo["ip"], "7"]),
        input=payload, check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload


def test_tcp_echo_vxnet_to_kernel(interop: Interop) -> None:
    ka = interop.ka
    server = subprocess.Popen(
        netns.exec_argv(ka.namespace, [sys.executable, "-m", "vxnet.images", "echo"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(ka.namespace, 7)
        payload = secrets.token_hex(50_000)
        c = interop.lab.find("vecho")
        r = subprocess.run(
            netns.exec_argv(c["netns"], ["nc", "-N", "-w", "5", ka.ip, "7"]),
            input=payload, check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == payload
    finally:
        server.terminate()
        server.wait(timeout=5)


def test_iperf3_kernel_to_vxnet(interop: Interop) -> None:
    _wait_listening(interop.perf["netns"], 5201)
    r = interop.ka.exec(["iperf3", "-c", interop.perf["ip"], "-t", "1", "-J"], timeout=30)
    assert _received_bytes(r) > 0


def test_iperf3_vxnet_to_kernel(interop: Interop) -> None:
    ka = interop.ka
    started = ka.exec(["iperf3", "-s", "-D", "-1"], timeout=10)
    assert started.returncode == 0, started.stderr
    _wait_listening(ka.namespace, 5201)
    r = interop.lab.exec("vecho", ["iperf3", "-c", ka.ip, "-t", "1", "-J"], timeout=30)
    assert _received_bytes(r) > 0


def _received_bytes(r: subprocess.CompletedProcess[str]) -> int:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    report = json.loads(r.stdout)
    return int(report["end"]["sum_received"]["bytes"])


def _wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            netns.exec_argv(ns, ["ss", "-Hltn", f"sport = :{port}"]),
            check=False, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on :{port} in {ns} after {timeout} s")
