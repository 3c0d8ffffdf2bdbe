"""The demo's service steps: discovery, VIP and dnsrr, the routing mesh, publishing, ingress.

Part of ``vxnet lab demo`` (:mod:`vxnet.demo`); each step returns ``(verified, lines)``.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vxnet.demo import Tour
    from vxnet.lab import Lab

OUTSIDE = "192.168.100.200"  # a client outside the swarm, on the fabric
UDP_CLIENT = (
    "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);"
    "s.sendto(b'hello mesh',(sys.argv[1],int(sys.argv[2])));print(s.recvfrom(100)[0].decode())"
)


def hostnames(text: str) -> list[str]:
    return re.findall(r"^Hostname: (\S+)", text, re.M)


def outside_run(lab: Lab, argv: list[str]) -> str:
    ns = f"vx-{lab.name}-xout"
    r = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20, check=False
    )
    return r.stdout


def curl_outside(lab: Lab, host: str, port: int) -> list[str]:
    url = f"http://{lab.host_address(host)}:{port}/"
    return hostnames(outside_run(lab, ["curl", "-s", "--max-time", "3", url]))


def services_tour(tour: Tour, lab: Lab, web: list[dict[str, Any]]) -> None:
    mgr = lab.manager

    def discovery() -> tuple[bool, list[str]]:
        mgr.post(
            "/services",
            {
                "name": "rr",
                "image": "whoami",
                "replicas": 2,
                "networks": ["appnet"],
                "endpoint_mode": "dnsrr",
            },
        )
        lab.converge()
        vip = next(iter(mgr.get("/services/web")["vips"].values()))
        answers, lines = {}, []
        for name in ("web", "tasks.web", "rr"):
            r = lab.exec("client", ["dig", "@127.0.0.11", "+short", name])
            answers[name] = r.stdout.split()
            lines.append(f"dig {name}: {' '.join(answers[name]) or r.stderr.strip()}")
        lines.append(
            "web -> its VIP; tasks.web -> every task; rr (--endpoint-mode dnsrr) -> "
            "every task, no VIP: bring your own balancer"
        )
        rr = {c["ip"] for c in lab.containers().values() if c["name"].startswith("rr.")}
        ok = answers["web"] == [vip] and set(answers["tasks.web"]) == {c["ip"] for c in web}
        return ok and set(answers["rr"]) == rr and len(rr) == 2, lines

    tour.step(
        "Service discovery at 127.0.0.11: VIP, tasks.<service>, and dnsrr",
        "vxnet exec client -- dig @127.0.0.11 web; ... tasks.web; ... rr",
        discovery,
    )

    def vip() -> tuple[bool, list[str]]:
        seen: Counter[str] = Counter()
        for _ in range(6):
            seen.update(
                hostnames(
                    lab.exec("client", ["curl", "-s", "--max-time", "3", "http://web/"]).stdout
                )
            )
        conns = lab.client("h2").get("/dataplane/lb")["connections"]
        lines = [f"{name}: {n} of 6 connections" for name, n in sorted(seen.items())]
        lines += [
            f"h2 conntrack: {c['client']} -> {c['vip']} became {c['snat']} -> {c['backend']} "
            f"({c['state']})"
            for c in conns[:2]
        ]
        return set(seen) == {c["name"] for c in web}, lines

    tour.step(
        "VIP load balancing in the dataplane: round robin, DNAT + SNAT, no IPVS",
        "vxnet exec client -- curl http://web/   (x6)",
        vip,
    )

    def mesh() -> tuple[bool, list[str]]:
        mgr.post(
            "/services", {"name": "front", "image": "whoami", "replicas": 2, "ports": ["8080:80"]}
        )
        mgr.post(
            "/services",
            {
                "name": "uecho",
                "image": "echo",
                "replicas": 1,
                "ports": ["published=5353,target=7,protocol=udp"],
            },
        )
        lab.converge()
        lab.add_fabric_namespace("out", OUTSIDE)
        replicas = {t["container"] for t in mgr.get("/services/front/tasks")}
        lines, seen_all, ok = [], set(), True
        for host in lab.hosts:
            seen = {n for _ in range(4) for n in curl_outside(lab, host, 8080)}
            has_task = any(t["node"] == host for t in mgr.get("/services/front/tasks"))
            where = "runs a task" if has_task else "runs no task"
            lines.append(f"curl {lab.host_address(host)}:8080 ({host}, {where}): {sorted(seen)}")
            ok &= bool(seen)
            seen_all |= seen
        udp = outside_run(lab, ["python3", "-c", UDP_CLIENT, lab.host_address("h2"), "5353"])
        lines.append(f"UDP to h2:5353 (-p published=5353,target=7,protocol=udp): {udp.strip()!r}")
        lines.append("host DNAT -> ingress sandbox -> ingress VIP -> a task anywhere")
        return ok and seen_all == replicas and udp.strip() == "hello mesh", lines

    tour.step(
        "The routing mesh: a client outside the swarm reaches a task through any host",
        "vxnet service create --name front --replicas 2 -p 8080:80 whoami; curl hN:8080",
        mesh,
    )

    def standalone_publish() -> tuple[bool, list[str]]:
        lab.run("h3", "pub", "appnet", "whoami", publish=["8090:80"])
        got = curl_outside(lab, "h3", 8090)
        elsewhere = curl_outside(lab, "h1", 8090)
        lines = [
            f"curl h3:8090 -> {got}; curl h1:8090 -> {elsewhere or 'refused'}",
            "a plain DNAT on the node that runs it, to its docker_gwbridge address",
        ]
        return got == ["pub"] and not elsewhere, lines

    tour.step(
        "A standalone container publishes a port through docker_gwbridge",
        "vxnet -H h3 run -d --name pub --network appnet -p 8090:80 whoami",
        standalone_publish,
    )


def customise_ingress_tour(tour: Tour, lab: Lab) -> None:
    mgr = lab.manager

    def customise() -> tuple[bool, list[str]]:
        old = next(n for n in mgr.get("/swarm/networks") if n["ingress"])
        lines = [f"ingress was {old['subnet']}, MTU {old['mtu']}"]
        for svc in ("front", "uecho"):
            mgr.delete(f"/services/{svc}")
        mgr.delete(f"/swarm/networks/{old['name']}")
        lines.append("removed the services that publish, then `network rm ingress` (answered y)")
        mgr.post(
            "/swarm/networks",
            {
                "name": "my-ingress",
                "driver": "overlay",
                "ingress": True,
                "subnet": "10.11.0.0/16",
                "gateway": "10.11.0.2",
                "options": ["com.docker.network.driver.mtu=1200"],
            },
        )
        mgr.post(
            "/services", {"name": "front", "image": "whoami", "replicas": 2, "ports": ["8080:80"]}
        )
        lab.converge()
        new = next(n for n in mgr.get("/swarm/networks") if n["ingress"])
        seen = {n for h in lab.hosts for _ in range(2) for n in curl_outside(lab, h, 8080)}
        sandbox = lab.client("h2").get("/mesh")["ingress_sandbox"]
        lines.append(
            f"my-ingress: {new['subnet']} gateway {new['gateway']} MTU {new['mtu']}; "
            f"h2's sandbox now {sandbox['ip'] if sandbox else None}"
        )
        lines.append(f"curl every host :8080 again -> {sorted(seen)}")
        ok = new["name"] == "my-ingress" and new["mtu"] == 1200 and bool(seen)
        return ok and bool(sandbox) and str(sandbox["ip"]).startswith("10.11."), lines

    tour.step(
        "Customising ingress: remove it, create my-ingress (subnet, gateway, MTU 1200)",
        "vxnet network rm ingress; vxnet network create --driver overlay --ingress "
        "--subnet 10.11.0.0/16 --gateway 10.11.0.2 --opt com.docker.network.driver.mtu=1200 "
        "my-ingress",
        customise,
    )
