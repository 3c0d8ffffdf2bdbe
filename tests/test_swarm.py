"""The manager on 2377, shown for real: tokens, TLS, rules, services, restarts, rotation (root)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import unique_lab_name
from vxnet.lab import Lab, builder
from vxnet.lab.topology import LabSpec, default_spec

pytestmark = pytest.mark.root
TOKEN_RE = re.compile(r"^SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}$")


def cli(lab: Lab | str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    name = lab if isinstance(lab, str) else lab.name
    return subprocess.run(
        [sys.executable, "-m", "vxnet", "--lab", name, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"{r.args}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def refused(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 1, f"{r.args} should fail:\n{r.stdout}\n{r.stderr}"
    assert needle in r.stderr, f"{needle!r} not in {r.stderr!r}"
    assert "Traceback" not in r.stderr


def wait_for(check: Any, timeout: float = 15.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def sw4() -> Iterator[Lab]:
    lab = Lab(hosts=4, name=unique_lab_name("s"))
    try:
        yield lab
    finally:
        lab.down()


def connected(lab: Lab, host: str) -> bool:
    return bool(lab.client(host).get("/swarm").get("connected"))


def test_the_lab_formed_a_swarm_with_real_tokens(sw4: Lab) -> None:
    out = ok(cli(sw4, "node", "ls"))
    assert out.count("Ready") == 4 and "Leader" in out and " *" in out
    token = ok(cli(sw4, "swarm", "join-token", "-q", "worker")).strip()
    assert TOKEN_RE.match(token)
    assert TOKEN_RE.match(ok(cli(sw4, "swarm", "join-token", "-q", "manager")).strip())
    nets = ok(cli(sw4, "network", "ls"))
    assert re.search(r"ingress\s+overlay\s+swarm", nets) and re.search(
        r"docker_gwbridge\s+bridge\s+local", nets
    )
    for h in sw4.hosts:
        (gw,) = [n for n in sw4.client(h).get("/local-networks") if n["Name"] == "docker_gwbridge"]
        assert gw["Options"]["com.docker.network.bridge.enable_icc"] == "false"
        assert gw["Options"]["com.docker.network.bridge.enable_ip_masquerade"] == "true"
    keys = json.loads(ok(cli(sw4, "-H", "h3", "swarm", "keys", "--show-keys", "--format", "json")))
    assert len(keys) == 6 and all(len(bytes.fromhex(k["key"])) == 16 for k in keys)
    assert all(
        "key" not in k for k in json.loads(ok(cli(sw4, "swarm", "keys", "--format", "json")))
    )


def test_join_refusals_and_the_manager_keeps_serving(sw4: Lab) -> None:
    from vxnet.manager import pki, tokens

    ok(cli(sw4, "-H", "h4", "swarm", "leave"))
    manager = f"{sw4.host_address('h1')}:2377"
    good = ok(cli(sw4, "swarm", "join-token", "-q", "worker")).strip()
    head, _secret = good.rsplit("-", 1)
    wrong_secret = head + "-" + ("0" * 24 + "1")
    from datetime import UTC, datetime

    other_ca = pki.create_root_ca(datetime.now(UTC)).cert_pem
    foreign = tokens.make_token(other_ca, bytes(16))
    join = ("-H", "h4", "swarm", "join", "--token")
    refused(cli(sw4, *join, "SWMTKN-1-nonsense", manager), "invalid join token")
    refused(cli(sw4, *join, wrong_secret, manager), "invalid join token")
    refused(cli(sw4, *join, foreign, manager), "root CA does not match")
    ok(cli(sw4, "swarm", "join-token", "--rotate", "worker"))
    refused(cli(sw4, *join, good, manager), "invalid join token")  # the rotated one
    refused(
        cli(sw4, "-H", "h4", "swarm", "join", "--token", good, "192.168.100.99:2377"),
        "cannot reach the manager",
    )
    assert connected(sw4, "h2") and connected(sw4, "h3")
    mtoken = ok(cli(sw4, "swarm", "join-token", "-q", "manager")).strip()
    out = ok(cli(sw4, *join, mtoken, manager))
    assert "as a manager" in out and "adds no high availability" in out
    ok(cli(sw4, "-H", "h4", "swarm", "leave", "--force"))
    new = ok(cli(sw4, "swarm", "join-token", "-q", "worker")).strip()
    assert "as a worker" in ok(cli(sw4, *join, new, manager))
    wait_for(lambda: connected(sw4, "h4"), what="h4's session")
    ok(
        cli(
            sw4,
            "node",
            "rm",
            "--force",
            *[n["id"] for n in sw4.manager.get("/nodes") if n["status"] != "ready"],
        )
    )
    assert ok(cli(sw4, "node", "ls")).count("Ready") == 4


TLS_PROBES = r"""
import socket, ssl, struct, sys, msgpack
from datetime import UTC, datetime
from vxnet.manager import pki
host = sys.argv[1]
def raw():
    s = socket.create_connection((host, 2377), timeout=5); return s
def tls(ctx):
    return ctx.wrap_socket(raw(), server_hostname=host)
def frame(obj):
    b = msgpack.packb(obj, use_bin_type=True); return struct.pack("!I", len(b)) + b
def answer(s):
    try:
        head = s.recv(4)
        if len(head) < 4: return "closed"
        (n,) = struct.unpack("!I", head); body = b""
        while len(body) < n: body += s.recv(n - len(body))
        return msgpack.unpackb(body, raw=False).get("message", "?")
    except (OSError, ssl.SSLError) as e: return "closed"
def probe(name, ctx, data):
    try:
        s = tls(ctx); s.sendall(data); out[name] = answer(s)
    except (OSError, ssl.SSLError):
        out[name] = "closed"
out = {}
s = raw(); s.sendall(b"GET / HTTP/1.0\r\n\r\n"); out["plaintext"] = answer(s)
now = datetime.now(UTC)
ca = pki.create_root_ca(now); key = pki.new_node_key()
cert = pki.sign_node_cert(ca, pki.make_csr(key), "intruder", "swarm-manager", "x", now)
anon = pki.client_ssl_context(None)
probe("foreign", pki.client_ssl_context(None, cert, key), frame({"type": "hello"}))
probe("oversized", anon, struct.pack("!I", 1 << 24))
probe("garbage", anon, struct.pack("!I", 3) + b"\xc1\xc1\xc1")
probe("badfield", anon, frame({"type": "join", "token": 5}))
probe("hello_unauth", anon, frame({"type": "hello"}))
print(__import__("json").dumps(out))
"""


def test_tls_garbage_and_foreign_certificates_are_refused(sw4: Lab) -> None:
    before = sw4.manager.get("/swarm")["manager_counters"]
    r = sw4.exec_host("h3", [sys.executable, "-c", TLS_PROBES, sw4.host_address("h1")])
    out = json.loads(ok(r))
    assert out["plaintext"] == "closed" and out["foreign"] == "closed"
    assert "frame_too_large" in out["oversized"]
    assert "frame_not_msgpack" in out["garbage"]
    assert "token must be str" in out["badfield"]
    assert "hello" in out["hello_unauth"]
    after = sw4.manager.get("/swarm")["manager_counters"]
    assert after.get("tls_handshake_failed", 0) - before.get("tls_handshake_failed", 0) >= 2
    for reason in ("frame_too_large", "frame_not_msgpack", "bad_field", "unexpected_message"):
        assert after.get(f"bad_frame_{reason}", 0) > before.get(f"bad_frame_{reason}", 0), reason
    assert all(connected(sw4, h) for h in sw4.hosts)


def test_network_rules_from_the_cli(sw4: Lab) -> None:
    refused(
        cli(sw4, "-H", "h2", "network", "create", "-d", "overlay", "x"),
        "This node is not a swarm manager. Worker nodes can't be used",
    )
    refused(cli(sw4, "network", "create", "-d", "overlay", "--ingress", "ing2"), "only one ingress")
    refused(
        cli(sw4, "network", "create", "-d", "overlay", "--subnet", "10.0.1.128/25", "x"), "overlaps"
    )
    refused(cli(sw4, "network", "create", "-d", "overlay", "front"), "already exists")
    refused(cli(sw4, "network", "create", "-d", "overlay", "-o", "bogus=1", "x"), "unknown overlay")
    refused(
        cli(
            sw4,
            "network",
            "create",
            "-d",
            "overlay",
            "-o",
            "com.docker.network.driver.mtu=1500",
            "x",
        ),
        "never fragmented",
    )
    ok(
        cli(
            sw4,
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.30.0.0/16",
            "--gateway",
            "10.30.0.254",
            "--ip-range",
            "10.30.5.0/24",
            "-o",
            "com.docker.network.driver.mtu=1200",
            "-o",
            "com.docker.network.driver.overlay.vxlanid_list=7000",
            "custom",
        )
    )
    (custom,) = json.loads(ok(cli(sw4, "network", "inspect", "custom")))
    assert custom["Driver"] == "overlay" and custom["Scope"] == "swarm" and not custom["Attachable"]
    assert custom["IPAM"]["Config"][0] == {
        "Subnet": "10.30.0.0/16",
        "Gateway": "10.30.0.254",
        "IPRange": "10.30.5.0/24",
    }
    assert custom["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "7000"
    assert custom["Options"]["com.docker.network.driver.mtu"] == "1200"
    refused(
        cli(sw4, "-H", "h2", "run", "-d", "--name", "lonely", "--network", "custom", "idle"),
        "not manually attachable",
    )
    ok(cli(sw4, "network", "create", "-d", "overlay", "plain"))
    (plain,) = json.loads(ok(cli(sw4, "network", "inspect", "plain")))
    vnis = sorted(n["vni"] for n in sw4.manager.get("/swarm/networks"))
    assert len(set(vnis)) == len(vnis) and all(v >= 4096 for v in vnis)
    assert plain["IPAM"]["Config"][0]["Subnet"].endswith("/24")
    # in use: a service on it
    ok(cli(sw4, "service", "create", "--name", "user", "--network", "plain", "idle"))
    refused(cli(sw4, "network", "rm", "plain"), "in use by service user")
    ok(cli(sw4, "service", "rm", "user"))
    ok(cli(sw4, "network", "rm", "plain", "custom"))
    # ingress: a prompt, and a refusal while a service publishes
    ok(cli(sw4, "service", "create", "--name", "pub", "-p", "8080:80", "whoami"))
    r = cli(sw4, "network", "rm", "ingress", input="n\n")
    assert "WARNING!" in r.stdout and "[y/N]" in r.stdout and r.returncode == 0
    assert any(n["ingress"] for n in sw4.manager.get("/swarm/networks"))
    refused(cli(sw4, "network", "rm", "-f", "ingress"), "depends on it")
    (pub,) = json.loads(ok(cli(sw4, "service", "inspect", "pub")))
    (ingress,) = [n for n in sw4.manager.get("/swarm/networks") if n["ingress"]]
    assert pub["network_ids"] == [ingress["id"]] and ingress["id"] in pub["vips"]
    refused(
        cli(
            sw4,
            "service",
            "create",
            "--name",
            "rr",
            "--endpoint-mode",
            "dnsrr",
            "-p",
            "8081:80",
            "whoami",
        ),
        "can't be used with dnsrr mode",
    )
    ok(cli(sw4, "service", "rm", "pub"))


def manual_lab(name: str) -> LabSpec:
    """Two hosts, no swarm and no network of the lab's own: the swarm is formed by hand, and
    its VNIs (from 4096) must not meet a lab network's (refused, see test_customise_lab)."""
    return dataclasses.replace(default_spec(name, 2, swarm=False), networks=())


def test_overlay_needs_a_manager_and_pools_run_out() -> None:
    name = unique_lab_name("p")
    lab = Lab(spec=manual_lab(name))
    try:
        refused(
            cli(lab, "network", "create", "-d", "overlay", "x"),
            'Use "vxnet swarm init" or "vxnet swarm join"',
        )
        refused(  # the lab's fabric carries 1500 bytes: a swarm cannot claim jumbo frames
            cli(lab, "swarm", "init", "--underlay-mtu", "9000"),
            "--underlay-mtu 9000 is more than eth0 (192.168.100.11) carries: its MTU is 1500",
        )
        out = ok(
            cli(
                lab,
                "swarm",
                "init",
                "--underlay-mtu",
                "1500",
                "--default-addr-pool",
                "10.20.0.0/23",
                "--default-addr-pool-mask-length",
                "24",
            )
        )
        assert "vxnet swarm join --token SWMTKN-1-" in out
        (ingress,) = json.loads(ok(cli(lab, "network", "inspect", "ingress")))
        assert ingress["IPAM"]["Config"][0]["Subnet"] == "10.20.0.0/24"
        ok(cli(lab, "network", "create", "-d", "overlay", "--attachable", "second"))
        refused(
            cli(lab, "network", "create", "-d", "overlay", "third"),
            "could not find an available, non-overlapping IPv4 address pool",
        )
        # the seed's docker_gwbridge customisation: made by the user before joining, kept
        ok(
            cli(
                lab,
                "-H",
                "h2",
                "network",
                "create",
                "--subnet",
                "10.11.0.0/16",
                "-o",
                "com.docker.network.bridge.name=docker_gwbridge",
                "-o",
                "com.docker.network.bridge.enable_icc=false",
                "-o",
                "com.docker.network.bridge.enable_ip_masquerade=true",
                "docker_gwbridge",
            )
        )
        token = re.search(r"--token (\S+)", out)
        assert token is not None
        ok(
            cli(
                lab,
                "-H",
                "h2",
                "swarm",
                "join",
                "--token",
                token.group(1),
                f"{lab.host_address('h1')}:2377",
            )
        )
        (gw2,) = json.loads(ok(cli(lab, "-H", "h2", "network", "inspect", "docker_gwbridge")))
        assert gw2["IPAM"]["Config"][0]["Subnet"] == "10.11.0.0/16" and gw2["created_by"] == "user"
        (gw1,) = json.loads(ok(cli(lab, "-H", "h1", "network", "inspect", "docker_gwbridge")))
        assert (
            gw1["IPAM"]["Config"][0]["Subnet"] == "172.18.0.0/16" and gw1["created_by"] == "swarm"
        )
        assert gw1["Options"]["com.docker.network.bridge.enable_icc"] == "false"
        # network inspect -v: the peers are the nodes with endpoints on the network
        lab.run("h1", "a1", "second", "idle")
        lab.run("h2", "a2", "second", "idle")
        (second,) = json.loads(ok(cli(lab, "network", "inspect", "-v", "second")))
        assert {p["Name"] for p in second["Peers"]} == {"h1", "h2"}
        assert {c["Name"] for c in second["Containers"].values()} == {"a1", "a2"}
        refused(cli(lab, "swarm", "init"), "already part of a swarm")
        refused(cli(lab, "swarm", "leave"), "Use `--force`")
    finally:
        lab.down()


def test_services_spread_scale_go_global_and_talk(sw4: Lab) -> None:
    ok(
        cli(
            sw4,
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "4",
            "--network",
            "front",
            "whoami",
        )
    )
    tasks = sw4.manager.get("/services/web/tasks")
    assert sorted(t["node"] for t in tasks) == sorted(sw4.hosts)  # one per node
    ips = [next(iter(t["addresses"].values())) for t in tasks]
    assert len(set(ips)) == 4
    ok(cli(sw4, "-H", "h2", "run", "-d", "--name", "probe", "--network", "front", "idle"))
    for ip in ips:
        r = sw4.exec("probe", ["ping", "-c", "1", "-W", "2", ip])
        assert r.returncode == 0, ip
    assert re.search(r"web\s+replicated\s+4/4\s+whoami", ok(cli(sw4, "service", "ls")))
    ok(cli(sw4, "service", "scale", "web=2"))
    tasks = sw4.manager.get("/services/web/tasks")
    assert sorted(t["slot"] for t in tasks) == [1, 2]
    assert len([c for c in sw4.containers() if c.startswith("web.")]) == 2
    ok(
        cli(
            sw4,
            "service",
            "create",
            "--name",
            "every",
            "--mode",
            "global",
            "--network",
            "back",
            "idle",
        )
    )
    assert sorted(t["node"] for t in sw4.manager.get("/services/every/tasks")) == sorted(sw4.hosts)
    ok(cli(sw4, "service", "rm", "every", "web"))
    assert not [c for c in sw4.containers() if c.startswith(("web.", "every."))]
    sw4.rm("probe")


def snapshot(lab: Lab) -> dict[str, Any]:
    m = lab.manager
    services = {s["name"]: s for s in m.get("/services")}
    tasks = {n: m.get(f"/services/{n}/tasks") for n in services}
    return {
        "networks": {n["name"]: (n["id"], n["vni"], n["subnet"]) for n in m.get("/swarm/networks")},
        "services": {n: (s["id"], s["vips"], s["replicas"]) for n, s in services.items()},
        "tasks": {
            n: sorted((t["id"], t["slot"], json.dumps(t["addresses"])) for t in ts)
            for n, ts in tasks.items()
        },
        "nodes": sorted((n["id"], n["hostname"]) for n in m.get("/nodes")),
        "keys": sorted(k["lamport_time"] for k in lab.client("h1").get("/swarm/keys")),
    }


def test_manager_kill_9_loses_nothing_and_workers_come_back(sw4: Lab) -> None:
    ok(
        cli(
            sw4,
            "service",
            "create",
            "--name",
            "keep",
            "--replicas",
            "3",
            "--network",
            "front",
            "echo",
        )
    )
    sw4.run("h3", "standalone", "front", "idle")
    before = snapshot(sw4)
    pid = sw4.state["hosts"]["h1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not builder.daemon_alive(pid), what="the manager to die")
    ok(cli(sw4, "lab", "restart", "h1"))
    sw4.state = builder.load_state(sw4.name)
    took = wait_for(lambda: all(connected(sw4, h) for h in sw4.hosts), what="all sessions")
    assert took < 10
    after = snapshot(sw4)
    assert after["networks"] == before["networks"] and after["services"] == before["services"]
    assert after["nodes"] == before["nodes"] and after["keys"] == before["keys"]
    # tasks on the restarted manager's node are re-adopted (persistent TAPs): never duplicated
    assert {n: len(t) for n, t in after["tasks"].items()} == {
        n: len(t) for n, t in before["tasks"].items()
    }
    sw4.converge()
    addresses: list[str] = []
    for svc in sw4.manager.get("/services"):
        addresses += list(svc["vips"].values())
        for t in sw4.manager.get(f"/services/{svc['name']}/tasks"):
            addresses += list(t["addresses"].values())
    addresses += [c["ip"] for c in sw4.containers().values() if c.get("attached")]
    assert len(addresses) == len(set(addresses)), sorted(addresses)
    vnis = [n[1] for n in after["networks"].values()]
    assert len(vnis) == len(set(vnis))
    for t in sw4.manager.get("/services/keep/tasks"):
        ip = next(iter(t["addresses"].values()))
        assert sw4.exec("standalone", ["ping", "-c", "1", "-W", "2", ip]).returncode == 0
    ok(cli(sw4, "service", "rm", "keep"))
    sw4.rm("standalone")


def test_rotation_every_2s_leaves_every_node_with_the_same_three_tags(sw4: Lab) -> None:
    ok(cli(sw4, "swarm", "update", "--key-rotation-interval", "2s"))
    try:
        seen: set[tuple[int, ...]] = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 9:
            views = {
                h: tuple(
                    sorted(
                        k["lamport_time"]
                        for k in sw4.client(h).get("/swarm/keys")
                        if k["subsystem"] == "networking:ipsec"
                    )
                )
                for h in sw4.hosts
            }
            if len(set(views.values())) == 1:
                (tags,) = set(views.values())
                assert len(tags) == 3
                seen.add(tags)
            time.sleep(0.25)
        assert len(seen) >= 3, seen  # several rotations observed, each time everywhere at once
        ordered = sorted(seen)
        assert all(a[1:] == b[:2] or a[-1] < b[0] for a, b in itertools.pairwise(ordered))
    finally:
        ok(cli(sw4, "swarm", "update", "--key-rotation-interval", "12h"))


def test_a_silent_node_is_shown_down_and_its_tasks_move(sw4: Lab) -> None:
    ok(cli(sw4, "service", "create", "--name", "mover", "--replicas", "4", "idle"))
    pid = sw4.state["hosts"]["h4"]["pid"]
    os.kill(pid, signal.SIGKILL)
    took = wait_for(
        lambda: re.search(r"h4\s+Down", ok(cli(sw4, "node", "ls"))) is not None,
        what="h4 shown down",
    )
    assert took < 8
    wait_for(
        lambda: all(t["node"] != "h4" for t in sw4.manager.get("/services/mover/tasks")),
        what="tasks rescheduled",
    )
    assert len(sw4.manager.get("/services/mover/tasks")) == 4
    ok(cli(sw4, "lab", "restart", "h4"))
    sw4.state = builder.load_state(sw4.name)
    wait_for(
        lambda: re.search(r"h4\s+Ready", ok(cli(sw4, "node", "ls"))) is not None, what="h4 back"
    )
    ok(cli(sw4, "service", "rm", "mover"))


def test_certificates_are_renewed_before_they_expire() -> None:
    name = unique_lab_name("c")
    lab = Lab(spec=manual_lab(name))
    try:
        out = ok(cli(lab, "swarm", "init", "--cert-expiry", "12s"))
        token = re.search(r"--token (\S+)", out)
        assert token is not None
        ok(
            cli(
                lab,
                "-H",
                "h2",
                "swarm",
                "join",
                "--token",
                token.group(1),
                f"{lab.host_address('h1')}:2377",
            )
        )
        wait_for(
            lambda: all(
                lab.client(h).get("/swarm")["agent"]["renewals"] >= 1 for h in ("h1", "h2")
            ),
            timeout=15,
            what="renewals",
        )
        time.sleep(13)  # the first certificates have now expired
        assert all(connected(lab, h) for h in ("h1", "h2"))
        nodes = lab.client("h1").get("/nodes")
        assert all(n["status"] == "ready" for n in nodes)
    finally:
        lab.down()
