"""docker_gwbridge's data path and published ports: the renderer offline, the rest in netns.

The root tests build a mini fabric, every piece in its own namespace (nothing in the root one):

    out (192.168.X.2) --veth-- host (192.168.X.1, docker_gwbridge 172.18.0.1/16)
                                  |-- a   172.18.0.3  isolated port (icc off)
                                  |-- b   172.18.0.4  isolated port
                                  |-- c   172.18.0.5  icc on
                                  |-- d   172.18.0.6  icc on
                                  '-- sb  172.18.0.2  "ingress sandbox" --veth-- srv 10.255.0.5

``srv`` stands in for the ingress VIP: it has no route but its own /24, so its replies come back
only through the sandbox's masquerade.  ``out`` has no route to 172.18/16 either.
"""

from __future__ import annotations

import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.conftest import need, root_links
from vxnet import netns, nft
from vxnet.daemon import gwbridge
from vxnet.daemon.gwbridge import Dnat, HostRules, SandboxRules, render
from vxnet.errors import Conflict, LabError, UsageError

SUBNET = IPv4Network("172.18.0.0/16")
GATEWAY = IPv4Address("172.18.0.1")
BRIDGE = "docker_gwbridge"
SANDBOX_IP = IPv4Address("172.18.0.2")
VIP = IPv4Address("10.255.0.5")


def ip4(text: str) -> IPv4Address:
    return IPv4Address(text)


# -- the renderer, offline ---------------------------------------------------------------------


def test_host_rules_render_exactly() -> None:
    rules = HostRules(
        BRIDGE,
        SUBNET,
        masquerade=True,
        publish=[
            Dnat("udp", 53, ip4("172.18.0.3"), 5353),
            Dnat("tcp", 8080, SANDBOX_IP, 8080),
            Dnat("tcp", 443, ip4("172.18.0.4"), 8443),
        ],
    )
    pre = 'iifname != "docker_gwbridge" fib daddr type local'
    out = "ip daddr != 127.0.0.0/8 fib daddr type local"
    assert render(rules).splitlines() == [
        "chain prerouting {",
        "\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t{pre} tcp dport 443 dnat to 172.18.0.4:8443",
        f"\t{pre} tcp dport 8080 dnat to 172.18.0.2:8080",
        f"\t{pre} udp dport 53 dnat to 172.18.0.3:5353",
        "}",
        "chain output {",
        "\ttype nat hook output priority -100; policy accept;",
        f"\t{out} tcp dport 443 dnat to 172.18.0.4:8443",
        f"\t{out} tcp dport 8080 dnat to 172.18.0.2:8080",
        f"\t{out} udp dport 53 dnat to 172.18.0.3:5353",
        "}",
        "chain postrouting {",
        "\ttype nat hook postrouting priority srcnat; policy accept;",
        '\tip saddr 172.18.0.0/16 oifname != "docker_gwbridge" masquerade',
        "}",
    ]


def test_render_is_deterministic_whatever_the_order() -> None:
    publish = [Dnat("tcp", p, ip4(f"172.18.0.{p % 200 + 2}"), 80) for p in range(1000, 1040)]
    texts = set()
    for seed in range(5):
        shuffled = list(publish)
        random.Random(seed).shuffle(shuffled)
        texts.add(render(HostRules(BRIDGE, SUBNET, masquerade=True, publish=shuffled)))
    assert len(texts) == 1


def test_no_masquerade_and_no_ports_leave_empty_chains() -> None:
    text = render(HostRules("br-x", IPv4Network("10.9.0.0/24"), masquerade=False))
    assert "masquerade" not in text
    assert "dnat" not in text
    assert text.count("chain ") == 3


def test_same_port_twice_is_one_rule_and_two_targets_conflict() -> None:
    same = Dnat("tcp", 80, ip4("172.18.0.3"), 80)
    text = render(HostRules(BRIDGE, SUBNET, masquerade=True, publish=[same, same]))
    assert text.count("tcp dport 80 ") == 2  # once in prerouting, once in output
    other = Dnat("tcp", 80, ip4("172.18.0.4"), 80)
    with pytest.raises(Conflict, match="80/tcp is published twice"):
        render(HostRules(BRIDGE, SUBNET, masquerade=True, publish=[same, other]))
    assert "udp dport 80" in render(
        HostRules(
            BRIDGE, SUBNET, masquerade=True, publish=[same, Dnat("udp", 80, ip4("1.2.3.4"), 80)]
        )
    )


def test_sandbox_rules_render() -> None:
    rules = SandboxRules([Dnat("udp", 7, VIP, 7), Dnat("tcp", 8080, VIP, 8080)], snat_ifname="eth0")
    assert render(rules).splitlines() == [
        "chain prerouting {",
        "\ttype nat hook prerouting priority dstnat; policy accept;",
        '\tiifname "eth1" tcp dport 8080 dnat to 10.255.0.5:8080',
        '\tiifname "eth1" udp dport 7 dnat to 10.255.0.5:7',
        "}",
        "chain postrouting {",
        "\ttype nat hook postrouting priority srcnat; policy accept;",
        '\toifname "eth0" ct status dnat masquerade',
        "}",
    ]
    assert "masquerade" not in render(SandboxRules([Dnat("tcp", 1, VIP, 1)], ifname="gw0"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dnat("icmp", 1, ip4("1.2.3.4"), 1),  # type: ignore[arg-type]
        lambda: Dnat("tcp", 0, ip4("1.2.3.4"), 1),
        lambda: Dnat("tcp", 1, ip4("1.2.3.4"), 65536),
        lambda: Dnat("tcp", 1, "1.2.3.4", 1),  # type: ignore[arg-type]
        lambda: render(HostRules('br"; flush ruleset', SUBNET, masquerade=True)),
        lambda: render(SandboxRules([], ifname="much-too-long-name")),
    ],
)
def test_bad_input_is_a_usage_error(make: object) -> None:
    with pytest.raises(UsageError):
        make()  # type: ignore[operator]


def test_missing_nft_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LabError, match=r"nft not found: apt-get install nftables"):
        nft.list_table("anything", "ip", "vxnet")


def test_bad_family_or_table_name_is_refused_before_running_nft() -> None:
    with pytest.raises(UsageError):
        nft.apply_table("anything", "ipx", "vxnet", "")
    with pytest.raises(UsageError):
        nft.delete_table("anything", "ip", "vx net; flush ruleset")


# -- the kernel ----------------------------------------------------------------------------------

SERVER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
if proto == "tcp":
    s.listen(16)
print("ready", flush=True)
while True:
    if proto == "tcp":
        conn, peer = s.accept()
        conn.recv(100)
        conn.sendall(f"{peer[0]}\n".encode())
        conn.close()
    else:
        data, peer = s.recvfrom(100)
        s.sendto(f"{peer[0]}\n".encode(), peer)
"""

CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.settimeout(3)
s.connect((host, port))
s.send(b"hello")
print(s.recv(100).decode().strip())
"""


@dataclass
class Fabric:
    prefix: str
    x: int
    names: list[str]
    servers: list[subprocess.Popen[str]]

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    @property
    def host_ip(self) -> str:
        return f"192.168.{self.x}.1"

    @property
    def out_ip(self) -> str:
        return f"192.168.{self.x}.2"

    def add(self, short: str) -> str:
        name = self.ns(short)
        self.names.append(name)
        netns.create(name)
        return name

    def run(self, short: str, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns.exec_argv(self.ns(short), list(argv)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ping(self, short: str, target: str) -> bool:
        return self.run(short, "ping", "-c", "1", "-W", "1", target).returncode == 0

    def serve(self, short: str, proto: str, port: int) -> None:
        argv = netns.exec_argv(self.ns(short), [sys.executable, "-c", SERVER, proto, str(port)])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    def ask(self, short: str, proto: str, host: str, port: int) -> str:
        r = self.run(short, sys.executable, "-c", CLIENT, proto, host, str(port))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


def _build(f: Fabric) -> None:
    host, out = f.add("host"), f.add("out")
    netns.add_veth(host, "fab0", out, "fab0")
    netns.add_address(host, "fab0", f.host_ip, 24)
    netns.add_address(out, "fab0", f.out_ip, 24)
    for _ in range(2):  # a second call keeps the bridge as it is
        gwbridge.ensure_bridge(host, BRIDGE, SUBNET, GATEWAY, mtu=1500)
    containers = {"a": (3, False), "b": (4, False), "c": (5, True), "d": (6, True)}
    for short, (last, icc) in containers.items():
        ns = f.add(short)
        # An overlay's interface and default route, as create_container leaves them (a veth
        # with both ends inside stands in for its TAP: this kernel has no dummy driver).
        netns.add_veth(ns, "eth0", ns, "eth0peer")
        netns.add_address(ns, "eth0", f"10.0.1.{last}", 24)
        netns.set_link(ns, "eth0", state="up")
        netns.add_route(ns, "0.0.0.0/0", gateway="10.0.1.1")
        gwbridge.attach(host, BRIDGE, ns, "eth1", ip4(f"172.18.0.{last}"), 16, GATEWAY, icc=icc)
    sb, srv = f.add("sb"), f.add("srv")
    gwbridge.attach(host, BRIDGE, sb, "eth1", SANDBOX_IP, 16, GATEWAY, icc=False)
    netns.add_veth(sb, "eth0", srv, "eth0")
    netns.add_address(sb, "eth0", "10.255.0.2", 24)
    netns.add_address(srv, "eth0", str(VIP), 24)
    gwbridge.prepare_sandbox(sb)
    gwbridge.apply_sandbox_rules(
        sb, SandboxRules([Dnat("tcp", 8090, VIP, 8090)], ifname="eth1", snat_ifname="eth0")
    )
    gwbridge.apply_host_rules(
        host,
        HostRules(
            BRIDGE,
            SUBNET,
            masquerade=True,
            publish=[
                Dnat("tcp", 8080, ip4("172.18.0.3"), 80),  # mode=host / run -p
                Dnat("udp", 8081, ip4("172.18.0.3"), 9000),
                Dnat("tcp", 8090, SANDBOX_IP, 8090),  # routing mesh: to the ingress sandbox
            ],
        ),
    )
    f.serve("out", "udp", 7)
    f.serve("out", "tcp", 7)
    f.serve("a", "tcp", 80)
    f.serve("a", "udp", 9000)
    f.serve("srv", "tcp", 8090)


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    need("nft", "ping", "bridge")
    before = root_links()
    f = Fabric("gw" + secrets.token_hex(3), random.randrange(100, 250), [], [])
    try:
        _build(f)
        yield f
    finally:
        for proc in f.servers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for name in reversed(f.names):
            netns.remove(name)
        assert netns.list_with_prefix(f.prefix) == []
        assert root_links() == before


@pytest.mark.parametrize("short", ["a", "b", "c", "d", "sb"])
@pytest.mark.root
def test_container_pings_its_gateway(fabric: Fabric, short: str) -> None:
    assert fabric.ping(short, str(GATEWAY))


@pytest.mark.root
def test_default_route_is_replaced_by_the_gwbridge_gateway(fabric: Fabric) -> None:
    routes = fabric.run("a", "ip", "-4", "route", "show", "default").stdout.split()
    assert routes[:5] == ["default", "via", str(GATEWAY), "dev", "eth1"]
    assert "10.0.1.1" not in routes
    link = fabric.run("a", "ip", "-o", "link", "show", "eth1").stdout
    assert "02:42:ac:12:00:03" in link


@pytest.mark.root
def test_icc_off_isolates_containers_and_icc_on_does_not(fabric: Fabric) -> None:
    assert not fabric.ping("a", "172.18.0.4")
    assert not fabric.ping("b", "172.18.0.3")
    assert fabric.ping("c", "172.18.0.6")
    assert fabric.ping("d", "172.18.0.5")
    ports = fabric.run("host", "bridge", "-d", "link", "show").stdout
    assert ports.count("isolated on") == 3  # a, b and the sandbox


@pytest.mark.root
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_masquerade_shows_the_host_address_outside(fabric: Fabric, proto: str) -> None:
    assert fabric.ask("a", proto, fabric.out_ip, 7) == fabric.host_ip


@pytest.mark.root
def test_tcp_dnat_reaches_a_container_and_keeps_the_client_address(fabric: Fabric) -> None:
    assert fabric.ask("out", "tcp", fabric.host_ip, 8080) == fabric.out_ip


@pytest.mark.root
def test_udp_dnat(fabric: Fabric) -> None:
    assert fabric.ask("out", "udp", fabric.host_ip, 8081) == fabric.out_ip


@pytest.mark.root
def test_the_host_itself_reaches_its_published_port(fabric: Fabric) -> None:
    assert fabric.ask("host", "tcp", fabric.host_ip, 8080) == fabric.host_ip


@pytest.mark.root
def test_routing_mesh_chain_through_the_sandbox(fabric: Fabric) -> None:
    # out -> host:8090 -DNAT-> sandbox 172.18.0.2:8090 -DNAT+SNAT-> "VIP" 10.255.0.5:8090
    assert fabric.ask("out", "tcp", fabric.host_ip, 8090) == "10.255.0.2"
    assert "dnat to 10.255.0.5:8090" in nft.list_table(fabric.ns("sb"), "ip", "vxnet")


@pytest.mark.root
def test_published_ports_only_for_the_host_own_addresses(fabric: Fabric) -> None:
    # Traffic to a container's port 8080 (not the host's address) is not rewritten: nothing there.
    r = fabric.run("c", sys.executable, "-c", CLIENT, "tcp", "172.18.0.6", "8080")
    assert r.returncode != 0


@pytest.mark.root
def test_ensure_bridge_refuses_another_address(fabric: Fabric) -> None:
    with pytest.raises(LabError, match=r"has address 172\.18\.0\.1/16"):
        gwbridge.ensure_bridge(
            fabric.ns("host"), BRIDGE, IPv4Network("172.19.0.0/16"), ip4("172.19.0.1")
        )
    with pytest.raises(LabError, match="not a bridge"):
        gwbridge.ensure_bridge(fabric.ns("host"), "fab0", SUBNET, GATEWAY)


@pytest.mark.root
def test_detach_is_idempotent_and_takes_the_container_end(fabric: Fabric) -> None:
    ns = fabric.add("e")
    veth = gwbridge.attach(
        fabric.ns("host"), BRIDGE, ns, "eth1", ip4("172.18.0.9"), 16, GATEWAY, icc=True
    )
    assert veth.startswith("vxg") and len(veth) <= 15
    assert fabric.ping("e", "172.18.0.5")
    gwbridge.detach(fabric.ns("host"), veth)
    gwbridge.detach(fabric.ns("host"), veth)
    assert fabric.run("e", "ip", "link", "show", "eth1").returncode != 0
    links = fabric.run("host", "ip", "-o", "link").stdout
    with pytest.raises(LabError, match="no interface 'nobridge'"):
        gwbridge.attach(
            fabric.ns("host"), "nobridge", ns, "eth1", ip4("172.18.0.9"), 16, GATEWAY, icc=True
        )
    assert fabric.run("host", "ip", "-o", "link").stdout == links  # nothing left behind


@pytest.mark.root
def test_nft_tables_apply_twice_delete_twice_and_report_errors(fabric: Fabric) -> None:
    ns = fabric.add("nft")
    body = (
        "chain input {\n\ttype filter hook input priority 0; policy accept;\n\tudp dport 9 drop\n}"
    )
    nft.apply_table(ns, "inet", "scratch", body)
    nft.apply_table(ns, "inet", "scratch", body)
    listed = nft.list_table(ns, "inet", "scratch")
    assert listed.count("udp dport 9 drop") == 1
    nft.delete_table(ns, "inet", "scratch")
    nft.delete_table(ns, "inet", "scratch")
    with pytest.raises(LabError, match="No such file or directory"):
        nft.list_table(ns, "inet", "scratch")
    nft.apply_table(ns, "inet", "scratch", body)
    with pytest.raises(LabError, match="frobnicate") as bad:
        nft.apply_table(ns, "inet", "scratch", "chain c {\n\tfrobnicate\n}")
    assert "Error" in str(bad.value)
    assert nft.list_table(ns, "inet", "scratch").count("udp dport 9 drop") == 1  # atomic
    with pytest.raises(LabError, match=r"Cannot open network namespace|No such file"):
        nft.list_table(fabric.prefix + "-missing", "inet", "scratch")


@pytest.mark.root
def test_sctp_rules_load(fabric: Fabric) -> None:
    ns = fabric.add("sctp")
    rules = HostRules(BRIDGE, SUBNET, masquerade=True, publish=[Dnat("sctp", 9, GATEWAY, 9)])
    nft.apply_table(ns, "ip", "vxnet", render(rules))
    assert "sctp dport 9 dnat to 172.18.0.1:9" in nft.list_table(ns, "ip", "vxnet")


@pytest.mark.root
@pytest.mark.parametrize("br_netfilter", ["0", "1"])
def test_rules_hold_with_br_netfilter_on_or_off(fabric: Fabric, br_netfilter: str) -> None:
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if fabric.run("host", "test", "-e", path).returncode != 0:
        pytest.skip("no br_netfilter in this kernel")
    assert fabric.run("host", "sh", "-c", f"echo {br_netfilter} > {path}").returncode == 0
    try:
        assert fabric.ping("c", "172.18.0.6")  # bridged, not masqueraded
        assert not fabric.ping("a", "172.18.0.4")
        assert fabric.ask("a", "udp", fabric.out_ip, 7) == fabric.host_ip
        assert fabric.ask("out", "tcp", fabric.host_ip, 8080) == fabric.out_ip
    finally:
        fabric.run("host", "sh", "-c", f"echo 1 > {path}")
