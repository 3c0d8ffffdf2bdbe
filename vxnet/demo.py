"""``vxnet lab demo``: the guided tour.  Every check mark is earned by a verified result.

Each step prints what it does, the command a user would type, and what was seen on the wire.
The tour grows with each feature; today: a swarm formed with real tokens, ingress and
docker_gwbridge, user overlays, a replicated service spread over hosts, a standalone container
on an attachable network, ping and HTTP across the overlay, a VXLAN packet decoded from the
fabric, service discovery at 127.0.0.11, VIP load balancing, the routing mesh from outside the
swarm, isolation between networks, key rotation watched, a node failure handled, counters.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import click

from vxnet.capture import explain, explain_vxlan, finish_capture, start_capture
from vxnet.errors import BadPacket, VxnetError
from vxnet.esp.sa import SecurityAssociation
from vxnet.esp.spi import derive_spi, salt_for_spi
from vxnet.gossip.messages import decode_message_untrusted
from vxnet.gossip.packet import Keyring, decode_packet_untrusted
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec

LAB_NAME = "demo"


class Tour:
    def __init__(self, step_mode: bool) -> None:
        self.step_mode = step_mode
        self.failures: list[str] = []
        self.n = 0

    def step(self, title: str, command: str, action: Callable[[], tuple[bool, list[str]]]) -> bool:
        self.n += 1
        click.secho(f"\n[{self.n}] {title}", bold=True)
        click.secho(f"    $ {command}", fg="cyan")
        try:
            ok, lines = action()
        except (VxnetError, OSError) as exc:
            ok, lines = False, [f"error: {exc}"]
        for line in lines:
            click.echo(f"    {line}")
        mark = (
            click.style("  \u2713 verified", fg="green")
            if ok
            else click.style("  \u2717 FAILED", fg="red")
        )
        click.echo(mark)
        if not ok:
            self.failures.append(title)
        if self.step_mode:
            click.pause("    (press any key for the next step)")
        return ok


def run_demo(keep: bool = False, step: bool = False) -> int:
    click.secho("vxnet: Docker's overlay network, rebuilt in userspace Python", bold=True)
    click.echo(
        "Three hosts on one machine (network namespaces), one Linux bridge as the physical\n"
        "network, and one vxnet daemon per host doing VXLAN (RFC 7348, UDP 4789)."
    )
    builder.down(LAB_NAME)  # a previous --keep run may still be up
    t0 = time.monotonic()
    tour = Tour(step)
    spec = dataclasses.replace(default_spec(LAB_NAME, 3), networks=())
    lab = Lab(spec=spec)
    try:
        _tour(tour, lab)
    finally:
        if keep:
            click.echo(
                f"\nThe lab stays up: try `vxnet --lab {LAB_NAME} ps -a`, "
                f"`vxnet --lab {LAB_NAME} exec client -- ping web1`; "
                f"`vxnet lab down --name {LAB_NAME}` when done."
            )
        else:
            lab.down()
    took = time.monotonic() - t0
    if tour.failures:
        click.secho(
            f"\n{len(tour.failures)} step(s) failed: {', '.join(tour.failures)} ({took:.0f}s)",
            fg="red",
        )
        return 1
    click.secho(f"\nAll {tour.n} steps verified in {took:.0f}s.", fg="green", bold=True)
    return 0


def _tour(tour: Tour, lab: Lab) -> None:
    mgr = lab.manager

    def swarm() -> tuple[bool, list[str]]:
        nodes = mgr.get("/nodes")
        token = mgr.get("/swarm/join-token/worker")["token"]
        lines = [
            f"{n['hostname']}: {n['status']}, {n['role']} {n['manager_status']}".rstrip()
            for n in nodes
        ]
        lines.append(f"worker token: {token[:24]}... (digest of the root CA + a secret)")
        ss = lab.exec_host("h1", ["ss", "-ltn"]).stdout
        listening = f"{lab.host_address('h1')}:2377" in ss
        lines.append(f"h1 listens on {lab.host_address('h1')}:2377 (mutual TLS): {listening}")
        ok = len(nodes) == 3 and all(n["status"] == "ready" for n in nodes) and listening
        return ok, lines

    tour.step(
        "A swarm: h1 runs `swarm init`, h2 and h3 join with the real token",
        "vxnet swarm init; vxnet -H h2 swarm join --token SWMTKN-1-... h1:2377",
        swarm,
    )

    def defaults() -> tuple[bool, list[str]]:
        (ingress,) = [n for n in mgr.get("/swarm/networks") if n["ingress"]]
        bridges = {h: [n["Name"] for n in lab.client(h).get("/local-networks")] for h in lab.hosts}
        lines = [f"ingress: overlay, subnet {ingress['subnet']}, VNI {ingress['vni']}"]
        lines += [f"{h}: local bridge networks {b}" for h, b in bridges.items()]
        ok = ingress["vni"] >= 4096 and all("docker_gwbridge" in b for b in bridges.values())
        return ok, lines

    tour.step(
        "Joining created `ingress` (overlay) and `docker_gwbridge` (bridge) on every node",
        "vxnet network ls",
        defaults,
    )

    def overlay() -> tuple[bool, list[str]]:
        app = mgr.post("/swarm/networks", {"name": "appnet", "attachable": True})
        other = mgr.post("/swarm/networks", {"name": "othernet", "attachable": True})
        lines = [
            f"{n['name']}: subnet {n['subnet']}, gateway {n['gateway']}, VNI {n['vni']}, "
            f"MTU {n['mtu']} (1500 - 50 of VXLAN)"
            for n in (app, other)
        ]
        return app["vni"] != other["vni"] and app["mtu"] == 1450, lines

    tour.step(
        "User-defined overlays get their own subnet and VNI from the manager",
        "vxnet network create -d overlay --attachable appnet",
        overlay,
    )

    def service() -> tuple[bool, list[str]]:
        mgr.post(
            "/services", {"name": "web", "image": "whoami", "replicas": 3, "networks": ["appnet"]}
        )
        lab.converge()
        tasks = mgr.get("/services/web/tasks")
        lines = [
            f"{t['container']} on {t['node']}: {t['state']}, {next(iter(t['addresses'].values()))}"
            for t in tasks
        ]
        return {t["node"] for t in tasks} == set(lab.hosts), lines

    tour.step(
        "A replicated service: the scheduler spreads 3 tasks over the 3 nodes",
        "vxnet service create --name web --replicas 3 --network appnet whoami",
        service,
    )

    def standalone() -> tuple[bool, list[str]]:
        c = lab.run("h2", "client", "appnet", "idle")
        lab.run("h3", "outsider", "othernet", "idle")
        return c["ip"].startswith("10."), [f"client on h2: {c['ip']} (address from the manager)"]

    tour.step(
        "A standalone container joins the attachable overlay",
        "vxnet -H h2 run -d --name client --network appnet idle",
        standalone,
    )

    web = [c for c in lab.containers().values() if c["name"].startswith("web.")]

    def ping() -> tuple[bool, list[str]]:
        lines, ok = [], True
        for c in web:
            r = lab.exec("client", ["ping", "-c", "2", "-i", "0.2", "-W", "2", c["ip"]])
            ok &= r.returncode == 0
            rtt = [ln.split("time=")[1] for ln in r.stdout.splitlines() if "time=" in ln]
            lines.append(
                f"client -> {c['name']} on {c['host']} ({c['ip']}): "
                f"{'ok' if r.returncode == 0 else 'LOST'} {' '.join(rtt)}"
            )
        return ok, lines

    tour.step(
        "client pings every task, on every host, across the overlay",
        "vxnet exec client -- ping <task ip>",
        ping,
    )

    def wire() -> tuple[bool, list[str]]:
        remote = next(c for c in web if c["host"] != "h2")
        proc = start_capture(lab.fabric_netns, "h2", count=1, timeout=5)
        lab.exec("client", ["ping", "-c", "1", "-W", "2", remote["ip"]])
        frames = finish_capture(proc, 5)
        if not frames:
            return False, ["no VXLAN packet seen on the fabric"]
        lines = explain(frames[0])
        return any("VNI" in ln for ln in lines) and any("ICMP" in ln for ln in lines), lines

    tour.step(
        "The same ping on the wire: ICMP inside Ethernet inside VXLAN inside UDP",
        f"vxnet capture on h2's port of the fabric ({lab.fabric_netns})",
        wire,
    )

    def gossip() -> tuple[bool, list[str]]:
        view = lab.client("h2").get("/gossip")
        lines = [
            f"h2 sees {len(view['members'])} members: "
            + ", ".join(f"{m['name'][:12]} {m['state']}" for m in view["members"])
        ]
        fdb = [r for r in lab.client("h2").get("/fdb") if r["network"] == "appnet"]
        lines += [
            f"h2 FDB {r['mac']} ({r['ip']}) -> {r['vtep']}  [from {r['origin']}]" for r in fdb
        ]
        proc = start_capture(lab.fabric_netns, "h2", count=1, timeout=5, udp_port=7946)
        frames = finish_capture(proc, 5)
        if not frames:
            return False, [*lines, "no gossip packet seen on 7946"]
        lines += explain_gossip(frames[0], lab.client("h2").get("/swarm/keys?show=1"))
        ok = (
            all(m["state"] == "alive" for m in view["members"])
            and fdb
            and all(r["origin"] == "gossip" for r in fdb)
        )
        return bool(ok) and any("decrypted" in ln for ln in lines), lines

    tour.step(
        "Gossip on 7946 (memberlist, encrypted) programmed those FDB entries",
        "vxnet -H h2 gossip members; vxnet -H h2 fdb show",
        gossip,
    )

    def http() -> tuple[bool, list[str]]:
        seen = set()
        for c in web:
            code = (
                "import urllib.request;print(urllib.request.urlopen("
                f"'http://{c['ip']}/',timeout=5).read().decode())"
            )
            out = lab.exec("client", [sys.executable, "-c", code]).stdout
            seen |= {ln.split(": ")[1] for ln in out.splitlines() if ln.startswith("Hostname")}
        return seen == {c["name"] for c in web}, [f"answered: {', '.join(sorted(seen))}"]

    tour.step(
        "TCP across the overlay: every whoami task answers HTTP",
        "vxnet exec client -- curl http://<task ip>/",
        http,
    )

    def discovery() -> tuple[bool, list[str]]:
        vip = mgr.get("/services/web")["vips"]
        lines = []
        answers = {}
        for name in ("web", "tasks.web"):
            r = lab.exec("client", ["dig", "@127.0.0.11", "+short", name])
            answers[name] = r.stdout.split()
            lines.append(f"dig {name}: {' '.join(answers[name]) or r.stderr.strip()}")
        ok = answers["web"] == [next(iter(vip.values()))] and set(answers["tasks.web"]) == {
            c["ip"] for c in web
        }
        lines.append("web -> the service's VIP; tasks.web -> every task (records from gossip)")
        return ok, lines

    tour.step(
        "Service discovery: each container's resolver at 127.0.0.11 knows the swarm's services",
        "vxnet exec client -- dig @127.0.0.11 web; ... tasks.web",
        discovery,
    )

    def vip() -> tuple[bool, list[str]]:
        seen: dict[str, int] = {}
        for _ in range(6):
            out = lab.exec("client", ["curl", "-s", "--max-time", "3", "http://web/"]).stdout
            for ln in out.splitlines():
                if ln.startswith("Hostname: "):
                    seen[ln.split(": ")[1]] = seen.get(ln.split(": ")[1], 0) + 1
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
        mgr.post("/services", {"name": "front", "image": "whoami", "replicas": 2,
                               "ports": ["8080:80"]})  # fmt: skip
        lab.converge()
        outside = lab.add_fabric_namespace("out", "192.168.100.200")
        replicas = {t["container"] for t in mgr.get("/services/front/tasks")}
        lines, seen_all, ok = [], set(), True
        for host in lab.hosts:
            seen = set()
            for _ in range(4):
                r = subprocess.run(
                    ["ip", "netns", "exec", outside, "curl", "-s", "--max-time", "3",
                     f"http://{lab.host_address(host)}:8080/"],
                    capture_output=True, text=True, timeout=20, check=False,
                )  # fmt: skip
                seen |= {ln.split(": ")[1] for ln in r.stdout.splitlines() if "Hostname" in ln}
            has_task = any(t["node"] == host for t in mgr.get("/services/front/tasks"))
            where = "runs a task" if has_task else "runs no task"
            lines.append(f"curl {lab.host_address(host)}:8080 ({host}, {where}): {sorted(seen)}")
            ok &= bool(seen)
            seen_all |= seen
        lines.append("host DNAT -> ingress sandbox -> ingress VIP -> a task anywhere")
        return ok and seen_all == replicas, lines

    tour.step(
        "The routing mesh: a client outside the swarm reaches a task through any host's :8080",
        "vxnet service create --name front --replicas 2 -p 8080:80 whoami; curl hN:8080",
        mesh,
    )

    def isolation() -> tuple[bool, list[str]]:
        target = web[0]["ip"]
        r = lab.exec("outsider", ["ping", "-c", "2", "-i", "0.2", "-W", "1", target])
        return r.returncode != 0, [
            f"outsider (othernet) -> {target} (appnet): "
            f"{'unreachable' if r.returncode else 'REACHED'}"
        ]

    tour.step(
        "Isolation: a container on another overlay cannot reach the service",
        "vxnet exec outsider -- ping <task ip>",
        isolation,
    )

    def encrypted() -> tuple[bool, list[str]]:
        net = mgr.post(
            "/swarm/networks", {"name": "secretnet", "attachable": True, "options": ["encrypted"]}
        )
        lab.run("h1", "vault", "secretnet", "echo")
        lab.run("h2", "teller", "secretnet", "idle")
        vault = lab.find("vault")
        proc = start_capture(lab.fabric_netns, "h2", count=40, timeout=5, udp_port=None)
        r = lab.exec("teller", ["ping", "-c", "3", "-i", "0.2", "-W", "2", vault["ip"]])
        frames = [f for f in finish_capture(proc, 5) if len(f) > 34 and f[23] == 50]
        lines = [
            f"secretnet: VNI {net['vni']}, MTU {net['mtu']} (ESP with a 16-byte ICV costs "
            f"34 bytes more), ping teller (h2) -> vault (h1): exit {r.returncode}"
        ]
        if not frames:
            return False, [*lines, "no ESP (IP protocol 50) seen on the fabric"]
        lines += explain_esp(frames[0], lab.client("h2").get("/swarm/keys?show=1"))
        return r.returncode == 0 and any("VNI" in ln for ln in lines), lines

    tour.step(
        "An encrypted overlay: every VXLAN datagram travels as ESP (AES-GCM)",
        "vxnet network create -d overlay --opt encrypted --attachable secretnet",
        encrypted,
    )

    def keys() -> tuple[bool, list[str]]:
        before = {h: _tags(lab, h) for h in lab.hosts}
        mgr.post("/swarm/update", {"key_rotation_interval": "1s"})
        time.sleep(2.5)
        after = {h: _tags(lab, h) for h in lab.hosts}
        mgr.post("/swarm/update", {"key_rotation_interval": "12h"})
        lines = [f"{h}: tags {before[h]} -> {after[h]}" for h in lab.hosts]
        same = len({tuple(t) for t in after.values()}) == 1
        return same and after["h1"] != before["h1"], lines

    tour.step(
        "Key rotation watched: three keys per subsystem, the oldest dropped, same on every node",
        "vxnet swarm update --key-rotation-interval 1s; vxnet -H h3 swarm keys",
        keys,
    )

    def failure() -> tuple[bool, list[str]]:
        pid = lab.state["hosts"]["h3"]["pid"]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        status = ""
        while time.monotonic() - t0 < 15:
            status = next(n["status"] for n in mgr.get("/nodes") if n["hostname"] == "h3")
            tasks = mgr.get("/services/web/tasks")
            if status == "down" and all(t["node"] != "h3" for t in tasks):
                break
            time.sleep(0.2)
        took = time.monotonic() - t0
        gossip_dead = ""
        while time.monotonic() - t0 < 15 and not gossip_dead:
            states = {
                m["state"]
                for m in lab.client("h1").get("/gossip")["members"]
                if m["addr"] == lab.host_address("h3")
            }
            if states and states <= {"dead", "left"}:
                gossip_dead = f"{time.monotonic() - t0:.1f}s"
            time.sleep(0.2)
        lines = [
            f"h3's daemon killed (kill -9); manager saw h3 {status} after {took:.1f}s "
            f"(heartbeats); gossip on h1 declared it dead after {gossip_dead or 'never'} "
            "(SWIM: ping, indirect pings, suspicion)"
        ]
        lines += [f"{t['container']} now on {t['node']}" for t in mgr.get("/services/web/tasks")]
        return status == "down" and bool(gossip_dead) and all(
            t["node"] != "h3" for t in tasks
        ), lines

    tour.step(
        "A node fails: heartbeats stop, the manager marks it down and reschedules its task",
        "kill -9 <h3 daemon>; vxnet node ls; vxnet service ps web",
        failure,
    )

    def stats() -> tuple[bool, list[str]]:
        st = lab.stats("h2")["networks"]["appnet"]
        lines = [
            f"h2 appnet: rx {st['rx_frames']} frames / tx {st['tx_frames']} frames, "
            f"ARP answered locally {st['arp_replies']}, drops {st['drops'] or 0}"
        ]
        return st["rx_frames"] > 0 and st["tx_frames"] > 0, lines

    tour.step(
        "Counters: every frame forwarded or dropped with a reason",
        "vxnet -H h2 dataplane stats",
        stats,
    )


def explain_gossip(frame: bytes, keys: list[dict[str, object]]) -> list[str]:
    """A captured 7946 datagram: shown as ciphertext, then decrypted with the node's keys."""
    eth_ip_udp = 14 + (frame[14] & 0xF) * 4 + 8
    payload = frame[eth_ip_udp:]
    lines = [
        f"UDP 7946 payload: {len(payload)} bytes, first byte {payload[0]} "
        f"(1 = AES-GCM, keyring version 1), nonce {payload[1:13].hex()}"
    ]
    ring = [bytes.fromhex(str(k["key"])) for k in keys if k["subsystem"] == "networking:gossip"]
    try:
        inner = decode_packet_untrusted(
            payload, keyring=Keyring(ring, ring[len(ring) // 2]), require_encryption=True
        )
        kinds = [type(decode_message_untrusted(m)).__name__ for m in inner]
    except BadPacket as exc:
        return [*lines, f"could not decrypt: {exc.reason}"]
    lines.append(f"decrypted with networking:gossip keys: {', '.join(kinds)} (memberlist messages)")
    return lines


def explain_esp(frame: bytes, keys: list[dict[str, object]]) -> list[str]:
    """An ESP packet from the fabric: its SPI names the node pair and key; decrypt it."""
    ihl = (frame[14] & 0x0F) * 4
    src, dst = ipaddress.IPv4Address(frame[26:30]), ipaddress.IPv4Address(frame[30:34])
    esp = frame[14 + ihl :]
    spi, seq = int.from_bytes(esp[:4], "big"), int.from_bytes(esp[4:8], "big")
    lines = [
        f"IPv4 {src} -> {dst} protocol 50 (ESP)  SPI 0x{spi:08x} seq {seq}: "
        f"{len(esp) - 16} bytes of ciphertext, no UDP, no VXLAN, no inner frame visible"
    ]
    for k in keys:
        tag = int(str(k["lamport_time"]))
        if k["subsystem"] == "networking:ipsec" and derive_spi(src, dst, tag) == spi:
            sa = SecurityAssociation(spi, bytes.fromhex(str(k["key"])), salt_for_spi(spi))
            try:
                _, inner = sa.decrypt_untrusted(esp)
            except BadPacket as exc:
                return [*lines, f"could not decrypt: {exc.reason}"]
            lines.append(
                f"SPI = FNV-1a({src} | tag {tag} | {dst}); decrypted with that "
                "networking:ipsec key (vxnet swarm keys --show-keys):"
            )
            return lines + explain_vxlan(inner)
    return [*lines, "no ipsec key matches this SPI"]


def _tags(lab: Lab, host: str) -> list[int]:
    return sorted(
        k["lamport_time"]
        for k in lab.client(host).get("/swarm/keys")
        if k["subsystem"] == "networking:ipsec"
    )
