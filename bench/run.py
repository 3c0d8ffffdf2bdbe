"""``vxnet bench``: kernel VXLAN and vxnet in the same two-host topology, measured the same way.

(a) :func:`vxnet.lab.kernel.kernel_pair` -- two namespaces with kernel ``vxlan`` devices on one
fabric, a container behind each; (b) a two-host vxnet lab (offloads on, the default), an
``iperf3`` container on h1 and an ``idle`` one on h2, on a plain network and (``--encrypted``)
an encrypted one; (c) the same lab with ``--no-offload`` daemons.  On each: ping RTT, then
``repeats`` rounds of TCP 1 stream, TCP N streams and UDP 1400-byte packets/s
(:mod:`bench.measure`), CPU and daemon memory from /proc.  Then one table side by side, with
ratios to the kernel.

A side that fails is reported as failed (and the exit status is 1); no figure is printed that
was not measured in this run.  Every namespace is removed at the end, on errors too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.hops import Point, measure_hops, render_hops, summarize
from bench.measure import (
    IPERF_PORT,
    PING_COUNT,
    PING_INTERVAL,
    UDP_PAYLOAD,
    Runner,
    Side,
    machine,
    measure,
    progress,
)
from vxnet import netns
from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU, VXLAN_OVERHEAD
from vxnet.lab import Lab
from vxnet.lab.kernel import VXLAN_PORT, kernel_pair
from vxnet.lab.topology import default_spec
from vxnet.manager.networks import MTU_OPTION, mtu_ceilings

__all__ = ["Side", "run_bench"]


def _runner(ns: str) -> Runner:
    def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns.exec_argv(ns, argv), check=False, capture_output=True, text=True, timeout=timeout
        )

    return run


def bench_kernel(
    duration: int,
    repeats: int,
    streams: int,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    hops: bool = False,
) -> Side:
    side = Side("kernel VXLAN", path="kernel")
    name = "benchk" + secrets.token_hex(3)
    progress(f"kernel VXLAN: building the pair (vx-{name}-*)")
    mtu = underlay_mtu - VXLAN_OVERHEAD
    try:
        with kernel_pair(f"vx-{name}-", mtu=mtu, underlay_mtu=underlay_mtu) as pair:
            srv, cli = pair.containers  # srv behind h1, cli behind h2, as on the vxnet side
            server = subprocess.Popen(
                netns.exec_argv(srv.namespace, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                measure(
                    side,
                    _runner(cli.namespace),
                    _runner(srv.namespace),
                    srv.ip,
                    duration,
                    repeats,
                    streams,
                )
                if hops:
                    points = _points(cli.namespace, pair.fabric, srv.namespace)
                    measure_hops(side, _runner(cli.namespace), srv.ip, points)
            finally:
                server.terminate()
                server.wait(timeout=10)
    except Exception as exc:  # report this side as failed and go on to the other
        side.error = f"{type(exc).__name__}: {exc}"
    _check_removed(side, f"vx-{name}-")
    return side


def _points(client_ns: str, fabric_ns: str, server_ns: str) -> list[Point]:
    """The client's eth0, its host's (h2's) port on the fabric bridge, the server's eth0."""
    return [
        Point(client_ns, "eth0"),
        Point(fabric_ns, "h2", vxlan_port=VXLAN_PORT),
        Point(server_ns, "eth0"),
    ]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Daemons started meanwhile inherit these (the lab passes its environment on)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_vxnet(
    duration: int,
    repeats: int,
    streams: int,
    encrypted: bool = False,
    offload: bool = True,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    hops: bool = False,
) -> list[Side]:
    """vxnet plain, and (with ``encrypted``) an encrypted overlay beside it in the same lab."""
    suffix = "" if offload else " offloads off"
    sides = [Side("vxnet" + suffix)] + ([Side("vxnet encrypted")] if encrypted else [])
    name = "benchv" + secrets.token_hex(3)
    progress(f"vxnet{suffix}: building lab {name} (2 hosts, underlay MTU {underlay_mtu})")
    env = {} if offload else {"VXNET_NO_OFFLOAD": "1"}
    spec = default_spec(name, 2, underlay_mtu=underlay_mtu)
    plain_mtu, secret_mtu = mtu_ceilings(underlay_mtu)
    try:
        with _environment(**env), Lab(spec=spec) as lab:
            info = lab.client("h1").get("/info")
            daemons = [int(lab.state["hosts"][h]["pid"]) for h in ("h1", "h2")]
            networks = {"plain": [f"{MTU_OPTION}={plain_mtu}"]}
            if encrypted:
                networks["secret"] = ["encrypted", f"{MTU_OPTION}={secret_mtu}"]
            for net, options in networks.items():
                lab.manager.post(
                    "/swarm/networks", {"name": net, "attachable": True, "options": options}
                )
            for side, net in zip(sides, networks, strict=True):
                side.path = str(info.get("dataplane_path", "?"))
                if net == "secret":
                    side.path = "per-frame ESP"
                progress(f"{side.name}: network {net} ({side.path})")
                try:
                    srv = lab.run("h1", f"srv-{net}", net, "iperf3")
                    cli = lab.run("h2", f"cli-{net}", net, "idle")
                    measure(
                        side,
                        _runner(cli["netns"]),
                        _runner(srv["netns"]),
                        srv["ip"],
                        duration,
                        repeats,
                        streams,
                        daemons,
                    )
                    if hops and net == "plain":  # ESP on the fabric is not matched (hops.py)
                        points = _points(cli["netns"], lab.fabric_netns, srv["netns"])
                        measure_hops(side, _runner(cli["netns"]), srv["ip"], points)
                except Exception as exc:  # this side failed; the other may still be measured
                    side.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # report as failed; Lab.__exit__ has torn it down
        for side in sides:
            side.error = side.error or f"{type(exc).__name__}: {exc}"
    for side in sides:
        _check_removed(side, f"vx-{name}-")
    return sides


def aes_gcm_ceiling(seconds: float = 0.5) -> dict[str, float]:
    """The raw AES-128-GCM rate of this machine (one core, cryptography's AESGCM), Gbit/s."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(bytes(16))
    out: dict[str, float] = {}
    for size in (1400, 65536):
        data, nonce, n = bytes(size), bytes(12), 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            aead.encrypt(nonce, data, None)
            n += 1
        out[f"gbps_{size}"] = n * size * 8 / (time.perf_counter() - t0) / 1e9
    return out


def _check_removed(side: Side, prefix: str) -> None:
    left = netns.list_with_prefix(prefix)
    if left:
        msg = f"namespaces left behind: {', '.join(left)} (`vxnet lab down --name ...`)"
        side.error = f"{side.error}; {msg}" if side.error else msg


# ------------------------------------------------------------------------------ reporting


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(vx: float | None, k: float | None) -> str:
    if vx is None or k is None or k == 0:
        return "-"
    return f"{vx / k:.2f}"


ROWS = [
    ("TCP 1 stream Gbit/s  median", "tcp1_gbps_median"),
    ("                     min", "tcp1_gbps_min"),
    ("                     max", "tcp1_gbps_max"),
    ("TCP {n} streams Gbit/s median", "tcpn_gbps_median"),
    ("                     min", "tcpn_gbps_min"),
    ("                     max", "tcpn_gbps_max"),
    ("UDP 1400 B kpps rx   median", "udp_kpps_median"),
    ("                     min", "udp_kpps_min"),
    ("                     max", "udp_kpps_max"),
    ("ping RTT ms          p50", "rtt_p50_ms"),
    ("                     p99", "rtt_p99_ms"),
    ("CPU cores per Gbit/s machine", "cores_per_gbps_median"),
    ("                     daemons", "daemon_cores_per_gbps_median"),
    ("daemon RSS MB        idle", "rss_idle_mb"),
    ("                     peak", "rss_peak_mb"),
]


def render(
    mach: dict[str, Any],
    sides: list[Side],
    duration: int,
    repeats: int,
    streams: int,
    ceiling: dict[str, float] | None,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
) -> str:
    sums = [s.summary() for s in sides]
    plain_mtu, secret_mtu = mtu_ceilings(underlay_mtu)
    cpu = f" ({mach['cpu']})" if mach["cpu"] else ""
    names = [s.name.replace("vxnet ", "") if s.name != "vxnet" else "vxnet" for s in sides]
    lines = [
        "vxnet bench: kernel VXLAN vs vxnet, same two-host namespace topology "
        f"(underlay MTU {underlay_mtu}; network MTU {plain_mtu}, encrypted: {secret_mtu})",
        f"machine: {mach['nproc']} CPUs{cpu}, Linux {mach['kernel']}, {mach['python']}",
        "paths: " + "; ".join(f"{s.name}: {s.path or '?'}" for s in sides),
        f"{repeats} rounds of: iperf3 TCP 1 stream, TCP {streams} streams, UDP {UDP_PAYLOAD}-byte "
        f"payload (1400-byte packets) unlimited rate, {duration} s each; ping: {PING_COUNT} "
        f"echoes every {float(PING_INTERVAL) * 1000:.0f} ms",
        "",
        f"{'':30}"
        + "".join(f"{n:>13}" for n in names)
        + "".join(f"{n[:9] + '/k':>12}" for n in names[1:]),
    ]
    lower_is_better = {"rtt_p50_ms", "rtt_p99_ms"}
    for label, key in ROWS:
        vals = [sm.get(key) for sm in sums]
        if all(v is None for v in vals):
            continue
        line = f"{label.format(n=streams):30}" + "".join(f"{_fmt(v):>13}" for v in vals)
        if key.endswith(("_median", "_p50_ms", "_p99_ms")) and not key.startswith(
            ("cores", "daemon")
        ):
            ratio = [_ratio(v, vals[0]) for v in vals[1:]]
            line += "".join(f"{r:>12}" for r in ratio)
            if key in lower_is_better:
                line += "  (x kernel)"
        lines.append(line)
    replies = [f"{len(s.rtt_ms)}/{s.pings_sent}" if s.pings_sent else "-" for s in sides]
    lines.append(f"{'ping replies':30}" + "".join(f"{r:>13}" for r in replies))
    if ceiling is not None:
        lines += [
            "",
            f"encryption ceiling on this machine (raw AES-128-GCM, one core): "
            f"{ceiling['gbps_1400']:.2f} Gbit/s at 1400 B, {ceiling['gbps_65536']:.2f} Gbit/s "
            "at 64 KB",
            "kernel ESP: not measured -- this kernel has no ESP/GCM (CONFIG_INET_ESP, "
            "CONFIG_CRYPTO_GCM off), so it cannot be a baseline here",
        ]
    for s in sides:
        if not s.ok:
            lines.append(f"{s.name} FAILED: {s.error or 'incomplete measurement'}")
    return "\n".join(lines)


def plot(path: str, sides: list[Side]) -> None:
    """Bars of each vxnet side's ratio to the kernel, per measure (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("TCP 1", "tcp1_gbps_median"),
        ("TCP N", "tcpn_gbps_median"),
        ("UDP pps", "udp_kpps_median"),
        ("RTT p50 (lower better)", "rtt_p50_ms"),
    ]
    kernel = sides[0].summary()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(sides) - 1)
    for i, side in enumerate(sides[1:]):
        sm = side.summary()
        vals = [sm[k] / kernel[k] if k in sm and kernel.get(k) else 0.0 for _, k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=side.name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [k for k, _ in keys])
    ax.set_ylabel("vxnet / kernel VXLAN")
    ax.set_title("vxnet bench: ratios to kernel VXLAN, measured side by side")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_bench(
    duration: int = 10,
    repeats: int = 3,
    json_path: str | None = None,
    encrypted: bool = False,
    streams: int = 4,
    plot_path: str | None = None,
    no_offload_row: bool = True,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    hops: bool = False,
) -> int:
    """Measure every side, print one table; 0 if all were measured, 1 otherwise."""
    if os.geteuid() != 0:
        print("vxnet bench needs root (network namespaces): run it with sudo", file=sys.stderr)
        return 1
    mach = machine()
    started = time.time()
    sides = [bench_kernel(duration, repeats, streams, underlay_mtu, hops)]
    sides += bench_vxnet(
        duration, repeats, streams, encrypted, underlay_mtu=underlay_mtu, hops=hops
    )
    if no_offload_row:
        sides += bench_vxnet(
            duration, repeats, streams, offload=False, underlay_mtu=underlay_mtu, hops=hops
        )
    ceiling = aes_gcm_ceiling() if encrypted else None
    print(render(mach, sides, duration, repeats, streams, ceiling, underlay_mtu), flush=True)
    if hops:
        print(render_hops([(s.name, summarize(s.hop_us)) for s in sides if s.hop_us]))
    if json_path:
        doc = {
            "machine": mach,
            "started": started,
            "params": {
                "duration": duration,
                "repeats": repeats,
                "streams": streams,
                "udp_payload": UDP_PAYLOAD,
                "underlay_mtu": underlay_mtu,
                "ping_count": PING_COUNT,
                "ping_interval_s": float(PING_INTERVAL),
            },
            "aes_gcm_ceiling_gbps": ceiling,
            "sides": {s.name: dict(asdict(s), summary=s.summary(), ok=s.ok) for s in sides},
        }
        Path(json_path).write_text(json.dumps(doc, indent=1) + "\n")
        progress(f"raw samples and summary written to {json_path}")
    if plot_path:
        plot(plot_path, sides)
        progress(f"plot written to {plot_path}")
    return 0 if all(s.ok for s in sides) else 1
