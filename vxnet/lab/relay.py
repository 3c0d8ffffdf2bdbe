"""``python -m vxnet.lab.relay``: an impaired cable, in userspace, between two interfaces.

While a lab host has a fault, its fabric port leaves the fabric bridge and this process joins
the two again: every frame read on one side (an ``AF_PACKET`` socket) is written to the other,
when and as often as :class:`vxnet.lab.impair.Impairer` decides.  It runs in the fabric's
namespace, one per impaired port, and writes its counters to a JSON file twice a second.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path

from vxnet import netns
from vxnet.files import write_private
from vxnet.lab.impair import Impairer, Impairment, Rule, packed

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
STATS_PERIOD = 0.5


def _socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)  # never read back what we send
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def rules_from_json(text: str) -> list[Rule]:
    return [
        Rule(Impairment(**r["impairment"]), packed(r.get("peers", []))) for r in json.loads(text)
    ]


def run(ns: str, side_a: str, side_b: str, rules: list[Rule], seed: int, stats: Path) -> None:
    netns.enter(ns)
    a, b = _socket(side_a), _socket(side_b)
    other = {a.fileno(): b, b.fileno(): a}
    impairer = Impairer(rules, random.Random(seed))
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    send_errors = 0
    next_stats = 0.0
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        now = time.monotonic()
        timeout = min(STATS_PERIOD, max(0.0, queue[0][0] - now)) if queue else STATS_PERIOD
        try:
            readable, _, _ = select.select([a, b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in readable:
            out = other[sock.fileno()]
            for _ in range(64):  # drain a burst, then look at the clock again
                try:
                    frame = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                for when in impairer.decide(frame, now):
                    seq += 1
                    heapq.heappush(queue, (when, seq, out, frame))
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:  # e.g. the far side went down during lab down: counted
                send_errors += 1
        if now >= next_stats:
            next_stats = now + STATS_PERIOD
            data = {**impairer.counters.to_json(), "send_errors": send_errors,
                    "queued": len(queue), "pid": os.getpid()}  # fmt: skip
            write_private(stats, json.dumps(data))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vxnet.lab.relay")
    p.add_argument("--netns", required=True)
    p.add_argument("--a", required=True, help="one side (the host's port)")
    p.add_argument("--b", required=True, help="the other side (towards the fabric bridge)")
    p.add_argument("--rules", required=True, help="JSON list of {impairment, peers}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stats", required=True)
    args = p.parse_args(argv)
    run(args.netns, args.a, args.b, rules_from_json(args.rules), args.seed, Path(args.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
