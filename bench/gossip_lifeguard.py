"""Lifeguard vs plain SWIM with slow members: paired runs of :mod:`bench.gossip_net`.

A fraction of the nodes (``--slow-frac``, at least one) is *slow*: by default its receive path
stalls for ``--stall`` seconds once every ``--stall-period`` (each slow member at its own
phase), and what arrives meanwhile is processed when the stall ends.  Its timers keep running
and it keeps sending: this is the Lifeguard paper's "slow message processing" (a CPU-starved
member whose packet handler lags), where a slow member times out its probes, accuses healthy
members and cannot process their refutations in time.  ``--slow-model jitter`` is the milder
model of the previous benchmark: every delivery to a slow member is ``U(0.4, 1.6)`` s late.

Nothing crashes.  Each of ``--runs`` runs uses its own seed (its own network and slow members)
and runs twice with the same seed:

* *Lifeguard*: DefaultLAN.  Local Health Aware Probe (missed nacks and refutations raise the
  awareness score, which stretches the probe interval and deadline up to x8), Local Health
  Aware Suspicion (a suspicion starts at 6x the minimum timeout and shrinks to it only with 2
  independent confirmations), Buddy System (a ping to a suspect carries the accusation).
* *plain SWIM*: :data:`PLAIN_SWIM_CONFIG` and protocol max 3: awareness capped at x1 (probes
  never stretch; with nacks gone too, as protocol 3 does not ask for them), a fixed suspicion
  timeout of ``suspicion_mult * log10(N) * probe_interval`` (maximum = minimum), and no buddy
  system (``Config.disable_buddy_system``, a vxnet-only switch).  Left in both, as in SWIM:
  indirect probes, the suspicion mechanism itself, refutation by incarnation, TCP fallback.

A *false positive* is a live member declared dead by a node's own suspicion timer (the
paper's false-positive failure detection), counted once per member and incarnation: the Dead
messages that follow, and other nodes' timers expiring on the same suspicion, are not counted
again (``fp_declarations`` counts every timer that expired).  They are counted against
healthy members and against slow ones, with the suspicions raised by failed probes.  The
factor is plain SWIM / Lifeguard, over the sum of the runs.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from bench.gossip_net import Simulator
from vxnet.gossip.config import Config
from vxnet.gossip.messages import DEFAULT_VSN

if TYPE_CHECKING:
    from bench.gossip_sim import Options

#: Plain SWIM advertises protocol max 3: indirect pings ask for no nacks.
PLAIN_SWIM_VSN = bytes([1, 3, 2, 0, 0, 0])
PLAIN_SWIM_CONFIG = Config(
    awareness_max_multiplier=1, suspicion_max_timeout_mult=1, disable_buddy_system=True
)
#: Summed over the runs; the factor is computed on the first.
COUNTS = (
    "fp_healthy",
    "fp_slow",
    "false_suspicions_healthy",
    "false_suspicions_slow",
    "dead_views_healthy",
    "dead_views_slow",
    "refutations",
)


def slow_scenario(
    n: int, loss: float, opts: Options, *, lifeguard: bool, run: int = 0
) -> dict[str, Any]:
    """One run: the same seed for both modes (a paired comparison)."""
    seed = f"{opts.seed}/{n}/{loss}/slow/{run}"
    pick = random.Random(f"pick/{seed}")
    k = max(1, round(n * opts.slow_frac))
    slow = frozenset(pick.sample(range(n), k))
    config = Config() if lifeguard else PLAIN_SWIM_CONFIG
    vsn = DEFAULT_VSN if lifeguard else PLAIN_SWIM_VSN
    t0 = time.perf_counter()
    net = opts.net(
        loss,
        slow=slow,
        slow_model=opts.slow_model,
        stall=opts.stall,
        stall_period=opts.stall_period,
    )
    sim = Simulator(n, net, config, seed, vsn=vsn, full_codec=opts.full_codec)
    sim.warm_start()
    setup = time.perf_counter() - t0
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], *(sim.nodes[i].awareness_score for i in slow))
        sim.at(sim.now + 1.0, sample)

    sim.at(1.0, sample)
    t1 = time.perf_counter()
    sim.run_until(opts.duration)
    run_s = time.perf_counter() - t1
    raised = [s for s in sim.suspicions if s.origin]
    # one false positive per (member, incarnation) some node's own timer declared dead
    origin = {(d.member, d.incarnation): d for d in sim.deaths if d.origin}.values()
    return {
        "mode": "lifeguard" if lifeguard else "plain_swim",
        "run": run,
        "slow_nodes": k,
        "fp_healthy": sum(d.member not in slow for d in origin),
        "fp_slow": sum(d.member in slow for d in origin),
        "fp_by_slow": sum(d.observer in slow for d in origin),
        "fp_declarations": sum(d.origin for d in sim.deaths),
        "false_suspicions_healthy": sum(s.member not in slow for s in raised),
        "false_suspicions_slow": sum(s.member in slow for s in raised),
        "false_suspicions_by_slow": sum(s.observer in slow for s in raised),
        "dead_views_healthy": sum(d.member not in slow for d in sim.deaths),
        "dead_views_slow": sum(d.member in slow for d in sim.deaths),
        "refutations": sim.counters()["refutations"],
        "peak_awareness_slow": peak[0],
        "wall_setup_s": round(setup, 2),
        "wall_run_s": round(run_s, 2),
    }


def compare(n: int, loss: float, opts: Options) -> dict[str, Any]:
    """``opts.runs`` paired runs; per-mode sums, the runs themselves, and the factors."""
    out: dict[str, Any] = {"runs": opts.runs, "model": _model(opts)}
    for lifeguard in (True, False):
        mode = "lifeguard" if lifeguard else "plain_swim"
        runs = [slow_scenario(n, loss, opts, lifeguard=lifeguard, run=r) for r in range(opts.runs)]
        total = {c: sum(r[c] for r in runs) for c in COUNTS}
        total["peak_awareness_slow"] = max(r["peak_awareness_slow"] for r in runs)
        total["slow_nodes"] = runs[0]["slow_nodes"]
        total["per_run_fp_healthy"] = [r["fp_healthy"] for r in runs]
        total["wall_s"] = round(sum(r["wall_setup_s"] + r["wall_run_s"] for r in runs), 2)
        out[mode] = total
    lg, sw = out["lifeguard"], out["plain_swim"]
    out["fp_ratio"] = ratio(sw["fp_healthy"], lg["fp_healthy"])
    out["fp_ratio_all"] = ratio(sw["fp_healthy"] + sw["fp_slow"], lg["fp_healthy"] + lg["fp_slow"])
    out["suspicion_ratio"] = ratio(sw["false_suspicions_healthy"], lg["false_suspicions_healthy"])
    return out


def ratio(swim: int, lifeguard: int) -> float | None:
    """plain SWIM / Lifeguard; None when both are 0, inf when only Lifeguard's is."""
    if lifeguard == 0:
        return None if swim == 0 else float("inf")
    return round(swim / lifeguard, 2)


def _model(opts: Options) -> str:
    if opts.slow_model == "jitter":
        return "jitter U(0.4,1.6) s"
    return f"stall {opts.stall:g} s every {opts.stall_period:g} s"
