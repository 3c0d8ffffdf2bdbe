"""The gossip simulation's report: one table, the issue's targets, a plot (``bench.gossip_sim``).

**Load.**  SWIM's claim is about the failure detector: each member sends and receives a
constant number of protocol-period messages (ping, ack, indirect ping and its relay, nack) per
period, whatever N.  Those are the ``probe`` datagrams; the target "per-node load flat in N"
is judged on them.  memberlist adds *gossip* datagrams: every ``gossip_interval`` it sends the
queued broadcasts to ``gossip_nodes`` members, if any are queued, so at most 15 a second with
the defaults.  How often the queue is non-empty grows with the cluster's rate of news (one
false suspicion and its refutation per few thousand probes at 10 % loss, i.e. proportional to
N), so total datagrams per node grow with N until they reach that ceiling, and bytes per node
keep growing with N (every node hears every refutation).  Both are reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.gossip_sim import Options

# Criteria the report applies to the targets ("flat in N" needs a number).
FLAT_DETECTION = 2.0  # max/min of all-dead time over N at one loss rate
FLAT_LOAD = 1.25  # max/min of probe datagrams per node per second over N at one loss rate
LIFEGUARD_CLAIM = 50.0
WALL_TARGET = 60.0  # seconds of wall time for 1,000 nodes x 120 virtual seconds


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
    ("prb/n/s", 8),
    ("gsp/n/s", 8),
    ("dg/n/s", 7),
    ("tcp/n/s", 8),
    ("udpB/n/s", 9),
    ("tcpB/n/s", 9),
    ("ndb", 6),
    ("LG fp", 6),
    ("SW fp", 6),
    ("SW/LG", 6),
    ("cpu", 6),
    ("wall", 7),
]


def _model(opts: Options) -> str:
    if opts.slow_model == "jitter":
        return "delivery U(0.4,1.6) s late"
    return f"receive stalls {opts.stall:g} s every {opts.stall_period:g} s"


def render(rows: Sequence[dict[str, Any]], mach: dict[str, Any], opts: Options) -> str:
    cpu = f" ({mach['cpu']})" if mach["cpu"] else ""
    lines = [
        "vxnet gossip simulation: memberlist SWIM+Lifeguard cores on virtual time (one process)",
        f"machine: nproc {mach['nproc']}{cpu}, Linux {mach['kernel']}, {mach['python']}",
        f"run: {opts.duration:g} virtual s per scenario, seed {opts.seed}, crash at "
        f"{opts.warmup:g} s, one-way delay {opts.delay_ms:g}+U(0,{opts.jitter_ms:g}) ms, "
        f"slow members {opts.slow_frac:.0%} (min 1, {_model(opts)}, {opts.runs} paired runs), "
        "UDP through the real codec, "
        + ("TCP too" if opts.full_codec else "TCP objects (push/pull bytes sampled 1/16)"),
        "",
        " ".join(f"{h:>{w}}" for h, w in COLUMNS),
    ]
    for r in rows:
        c = r["crash"]
        load = c["load_per_node_s"]
        db = c["networkdb"]
        cmp = r.get("compare")
        cells = [
            str(r["nodes"]),
            f"{r['loss_pct']:g}%",
            _f(c["first_suspect_s"]),
            _f(c["first_dead_s"]),
            _f(c["all_dead_s"]) if c["all_dead_s"] is not None else c["dead_seen_by"],
            str(c["false_suspicions"]),
            str(c["false_deaths"]),
            _f(load["probe_udp"], 2),
            _f(load["gossip_udp"], 2),
            _f(load["msgs"], 2),
            _f(load["tcp_ops"], 3),
            _f(load["udp_bytes"], 0),
            _f(load["tcp_bytes"], 0),
            (_f(db.get("all_s"), 2) if db.get("converged") else db.get("reached", "-"))
            if db["enabled"]
            else "n/a",
            str(cmp["lifeguard"]["fp_healthy"]) if cmp else "-",
            str(cmp["plain_swim"]["fp_healthy"]) if cmp else "-",
            _f(cmp["fp_ratio"]) if cmp else "-",
            _f(c["cpu_run_s"]),
            _f(r["wall_s"]),
        ]
        lines.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(cells, COLUMNS, strict=True)))
    lines += [
        "",
        "susp1/dead1/deadAll: s from the crash to the first node suspecting / declaring it dead,",
        "  and to the last live node declaring it dead (a/b: only a of b did by the end).",
        "fSusp: suspicions raised by a failed probe against a live member; fDead: a live member",
        "  declared dead (per observer).  Per node per second: prb = probe datagrams (ping, ack,",
        "  indirect ping, nack: SWIM's protocol-period messages), gsp = gossip datagrams (queued",
        "  broadcasts, at most gossip_nodes / gossip_interval = 15), dg = every memberlist",
        "  datagram + TCP exchange, tcp = TCP exchanges; udpB, tcpB: payload bytes (push/pull",
        "  state dominates TCP).",
        "ndb: s until every live node has one networkdb table write (n/a: N > --netdb-max).",
        "LG fp / SW fp: with slow members, live healthy members declared dead by a node's own",
        "  suspicion timer, Lifeguard vs plain SWIM, summed over the paired runs (SW/LG: their",
        "  ratio, inf: Lifeguard none).  cpu: CPU s of the crash simulation (set-up excluded);",
        "  wall: s of wall time for the row (all its scenarios, set-up included).",
    ]
    crash_walls = [
        f"N={r['nodes']} loss={r['loss_pct']:g}%: set-up {r['crash']['wall_setup_s']} s + "
        f"run {r['crash']['wall_run_s']} s (CPU {r['crash']['cpu_run_s']} s)"
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
        loads = [r["crash"]["load_per_node_s"] for r in group]
        probe = [x["probe_udp"] for x in loads]
        spread = max(probe) / min(probe) if min(probe) > 0 else math.inf
        total = [x["msgs"] for x in loads]
        byts = [x["bytes"] for x in loads]
        out.append(
            {
                "target": f"per-node load flat in N (loss {loss:g}%)",
                "measured": ", ".join(
                    f"N={r['nodes']}: {x['probe_udp']:.2f} probe + {x['gossip_udp']:.2f} gossip"
                    f" dg, {x['bytes']:.0f} B"
                    for r, x in zip(group, loads, strict=True)
                )
                + f" per node per s; probe max/min x{spread:.2f}"
                + f" (all datagrams x{max(total) / min(total):.2f}"
                + f", bytes x{max(byts) / min(byts):.2f}: see gossip_report)",
                "criterion": f"probe datagrams (SWIM's protocol period) max/min <= {FLAT_LOAD}",
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
    cmp_rows = [r for r in rows if "compare" in r]
    if cmp_rows:
        parts = []
        for r in cmp_rows:
            c = r["compare"]
            lg, sw = c["lifeguard"], c["plain_swim"]
            parts.append(
                f"N={r['nodes']} loss {r['loss_pct']:g}% ({c['runs']} runs, {c['model']}): "
                f"healthy members declared dead SWIM {sw['fp_healthy']} / LG {lg['fp_healthy']}"
                f" = {_f(c['fp_ratio'])}x; all live members {sw['fp_healthy'] + sw['fp_slow']}"
                f" / {lg['fp_healthy'] + lg['fp_slow']} = {_f(c['fp_ratio_all'])}x; suspicions"
                f" of healthy members {sw['false_suspicions_healthy']}"
                f" / {lg['false_suspicions_healthy']} = {_f(c['suspicion_ratio'])}x"
            )
        ratios = [r["compare"]["fp_ratio"] for r in cmp_rows]
        out.append(
            {
                "target": "Lifeguard false-positive reduction under slow members (paper: >50x)",
                "measured": "; ".join(parts),
                "criterion": f"> {LIFEGUARD_CLAIM:g}x (healthy members declared dead)",
                "met": all(x is not None and x > LIFEGUARD_CLAIM for x in ratios),
            }
        )
    big = [r for r in rows if r["nodes"] == 1000]
    if big:
        scale = 120.0 / opts.duration
        walls = [r["crash"]["wall_run_s"] * scale for r in big]
        out.append(
            {
                "target": "1,000 nodes x 120 virtual s in < 60 s of wall time",
                "measured": ", ".join(
                    f"loss {r['loss_pct']:g}%: {w:.1f} s wall, "
                    f"{r['crash']['cpu_run_s'] * scale:.1f} s CPU"
                    f" (+ {r['crash']['wall_setup_s']:.1f} s warm start)"
                    for r, w in zip(big, walls, strict=True)
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
        probe = [r["crash"]["load_per_node_s"]["probe_udp"] for r in group]
        msgs = [r["crash"]["load_per_node_s"]["msgs"] for r in group]
        byts = [r["crash"]["load_per_node_s"]["bytes"] for r in group]
        ax_load.plot(ns, probe, "o-", color=color, label=f"probe, {loss:g}%")
        ax_load.plot(ns, msgs, "s--", color=color, label=f"all, {loss:g}%")
        ax_bytes.plot(ns, byts, "o-", color=color, label=f"{loss:g}%")
    for ax, title, unit in (
        (ax_det, "crash: time to dead (first / every live node)", "s after crash"),
        (ax_load, "memberlist datagrams per node per s", "probe (SWIM) / all + TCP"),
        (ax_bytes, "memberlist bytes per node per s", "payload bytes"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    cmp_rows = [r for r in rows if "compare" in r]
    if cmp_rows:
        labels = [f"{r['nodes']}\n{r['loss_pct']:g}%" for r in cmp_rows]
        x = list(range(len(cmp_rows)))
        lg = [r["compare"]["lifeguard"]["fp_healthy"] for r in cmp_rows]
        sw = [r["compare"]["plain_swim"]["fp_healthy"] for r in cmp_rows]
        ax_fp.bar([i - 0.2 for i in x], [max(v, 0.5) for v in lg], 0.4, label="Lifeguard")
        ax_fp.bar([i + 0.2 for i in x], [max(v, 0.5) for v in sw], 0.4, label="plain SWIM")
        ax_fp.set_xticks(x, labels)
        ax_fp.set_yscale("log")
        ax_fp.set_ylabel("healthy members declared dead (0 drawn as 0.5)")
        ax_fp.set_title("slow members: false positives")
        ax_fp.legend(fontsize=7)
    else:
        ax_fp.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
