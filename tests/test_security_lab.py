"""Security, live: the matrix a reviewer reads to see who is kept out, and how (root).

One 2-host swarm lab: attachable ``red`` and ``blue``, attachable encrypted ``vault``, and
``sealed`` (not attachable); echo containers ``r1 r2``, ``b1 b2``, ``v1 v2`` (one of each per
host) and the services ``redweb`` (red), ``blueweb`` (blue), ``sealedweb`` (sealed), whoami.

Each property, where it is shown here, and where else (grep before adding a duplicate):

* isolation (containers, task IPs and VIPs; ping, TCP, DNS A and PTR; same-network pairs as the
  control; no container talks to another over docker_gwbridge): ``test_isolation_matrix``;
  also ``tests/test_lab.py`` (forced L2 between VNIs), ``tests/test_mesh_lab.py`` (one VIP);
* standalone containers refused on a non-attachable network, Docker's message: here; also
  ``tests/test_swarm.py`` (from the CLI);
* plaintext VXLAN on an encrypted VNI dropped and counted: here; also ``tests/test_esp_lab.py``
  (CVE-2023-28841, with hostile ESP by reason) and ``tests/test_hostile_lab.py`` (thousands);
* a gossip node with a wrong key, or none, never joins and is counted: here (a real
  ``python -m vxnet.gossip.node``); offline in ``tests/gossip/test_packet.py``;
* wrong, foreign-CA, malformed and rotated join tokens refused by the manager: here (raw join
  conversations); the CLI's own checks and the new token joining in ``tests/test_swarm.py``;
* a certificate from a foreign CA and an expired node certificate refused on 2377, a valid one
  accepted: here; offline in ``tests/manager/test_pki.py`` and ``tests/manager/test_cluster.py``;
* certificates renewed before expiry: ``tests/test_swarm.py::
  test_certificates_are_renewed_before_they_expire`` (12 s certificates, live), not repeated;
* control sockets and state files root-only: here (the whole run directory); the store's own
  modes in ``tests/manager/test_store.py``, the private-file writer in ``tests/test_files.py``;
* garbage on 4789, 7946, 2377 and 127.0.0.11:53, each packet counted: ``tests/test_hostile_lab.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_lab_name
from tests.test_hostile_lab import vxlan_header
from vxnet import netns
from vxnet.errors import VxnetError
from vxnet.lab import Lab, builder
from vxnet.manager import pki, tokens

pytestmark = pytest.mark.root

ATTACHABLE = ("red", "blue", "vault")
SERVICES = {"redweb": "red", "blueweb": "blue", "sealedweb": "sealed"}
ECHO_PORT, WEB_PORT = 7, 80

#: Runs in a container: ping, TCP and DNS (A and PTR at 127.0.0.11) towards every target.
PROBE = r"""
import json, socket, struct, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1])
def tcp(ip, port):
    try:
        socket.create_connection((ip, port), timeout=1.5).close()
        return True
    except OSError:
        return False
def dns(name, qtype):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    q = struct.pack("!HHHHHH", 0x5EC, 0x0100, 1, 0, 0, 0) + labels + b"\0"
    q += struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(q, ("127.0.0.11", 53))
        r = s.recv(4096)
    return struct.unpack("!H", r[6:8])[0]  # ANCOUNT
def ptr(ip):
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
pings = {t["ip"]: subprocess.Popen(["ping", "-c", "2", "-i", "0.3", "-W", "1", t["ip"]],
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for t in targets}
with ThreadPoolExecutor(16) as ex:
    tcps = {t["ip"]: ex.submit(tcp, t["ip"], t["port"]) for t in targets}
    names = {t["ip"]: ex.submit(dns, t["name"], 1) for t in targets if t["name"]}
    ptrs = {t["ip"]: ex.submit(dns, ptr(t["ip"]), 12) for t in targets if t["name"]}
print(json.dumps({t["ip"]: {"ping": pings[t["ip"]].wait() == 0, "tcp": tcps[t["ip"]].result(),
    "a": names[t["ip"]].result() if t["name"] else None,
    "ptr": ptrs[t["ip"]].result() if t["name"] else None} for t in targets}))
"""

#: Runs on the fabric: join conversations and TLS sessions against the manager.
MANAGER_PROBE = r"""
import json, socket, ssl, struct, sys, tempfile
import msgpack
cfg = json.load(sys.stdin)
addr = (cfg["manager"], 2377)
def frame(obj):
    b = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("!I", len(b)) + b
def read(tls):
    head = b""
    while len(head) < 4:
        chunk = tls.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack("!I", head)
    body = b""
    while len(body) < n:
        body += tls.recv(n - len(body))
    return msgpack.unpackb(body, raw=False)
def context(cert=None, key=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        with tempfile.TemporaryDirectory() as d:
            open(d + "/crt", "w").write(cert)
            open(d + "/key", "w").write(key)
            ctx.load_cert_chain(d + "/crt", d + "/key")
    return ctx
def join(token):
    with socket.create_connection(addr, timeout=10) as raw:
        tls = context().wrap_socket(raw)
        addr_ = "192.168.100.252"
        tls.sendall(frame({"type": "join", "token": token, "csr": b"-", "hostname": "intruder",
                           "advertise_addr": addr_, "data_path_addr": addr_}))
        reply = read(tls)
        return reply.get("message", reply["type"]) if reply else "closed"
def session(cert, key):
    # TLS 1.3: the client finishes its handshake before the server has checked its certificate;
    # a refusal arrives as an alert on the first read.  Accepted: the manager waits for a hello.
    try:
        with socket.create_connection(addr, timeout=10) as raw:
            tls = context(cert, key).wrap_socket(raw)
            tls.settimeout(2)
            try:
                return "closed" if tls.recv(1) == b"" else "data"
            except TimeoutError:
                return "accepted"
    except (ssl.SSLError, OSError) as exc:
        return "refused: " + str(exc)
out = {"tokens": {k: join(t) for k, t in cfg["tokens"].items()},
       "certs": {k: session(*v) for k, v in cfg["certs"].items()}}
print(json.dumps(out))
"""


# -------------------------------------------------------------------------------- the lab


@dataclass
class Target:
    name: str  # container, task or service name: what a neighbour would ask DNS for
    ip: str
    port: int
    network: str
    kind: str  # "container", "task", "vip" or "gwbridge"
    host: str | None = None


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("x")
    lab = Lab(hosts=2, name=name)
    try:
        mgr = lab.manager
        for net in ATTACHABLE:
            body: dict[str, Any] = {"name": net, "attachable": True}
            if net == "vault":
                body["options"] = ["encrypted"]
            mgr.post("/swarm/networks", body)
        mgr.post("/swarm/networks", {"name": "sealed"})
        for svc, net in SERVICES.items():
            replicas = 1 if net == "sealed" else 2
            mgr.post(
                "/services",
                {"name": svc, "image": "whoami", "replicas": replicas, "networks": [net]},
            )
        for net in ATTACHABLE:
            lab.run("h1", f"{net[0]}1", net, "echo")
            lab.run("h2", f"{net[0]}2", net, "echo")
        lab.converge()
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


def targets(lab: Lab) -> list[Target]:
    """Every container, task and VIP of the lab, and every container's docker_gwbridge address."""
    out: list[Target] = []
    for name, c in lab.containers().items():
        for e in c["endpoints"]:
            port = WEB_PORT if c.get("task_id") else ECHO_PORT
            kind = "task" if c.get("task_id") else "container"
            out.append(Target(name, e["ip"], port, e["network"], kind, c["host"]))
        if c.get("gateway_ip"):
            out.append(
                Target(name, c["gateway_ip"], ECHO_PORT, "docker_gwbridge", "gwbridge", c["host"])
            )
    network_names = {n["id"]: n["name"] for n in lab.manager.get("/swarm/networks")}
    for svc in SERVICES:
        for net_id, vip in lab.manager.get(f"/services/{svc}")["vips"].items():
            net = network_names[net_id]
            out.append(Target(svc, vip.split("/")[0], WEB_PORT, net, "vip"))
    return out


def probe(lab: Lab, source: str, tgts: list[Target]) -> dict[str, dict[str, Any]]:
    payload = [
        {"name": "" if t.kind == "gwbridge" else t.name, "ip": t.ip, "port": t.port} for t in tgts
    ]
    r = lab.exec(source, [sys.executable, "-c", PROBE, json.dumps(payload)], timeout=120)
    assert r.returncode == 0, r.stderr
    result: dict[str, dict[str, Any]] = json.loads(r.stdout)
    return result


# ------------------------------------------------------------------------------- the tests


def test_isolation_matrix(lab: Lab) -> None:
    """Every source container against every target: reachable and resolvable exactly when they
    share a network; nothing at all across networks, VIPs and task IPs included."""
    everything = targets(lab)
    containers = lab.containers()
    sources = {name: {e["network"] for e in c["endpoints"]} for name, c in containers.items()}
    assert len(sources) == 11, sources  # 6 echo containers + 5 tasks
    violations: list[str] = []
    controls_failed: list[str] = []
    pairs = 0

    def one(source: str) -> tuple[str, dict[str, dict[str, Any]]]:
        own = {t.ip for t in everything if t.name == source and t.kind != "vip"}
        return source, probe(lab, source, [t for t in everything if t.ip not in own])

    with ThreadPoolExecutor(3) as pool:  # 2 cores: a few sources at a time
        results = dict(pool.map(one, sorted(sources)))
    for source, seen in results.items():
        host = containers[source]["host"]
        for t in everything:
            if t.ip not in seen:
                continue
            got = seen[t.ip]
            shared = t.network in sources[source]
            nets = ",".join(sorted(sources[source]))
            what = f"{source} ({nets}) -> {t.kind} {t.name} {t.ip} ({t.network})"
            if t.kind == "gwbridge":  # icc off: no container talks to another over the bridge
                if (got["ping"] or got["tcp"]) and t.host == host:
                    violations.append(f"{what}: {got}")
                continue
            pairs += 1
            if shared:
                if not (got["ping"] or t.kind == "vip") or not got["tcp"] or not got["a"]:
                    controls_failed.append(f"{what}: {got}")  # (IPVS does not answer pings)
            elif got["ping"] or got["tcp"] or got["a"] or got["ptr"]:
                violations.append(f"{what}: {got}")
    print(
        f"\nisolation matrix: {len(sources)} sources, {pairs} pairs, {len(violations)} violations"
    )
    assert controls_failed == [], controls_failed
    assert violations == [], violations


def test_standalone_containers_are_refused_on_a_non_attachable_network(lab: Lab) -> None:
    with pytest.raises(VxnetError, match="not manually attachable"):
        lab.run("h2", "squatter", "sealed", "idle")
    assert "squatter" not in lab.containers()


def test_plaintext_vxlan_on_the_encrypted_vni_is_dropped_and_counted(lab: Lab) -> None:
    """CVE-2023-28841: plaintext for an encrypted VNI, even to a real container's MAC."""
    vni = lab.stats("h2")["networks"]["vault"]["vni"]
    v2 = lab.find("v2")
    inner = bytes.fromhex(v2["mac"].replace(":", "")) + bytes.fromhex("02420a0000fe") + b"\x08\x00"
    datagram = vxlan_header(vni) + inner + bytes(46)
    before = lab.stats("h2")["networks"]["vault"]
    ns = lab.add_fabric_namespace("plain", "192.168.100.253")
    send = (
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"for _ in range(20): s.sendto(bytes.fromhex('{datagram.hex()}'), "
        f"('{lab.data_address('h2')}', {lab.state['data_port']}))\n"
    )
    subprocess.run(netns.exec_argv(ns, [sys.executable, "-c", send]), check=True, timeout=30)
    time.sleep(0.5)
    after = lab.stats("h2")["networks"]["vault"]
    dropped = after["drops"].get("plaintext_on_encrypted_vni", 0)
    assert dropped - before["drops"].get("plaintext_on_encrypted_vni", 0) == 20
    assert after["rx_frames"] == before["rx_frames"]


def test_a_gossip_node_with_a_wrong_key_or_none_never_joins(lab: Lab) -> None:
    ns = lab.add_fabric_namespace("gossip", "192.168.100.251")
    seed = f"{lab.host_address('h1')}:7946"
    before = lab.client("h1").get("/gossip")["service"]
    outputs = {}
    for name, keys in (("wrongkey", ["--key", os.urandom(16).hex()]), ("nokey", [])):
        argv = [sys.executable, "-m", "vxnet.gossip.node", "--name", name]
        argv += ["--bind", "192.168.100.251", "--join", seed, "--tcp-timeout", "2", *keys]
        proc = subprocess.Popen(
            netns.exec_argv(ns, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(6)  # the join, and a few probe rounds, had they been let in
        finally:
            proc.terminate()
            outputs[name] = [
                json.loads(line) for line in proc.communicate(timeout=20)[0].split("\n") if line
            ]
    for name, events in outputs.items():
        ready = [e for e in events if e.get("event") == "ready"]
        assert ready and ready[0]["joined"] == 0, (name, events[:5])
        assert not [e for e in events if e.get("event") == "join" and e.get("node") != name], name
    for host in lab.hosts:
        names = {m["name"] for m in lab.client(host).get("/gossip")["members"]}
        assert not names & {"wrongkey", "nokey"}, (host, names)
    after = lab.client("h1").get("/gossip")["service"]
    grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    print(f"\ngossip intruders, h1's counters: {grew}")
    assert grew.get("tcp_bad_streams", 0) >= 2, grew  # each join's push/pull refused
    assert grew.get("drop_tcp_unencrypted", 0) >= 1, grew
    assert any(k.startswith("drop_tcp_") and k != "drop_tcp_unencrypted" for k in grew), grew


def manager_probe(lab: Lab, suffix: str, address: str, cfg: dict[str, Any]) -> dict[str, Any]:
    ns = lab.add_fabric_namespace(suffix, address)
    r = subprocess.run(
        netns.exec_argv(ns, [sys.executable, "-c", MANAGER_PROBE]),
        input=json.dumps(dict(cfg, manager=lab.host_address("h1"))),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_wrong_foreign_and_rotated_join_tokens_are_refused(lab: Lab) -> None:
    mgr = lab.manager
    old = mgr.get("/swarm/join-token/worker")["token"]
    head, _secret = old.rsplit("-", 1)
    other_ca = pki.create_root_ca(datetime.now(UTC)).cert_pem
    wrong = {
        "wrong_secret": head + "-" + tokens.make_token(other_ca, os.urandom(16)).rsplit("-", 1)[1],
        "foreign_ca": tokens.make_token(other_ca, os.urandom(16)),
        "malformed": "SWMTKN-1-nonsense",
    }
    new = mgr.get("/swarm/join-token/worker?rotate=1")["token"]
    assert new != old and mgr.get("/swarm/join-token/worker")["token"] == new
    before = mgr.get("/swarm")["manager_counters"]
    out = manager_probe(
        lab, "tokens", "192.168.100.247", {"tokens": {**wrong, "rotated": old}, "certs": {}}
    )["tokens"]
    print(f"\njoin tokens: {out}")
    for kind in ("wrong_secret", "foreign_ca", "rotated"):
        assert "invalid join token" in out[kind], (kind, out)
    assert "token" in out["malformed"] and out["malformed"] != "joined", out
    after = mgr.get("/swarm")["manager_counters"]
    assert after.get("refused", 0) - before.get("refused", 0) == 4, (before, after)
    assert after.get("joined", 0) == before.get("joined", 0)
    assert len(mgr.get("/nodes")) == 2


def test_foreign_and_expired_certificates_are_refused_on_2377(lab: Lab) -> None:
    """Mutual TLS with the swarm's own CA, a foreign CA, and the swarm's CA but expired.

    The swarm CA's key comes from the manager's store, as an attacker who had stolen it would
    have it; the node certificates are made for h2's real node id, so only the CA or the dates
    differ from what h2 itself presents.
    """
    h1, h2 = lab.client("h1").get("/swarm"), lab.client("h2").get("/swarm")
    db = Path(lab.state["hosts"]["h1"]["state_dir"]) / "swarm" / "manager.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (value,) = conn.execute("SELECT value FROM kv WHERE key = 'ca'").fetchone()
    ca_json = json.loads(value)
    swarm_ca = pki.RootCA(ca_json["cert"].encode(), ca_json["key"].encode())
    foreign_ca = pki.create_root_ca(datetime.now(UTC))
    now = datetime.now(UTC)

    def cert(ca: pki.RootCA, issued: datetime, lifetime: timedelta) -> list[str]:
        key = pki.new_node_key()
        pem = pki.sign_node_cert(
            ca, pki.make_csr(key), h2["node_id"], "swarm-worker", h1["cluster_id"], issued, lifetime
        )
        return [pem.decode(), key.decode()]

    certs = {
        "valid": cert(swarm_ca, now, timedelta(hours=1)),  # the control
        "foreign_ca": cert(foreign_ca, now, timedelta(hours=1)),
        "expired": cert(swarm_ca, now - timedelta(days=2), timedelta(days=1)),
    }
    before = lab.manager.get("/swarm")["manager_counters"]
    out = manager_probe(lab, "certs", "192.168.100.248", {"tokens": {}, "certs": certs})["certs"]
    print(f"\ncertificates on 2377: {out}")
    assert out["valid"] == "accepted", out
    for kind in ("foreign_ca", "expired"):
        assert out[kind] != "accepted", (kind, out)
    time.sleep(0.5)
    after = lab.manager.get("/swarm")["manager_counters"]
    assert after["tls_handshake_failed"] - before.get("tls_handshake_failed", 0) == 2
    log = Path(lab.state["hosts"]["h1"]["log"]).read_text().splitlines()
    refusals = [line for line in log if "TLS handshake failed" in line][-2:]
    print("\n".join(refusals))
    assert "unable to get local issuer" in refusals[0] and "has expired" in refusals[1], refusals
    assert all(lab.client(h).get("/swarm")["connected"] for h in lab.hosts)


def loose_paths(run: Path) -> list[str]:
    """Paths under ``run`` (itself included) whose own mode lets group or others in, or that
    root does not own, relative to ``run``."""
    out = []
    for path in [run, *run.rglob("*")]:
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode) and (st.st_mode & 0o077 or st.st_uid != 0):
            out.append(f"{path.relative_to(run)} {stat.filemode(st.st_mode)} uid={st.st_uid}")
    return out


def test_control_sockets_and_state_files_are_root_only(lab: Lab) -> None:
    """The run directory is 0700 and root's; in it, every daemon socket is 0600, every directory
    0700, and every state file (lab.json, each host's containers and networks, its node key and
    certificates, the manager's store, the lock, the container logs) 0600."""
    run = builder.run_dir(lab.name)
    st = run.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    for h in lab.state["hosts"].values():
        sock = Path(h["socket"])
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert Path(h["state_dir"]).is_relative_to(run)
    loose = loose_paths(run)
    total = len([run, *run.rglob("*")])
    print(f"\nroot-only: {total} paths under {run}")
    assert loose == [], loose
    assert any(
        p.startswith("h1/swarm/manager.db")
        for p in (str(q.relative_to(run)) for q in run.rglob("*"))
    )
