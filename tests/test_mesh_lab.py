"""Service discovery, VIP load balancing and the routing mesh, shown for real (root).

One 3-host swarm lab.  ``app`` (attachable) carries ``web`` (whoami, 3 replicas, published on
8080 through the ingress routing mesh), ``rr`` (dnsrr, 2 replicas), ``uecho`` (echo, UDP 7
published on 5353/udp) and a standalone container ``c1`` with an alias; ``other`` carries a
service ``hidden`` and nothing else.  A plain namespace on the fabric plays the client outside
the swarm.  Issue 6's "Must be shown": the real dig at 127.0.0.11 for every record kind; curl
through each host's published port reaching every replica; UDP published; scaling and a task's
death changing answers and backends; isolation between networks; docker_gwbridge as the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import unique_lab_name
from vxnet import netns
from vxnet.errors import Conflict
from vxnet.lab import Lab, builder

pytestmark = pytest.mark.root

OUTSIDE = "192.168.100.250"  # the client outside the swarm, on the fabric
UPSTREAM = """
import socket, sys
import dns.message, dns.rcode, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    data, addr = s.recvfrom(4096)
    query = dns.message.from_wire(data)
    reply = dns.message.make_response(query)
    name = query.question[0].name.to_text()
    if name == "example.test.":
        reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "203.0.113.7"))
    else:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    s.sendto(reply.to_wire(), addr)
"""
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"ping-through-the-mesh", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(100)[0].decode())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("m")
    lab = Lab(hosts=3, name=name)
    try:
        mgr = lab.manager
        mgr.post("/swarm/networks", {"name": "app", "attachable": True})
        mgr.post("/swarm/networks", {"name": "other"})
        mgr.post("/services", {"name": "web", "image": "whoami", "replicas": 3,
                               "networks": ["app"], "ports": ["8080:80"]})  # fmt: skip
        mgr.post("/services", {"name": "rr", "image": "whoami", "replicas": 2,
                               "networks": ["app"], "endpoint_mode": "dnsrr"})  # fmt: skip
        mgr.post("/services", {"name": "uecho", "image": "echo", "replicas": 1,
                               "networks": ["app"], "ports": ["5353:7/udp"]})  # fmt: skip
        mgr.post("/services", {"name": "hidden", "image": "whoami", "networks": ["other"]})
        mgr.post("/services", {"name": "everywhere", "image": "whoami", "mode": "global",
                               "ports": ["8081:80"]})  # fmt: skip
        mgr.post("/services", {"name": "hostweb", "image": "whoami", "replicas": 1,
                               "ports": ["published=8090,target=80,mode=host"]})  # fmt: skip
        lab.converge()
        lab.run("h1", "c1", "app", "idle", aliases=["db"])
        lab.add_fabric_namespace("out", OUTSIDE)
        upstream = subprocess.Popen(
            netns.exec_argv(f"{builder.prefix(name)}xout", [sys.executable, "-c", UPSTREAM,
                                                             OUTSIDE])
        )  # fmt: skip
        lab.run("h2", "up1", "app", "idle", dns=[OUTSIDE])
        wait_for(lambda: len(dig(lab, "c1", "tasks.web")) == 3, "3 web tasks in DNS")
        wait_for(lambda: len(dig(lab, "c1", "tasks.rr")) == 2, "2 rr tasks in DNS")
        yield lab
    finally:
        with contextlib.suppress(NameError):
            upstream.kill()
            upstream.wait()
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def dig(lab: Lab, container: str, name: str, *extra: str) -> list[str]:
    """The answer section of the real dig, asked at 127.0.0.11 inside ``container``."""
    r = lab.exec(container, ["dig", "@127.0.0.11", "+short", "+time=2", "+tries=1", *extra, name])
    return r.stdout.split()


def dig_status(lab: Lab, container: str, name: str, *extra: str) -> str:
    r = lab.exec(container, ["dig", "@127.0.0.11", "+time=2", "+tries=1", *extra, name])
    m = re.search(r"status: (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def outside(lab: Lab, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    ns = f"{builder.prefix(lab.name)}xout"
    return subprocess.run(netns.exec_argv(ns, argv), capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def hostname(body: str) -> str:
    m = re.search(r"^Hostname: (\S+)", body, re.M)
    assert m, body
    return m.group(1)


def curl(run: Callable[[list[str]], Any], url: str) -> str:
    r = run(["curl", "-s", "--max-time", "3", url])
    assert r.returncode == 0, f"curl {url}: {r.returncode} {r.stderr}"
    return str(r.stdout)


def service_vip(lab: Lab, service: str, network: str = "app") -> str:
    svc = lab.manager.get(f"/services/{service}")
    net = next(n for n in lab.manager.get("/swarm/networks") if n["name"] == network)
    return str(svc["vips"][net["id"]])


def task_ips(lab: Lab, service: str, network: str = "app") -> set[str]:
    return {
        e["ip"]
        for c in lab.containers().values()
        if c["name"].startswith(f"{service}.")
        for e in c["endpoints"]
        if e["network"] == network
    }


def ip_on(lab: Lab, container: str, network: str = "app") -> str:
    return str(next(e["ip"] for e in lab.find(container)["endpoints"] if e["network"] == network))


# ----------------------------------------------------------------------------------- DNS


def test_dig_answers_every_record_kind(lab: Lab) -> None:
    assert dig(lab, "c1", "web") == [service_vip(lab, "web")]  # vip mode: the VIP only
    assert set(dig(lab, "c1", "tasks.web")) == task_ips(lab, "web")
    assert set(dig(lab, "c1", "rr")) == task_ips(lab, "rr")  # dnsrr: every task
    assert set(dig(lab, "c1", "tasks.rr")) == task_ips(lab, "rr")
    assert dig(lab, "c1", "c1") == [lab.ip("c1")]  # a container's name
    assert dig(lab, "c1", "db") == [lab.ip("c1")]  # and its --network-alias
    task = next(n for n in lab.containers() if n.startswith("web."))
    assert dig(lab, "c1", task) == [ip_on(lab, task)]  # a task's name
    assert dig_status(lab, "c1", "web", "AAAA") == "NOERROR"  # exists, no IPv6: empty
    assert dig(lab, "c1", "web", "AAAA") == []
    assert dig_status(lab, "c1", "nosuchservice") == "NXDOMAIN"
    assert set(dig(lab, "c1", "tasks.web", "+tcp")) == task_ips(lab, "web")  # DNS over TCP
    assert dig_status(lab, "c1", "example.com") == "SERVFAIL"  # no upstream in a lab: at once
    # every node answers the same: a task on another host asks too
    other = next(
        n for n, c in lab.containers().items() if n.startswith("rr.") and c["host"] != "h1"
    )
    assert set(dig(lab, other, "tasks.web")) == task_ips(lab, "web")


def test_resolv_conf_points_at_the_embedded_resolver(lab: Lab) -> None:
    r = lab.exec("c1", ["cat", "/etc/resolv.conf"])
    assert "nameserver 127.0.0.11" in r.stdout
    r = lab.exec("c1", ["getent", "hosts", "web"])  # the libc resolver, through resolv.conf
    assert r.stdout.split()[:1] == [service_vip(lab, "web")], r.stdout + r.stderr


def test_isolation_a_container_cannot_resolve_or_reach_another_networks_service(lab: Lab) -> None:
    assert dig_status(lab, "c1", "hidden") == "NXDOMAIN"
    # a dotted name that is not ours goes upstream, and a lab has none: SERVFAIL, no answer
    assert dig_status(lab, "c1", "tasks.hidden") in ("NXDOMAIN", "SERVFAIL")
    assert dig(lab, "c1", "tasks.hidden") == []
    vip = service_vip(lab, "hidden", "other")
    r = lab.exec("c1", ["curl", "-s", "--max-time", "2", f"http://{vip}/"])
    assert r.returncode != 0, r.stdout
    hidden_ip = task_ips(lab, "hidden", "other").pop()
    r = lab.exec("c1", ["curl", "-s", "--max-time", "2", f"http://{hidden_ip}/"])
    assert r.returncode != 0, r.stdout


# ----------------------------------------------------------------------------- VIP LB


def test_vip_spreads_connections_over_every_replica(lab: Lab) -> None:
    names = Counter(hostname(curl(lambda a: lab.exec("c1", a), "http://web/")) for _ in range(30))
    tasks = {n for n in lab.containers() if n.startswith("web.")}
    assert set(names) == tasks, names
    assert max(names.values()) - min(names.values()) <= 1, names  # round robin
    body = curl(lambda a: lab.exec("c1", a), "http://web/")
    lb = lab.client("h1").get("/discovery")["lb_addresses"]["app"]
    assert f"RemoteAddr: {lb}:" in body  # SNAT to h1's load-balancer address on app


# ------------------------------------------------------------------------ routing mesh


def test_routing_mesh_any_host_reaches_every_replica(lab: Lab) -> None:
    tasks = {n for n in lab.containers() if n.startswith("web.")}
    for host in lab.hosts:
        seen = {
            hostname(curl(lambda a: outside(lab, a), f"http://{lab.host_address(host)}:8080/"))
            for _ in range(30)
        }
        assert seen == tasks, (host, seen)


def test_routing_mesh_reaches_a_task_from_a_host_that_runs_none(lab: Lab) -> None:
    hosts_with_uecho = {c["host"] for n, c in lab.containers().items() if n.startswith("uecho.")}
    empty = next(h for h in lab.hosts if h not in hosts_with_uecho)
    r = outside(lab, ["python3", "-c", UDP_CLIENT, lab.host_address(empty), "5353"])
    assert r.stdout.strip() == "ping-through-the-mesh", r.stdout + r.stderr


def test_standalone_container_publishes_through_docker_gwbridge(lab: Lab) -> None:
    lab.run("h2", "pub1", "app", "whoami", publish=["9090:80"])
    try:
        url = f"http://{lab.host_address('h2')}:9090/"
        wait_for(lambda: outside(lab, ["curl", "-s", "--max-time", "2", url]).returncode == 0,
                 "pub1's server to listen")  # fmt: skip
        body = curl(lambda a: outside(lab, a), url)
        assert hostname(body) == "pub1"
        assert f"RemoteAddr: {OUTSIDE}:" in body  # a plain DNAT keeps the client's address
        r = outside(
            lab, ["curl", "-s", "--max-time", "2", f"http://{lab.host_address('h1')}:9090/"]
        )
        assert r.returncode != 0  # only the node running it publishes it
    finally:
        lab.rm("pub1")


def test_containers_leave_the_swarm_through_docker_gwbridge(lab: Lab) -> None:
    routes = lab.exec("c1", ["ip", "route", "show", "default"]).stdout
    assert "dev eth1" in routes, routes
    r = lab.exec("c1", ["ping", "-c", "2", "-W", "2", OUTSIDE])
    assert r.returncode == 0, r.stdout + r.stderr
    # ICC off: two containers' gwbridge addresses cannot reach each other
    mesh = lab.client("h1").get("/mesh")
    others = [ip for n, ip in mesh["containers"].items() if n not in ("c1",)]
    assert others
    r = lab.exec("c1", ["ping", "-c", "1", "-W", "1", others[0]])
    assert r.returncode != 0


# ------------------------------------------------------------------ changes over time


def test_scaling_and_a_dead_task_change_answers_and_backends(lab: Lab) -> None:
    lab.manager.post("/services/web/scale", {"replicas": 1})
    wait_for(lambda: len(dig(lab, "c1", "tasks.web")) == 1, "one web task in DNS", 30)
    answers = dig(lab, "c1", "tasks.web")
    only = {
        n
        for n, c in lab.containers().items()  # one snapshot: tasks come and go meanwhile
        if n.startswith("web.") and any(e["ip"] in answers for e in c["endpoints"])
    }
    seen = {hostname(curl(lambda a: lab.exec("c1", a), "http://web/")) for _ in range(6)}
    assert seen == only
    lab.manager.post("/services/web/scale", {"replicas": 3})
    wait_for(lambda: len(dig(lab, "c1", "tasks.web")) == 3, "three web tasks again", 30)
    # a task dies: the manager replaces it; answers and backends follow
    victim = next(n for n, c in lab.containers().items() if n.startswith("web."))
    ip = ip_on(lab, victim)
    os.kill(int(lab.find(victim)["pid"]), signal.SIGKILL)  # its process only
    wait_for(lambda: ip not in dig(lab, "c1", "tasks.web"), "the dead task out of DNS", 30)
    wait_for(lambda: len(dig(lab, "c1", "tasks.web")) == 3, "a replacement task", 30)
    tasks = {n for n in lab.containers() if n.startswith("web.")}
    seen = {hostname(curl(lambda a: lab.exec("c1", a), "http://web/")) for _ in range(15)}
    assert seen == tasks


def test_lb_command_shows_vips_and_sets_idle_timeouts(lab: Lab) -> None:
    def vx(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vxnet", "--lab", lab.name, "-H", "h1",
                               "dataplane", "lb", *args], capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip

    r = vx()
    assert r.returncode == 0, r.stderr
    assert service_vip(lab, "web") in r.stdout and "8080->80/tcp" in r.stdout
    r = vx("--set", "tcp_established_idle=900", "--set", "udp_idle=5", "--format", "json")
    assert r.returncode == 0, r.stderr
    settings = json.loads(r.stdout)["settings"]
    assert (settings["tcp_established_idle"], settings["udp_idle"]) == (900, 5)
    r = vx("--set", "no_such_timeout=5")
    assert r.returncode != 0 and "unknown settings" in r.stderr
    r = vx("--set", "udp_idle=-1")
    assert r.returncode != 0 and "positive" in r.stderr
    assert vx("--set", "udp_idle=30", "--set", "tcp_established_idle=7500").returncode == 0


def test_other_names_go_to_the_containers_upstream_through_docker_gwbridge(lab: Lab) -> None:
    """`run --dns`: 127.0.0.11 forwards what is not the swarm's, from the container's own
    namespace (its default route: docker_gwbridge, masqueraded onto the fabric)."""
    assert dig(lab, "up1", "example.test") == ["203.0.113.7"]
    assert dig_status(lab, "up1", "nosuch.test") == "NXDOMAIN"  # the upstream's own answer
    assert dig(lab, "up1", "web") == [service_vip(lab, "web")]  # the swarm's names stay local
    assert dig_status(lab, "c1", "example.test") == "SERVFAIL"  # c1 has no upstream


def test_a_global_service_is_published_by_every_host(lab: Lab) -> None:
    tasks = {n for n in lab.containers() if n.startswith("everywhere.")}
    assert len(tasks) == len(lab.hosts)
    seen = set()
    for host in lab.hosts:
        for _ in range(6):
            url = f"http://{lab.host_address(host)}:8081/"
            seen.add(hostname(curl(lambda a: outside(lab, a), url)))
    assert seen == tasks


def test_host_mode_publishes_only_where_the_task_runs(lab: Lab) -> None:
    (task,) = [c for n, c in lab.containers().items() if n.startswith("hostweb.")]
    for host in lab.hosts:
        url = f"http://{lab.host_address(host)}:8090/"
        r = outside(lab, ["curl", "-s", "--max-time", "2", url])
        if host == task["host"]:
            assert hostname(r.stdout) == task["name"]
            assert f"RemoteAddr: {OUTSIDE}:" in r.stdout  # a plain DNAT: the client is seen
        else:
            assert r.returncode != 0, (host, r.stdout)


def test_a_host_port_published_twice_is_refused(lab: Lab) -> None:
    lab.run("h3", "pubx", "app", "whoami", publish=["9191:80"])
    try:
        with pytest.raises(Conflict, match="port is already allocated"):
            lab.run("h3", "puby", "app", "whoami", publish=["9191:80"])
        assert "puby" not in lab.containers()  # nothing was made
        with pytest.raises(Conflict, match="port is already allocated"):
            lab.run("h3", "pubz", "app", "whoami", publish=["8080:80"])  # the mesh's
    finally:
        lab.rm("pubx")
