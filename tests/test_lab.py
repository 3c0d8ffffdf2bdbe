"""The foundation, shown for real: namespaces, TAPs, the daemons and VXLAN on a fabric (root)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import need, root_links, unique_lab_name
from vxnet import netns
from vxnet.capture import explain, finish_capture, start_capture
from vxnet.lab import Lab, builder

pytestmark = pytest.mark.root

ECHO_CLIENT = """
import socket, sys
ip = sys.argv[1]
s = socket.create_connection((ip, 7), timeout=5)
payload = bytes(range(256)) * 200
s.sendall(payload)
got = b""
while len(got) < len(payload):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"hello-udp", (ip, 7))
print(got == payload, u.recvfrom(100)[0].decode())
"""


def vxnet_cli(lab: Lab | str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    name = lab if isinstance(lab, str) else lab.name
    return subprocess.run(
        [sys.executable, "-m", "vxnet", "--lab", name, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def pair(lab3: Lab) -> Lab:
    lab3.run("h1", "srv", "front", "echo")
    lab3.run("h2", "cli", "front", "idle")
    lab3.run("h3", "blue", "back", "idle")
    return lab3


def test_containers_on_different_hosts_ping_and_exchange_tcp_udp(pair: Lab) -> None:
    r = pair.exec("cli", ["ping", "-c", "3", "-i", "0.2", "-W", "2", pair.ip("srv")])
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    r = pair.exec("cli", [sys.executable, "-c", ECHO_CLIENT, pair.ip("srv")])
    assert r.stdout.split() == ["True", "hello-udp"], r.stderr
    st = pair.stats("h1")["networks"]["front"]
    assert st["rx_frames"] > 0 and st["tx_frames"] > 0


def test_container_interface_is_docker_shaped(pair: Lab) -> None:
    c = pair.find("srv")
    assert c["mac"] == "02:42:" + ":".join(f"{int(o):02x}" for o in c["ip"].split("."))
    r = pair.exec("srv", ["ip", "-o", "link", "show", "eth0"])
    assert "mtu 1450" in r.stdout and c["mac"] in r.stdout
    routes = pair.exec("srv", ["ip", "route"]).stdout
    # in a swarm, as in Docker: the overlay on eth0, the way out through docker_gwbridge on eth1
    assert "10.0.1.0/24 dev eth0" in routes and "default via 172.18.0.1 dev eth1" in routes, routes


def test_iperf3_over_the_overlay(pair: Lab) -> None:
    need("iperf3")
    lab3 = pair
    lab3.run("h3", "perf", "front", "iperf3")
    try:
        ip = lab3.ip("perf")
        out = None
        for _ in range(50):  # wait until iperf3 -s listens
            r = lab3.exec("cli", ["iperf3", "-c", ip, "-t", "1", "-J"], timeout=30)
            if r.returncode == 0:
                out = json.loads(r.stdout)
                break
            time.sleep(0.1)
        assert out is not None, "iperf3 never connected"
        assert out["end"]["sum_received"]["bytes"] > 1_000_000
    finally:
        lab3.rm("perf")


def test_networks_with_different_vnis_cannot_reach_each_other(pair: Lab) -> None:
    """Even forcing L2 (a route on-link and a neighbour entry), VNI 4098 never reaches 4097."""
    srv = pair.find("srv")
    pair.exec("blue", ["ip", "route", "add", "10.0.1.0/24", "dev", "eth0"], check=True)
    pair.exec(
        "blue",
        ["ip", "neigh", "replace", srv["ip"], "lladdr", srv["mac"], "dev", "eth0"],
        check=True,
    )
    before = pair.stats("h3")["networks"]["back"]["drops"].get("unknown_dst", 0)
    r = pair.exec("blue", ["ping", "-c", "2", "-i", "0.2", "-W", "1", srv["ip"]])
    after = pair.stats("h3")["networks"]["back"]["drops"].get("unknown_dst", 0)
    assert r.returncode != 0
    assert after - before == 2


def test_capture_on_the_fabric_decodes_as_vxlan(pair: Lab) -> None:
    need("tshark")
    argv = [
        "tshark",
        "-i",
        "h2",
        "-c",
        "2",
        "-a",
        "duration:10",
        "-f",
        "udp port 4789",
        "-T",
        "fields",
        "-e",
        "vxlan.vni",
        "-e",
        "ip.src",
        "-e",
        "icmp.type",
    ]
    proc = subprocess.Popen(
        netns.exec_argv(pair.fabric_netns, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # tshark needs a moment before it captures
    pair.exec("cli", ["ping", "-c", "3", "-i", "0.3", pair.ip("srv")])
    out, err = proc.communicate(timeout=20)
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    assert rows, err
    assert all(row[0] == "4097" for row in rows), rows
    assert {row[2] for row in rows} & {"8", "0"}  # the inner ICMP is dissected too


def test_our_capture_and_codecs_see_the_same(pair: Lab) -> None:
    proc = start_capture(pair.fabric_netns, "h1", count=1, timeout=5)
    pair.exec("cli", ["ping", "-c", "1", "-W", "2", pair.ip("srv")])
    frames = finish_capture(proc, 5)
    assert frames
    text = "\n".join(explain(frames[0]))
    assert "VNI 4097" in text and "ICMP" in text and "4789" in text


def _junk_datagrams(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    good_inner = (
        bytes.fromhex("02420a000102") + bytes.fromhex("02420a0001ff") + b"\x08\x00" + b"x" * 30
    )
    kinds = [
        lambda: b"\x08\x00",  # truncated header
        lambda: bytes.fromhex("0000000000100100") + good_inner,  # no I flag
        lambda: bytes.fromhex("0800000000ffff00") + good_inner,  # unknown VNI
        lambda: bytes.fromhex("0800000000100100") + b"\x01\x02",  # truncated inner frame
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200))),  # garbage
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def _all_drops(stats: dict[str, object]) -> int:
    total = sum(stats["global"]["drops"].values())  # type: ignore[index]
    for net in stats["networks"].values():  # type: ignore[attr-defined]
        total += sum(net["drops"].values())
    return total


def test_malformed_vxlan_is_counted_and_does_not_disturb_a_ping(pair: Lab) -> None:
    ns = pair.add_fabric_namespace("junk", "192.168.100.250")
    target = pair.host_address("h1")
    before = pair.stats("h1")
    pinger = subprocess.Popen(
        netns.exec_argv(
            pair.find("cli")["netns"],
            ["ping", "-c", "200", "-i", "0.01", "-W", "2", pair.ip("srv")],
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    junk = _junk_datagrams(2000, seed=7)
    sender = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for i,line in enumerate(sys.stdin):\n"
        f"  s.sendto(bytes.fromhex(line.strip()),('{target}',4789))\n"
        "  time.sleep(0.0005) if i % 20 == 0 else None\n"
    )
    subprocess.run(
        netns.exec_argv(ns, [sys.executable, "-c", sender]),
        input="\n".join(d.hex() for d in junk),
        text=True,
        check=True,
    )
    out, _ = pinger.communicate(timeout=60)
    assert " 0% packet loss" in out, out
    time.sleep(0.3)
    after = pair.stats("h1")
    assert _all_drops(after) - _all_drops(before) == len(junk)
    g0, g1 = before["global"]["drops"], after["global"]["drops"]
    for reason in ("vxlan_truncated", "vxlan_no_i_flag", "unknown_vni", "inner_truncated"):
        assert g1.get(reason, 0) - g0.get(reason, 0) >= 400, reason
    assert builder.daemon_alive(pair.state["hosts"]["h1"]["pid"])


def test_a_frame_bigger_than_the_network_mtu_is_dropped_and_counted(pair: Lab) -> None:
    """A container forced above its network's MTU: vxnet refuses the frame, never truncates."""
    pair.exec("cli", ["ip", "link", "set", "eth0", "mtu", "1500"], check=True)
    try:
        before = pair.stats("h2")["networks"]["front"]["drops"].get("too_big", 0)
        r = pair.exec(
            "cli", ["ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1460", pair.ip("srv")]
        )
        after = pair.stats("h2")["networks"]["front"]["drops"].get("too_big", 0)
        assert r.returncode != 0 and after - before == 2
        ok = pair.exec(
            "cli", ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422", pair.ip("srv")]
        )
        assert ok.returncode == 0  # 1422 + 28 = 1450: exactly the network MTU passes
    finally:
        pair.exec("cli", ["ip", "link", "set", "eth0", "mtu", "1450"], check=True)


def test_api_speaks_http_to_curl_and_survives_garbage(pair: Lab) -> None:
    need("curl")
    sock = pair.state["hosts"]["h1"]["socket"]
    r = subprocess.run(
        ["curl", "-s", "--unix-socket", sock, "http://localhost/info"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(r.stdout)["host"] == "h1"
    for junk in (
        b"\x00\xff garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /networks HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}",
    ):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(sock)
        s.sendall(junk)
        assert s.recv(100).startswith(b"HTTP/1.1 4")
        s.close()
    assert pair.client("h1").get("/info")["host"] == "h1"


def test_cli_errors_are_one_clear_line(pair: Lab) -> None:
    cases = [
        (["ps"], "no lab named", "nosuchlab"),
        (
            ["run", "-d", "--name", "bad name", "--network", "front", "idle"],
            "invalid container name",
            None,
        ),
        (
            ["run", "-d", "--name", "x1", "--network", "nope", "idle"],
            "network nope not found",
            None,
        ),
        (
            ["run", "-d", "--name", "x2", "--network", "front", "--ip", "10.9.9.9", "idle"],
            "is not in the subnet of network 'front'",  # the manager allocates swarm addresses
            None,
        ),
        (["run", "-d", "--name", "srv", "--network", "front", "idle"], "already in use", None),
        (["run", "-d", "--name", "x3", "--network", "front", "nosuchimage"], "unknown image", None),
        (
            [
                "fdb",
                "add",
                "--network",
                "front",
                "--mac",
                "zz",
                "--ip",
                "10.0.1.50",
                "--vtep",
                "192.168.100.99",
            ],
            "MAC",
            None,
        ),
        (["-H", "h9", "ps"], "no host 'h9'", None),
    ]
    for args, needle, lab in cases:
        r = vxnet_cli(lab or pair, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = vxnet_cli(pair, "lab", "up", "--hosts", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_fdb_cli_round_trip(pair: Lab) -> None:
    args = [
        "fdb",
        "add",
        "--network",
        "front",
        "--mac",
        "02:42:0a:00:01:fa",
        "--ip",
        "10.0.1.250",
        "--vtep",
        "192.168.100.99",
    ]
    assert vxnet_cli(pair, "-H", "h2", *args).returncode == 0
    rows = json.loads(vxnet_cli(pair, "-H", "h2", "fdb", "show", "--format", "json").stdout)
    assert {
        "mac": "02:42:0a:00:01:fa",
        "ip": "10.0.1.250",
        "vtep": "192.168.100.99",
        "origin": "manual",
    }.items() <= next(r for r in rows if r["ip"] == "10.0.1.250").items()
    assert (
        vxnet_cli(
            pair, "-H", "h2", "fdb", "del", "--network", "front", "--mac", "02:42:0a:00:01:fa"
        ).returncode
        == 0
    )
    pair.sync_peers()  # the manual entry is gone; gossip's (or the lab's) are untouched
    rows = pair.client("h2").get("/fdb")
    assert all(r["mac"] != "02:42:0a:00:01:fa" for r in rows)
    assert {r["origin"] for r in rows} <= {"gossip", "lab"} and rows


def test_lab_down_leaves_nothing_even_after_kill_9() -> None:
    links_before = root_links()
    name = unique_lab_name("d")
    lab = Lab(hosts=2, name=name)
    try:
        lab.run("h1", "a", "front", "echo")
        lab.run("h2", "b", "front", "idle")
        assert root_links() == links_before, "the lab must not touch the root namespace"
        pid = lab.state["hosts"]["h1"]["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert not builder.daemon_alive(pid)
    finally:
        r = vxnet_cli(name, "lab", "down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert netns.list_with_prefix(builder.prefix(name)) == []
    assert not builder.run_dir(name).exists()
    leftovers = subprocess.run(  # noqa: PLW1510 - pgrep exits 1 when nothing matches
        ["pgrep", "-f", f"/run/vxnet/{name}/"], capture_output=True, text=True
    )
    assert leftovers.stdout == ""
    assert root_links() == links_before
    r = vxnet_cli(name, "lab", "down", "--name", name)  # idempotent
    assert r.returncode == 0


def test_lab_restart_brings_a_killed_daemon_back() -> None:
    name = unique_lab_name("r")
    with Lab(hosts=2, name=name) as lab:
        lab.run("h1", "a", "front", "idle")
        lab.run("h2", "b", "front", "idle")
        old = lab.state["hosts"]["h2"]["pid"]
        os.kill(old, signal.SIGKILL)
        r = vxnet_cli(name, "lab", "restart", "h2")
        assert r.returncode == 0, r.stderr
        # the container survived its daemon (persistent TAPs): the new daemon re-adopts it
        adopted = next(ln for ln in r.stdout.splitlines() if "re-adopted (persistent TAPs)" in ln)
        assert "b" in adopted.split(": ", 1)[1].split(", "), r.stdout
        lab.state = builder.load_state(name)
        assert lab.state["hosts"]["h2"]["pid"] != old
        for _ in range(100):  # the restarted node rejoins the swarm by itself
            if lab.client("h2").get("/swarm")["connected"]:
                break
            time.sleep(0.1)
        assert lab.client("h2").get("/swarm")["connected"]
        lab.sync_peers()
        lab.run("h2", "b2", "front", "idle")
        r2 = lab.exec("b2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", lab.ip("a")])
        assert r2.returncode == 0, r2.stdout
        inspect = json.loads(vxnet_cli(name, "lab", "inspect", "--format", "json").stdout)
        assert all(h["daemon_running"] for h in inspect["hosts"].values())


def test_foreground_run_streams_output_and_exit_code(pair: Lab) -> None:
    r = vxnet_cli(
        pair,
        "-H",
        "h2",
        "run",
        "--name",
        "once",
        "--network",
        "front",
        "idle",
        "sh",
        "-c",
        f"ping -c 1 -W 2 {pair.ip('srv')} >/dev/null && echo reached; exit 3",
    )
    assert r.returncode == 3 and "reached" in r.stdout, r.stderr
    assert pair.find("once")["status"] == "exited (3)"
    pair.rm("once", force=False)  # an exited container needs no -f


def test_rm_refuses_a_running_container_without_force_and_removes_its_namespace(pair: Lab) -> None:
    pair.run("h1", "gone", "front", "idle")
    gone = pair.find("gone")
    ns = gone["netns"]
    assert any(row["mac"] == gone["mac"] for row in pair.client("h2").get("/fdb"))
    r = vxnet_cli(pair, "rm", "gone")
    assert r.returncode == 1 and "rm -f" in r.stderr
    assert vxnet_cli(pair, "rm", "-f", "gone").returncode == 0
    assert not netns.exists(ns) and netns.pids_in(ns) == []
    for host in ("h2", "h3"):  # every other host forgot its FDB entry
        assert all(row["mac"] != gone["mac"] for row in pair.client(host).get("/fdb"))
    assert "gone" not in pair.containers()


def test_a_lab_on_another_data_port() -> None:
    from vxnet.lab.topology import parse_spec

    name = unique_lab_name("p")
    spec = parse_spec(
        {"name": name, "underlay": {"data_port": 4790}, "host": [{"name": "h1"}, {"name": "h2"}]}
    )
    with Lab(spec=spec) as lab:
        lab.run("h1", "a", "front", "idle")
        lab.run("h2", "b", "front", "idle")
        assert lab.client("h1").get("/info")["data_port"] == 4790
        r = lab.exec("b", ["ping", "-c", "2", "-i", "0.2", "-W", "2", lab.ip("a")])
        assert r.returncode == 0, r.stdout
        sockets = lab.exec_host("h1", ["ss", "-uln"]).stdout
        assert "192.168.100.11:4790" in sockets and ":4789" not in sockets
