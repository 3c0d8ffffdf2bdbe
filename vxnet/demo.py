"""``vxnet lab demo``: the guided tour.  Every check mark is earned by a verified result.

Each step prints what it does, the command a user would type, and what was seen on the wire.
The tour grows with each feature; today it covers the foundation: hosts, an overlay network,
containers on different hosts, ping and HTTP across the overlay, a VXLAN packet decoded from the
fabric, isolation between VNIs, and the dataplane's counters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click

from vxnet.capture import explain, finish_capture, start_capture
from vxnet.errors import VxnetError
from vxnet.lab import Lab, builder

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
    lab = Lab(hosts=3, name=LAB_NAME)
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
    def hosts() -> tuple[bool, list[str]]:
        lines = []
        for h in lab.hosts:
            info = lab.client(h).get("/info")
            lines.append(
                f"{h}: namespace {lab.host_netns(h)}, underlay {info['underlay_addr']}, "
                f"daemon pid {info['pid']}, VXLAN on UDP {info['data_port']}"
            )
        return len(lines) == 3, lines

    tour.step(
        "Three hosts on an underlay fabric, a vxnet daemon on each",
        f"vxnet lab up --name {LAB_NAME} --hosts 3",
        hosts,
    )

    def networks() -> tuple[bool, list[str]]:
        nets = lab.client("h1").get("/networks")
        lines = [
            f"{n['name']}: subnet {n['subnet']}, VNI {n['vni']}, MTU {n['mtu']} "
            "(1500 - 50 of VXLAN)"
            for n in nets
        ]
        return {n["vni"] for n in nets} == {4097, 4098}, lines

    tour.step(
        "Two overlay networks, each its own VXLAN segment (VNI >= 4096, as Docker)",
        "vxnet -H h1 network ls",
        networks,
    )

    def containers() -> tuple[bool, list[str]]:
        lab.run("h1", "web1", "front", "whoami")
        lab.run("h2", "client", "front", "idle")
        lab.run("h3", "other", "back", "idle")
        cs = lab.containers()
        lines = [
            f"{c['name']} on {c['host']}: {c['ip']} mac {c['mac']} ({c['network']})"
            for c in cs.values()
        ]
        fdb = lab.client("h2").get("/fdb")
        lines += [
            f"h2 FDB: {r['mac']} ({r['ip']}) -> VTEP {r['vtep']}  [programmed, never learned]"
            for r in fdb
            if r["network"] == "front"
        ]
        return len(cs) == 3 and any(r["ip"] == cs["web1"]["ip"] for r in fdb), lines

    tour.step(
        "Containers on different hosts; every FDB programmed from the others",
        "vxnet -H h1 run -d --name web1 --network front whoami",
        containers,
    )

    def ping() -> tuple[bool, list[str]]:
        r = lab.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", lab.ip("web1")])
        lines = [ln for ln in r.stdout.splitlines() if "bytes from" in ln or "packet loss" in ln]
        return r.returncode == 0 and " 0% packet loss" in r.stdout, lines

    tour.step(
        "client (h2) pings web1 (h1) across the overlay",
        "vxnet exec client -- ping -c 3 web1's-ip",
        ping,
    )

    def wire() -> tuple[bool, list[str]]:
        proc = start_capture(lab.fabric_netns, "h2", count=1, timeout=5)
        lab.exec("client", ["ping", "-c", "1", "-W", "2", lab.ip("web1")])
        frames = finish_capture(proc, 5)
        if not frames:
            return False, ["no VXLAN packet seen on the fabric"]
        lines = explain(frames[0])
        return any("VNI 4097" in ln for ln in lines) and any("ICMP" in ln for ln in lines), lines

    tour.step(
        "The same ping on the wire: ICMP inside Ethernet inside VXLAN inside UDP",
        f"vxnet capture on the fabric port of h2 (namespace {lab.fabric_netns})",
        wire,
    )

    def http() -> tuple[bool, list[str]]:
        code = f"import urllib.request;print(urllib.request.urlopen('http://{lab.ip('web1')}/',timeout=5).read().decode())"
        r = lab.exec("client", [sys.executable, "-c", code])
        return "Hostname: web1" in r.stdout, r.stdout.strip().splitlines()

    tour.step(
        "TCP across the overlay: HTTP to the whoami image on web1",
        "vxnet exec client -- curl http://web1's-ip/",
        http,
    )

    def isolation() -> tuple[bool, list[str]]:
        before = lab.stats("h3")["networks"]["back"]["drops"].get("no_route_out", 0)
        r = lab.exec("other", ["ping", "-c", "2", "-i", "0.2", "-W", "1", lab.ip("web1")])
        after = lab.stats("h3")["networks"]["back"]["drops"].get("no_route_out", 0)
        lines = [
            f"ping from 'other' (network back, VNI 4098) to web1 (front): exit {r.returncode}",
            f"h3 dropped and counted {after - before} frame(s) as no_route_out",
        ]
        return r.returncode != 0 and after > before, lines

    tour.step(
        "Isolation: a container on another network cannot reach web1",
        "vxnet exec other -- ping web1's-ip",
        isolation,
    )

    def stats() -> tuple[bool, list[str]]:
        st = lab.stats("h1")["networks"]["front"]
        lines = [
            f"h1 front: rx {st['rx_frames']} frames / tx {st['tx_frames']} frames, "
            f"ARP answered locally {st['arp_replies']}, drops {st['drops'] or 0}"
        ]
        return st["rx_frames"] > 0 and st["tx_frames"] > 0, lines

    tour.step(
        "Counters: every frame forwarded or dropped with a reason",
        "vxnet -H h1 dataplane stats",
        stats,
    )
