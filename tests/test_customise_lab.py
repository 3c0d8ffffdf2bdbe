"""The seed's customisation flows, end to end through the CLI (root).

* **ingress**: inspect it, remove the services that publish, ``network rm ingress`` (Docker's
  warning and prompt), create ``my-ingress`` with ``--ingress --subnet 10.11.0.0/16 --gateway
  10.11.0.2 --opt com.docker.network.driver.mtu=1200``, re-create the services.  With no ingress,
  services without published ports keep working and publishing ones fail clearly.
* **docker_gwbridge**: a ``docker_gwbridge`` the user made before ``swarm init``/``join`` (subnet,
  bridge name, ICC, masquerade) is used as is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import unique_lab_name
from vxnet import netns
from vxnet.errors import Conflict
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec

pytestmark = pytest.mark.root

OUTSIDE = "192.168.100.251"


def vx(lab: Lab, *args: str, stdin: str | None = None, ok: bool = True) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "vxnet", "--lab", lab.name, *args],
        capture_output=True, text=True, timeout=90, check=False, input=stdin,
    )  # fmt: skip
    if ok:
        assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    else:
        assert r.returncode != 0, f"{args} should fail: {r.stdout}"
    return r.stdout + r.stderr


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def curl_outside(lab: Lab, host: str, port: int = 8080) -> subprocess.CompletedProcess[str]:
    ns = f"{builder.prefix(lab.name)}xout"
    url = f"http://{lab.host_address(host)}:{port}/"
    return subprocess.run(netns.exec_argv(ns, ["curl", "-s", "--max-time", "3", url]),
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("c")
    lab = Lab(hosts=2, name=name)
    try:
        lab.add_fabric_namespace("out", OUTSIDE)
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def test_ingress_customisation_flow(lab: Lab) -> None:
    vx(lab, "network", "create", "-d", "overlay", "--attachable", "app")
    vx(lab, "service", "create", "--name", "web", "--replicas", "2", "-p", "8080:80", "whoami")
    vx(lab, "service", "create", "--name", "inner", "--network", "app", "whoami")
    lab.converge()
    wait_for(lambda: curl_outside(lab, "h2").returncode == 0, "the default ingress mesh")
    inspect = json.loads(vx(lab, "network", "inspect", "ingress"))[0]
    assert inspect["Ingress"] is True and inspect["IPAM"]["Config"][0]["Subnet"] == "10.0.0.0/24"

    # the ingress network cannot go while a service publishes through it
    out = vx(lab, "network", "rm", "-f", "ingress", ok=False)
    assert "service web depends on it" in out
    vx(lab, "service", "rm", "web")
    out = vx(lab, "network", "rm", "ingress", stdin="n\n")  # Docker's prompt, answered no
    assert "Are you sure you want to continue?" in out
    assert "ingress" in vx(lab, "network", "ls")
    vx(lab, "network", "rm", "ingress", stdin="y\n")
    assert "ingress" not in vx(lab, "network", "ls").split()
    wait_for(lambda: all(lab.client(h).get("/mesh")["ingress_sandbox"] is None
                         for h in lab.hosts), "the sandboxes to go")  # fmt: skip

    # without ingress: a service without published ports works, a publishing one fails clearly
    lab.run("h1", "probe", "app", "idle")
    r = lab.exec("probe", ["curl", "-s", "--max-time", "3", "http://inner/"])
    assert "Hostname: inner." in r.stdout, r.stdout + r.stderr
    out = vx(lab, "service", "create", "--name", "web", "-p", "8080:80", "whoami", ok=False)
    assert "no ingress network is present" in out

    vx(
        lab,
        "network",
        "create",
        "--driver",
        "overlay",
        "--ingress",
        "--subnet",
        "10.11.0.0/16",
        "--gateway",
        "10.11.0.2",
        "--opt",
        "com.docker.network.driver.mtu=1200",
        "my-ingress",
    )
    vx(lab, "service", "create", "--name", "web", "--replicas", "2", "-p", "8080:80", "whoami")
    lab.converge()
    for host in lab.hosts:
        wait_for(lambda h=host: curl_outside(lab, h).returncode == 0, f"my-ingress via {host}")
        sandbox = lab.client(host).get("/mesh")["ingress_sandbox"]
        assert sandbox["network"] == "my-ingress" and sandbox["ip"].startswith("10.11."), sandbox
        # the new ingress may get the old one's VNI: the dataplane must have it, not lose it
        # when the old one is pruned (it did once)
        assert "my-ingress" in lab.stats(host)["networks"], lab.stats(host)["networks"].keys()
    task = next(n for n in lab.containers() if n.startswith("web."))
    links = lab.exec(task, ["ip", "-o", "link"]).stdout
    assert "mtu 1200" in links, links  # the task's interface on my-ingress


def test_user_made_docker_gwbridge_is_used_as_is(lab: Lab) -> None:
    """Made before join: h3 joins the running swarm with its own docker_gwbridge."""
    name = unique_lab_name("g")
    # no network of the lab's own: the swarm made by hand below allocates VNIs from 4096
    other = Lab(spec=dataclasses.replace(default_spec(name, 1, swarm=False), networks=()))
    try:
        mine = other.client("h1")
        mine.post("/local-networks", {
            "name": "docker_gwbridge", "subnet": "10.99.0.0/16", "gateway": "10.99.0.1",
            "options": {"com.docker.network.bridge.name": "gwbr0",
                        "com.docker.network.bridge.enable_icc": "true",
                        "com.docker.network.bridge.enable_ip_masquerade": "false"},
        })  # fmt: skip
        mine.post("/swarm/init", {})
        # the node's agent connects to its own manager a moment after init answers
        wait_for(lambda: bool(mine.get("/swarm")["connected"]), "the agent's session", 20)
        mine.post("/swarm/networks", {"name": "own", "attachable": True})
        other.run("h1", "g1", "own", "idle")
        other.run("h1", "g2", "own", "idle")
        addr = other.exec("g1", ["ip", "-o", "-4", "addr", "show", "eth1"]).stdout
        assert " 10.99.0." in addr, addr
        link = other.exec_host("h1", ["ip", "-o", "link", "show", "gwbr0"])
        assert link.returncode == 0 and "gwbr0" in link.stdout
        g2 = other.exec("g2", ["ip", "-o", "-4", "addr", "show", "eth1"]).stdout.split()[3]
        r = other.exec("g1", ["ping", "-c", "1", "-W", "2", g2.split("/")[0]])
        assert r.returncode == 0, "enable_icc=true: containers reach each other on the bridge"
        rules = other.exec_host("h1", ["nft", "list", "table", "ip", "vxnet"]).stdout
        assert "masquerade" not in rules, rules  # enable_ip_masquerade=false
    finally:
        other.down()


def test_a_hand_made_swarm_cannot_take_a_lab_networks_vni() -> None:
    """A --no-swarm lab programs its own networks; a swarm formed by hand on it must not take
    one of their VNIs (or names): the switch would hand that VNI's containers to the swarm."""
    name = unique_lab_name("v")
    manual = Lab(hosts=1, name=name, swarm=False)
    try:
        manual.run("h1", "m1", "front", "idle")
        manual.run("h1", "m2", "front", "idle")
        front_vni = next(n["vni"] for n in manual.state["networks"] if n["name"] == "front")
        h1 = manual.client("h1")
        h1.post("/swarm/init", {})
        wait_for(lambda: bool(h1.get("/swarm")["connected"]), "the agent's session", 20)
        h1.post("/swarm/networks", {"name": "clash", "attachable": True, "options": [
            f"com.docker.network.driver.overlay.vxlanid_list={front_vni}"]})  # fmt: skip
        with pytest.raises(Conflict, match=r"collides with this host's own network front"):
            manual.run("h1", "s1", "clash", "idle")
        assert "s1" not in manual.containers()
        assert manual.stats("h1")["networks"]["front"]["vni"] == front_vni
        r = manual.exec("m1", ["ping", "-c", "1", "-W", "2", manual.ip("m2")])
        assert r.returncode == 0, "the lab's own network still switches its containers"
    finally:
        manual.down()
