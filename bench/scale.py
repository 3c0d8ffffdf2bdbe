"""``vxnet bench --scale``: many hosts, a few containers each, every pair reachable.

Brings up a swarm lab of ``hosts`` hosts (default 32), starts ``containers`` idle containers on
each (default 4) on the overlay ``front``, waits until gossip has programmed every host's FDB
with every other host's endpoints, then checks reachability from every container to every other
one (full all-pairs: one raw-socket ICMP prober per source container sends to all targets at
once, four more times to the silent ones), reports the bring-up time of each phase and the
memory of every host's daemon, and tears the lab down.  Nothing is sampled and nothing
printed that was not measured.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.measure import progress, rss_mb
from vxnet import netns
from vxnet.lab import Lab, neigh

NETWORK = "front"
PARALLEL = 16  # containers started / probers run at once

#: Runs in a source container: ICMP echo to every target, four more times to the silent ones;
#: prints the targets that answered.  Raw socket (root in the namespace), ids per target.
PROBER = r"""
import json, os, select, socket, struct, sys, time
targets = sys.argv[1:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
# A raw ICMP socket gets every ICMP packet of the namespace: the other probers' echo requests
# too, dozens a millisecond in a big lab.  Let the kernel keep only echo replies (ICMP_FILTER,
# SOL_RAW 255, option 1: a set bit drops that type) in a buffer big enough for all of them.
s.setsockopt(255, 1, struct.pack("=I", 0xFFFFFFFE))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
ident = os.getpid() & 0xFFFF
def echo(seq):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"vxnet-scale!"
    c = sum(struct.unpack("!10H", h))
    c = (c & 0xFFFF) + (c >> 16); c = (c & 0xFFFF) + (c >> 16)
    return h[:2] + struct.pack("!H", ~c & 0xFFFF) + h[4:]
got = set()
def drain(timeout):
    while select.select([s], [], [], timeout)[0]:
        data, (src, _) = s.recvfrom(2048)
        ihl = (data[0] & 15) * 4
        if data[ihl] == 0 and struct.unpack_from("!H", data, ihl + 4)[0] == ident:
            got.add(src)
        timeout = 0
for attempt in range(5):
    for i, t in enumerate(targets):
        if t not in got:
            s.sendto(echo(i), (t, 0))
            drain(0.001)
    deadline = time.monotonic() + 1.5
    while len(got) < len(targets) and time.monotonic() < deadline:
        drain(max(0.0, deadline - time.monotonic()))
    if len(got) == len(targets):
        break
print(json.dumps(sorted(got)))
"""


def _start(lab: Lab, host: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "network": NETWORK,
        "image": "idle",
        "cmd": [],
        "ip": None,
    }
    body.update(publish=[], aliases=[], dns=[])
    created: dict[str, Any] = lab.client(host, timeout=60).post("/containers", body)
    return dict(created, host=host)


def _probe(ns: str, targets: list[str]) -> set[str]:
    argv = netns.exec_argv(ns, [sys.executable, "-c", PROBER, *targets])
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    try:
        return set(json.loads(r.stdout))
    except ValueError:
        return set()


def arp_table() -> dict[str, int]:
    """The kernel's ARP table: its entries now, and how often it was full (it refused one)."""
    r = subprocess.run(["ip", "-s", "ntable", "show", "name", "arp_cache"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    found = dict(re.findall(r"\b(entries|table_fulls) (\d+)", r.stdout))
    return {k: int(v) for k, v in found.items()}


@contextlib.contextmanager
def neighbour_room(needed: int) -> Iterator[dict[str, Any]]:
    """Make the kernel's ARP table big enough for the lab, for this run only.

    One kernel holds every namespace's ARP entries in one table, and its limits are
    machine-wide: ``gc_thresh3`` (1024 by default) entries at most, forced garbage collection
    above ``gc_thresh2`` (512) that may only evict entries older than 5 s.  A real 32-host
    swarm has 32 tables; this lab has one, holding the hosts' underlay entries (every host
    talks to every other) and every container's.  Above the limit the kernel logs "neighbor
    table overflow" and drops the packet: the first runs of this bench lost most pairs to it.
    Docker's answer for big hosts is the same sysctl.  The old values come back afterwards.
    """
    names = neigh.THRESHOLDS
    old = neigh.limits()
    want = {"gc_thresh1": needed, "gc_thresh2": 2 * needed, "gc_thresh3": 4 * needed}
    raised = {n: max(old[n], want[n]) for n in names}
    note: dict[str, Any] = {"before": old, "during": raised}
    try:
        for n in reversed(names):  # thresh3 first: the kernel wants 1 <= 2 <= 3 at every step
            (neigh.NEIGH / n).write_text(str(raised[n]))
        yield note
    finally:
        for n in names:
            (neigh.NEIGH / n).write_text(str(old[n]))


def run_scale(hosts: int = 32, containers: int = 4, json_path: str | None = None) -> int:
    """Bring up, check, measure, tear down; 0 if every pair was reachable."""
    name = "scale" + secrets.token_hex(2)
    out: dict[str, Any] = {"hosts": hosts, "containers_per_host": containers}
    with neighbour_room(neigh.needed_entries(hosts, hosts * containers)) as room:
        table_before = arp_table()
        code = _run(name, hosts, containers, out)
        out["arp_table"] = dict(room, table_fulls=arp_table().get("table_fulls", 0)
                                - table_before.get("table_fulls", 0))  # fmt: skip
    print(render(out), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    return code


def _run(name: str, hosts: int, containers: int, out: dict[str, Any]) -> int:
    t0 = time.monotonic()
    progress(f"scale: lab {name}, {hosts} hosts (swarm: 1 manager, {hosts - 1} workers)")
    with Lab(hosts=hosts, name=name) as lab:
        out["lab_up_s"] = time.monotonic() - t0
        progress(f"scale: lab up in {out['lab_up_s']:.1f} s; {hosts * containers} containers")
        t1 = time.monotonic()
        jobs = [(h, f"c{h[1:]}x{i}") for i in range(containers) for h in lab.hosts]
        with ThreadPoolExecutor(PARALLEL) as pool:
            started = list(pool.map(lambda job: _start(lab, *job), jobs))
        out["containers_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        lab.sync_peers(timeout=120)
        out["converge_s"] = time.monotonic() - t2
        out["bring_up_s"] = time.monotonic() - t0
        progress(
            f"scale: containers in {out['containers_s']:.1f} s, FDBs converged in "
            f"{out['converge_s']:.1f} s: bring-up {out['bring_up_s']:.1f} s"
        )
        pids = [int(lab.state["hosts"][h]["pid"]) for h in lab.hosts]
        rss = [rss_mb([pid]) or 0.0 for pid in pids]
        ips = {c["name"]: c["ip"] for c in started}
        t3 = time.monotonic()
        with ThreadPoolExecutor(PARALLEL) as pool:
            answers = list(
                pool.map(
                    lambda c: (
                        c,
                        _probe(c["netns"], [ip for n, ip in ips.items() if n != c["name"]]),
                    ),
                    started,
                )
            )
        out["reachability_s"] = time.monotonic() - t3
        pairs = len(started) * (len(started) - 1)
        ok = sum(len(got) for _, got in answers)
        out["pairs"], out["pairs_ok"] = pairs, ok
        host_of = {c["name"]: c["host"] for c in started}
        for kind, same in (("same_host", True), ("cross_host", False)):
            pairs_k = [
                (c, n, ip)
                for c, _ in answers
                for n, ip in ips.items()
                if n != c["name"] and (host_of[n] == c["host"]) is same
            ]
            got_k = {c["name"]: got for c, got in answers}
            out[f"{kind}_pairs"] = len(pairs_k)
            out[f"{kind}_ok"] = sum(1 for c, _, ip in pairs_k if ip in got_k[c["name"]])
        out["unreachable"] = sorted(
            f"{c['name']}->{n}"
            for c, got in answers
            for n, ip in ips.items()
            if n != c["name"] and ip not in got
        )[:50]
        out["daemon_rss_mb"] = {"median": statistics.median(rss), "max": max(rss), "all": rss}
        out["containers_rss_mb_per_host"] = _container_rss(started, hosts)
    out["teardown_s"] = time.monotonic() - t0 - out["bring_up_s"] - out["reachability_s"]
    return 0 if ok == pairs else 1


def _container_rss(started: list[dict[str, Any]], hosts: int) -> float:
    pids = [int(c["pid"]) for c in started if c.get("pid")]
    total = sum(rss_mb([pid]) or 0.0 for pid in pids)
    return total / hosts


def render(out: dict[str, Any]) -> str:
    rss = out["daemon_rss_mb"]
    before, during = out["arp_table"]["before"], out["arp_table"]["during"]
    lines = [
        f"vxnet bench --scale: {out['hosts']} hosts x {out['containers_per_host']} containers "
        f"on one overlay, swarm mode (gossip programs the FDBs)",
        f"bring-up            {out['bring_up_s']:7.1f} s   (target <= 60 s)",
        f"  lab (netns, daemons, swarm)  {out['lab_up_s']:7.1f} s",
        f"  containers                   {out['containers_s']:7.1f} s",
        f"  FDBs converged (gossip)      {out['converge_s']:7.1f} s",
        f"reachability        {out['pairs_ok']}/{out['pairs']} ordered pairs (all pairs, ICMP) "
        f"in {out['reachability_s']:.1f} s",
        f"  same host {out['same_host_ok']}/{out['same_host_pairs']}, across hosts "
        f"{out['cross_host_ok']}/{out['cross_host_pairs']}",
        f"daemon RSS per host {rss['median']:7.1f} MB median, {rss['max']:.1f} MB max",
        f"containers per host {out['containers_rss_mb_per_host']:7.1f} MB RSS (idle processes)",
        f"teardown            {out['teardown_s']:7.1f} s",
        f"kernel ARP table    gc_thresh1/2/3 {before['gc_thresh1']}/{before['gc_thresh2']}/"
        f"{before['gc_thresh3']} raised to {during['gc_thresh1']}/{during['gc_thresh2']}/"
        f"{during['gc_thresh3']} for the run (one kernel, one table for every host), "
        f"restored; table full {out['arp_table']['table_fulls']} times during the run",
    ]
    if out["unreachable"]:
        lines.append("unreachable (first 50): " + ", ".join(out["unreachable"]))
    return "\n".join(lines)
