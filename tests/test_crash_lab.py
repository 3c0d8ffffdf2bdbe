"""Crash recovery: `kill -9` of a daemon loses no container (root).

A daemon's TAPs are persistent (TUNSETPERSIST) and it writes what it needs to take its
containers back.  Shown here on a 3-host swarm: after `kill -9` of a worker's daemon and
`lab restart`, the same container processes, namespaces, addresses and docker_gwbridge links
are re-adopted, traffic to them resumes (ping, a TCP stream, a VIP, the routing mesh, their
127.0.0.11), and nothing was re-created; after `kill -9` of the manager's daemon, the same.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import unique_lab_name
from tests.test_esp_lab import ECHO_CLIENT  # 200 KB through the echo server, checked
from vxnet import netns
from vxnet.lab import Lab, builder

pytestmark = pytest.mark.root

OUTSIDE = "192.168.100.252"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("k")
    lab = Lab(hosts=3, name=name)
    try:
        lab.manager.post("/services", {"name": "web", "image": "whoami", "replicas": 3,
                                       "networks": ["front"], "ports": ["8080:80"]})  # fmt: skip
        lab.converge()
        lab.run("h2", "echo2", "front", "echo")
        lab.run("h3", "probe", "front", "idle")
        lab.add_fabric_namespace("out", OUTSIDE)
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def identity(lab: Lab, host: str) -> dict[str, tuple[int, str, str]]:
    """Per container on ``host``: (pid, namespace, first address): what must not change."""
    return {
        n: (c["pid"], c["netns"], c["ip"]) for n, c in lab.containers().items() if c["host"] == host
    }


def crash_and_restart(lab: Lab, host: str) -> dict[str, object]:
    pid = int(lab.state["hosts"][host]["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not builder.daemon_alive(pid), f"{host}'s daemon to die")
    result = lab.restart(host)
    wait_for(lambda: all(lab.client(h).get("/swarm")["connected"] for h in lab.hosts),
             "every node connected to the manager")  # fmt: skip
    lab.converge()
    return result


def curl_outside(lab: Lab, host: str) -> str:
    ns = f"{builder.prefix(lab.name)}xout"
    r = subprocess.run(netns.exec_argv(ns, ["curl", "-s", "--max-time", "3",
                       f"http://{lab.host_address(host)}:8080/"]), capture_output=True, text=True,
                       timeout=20, check=False)  # fmt: skip
    return r.stdout


def check_traffic(lab: Lab, host: str) -> None:
    front = {
        n: e["ip"]
        for n, c in lab.containers().items()
        if c["host"] == host
        for e in c["endpoints"]
        if e["network"] == "front"
    }
    assert front
    for name, ip in front.items():
        r = lab.exec("probe" if host != "h3" else "echo2", ["ping", "-c", "2", "-i", "0.2",
                     "-W", "2", ip])  # fmt: skip
        assert r.returncode == 0, (name, r.stdout)
    r = lab.exec("probe", [sys.executable, "-c", ECHO_CLIENT, lab.ip("echo2")], timeout=60)
    assert r.stdout.split() == ["204800", "True"], r.stdout + r.stderr
    seen = set()
    for _ in range(9):
        out = lab.exec("probe", ["curl", "-s", "--max-time", "3", "http://web/"]).stdout
        seen |= set(re.findall(r"^Hostname: (\S+)", out, re.M))
    assert seen == {n for n in lab.containers() if n.startswith("web.")}, seen
    assert "Hostname: web." in curl_outside(lab, host)  # the restarted host's routing mesh
    task = next(n for n, c in lab.containers().items() if c["host"] == host and "web." in n)
    r = lab.exec(task, ["dig", "@127.0.0.11", "+short", "tasks.web"])
    assert len(r.stdout.split()) == 3, r.stdout + r.stderr  # its resolver is back


def test_kill_9_of_a_worker_keeps_its_containers(lab: Lab) -> None:
    before = identity(lab, "h2")
    assert "echo2" in before
    result = crash_and_restart(lab, "h2")
    assert set(result["adopted"]) == {*before, "ingress-sbox"}, result  # type: ignore[arg-type]
    assert result["lost_containers"] == []
    assert identity(lab, "h2") == before  # same processes, namespaces, addresses
    check_traffic(lab, "h2")


def test_kill_9_of_the_manager_keeps_its_containers_and_its_store(lab: Lab) -> None:
    services = {s["name"]: s["vips"] for s in lab.manager.get("/services")}
    tasks = {t["id"] for t in lab.manager.get("/services/web/tasks")}
    before = identity(lab, "h1")
    result = crash_and_restart(lab, "h1")
    assert set(result["adopted"]) == {*before, "ingress-sbox"}, result  # type: ignore[arg-type]
    assert identity(lab, "h1") == before
    assert {s["name"]: s["vips"] for s in lab.manager.get("/services")} == services
    assert {t["id"] for t in lab.manager.get("/services/web/tasks")} == tasks  # none re-created
    check_traffic(lab, "h1")


def test_a_container_that_died_with_its_daemon_down_is_seen_as_exited(lab: Lab) -> None:
    lab.run("h3", "shortlived", "front", "idle")
    pid = int(lab.state["hosts"]["h3"]["pid"])
    victim = int(lab.find("shortlived")["pid"])
    os.kill(pid, signal.SIGKILL)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not builder.daemon_alive(pid), "h3's daemon to die")
    lab.restart("h3")
    wait_for(lambda: lab.find("shortlived")["status"] != "running", "the exit to be noticed", 10)
    assert lab.find("shortlived")["status"] == "exited (-1)"  # its real code died with h3's daemon
    lab.rm("shortlived")
