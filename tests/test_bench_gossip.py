"""Smoke test of the gossip simulation benchmark (``bench.gossip_sim``): 30 nodes, seeded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import gossip_sim
from bench.gossip_lifeguard import compare, slow_scenario
from bench.gossip_sim import Options, crash_scenario, main
from vxnet.gossip.suspicion import suspicion_timeout

N = 30
OPTS = Options(nodes=[N], losses=[0.0], duration=40.0, seed=3, warmup=5.0)
WALL = ("wall_setup_s", "wall_run_s", "cpu_run_s")


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in WALL}


@pytest.fixture(scope="module")
def crash() -> dict[str, Any]:
    return crash_scenario(N, 0.0, OPTS)


def test_crash_is_detected_then_disseminated(crash: dict[str, Any]) -> None:
    lo = suspicion_timeout(4, N, 1.0)
    assert crash["first_suspect_s"] is not None
    assert crash["first_dead_s"] is not None
    assert crash["all_dead_s"] is not None, crash["dead_seen_by"]
    assert 0 <= crash["first_suspect_s"] <= crash["first_dead_s"] <= crash["all_dead_s"]
    assert crash["first_dead_s"] >= lo  # the suspicion timer runs at least its minimum
    assert crash["all_dead_s"] <= 6 * lo + 5  # ... and at most its maximum, then gossip
    assert crash["dead_seen_by"] == f"{N - 1}/{N - 1}"


def test_no_false_positives_without_loss(crash: dict[str, Any]) -> None:
    assert crash["false_deaths"] == 0
    assert crash["false_suspicions"] == 0


def test_load_and_networkdb_are_sane(crash: dict[str, Any]) -> None:
    load = crash["load_per_node_s"]
    assert 1.0 <= load["udp_msgs"] <= 6.0  # a probe (ping + ack) a second, some gossip
    # without loss a probe is a ping and an ack: two datagrams a node a second, give or take
    assert 1.8 <= load["probe_udp"] <= 2.2
    assert load["probe_udp"] + load["gossip_udp"] == pytest.approx(load["udp_msgs"], abs=0.01)
    assert load["udp_parts"] >= load["udp_msgs"]  # datagrams are counted, not their parts
    assert 0 < load["udp_bytes"] < 2000
    assert load["tcp_ops"] > 0  # push/pull (and one TCP ping fallback per failed probe)
    db = crash["networkdb"]
    assert db["enabled"] and db["converged"], db
    assert 0 < db["first_s"] <= db["all_s"] < 5.0


def test_a_seed_gives_the_same_figures(crash: dict[str, Any]) -> None:
    assert _strip(crash_scenario(N, 0.0, OPTS)) == _strip(crash)


def test_lossy_run_is_deterministic_and_counts_suspicions() -> None:
    lossy = Options(nodes=[N], losses=[20.0], duration=30.0, seed=4, warmup=5.0)
    a = crash_scenario(N, 20.0, lossy)
    b = crash_scenario(N, 20.0, lossy)
    assert _strip(a) == _strip(b)
    assert a["counters"]["probe_failures"] > 0
    assert a["load_per_node_s"]["udp_msgs"] > 1.0


def test_lifeguard_vs_plain_swim_with_a_stalled_member() -> None:
    opts = Options(nodes=[N], losses=[0.0], duration=40.0, seed=5, slow_frac=0.05)
    opts.stall, opts.stall_period = 15.0, 30.0
    lg = slow_scenario(N, 0.0, opts, lifeguard=True)
    swim = slow_scenario(N, 0.0, opts, lifeguard=False)
    assert lg["slow_nodes"] == swim["slow_nodes"] == 2
    assert lg["peak_awareness_slow"] >= 1
    assert swim["peak_awareness_slow"] == 0  # awareness_max_multiplier=1: Lifeguard is off
    assert swim["false_suspicions_healthy"] > lg["false_suspicions_healthy"]
    # a stalled member cannot hear refutations: plain SWIM's fixed timeout kills healthy ones
    assert swim["fp_healthy"] > 0
    assert lg["fp_healthy"] == 0
    assert _strip(slow_scenario(N, 0.0, opts, lifeguard=False)) == _strip(swim)


def test_compare_sums_paired_runs() -> None:
    opts = Options(nodes=[N], losses=[0.0], duration=30.0, seed=6, runs=2)
    opts.stall, opts.stall_period = 15.0, 30.0
    c = compare(N, 0.0, opts)
    assert c["runs"] == 2 and len(c["plain_swim"]["per_run_fp_healthy"]) == 2
    assert c["plain_swim"]["fp_healthy"] == sum(c["plain_swim"]["per_run_fp_healthy"])
    assert c["fp_ratio"] is None or c["fp_ratio"] >= 1


def test_plain_swim_turns_off_all_three_lifeguard_components() -> None:
    from bench.gossip_lifeguard import PLAIN_SWIM_CONFIG, PLAIN_SWIM_VSN

    assert PLAIN_SWIM_CONFIG.awareness_max_multiplier == 1  # no local health aware probe
    assert PLAIN_SWIM_CONFIG.suspicion_max_timeout_mult == 1  # no local health aware suspicion
    assert PLAIN_SWIM_CONFIG.disable_buddy_system  # no accusation on the ping to a suspect
    assert PLAIN_SWIM_VSN[1] == 3  # no nacks asked for


def test_main_prints_one_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gossip.json"
    png = tmp_path / "gossip.png"
    argv = ["--nodes", "20,40", "--loss", "0,10", "--duration", "25", "--seed", "2", "--runs", "1"]
    argv += ["--warmup", "5", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "machine: nproc" in text and "targets:" in text
    assert text.count(" susp1 ") == 1  # one table
    doc = json.loads(out.read_text())
    assert [(r["nodes"], r["loss_pct"]) for r in doc["rows"]] == [
        (20, 0.0),
        (20, 10.0),
        (40, 0.0),
        (40, 10.0),
    ]
    assert {"nproc", "kernel", "python"} <= set(doc["machine"])
    assert doc["method"]["plain_swim"]["config"]["awareness_max_multiplier"] == 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped" in text
    else:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--loss", "abc"]) == 2
    assert main(["--nodes", "2"]) == 2
    assert main(["--stall", "30:20"]) == 2
    assert main(["--runs", "0"]) == 2
    assert gossip_sim.main(["--help"]) == 0
    capsys.readouterr()
