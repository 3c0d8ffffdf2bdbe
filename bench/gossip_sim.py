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
UDP datagrams (probe and gossip apart) and their bytes, TCP exchanges (push/pull, TCP ping
fallback) and their bytes; the CPU time of the simulation besides its wall time.

**slow members, Lifeguard vs plain SWIM** (:mod:`bench.gossip_lifeguard`, which says what
the slow-member model is, what plain SWIM turns off and what counts as a false positive):
``--runs`` paired runs, each with the same seed, network and slow members in both modes.

The load is split into probe datagrams (SWIM's protocol-period messages, the target "flat in
N" is judged on them) and gossip datagrams; :mod:`bench.gossip_report` explains why.

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
import pstats
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.gossip_lifeguard import PLAIN_SWIM_CONFIG, PLAIN_SWIM_VSN, compare
from bench.gossip_net import NetModel, Partition, Simulator, Traffic
from bench.gossip_report import plot, render, render_targets, targets
from bench.measure import machine
from vxnet.gossip.config import Config
from vxnet.gossip.networkdb import PEER_TABLE, PeerRecord
from vxnet.gossip.suspicion import suspicion_timeout

DB_WRITE_AT = 1.0
DB_TIMEOUT = 30.0


@dataclass
class Options:
    nodes: list[int] = field(default_factory=lambda: [100, 1000])
    losses: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 20.0])
    duration: float = 120.0
    seed: int = 1
    warmup: float = 10.0
    slow_frac: float = 0.02
    runs: int = 3
    slow_model: str = "stall"
    stall: float = 20.0
    stall_period: float = 60.0
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
        "probe_udp": round(traffic.probe_udp / d, 3),
        "gossip_udp": round(traffic.gossip_udp / d, 3),
        "gossip_bytes": round(traffic.gossip_bytes / d, 1),
        "udp_parts": round(traffic.udp_parts / d, 3),
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
    t1, c1 = time.perf_counter(), time.process_time()
    sim.run_until(opts.duration)
    run, cpu = time.perf_counter() - t1, time.process_time() - c1

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
        "cpu_run_s": round(cpu, 2),
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
        progress(f"N={n} loss={loss:g}%: slow members, Lifeguard vs plain SWIM, {opts.runs} runs")
        cmp = row["compare"] = compare(n, loss, opts)
        gc.collect()
        progress(f"  {cmp['lifeguard']['wall_s']} s + {cmp['plain_swim']['wall_s']} s")
    if opts.partition is not None:
        progress(f"N={n} loss={loss:g}%: partition")
        row["partition"] = partition_scenario(n, loss, opts)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


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


def _stall(text: str) -> tuple[float, float]:
    try:
        stall, period = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("--stall wants SECONDS:PERIOD") from None
    if not 0 < stall < period:
        raise argparse.ArgumentTypeError("--stall: 0 < SECONDS < PERIOD")
    return stall, period


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
    p.add_argument("--runs", type=int, default=3, help="paired Lifeguard/SWIM runs (seeds)")
    p.add_argument(
        "--slow-model", choices=("stall", "jitter"), default="stall", help="see gossip_lifeguard"
    )
    p.add_argument("--stall", type=_stall, metavar="SECONDS:PERIOD", help="default 20:60")
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
    opts.runs = args.runs
    opts.slow_model = args.slow_model
    if args.stall is not None:
        opts.stall, opts.stall_period = args.stall
    opts.netdb_max = args.netdb_max
    opts.compare = not args.no_compare
    opts.partition = args.partition
    opts.full_codec = args.full_codec
    opts.delay_ms = args.delay_ms
    opts.jitter_ms = args.jitter_ms
    if opts.runs < 1:
        p.error("--runs: at least 1")
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
