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
import sys
import time
from collections import Counter
from collections.abc import Callable

import click

from vxnet.capture import explain, explain_vxlan, finish_capture, start_capture
from vxnet.demo_services import customise_ingress_tour, services_tour
from vxnet.errors import BadPacket, VxnetError
from vxnet.esp.sa import SecurityAssociation
from vxnet.esp.spi import derive_spi, salt_for_spi
from vxnet.gossip.messages import decode_message_untrusted
from vxnet.gossip.packet import Keyring, decode_packet_untrusted
from vxnet.lab import Lab, builder
from vxnet.lab.topology import default_spec

LAB_NAME = "demo"
DATA_SUBNET = ipaddress.IPv4Network("192.168.200.0/24")
CUSTOM_GWBRIDGE = {
    "name": "docker_gwbridge",
    "subnet": "10.99.0.0/16",
    "gateway": "10.99.0.1",
    "options": {
        "com.docker.network.bridge.name": "docker_gwbridge",
        "com.docker.network.bridge.enable_icc": "false",
        "com.docker.network.bridge.enable_ip_masquerade": "true",
    },
}


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
    # a second fabric for VXLAN/ESP (--data-path-addr); the swarm is formed below, after h3 made
    # its own docker_gwbridge, as the seed's customisation does
    spec = dataclasses.replace(
        default_spec(LAB_NAME, 3, swarm=False), networks=(), data_subnet=DATA_SUBNET
    )
    lab = Lab(spec=spec)
    try:
        lab.client("h3").post("/local-networks", CUSTOM_GWBRIDGE)
        builder.form_swarm(lab.state, dataclasses.replace(spec, swarm=True))
        builder.save_state(lab.name, lab.state)
        _tour(tour, lab)
    finally:
        if keep:
            click.echo(
                f"\nThe lab stays up: try `vxnet --lab {LAB_NAME} ps -a`, "
                f"`vxnet --lab {LAB_NAME} exec client -- dig tasks.web`, "
                f"`vxnet --lab {LAB_NAME} trace --on h2 --count 5`; "
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
        tcp = lab.exec_host("h1", ["ss", "-ltn"]).stdout
        udp = lab.exec_host("h1", ["ss", "-lun"]).stdout
        addr, data = lab.host_address("h1"), lab.data_address("h1")
        ports = {
            "TCP 2377 (manager, mutual TLS)": f"{addr}:2377" in tcp,
            "TCP+UDP 7946 (gossip)": f"{addr}:7946" in tcp and f"{addr}:7946" in udp,
            "UDP 4789 (VXLAN, on the data path)": f"{data}:4789" in udp,
        }
        lines += [f"h1 listens: {what}: {'yes' if up else 'NO'}" for what, up in ports.items()]
        ok = len(nodes) == 3 and all(n["status"] == "ready" for n in nodes)
        return ok and all(ports.values()), lines

    tour.step(
        "A swarm: h1 runs `swarm init`, h2 and h3 join with the real token",
        "vxnet swarm init; vxnet -H h2 swarm join --token SWMTKN-1-... h1:2377",
        swarm,
    )

    def defaults() -> tuple[bool, list[str]]:
        (ingress,) = [n for n in mgr.get("/swarm/networks") if n["ingress"]]
        lines = [f"ingress: overlay, subnet {ingress['subnet']}, VNI {ingress['vni']}"]
        subnets = {}
        for h in lab.hosts:
            gw = lab.client(h).get("/local-networks/docker_gwbridge")
            subnets[h] = gw["subnet"]
            lines.append(f"{h}: docker_gwbridge {gw['subnet']} (made by {gw['created_by']})")
        lines.append("h3 made its own before joining (--subnet 10.99.0.0/16): kept as is")
        ok = ingress["vni"] >= 4096 and subnets["h3"] == "10.99.0.0/16"
        return ok and subnets["h1"] != subnets["h3"], lines

    tour.step(
        "Joining created `ingress` (overlay) and `docker_gwbridge` (bridge); a custom one is kept",
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
        proc = start_capture(lab.fabric_netns, "h2d", count=1, timeout=5)
        lab.exec("client", ["ping", "-c", "1", "-W", "2", remote["ip"]])
        frames = finish_capture(proc, 5)
        if not frames:
            return False, ["no VXLAN packet seen on the fabric"]
        lines = explain(frames[0])
        return any("VNI" in ln for ln in lines) and any("ICMP" in ln for ln in lines), lines

    tour.step(
        "The same ping on the wire: ICMP inside Ethernet inside VXLAN inside UDP",
        f"vxnet trace --on h2 (h2's data-path port of the fabric, {lab.fabric_netns})",
        wire,
    )

    def apart() -> tuple[bool, list[str]]:
        info = lab.client("h2").get("/swarm")
        caps = {
            port: start_capture(lab.fabric_netns, port, count=10_000, timeout=3, udp_port=None)
            for port in ("h2", "h2d")
        }
        remote = next(c for c in web if c["host"] != "h2")
        lab.exec("client", ["ping", "-c", "5", "-i", "0.2", "-W", "2", remote["ip"]])
        seen = {port: _udp_ports(finish_capture(proc, 3)) for port, proc in caps.items()}
        lines = [
            f"h2: --advertise-addr {info['advertise_addr']} (eth0), "
            f"--data-path-addr {info['data_path_addr']} (eth1)",
            f"control port: {dict(seen['h2'])} (7946 gossip; no 4789)",
            f"data port:    {dict(seen['h2d'])} (4789 VXLAN only)",
        ]
        ok = seen["h2"][7946] > 0 and seen["h2"][4789] == 0
        return ok and seen["h2d"][4789] > 0 and seen["h2d"][7946] == 0, lines

    tour.step(
        "Control and data traffic apart: gossip and 2377 on one interface, VXLAN on the other",
        "vxnet swarm join --advertise-addr 192.168.100.12 --data-path-addr 192.168.200.12 ...",
        apart,
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

    services_tour(tour, lab, web)

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
        proc = start_capture(lab.fabric_netns, "h2d", count=40, timeout=5, udp_port=None)
        r = lab.exec("teller", ["ping", "-c", "3", "-i", "0.2", "-W", "2", vault["ip"]])
        frames = [f for f in finish_capture(proc, 5) if len(f) > 34 and f[23] == 50]
        lines = [
            f"secretnet: VNI {net['vni']}, MTU {net['mtu']} (ESP with a 16-byte ICV costs "
            f"34 bytes more), ping teller (h2) -> vault (h1): exit {r.returncode}"
        ]
        if not frames:
            return False, [*lines, "no ESP (IP protocol 50) seen on the fabric"]
        lines += explain_esp(frames[0], lab.client("h2").get("/swarm/keys?show=1"))
        lines.append(
            "standalone containers on it: --opt encrypted --attachable; the cost of it: "
            "`vxnet bench --encrypted`; (Docker's Windows nodes cannot join: none here)"
        )
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

    customise_ingress_tour(tour, lab)

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


def _udp_ports(frames: list[bytes]) -> Counter[int]:
    """How many captured IPv4/UDP frames went to or came from 7946 and 4789."""
    out: Counter[int] = Counter({7946: 0, 4789: 0})
    for f in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 0x0F) * 4
        ports = {
            int.from_bytes(f[14 + ihl : 16 + ihl], "big"),
            int.from_bytes(f[16 + ihl : 18 + ihl], "big"),
        }
        for p in ports & {7946, 4789}:
            out[p] += 1
    return out


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
