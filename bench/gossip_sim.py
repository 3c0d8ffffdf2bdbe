"""Gossip simulation benchmark: memberlist (SWIM + Lifeguard) and networkdb at 100 to 5,000 nodes.

``python -m bench.gossip_sim [--nodes 100,1000] [--loss 0,5,10,20] [--duration S] [--seed N]
[--json FILE] [--plot FILE.png] [--quick]``

Every node is a real sans-IO core (:mod:`vxnet.gossip.swim`, :mod:`vxnet.gossip.networkdb`),
all of them in one process on a virtual clock (:mod:`bench.gossip_net`, which also says how the
network, the codec and the byte counts are modelled).  For each cluster size N and loss rate:

**crash** (Lifeguard on, memberlist's DefaultLAN config).  The cluster starts converged (warm
start).  At 1 s one node writes one entry to a networkdb table every node is attached to
(N <= ``--netdb-max``): the time until every live node has it is the *networkdb convergence*;
networkdb is then detached so that its cost does not weigh on the rest of the run.  At
``--warmup`` seconds one node crashes: *first suspect* and *first dead* are the first node to
suspect it / declare it dead, *all dead* is when the last live node declared it dead.  Over the
whole run: *false suspicions* (suspicions a node raised, from its own failed probe, against a
member that was alive) and *false deaths* (a live member declared dead by some node: one per
observer and member); the load per node and second, memberlist's only (networkdb's apart):
UDP datagrams and their bytes, TCP exchanges (push/pull, TCP ping fallback) and their bytes.

**slow members, Lifeguard vs plain SWIM.**  A fraction of the nodes (``--slow-frac``, at least
one) processes everything it receives 0.4-1.6 s late (the Lifeguard paper's model); nothing
crashes.  The same seed, network and slow nodes run twice:

* *Lifeguard*: the DefaultLAN config (awareness up to x8, suspicion timeout from 6x the minimum
  down to the minimum with 2 independent confirmations, nacks);
* *plain SWIM*: ``Config(awareness_max_multiplier=1, suspicion_max_timeout_mult=1)`` and every
  node advertising protocol version max 3 (``vsn = [1, 3, 2, 0, 0, 0]``): no local health
  awareness (probe interval and timeout never stretch), a fixed suspicion timeout of
  ``suspicion_mult * log10(N) * probe_interval`` (memberlist's pre-Lifeguard value: the maximum
  equals the minimum, so confirmations cannot change it), and no nacks (an indirect probe is
  only asked for nacks by protocol >= 4).  What the config cannot switch off, and so stays in
  both: the accusation piggybacked on the ping to a suspect ("buddy system"), the TCP ping
  fallback (both as in memberlist since protocol 3), and refutation with a new incarnation.

The false-positive figures counted are suspicions raised against *healthy* members (alive and
not slow: the ones Lifeguard protects from slow accusers) and against any live member, and
false deaths; the ratio is plain SWIM / Lifeguard.

**partition** (``--partition START:END:FRAC``, off by default): FRAC of the nodes are cut off
from the rest from START to END; deaths across the cut while it lasts, deaths after END (stale
dead messages crossing the healed cut), and the time after END until no node sees any member
dead (memberlist never probes dead members: it heals only through gossip to the recently dead
and push/pull, or not at all).

Prints one table (and the machine), ``--json`` writes every figure, ``--plot`` a PNG
(matplotlib is optional: without it the plot is skipped, with a message).  No figure is
printed that was not measured in this run.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.gossip_net import NetModel, Partition, Simulator, Traffic
from vxnet.gossip.config import Config
from vxnet.gossip.messages import DEFAULT_VSN
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord
from vxnet.gossip.suspicion import suspicion_timeout

#: Plain SWIM advertises protocol max 3: indirect pings ask for no nacks.
PLAIN_SWIM_VSN = bytes([1, 3, 2, 0, 0, 0])
PLAIN_SWIM_CONFIG = Config(awareness_max_multiplier=1, suspicion_max_timeout_mult=1)
DB_WRITE_AT = 1.0
DB_TIMEOUT = 30.0

# Criteria the report applies to the targets ("flat in N" needs a number).
FLAT_DETECTION = 2.0  # max/min of first-dead time over N at one loss rate
FLAT_LOAD = 1.25  # max/min of datagrams per node per second over N at one loss rate
LIFEGUARD_CLAIM = 50.0
WALL_TARGET = 60.0  # seconds of wall time for 1,000 nodes x 120 virtual seconds


@dataclass
class Options:
    nodes: list[int] = field(default_factory=lambda: [100, 1000])
    losses: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 20.0])
    duration: float = 120.0
    seed: int = 1
    warmup: float = 10.0
    slow_frac: float = 0.02
    netdb_max: int = 1000
    compare: bool = True
    partition: tuple[float, float, float] | None = None
    full_codec: bool = False
    delay_ms: float = 2.0
    jitter_ms: float = 8.0

    def net(self, loss: float, **kw: Any) -> NetModel:
        return NetModel(
            loss=loss / 100.0,
            delay_base=self.delay_ms / 1000.0,
            delay_jitter=self.jitter_ms / 1000.0,
            **kw,
        )


def progress(msg: str) -> None:
    print(f"gossip-sim: {msg}", file=sys.stderr, flush=True)


def _rel(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 3)


def _per_node_s(traffic: Traffic, n: int, seconds: float) -> dict[str, float]:
    d = n * seconds
    return {
        "udp_msgs": round(traffic.udp / d, 3),
        "udp_bytes": round(traffic.udp_bytes / d, 1),
        "tcp_ops": round(traffic.tcp / d, 4),
        "tcp_bytes": round(traffic.tcp_bytes / d, 1),
        "msgs": round((traffic.udp + traffic.tcp) / d, 3),
        "bytes": round((traffic.udp_bytes + traffic.tcp_bytes) / d, 1),
    }


# ------------------------------------------------------------------------------ scenarios


def crash_scenario(n: int, loss: float, opts: Options) -> dict[str, Any]:
    seed = f"{opts.seed}/{n}/{loss}/crash"
    with_db = n <= opts.netdb_max
    t0 = time.perf_counter()
    sim = Simulator(
        n, opts.net(loss), Config(), seed, networkdb=with_db, full_codec=opts.full_codec
    )
    sim.warm_start()
    setup = time.perf_counter() - t0
    pick = random.Random(f"pick/{seed}")
    victim = pick.randrange(n)
    writer = (victim + 1 + pick.randrange(n - 1)) % n
    crash_at = opts.warmup
    db: dict[str, Any] = {"enabled": with_db}
    if with_db:
        _networkdb_probe(sim, writer, db)
    else:
        db["why"] = f"N > --netdb-max {opts.netdb_max}"
    sim.at(crash_at, lambda: sim.kill(victim))
    t1 = time.perf_counter()
    sim.run_until(opts.duration)
    run = time.perf_counter() - t1

    others = [i for i in range(n) if i != victim]
    sus = [s for s in sim.suspicions if s.member == victim and s.time >= crash_at]
    dead = {}
    for d in sim.deaths:
        if d.member == victim and d.time >= crash_at and d.observer not in dead:
            dead[d.observer] = d.time
    all_dead = max(dead.values()) if len(dead) == len(others) else None
    false_sus = [s for s in sim.suspicions if s.member != victim or s.time < crash_at]
    false_deaths = [d for d in sim.deaths if d.member != victim or d.time < crash_at]
    counters = sim.counters()
    lo = suspicion_timeout(Config().suspicion_mult, n, Config().probe_interval)
    out = {
        "nodes": n,
        "loss_pct": loss,
        "crash_at": crash_at,
        "first_suspect_s": _rel(min((s.time for s in sus), default=None), crash_at),
        "first_dead_s": _rel(min(dead.values(), default=None), crash_at),
        "all_dead_s": _rel(all_dead, crash_at),
        "dead_seen_by": f"{len(dead)}/{len(others)}",
        "suspicion_timeout_min_s": lo,
        "suspicion_timeout_max_s": lo * Config().suspicion_max_timeout_mult,
        "false_suspicions": sum(s.origin for s in false_sus),
        "false_suspect_views": len(false_sus),
        "false_deaths": len(false_deaths),
        "false_dead_members": len({d.member for d in false_deaths}),
        "load_per_node_s": _per_node_s(sim.traffic, n, opts.duration),
        "networkdb": db,
        "counters": {
            k: counters[k]
            for k in (
                "probes",
                "probe_failures",
                "suspicions_raised",
                "refutations",
                "suspicion_timeouts",
                "degraded_timeouts",
                "tcp_fallbacks",
                "push_pulls",
                "nacks",
            )
        },
        "events": sim.events_processed,
        "wall_setup_s": round(setup, 2),
        "wall_run_s": round(run, 2),
        "virtual_s": opts.duration,
    }
    return out


def _networkdb_probe(sim: Simulator, writer: int, db: dict[str, Any]) -> None:
    """At DB_WRITE_AT the writer creates one entry; detach networkdb once all have it."""
    key = "10.255.0.2/32"
    value = PeerRecord("10.255.0.2/24", "02:42:0a:ff:00:02", "10.0.0.1").encode()
    have: dict[int, float] = {}
    cursor = [0]
    before: list[Traffic] = []

    def write() -> None:
        before.append(sim.traffic.copy())
        sim.dbs[writer].create_entry("bench-net", PEER_TABLE, key, value, sim.now)
        sim.flush(writer)
        sim.at(sim.now + 0.1, check)

    def check() -> None:
        events = sim.table_events
        for t, i, ev in events[cursor[0] :]:
            if ev.key == key and ev.kind == "create":
                have.setdefault(i, t)
        cursor[0] = len(events)
        want = [i for i in sim.live() if i != writer]
        done = all(i in have for i in want)
        if done or sim.now >= DB_WRITE_AT + DB_TIMEOUT:
            times = sorted(have[i] - DB_WRITE_AT for i in want if i in have)
            spent = sim.traffic.minus(before[0])
            seconds = max(sim.now - DB_WRITE_AT, 1e-9)
            n = sim.n
            db.update(
                {
                    "converged": done,
                    "reached": f"{len(times)}/{len(want)}",
                    "first_s": round(times[0], 3) if times else None,
                    "median_s": round(statistics.median(times), 3) if times else None,
                    "all_s": round(times[-1], 3) if done and times else None,
                    "udp_msgs_per_node_s": round(spent.db_udp / (n * seconds), 3),
                    "tcp_ops_per_node_s": round(spent.db_tcp / (n * seconds), 4),
                }
            )
            sim.stop_networkdb()
        else:
            sim.at(sim.now + 0.1, check)

    sim.at(DB_WRITE_AT, write)


def slow_scenario(n: int, loss: float, opts: Options, *, lifeguard: bool) -> dict[str, Any]:
    seed = f"{opts.seed}/{n}/{loss}/slow"  # the same for both modes: a paired comparison
    pick = random.Random(f"pick/{seed}")
    k = max(1, round(n * opts.slow_frac))
    slow = frozenset(pick.sample(range(n), k))
    config = Config() if lifeguard else PLAIN_SWIM_CONFIG
    vsn = DEFAULT_VSN if lifeguard else PLAIN_SWIM_VSN
    t0 = time.perf_counter()
    sim = Simulator(n, opts.net(loss, slow=slow), config, seed, vsn=vsn, full_codec=opts.full_codec)
    sim.warm_start()
    setup = time.perf_counter() - t0
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], *(sim.nodes[i].awareness_score for i in slow))
        sim.at(sim.now + 1.0, sample)

    sim.at(1.0, sample)
    t1 = time.perf_counter()
    sim.run_until(opts.duration)
    run = time.perf_counter() - t1
    raised = [s for s in sim.suspicions if s.origin]
    deaths = sim.deaths
    counters = sim.counters()
    out = {
        "mode": "lifeguard" if lifeguard else "plain_swim",
        "slow_nodes": k,
        "false_suspicions_healthy": sum(s.member not in slow for s in raised),
        "false_suspicions_slow": sum(s.member in slow for s in raised),
        "false_suspicions_by_slow": sum(s.observer in slow for s in raised),
        "false_suspect_views": len(sim.suspicions),
        "false_deaths_healthy": sum(d.member not in slow for d in deaths),
        "false_deaths_slow": sum(d.member in slow for d in deaths),
        "refutations": counters["refutations"],
        "peak_awareness_slow": peak[0],
        "load_per_node_s": _per_node_s(sim.traffic, n, opts.duration),
        "wall_setup_s": round(setup, 2),
        "wall_run_s": round(run, 2),
    }
    return out


def partition_scenario(n: int, loss: float, opts: Options) -> dict[str, Any]:
    assert opts.partition is not None
    start, end, frac = opts.partition
    seed = f"{opts.seed}/{n}/{loss}/partition"
    pick = random.Random(f"pick/{seed}")
    side = frozenset(pick.sample(range(n), max(1, round(n * frac))))
    t0 = time.perf_counter()
    net = opts.net(loss, partitions=(Partition(start, end, side),))
    sim = Simulator(n, net, Config(), seed, full_codec=opts.full_codec)
    sim.warm_start()
    healed: list[float] = []

    def check() -> None:
        if not sim.dead_views:
            healed.append(sim.now)
        else:
            sim.at(sim.now + 0.5, check)

    sim.at(end, check)
    sim.run_until(max(opts.duration, end + 1.0))
    during = [d for d in sim.deaths if d.time < end]
    after = [d for d in sim.deaths if d.time >= end]
    out = {
        "side": len(side),
        "start": start,
        "end": end,
        "deaths_across_during": sum((d.observer in side) != (d.member in side) for d in during),
        "deaths_same_side_during": sum((d.observer in side) == (d.member in side) for d in during),
        "deaths_after_end": len(after),
        "dead_views_at_end": len(sim.dead_views),
        "healed_after_end_s": round(healed[0] - end, 3) if healed else None,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    return out


def run_row(n: int, loss: float, opts: Options) -> dict[str, Any]:
    t0 = time.perf_counter()
    progress(f"N={n} loss={loss:g}%: crash scenario ({opts.duration:g} virtual s)")
    row: dict[str, Any] = {"nodes": n, "loss_pct": loss, "crash": crash_scenario(n, loss, opts)}
    gc.collect()
    c = row["crash"]
    progress(f"  setup {c['wall_setup_s']} s, run {c['wall_run_s']} s, {c['events']} events")
    if opts.compare:
        for lifeguard in (True, False):
            mode = "lifeguard" if lifeguard else "plain SWIM"
            progress(f"N={n} loss={loss:g}%: slow members, {mode}")
            res = slow_scenario(n, loss, opts, lifeguard=lifeguard)
            row["lifeguard" if lifeguard else "plain_swim"] = res
            gc.collect()
            progress(f"  setup {res['wall_setup_s']} s, run {res['wall_run_s']} s")
        row["fp_ratio"] = _ratio(
            row["plain_swim"]["false_suspicions_healthy"],
            row["lifeguard"]["false_suspicions_healthy"],
        )
        row["fp_ratio_all"] = _ratio(
            row["plain_swim"]["false_suspicions_healthy"]
            + row["plain_swim"]["false_suspicions_slow"],
            row["lifeguard"]["false_suspicions_healthy"]
            + row["lifeguard"]["false_suspicions_slow"],
        )
    if opts.partition is not None:
        progress(f"N={n} loss={loss:g}%: partition")
        row["partition"] = partition_scenario(n, loss, opts)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def _ratio(swim: int, lifeguard: int) -> float | None:
    """plain SWIM / Lifeguard; None when both are 0, inf when only Lifeguard's is."""
    if lifeguard == 0:
        return None if swim == 0 else math.inf
    return round(swim / lifeguard, 2)


# ------------------------------------------------------------------------------ reporting


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


COLUMNS = [
    ("N", 6),
    ("loss", 5),
    ("susp1", 6),
    ("dead1", 6),
    ("deadAll", 8),
    ("fSusp", 6),
    ("fDead", 6),
    ("msg/n/s", 8),
    ("tcp/n/s", 8),
    ("udpB/n/s", 9),
    ("tcpB/n/s", 9),
    ("ndb", 6),
    ("LG fp", 6),
    ("SW fp", 6),
    ("SW/LG", 6),
    ("LGdd", 5),
    ("SWdd", 5),
    ("wall", 7),
]


def render(rows: Sequence[dict[str, Any]], mach: dict[str, Any], opts: Options) -> str:
    cpu = f" ({mach['cpu']})" if mach["cpu"] else ""
    lines = [
        "vxnet gossip simulation: memberlist SWIM+Lifeguard cores on virtual time (one process)",
        f"machine: nproc {mach['nproc']}{cpu}, Linux {mach['kernel']}, {mach['python']}",
        f"run: {opts.duration:g} virtual s per scenario, seed {opts.seed}, crash at "
        f"{opts.warmup:g} s, one-way delay {opts.delay_ms:g}+U(0,{opts.jitter_ms:g}) ms, "
        f"slow members {opts.slow_frac:.0%} (min 1), UDP through the real codec, "
        + ("TCP too" if opts.full_codec else "TCP objects (push/pull bytes sampled 1/16)"),
        "",
        " ".join(f"{h:>{w}}" for h, w in COLUMNS),
    ]
    for r in rows:
        c = r["crash"]
        load = c["load_per_node_s"]
        db = c["networkdb"]
        lg = r.get("lifeguard")
        sw = r.get("plain_swim")
        cells = [
            str(r["nodes"]),
            f"{r['loss_pct']:g}%",
            _f(c["first_suspect_s"]),
            _f(c["first_dead_s"]),
            _f(c["all_dead_s"]) if c["all_dead_s"] is not None else c["dead_seen_by"],
            str(c["false_suspicions"]),
            str(c["false_deaths"]),
            _f(load["msgs"], 2),
            _f(load["tcp_ops"], 3),
            _f(load["udp_bytes"], 0),
            _f(load["tcp_bytes"], 0),
            (_f(db.get("all_s"), 2) if db.get("converged") else db.get("reached", "-"))
            if db["enabled"]
            else "n/a",
            str(lg["false_suspicions_healthy"]) if lg else "-",
            str(sw["false_suspicions_healthy"]) if sw else "-",
            _f(r.get("fp_ratio")) if lg else "-",
            str(lg["false_deaths_healthy"] + lg["false_deaths_slow"]) if lg else "-",
            str(sw["false_deaths_healthy"] + sw["false_deaths_slow"]) if sw else "-",
            _f(r["wall_s"]),
        ]
        lines.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(cells, COLUMNS, strict=True)))
    lines += [
        "",
        "susp1/dead1/deadAll: s from the crash to the first node suspecting / declaring it dead,",
        "  and to the last live node declaring it dead (a/b: only a of b did by the end).",
        "fSusp: suspicions raised by a failed probe against a live member; fDead: a live member",
        "  declared dead (per observer).  msg/n/s: memberlist UDP datagrams + TCP exchanges per",
        "  node per second; tcp/n/s: the TCP exchanges alone; udpB/n/s, tcpB/n/s: their payload",
        "  bytes per node per second (push/pull state dominates TCP).",
        "ndb: s until every live node has one networkdb table write (n/a: N > --netdb-max).",
        "LG fp / SW fp: with slow members, suspicions raised against healthy members, Lifeguard",
        "  vs plain SWIM (SW/LG: their ratio, inf: Lifeguard raised none); LGdd/SWdd: false",
        "  deaths.  wall: s of wall time for the row (all its scenarios, set-up included).",
    ]
    crash_walls = [
        f"N={r['nodes']} loss={r['loss_pct']:g}%: set-up {r['crash']['wall_setup_s']} s + "
        f"run {r['crash']['wall_run_s']} s"
        for r in rows
    ]
    lines += ["", "crash scenario wall time (warm start + simulation):", *crash_walls]
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], opts: Options) -> list[dict[str, Any]]:
    """The issue's targets against what was measured (verdict None: not measured)."""
    out: list[dict[str, Any]] = []
    by_loss: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        by_loss.setdefault(r["loss_pct"], []).append(r)
    for loss, unsorted in sorted(by_loss.items()):
        group = sorted(unsorted, key=lambda r: r["nodes"])
        if len(group) < 2:
            continue
        dead = [r["crash"]["first_dead_s"] for r in group]
        full = [r["crash"]["all_dead_s"] for r in group]
        sizes = ", ".join(
            f"N={r['nodes']}: {_f(d)}/{_f(a)} s" for r, d, a in zip(group, dead, full, strict=True)
        )
        known = [v for v in full if v is not None]
        ok = None not in dead and len(known) == len(full)
        spread = max(known) / min(known) if ok and min(known) > 0 else None
        out.append(
            {
                "target": f"detection time flat in N (loss {loss:g}%)",
                "measured": f"first dead / all dead: {sizes}"
                + (f"; all-dead max/min x{spread:.2f}" if spread else ""),
                "criterion": f"all-dead max/min <= {FLAT_DETECTION}",
                "met": spread is not None and spread <= FLAT_DETECTION,
            }
        )
        msgs = [r["crash"]["load_per_node_s"]["msgs"] for r in group]
        byts = [r["crash"]["load_per_node_s"]["bytes"] for r in group]
        spread = max(msgs) / min(msgs) if min(msgs) > 0 else math.inf
        out.append(
            {
                "target": f"per-node load flat in N (loss {loss:g}%)",
                "measured": ", ".join(
                    f"N={r['nodes']}: {m:.2f} msg, {b:.0f} B"
                    for r, m, b in zip(group, msgs, byts, strict=True)
                )
                + f" per node per s; msgs max/min x{spread:.2f}"
                + f", bytes x{max(byts) / min(byts):.2f}",
                "criterion": f"msgs max/min <= {FLAT_LOAD}",
                "met": spread <= FLAT_LOAD,
            }
        )
    ten = [r for r in rows if r["loss_pct"] == 10]
    if ten:
        fd = {r["nodes"]: r["crash"]["false_deaths"] for r in ten}
        out.append(
            {
                "target": "zero false deaths at 10 % loss with Lifeguard (crash scenario)",
                "measured": ", ".join(f"N={k}: {v}" for k, v in fd.items()),
                "criterion": "0",
                "met": all(v == 0 for v in fd.values()),
            }
        )
    cmp_rows = [r for r in rows if "fp_ratio" in r]
    if cmp_rows:
        parts = []
        met = True
        for r in cmp_rows:
            ratio = r["fp_ratio"]
            lg, sw = r["lifeguard"], r["plain_swim"]
            parts.append(
                f"N={r['nodes']} loss {r['loss_pct']:g}%: SWIM {sw['false_suspicions_healthy']}"
                f" / LG {lg['false_suspicions_healthy']} = {_f(ratio)}x"
            )
            met = met and ratio is not None and ratio > LIFEGUARD_CLAIM
        deaths = "; ".join(
            f"N={r['nodes']} loss {r['loss_pct']:g}%: SWIM "
            f"{r['plain_swim']['false_deaths_healthy'] + r['plain_swim']['false_deaths_slow']}"
            f" / LG {r['lifeguard']['false_deaths_healthy'] + r['lifeguard']['false_deaths_slow']}"
            for r in cmp_rows
        )
        parts.append(f"false deaths: {deaths}")
        out.append(
            {
                "target": "Lifeguard false-positive reduction under slow members (paper: >50x)",
                "measured": "; ".join(parts),
                "criterion": f"> {LIFEGUARD_CLAIM:g}x (suspicions against healthy members)",
                "met": met,
            }
        )
    big = [r for r in rows if r["nodes"] == 1000]
    if big:
        walls = [r["crash"]["wall_run_s"] * 120.0 / opts.duration for r in big]
        setups = [r["crash"]["wall_setup_s"] for r in big]
        out.append(
            {
                "target": "1,000 nodes x 120 virtual s in < 60 s of wall time",
                "measured": ", ".join(
                    f"loss {r['loss_pct']:g}%: {w:.1f} s (+ {s:.1f} s warm start)"
                    for r, w, s in zip(big, walls, setups, strict=True)
                )
                + ("" if opts.duration == 120 else f" (scaled from {opts.duration:g} s)"),
                "criterion": f"simulation < {WALL_TARGET:g} s",
                "met": all(w < WALL_TARGET for w in walls),
            }
        )
    return out


def render_targets(items: Sequence[dict[str, Any]]) -> str:
    lines = ["", "targets:"]
    for t in items:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        lines.append(f"  [{verdict}] {t['target']}: {t['measured']} (criterion: {t['criterion']})")
    if not items:
        lines.append("  (nothing to compare: run several N, loss 10 %, N = 1,000)")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """A 2x2 PNG; returns why it was skipped, or None."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): plot skipped"
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax_det, ax_load, ax_bytes, ax_fp = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    losses = sorted({r["loss_pct"] for r in rows})
    for k, loss in enumerate(losses):
        color = f"C{k % 10}"
        group = sorted((r for r in rows if r["loss_pct"] == loss), key=lambda r: r["nodes"])
        ns = [r["nodes"] for r in group]
        first = [r["crash"]["first_dead_s"] for r in group]
        full = [r["crash"]["all_dead_s"] for r in group]
        first_y = [math.nan if v is None else v for v in first]
        full_y = [math.nan if v is None else v for v in full]
        ax_det.plot(ns, first_y, "o--", color=color, label=f"first, {loss:g}%")
        ax_det.plot(ns, full_y, "s-", color=color, label=f"all, {loss:g}%")
        msgs = [r["crash"]["load_per_node_s"]["msgs"] for r in group]
        byts = [r["crash"]["load_per_node_s"]["bytes"] for r in group]
        ax_load.plot(ns, msgs, "o-", color=color, label=f"{loss:g}%")
        ax_bytes.plot(ns, byts, "o-", color=color, label=f"{loss:g}%")
    for ax, title, unit in (
        (ax_det, "crash: time to dead (first / every live node)", "s after crash"),
        (ax_load, "memberlist messages per node per s", "datagrams + TCP exchanges"),
        (ax_bytes, "memberlist bytes per node per s", "payload bytes"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    cmp_rows = [r for r in rows if "lifeguard" in r]
    if cmp_rows:
        labels = [f"{r['nodes']}\n{r['loss_pct']:g}%" for r in cmp_rows]
        x = list(range(len(cmp_rows)))
        lg = [r["lifeguard"]["false_suspicions_healthy"] for r in cmp_rows]
        sw = [r["plain_swim"]["false_suspicions_healthy"] for r in cmp_rows]
        ax_fp.bar([i - 0.2 for i in x], [max(v, 0.5) for v in lg], 0.4, label="Lifeguard")
        ax_fp.bar([i + 0.2 for i in x], [max(v, 0.5) for v in sw], 0.4, label="plain SWIM")
        ax_fp.set_xticks(x, labels)
        ax_fp.set_yscale("log")
        ax_fp.set_ylabel("suspicions of healthy members (0 drawn as 0.5)")
        ax_fp.set_title("slow members: false positives")
        ax_fp.legend(fontsize=7)
    else:
        ax_fp.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ entry point


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _partition(text: str) -> tuple[float, float, float]:
    try:
        start, end, frac = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("--partition wants START:END:FRACTION") from None
    if not (0 <= start < end and 0 < frac < 1):
        raise argparse.ArgumentTypeError("--partition: 0 <= START < END, 0 < FRACTION < 1")
    return start, end, frac


def parse(argv: Sequence[str]) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m bench.gossip_sim",
        description="Simulate memberlist/networkdb clusters on virtual time and report detection "
        "times, false positives, load, Lifeguard vs plain SWIM and wall time.",
    )
    p.add_argument("--nodes", type=_numbers, help="cluster sizes (default 100,1000)")
    p.add_argument("--loss", type=_numbers, help="UDP loss rates in %% (default 0,5,10,20)")
    p.add_argument("--duration", type=float, help="virtual seconds per scenario (default 120)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="N=100, loss 0,10, 60 virtual s")
    p.add_argument("--warmup", type=float, default=10.0, help="crash time (virtual s)")
    p.add_argument("--slow-frac", type=float, default=0.02, help="fraction of slow members")
    p.add_argument("--netdb-max", type=int, default=1000, help="largest N with networkdb")
    p.add_argument("--no-compare", action="store_true", help="skip Lifeguard vs plain SWIM")
    p.add_argument("--partition", type=_partition, metavar="START:END:FRAC")
    p.add_argument("--full-codec", action="store_true", help="TCP messages through the codec too")
    p.add_argument("--delay-ms", type=float, default=2.0, help="one-way base delay")
    p.add_argument("--jitter-ms", type=float, default=8.0, help="one-way delay jitter (uniform)")
    p.add_argument("--profile", metavar="N", type=int, help="cProfile, print the top N functions")
    args = p.parse_args(list(argv))
    opts = Options()
    if args.quick:
        opts.nodes, opts.losses, opts.duration = [100], [0.0, 10.0], 60.0
    if args.nodes is not None:
        opts.nodes = [int(x) for x in args.nodes]
    if args.loss is not None:
        opts.losses = list(args.loss)
    if args.duration is not None:
        opts.duration = args.duration
    opts.seed = args.seed
    opts.warmup = args.warmup
    opts.slow_frac = args.slow_frac
    opts.netdb_max = args.netdb_max
    opts.compare = not args.no_compare
    opts.partition = args.partition
    opts.full_codec = args.full_codec
    opts.delay_ms = args.delay_ms
    opts.jitter_ms = args.jitter_ms
    if any(n < 3 for n in opts.nodes):
        p.error("--nodes: at least 3 nodes")
    if any(not 0 <= x < 100 for x in opts.losses):
        p.error("--loss: percentages in [0, 100)")
    if opts.warmup >= opts.duration:
        p.error("--warmup must be shorter than --duration")
    return opts, args


def run(opts: Options) -> list[dict[str, Any]]:
    return [run_row(n, loss, opts) for n in opts.nodes for loss in opts.losses]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts, args = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    mach = machine()
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    rows = run(opts)
    if profiler is not None:
        profiler.disable()
    total = time.perf_counter() - t0
    checks = targets(rows, opts)
    print(render(rows, mach, opts))
    print(render_targets(checks))
    print(f"\ntotal wall time: {total:.1f} s")
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(args.profile)
        print(buf.getvalue(), file=sys.stderr)
    status = 0
    if args.plot:
        why = plot(rows, args.plot)
        if why is not None:
            print(f"plot: {why}")
        else:
            print(f"plot: {args.plot}")
    if args.json:
        doc = {
            "machine": mach,
            "options": asdict(opts),
            "rows": rows,
            "targets": checks,
            "wall_s": round(total, 2),
            "method": {
                "bootstrap": "warm start (bench.gossip_net docstring)",
                "udp": "every message through decode_message_untrusted (broadcasts cached)",
                "tcp": "message objects" if not opts.full_codec else "encode + decode",
                "tcp_bytes": "exact" if opts.full_codec else "exact; push/pull sampled 1/16",
                "plain_swim": {
                    "config": asdict(PLAIN_SWIM_CONFIG),
                    "vsn": list(PLAIN_SWIM_VSN),
                },
            },
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_jsonable(doc), f, indent=2)
        print(f"json: {args.json}")
    return status


def _jsonable(value: Any) -> Any:
    """Strict JSON: infinite ratios become the string "inf"."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
