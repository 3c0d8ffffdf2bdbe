"""``vxnet bench``: kernel VXLAN and vxnet in the same two-host topology, measured the same way.

(a) :func:`vxnet.lab.kernel.kernel_pair` -- two namespaces with kernel ``vxlan`` devices on one
fabric, a container behind each; (b) a two-host vxnet lab, an ``iperf3`` container on h1 and an
``idle`` one on h2.  On each: ping RTT from the h2 container to the h1 container (one echo every
10 ms, each reply's ``time=``), then ``iperf3 -c`` single-stream TCP throughput, ``repeats``
times.  Then one table side by side, with the ratios vxnet/kernel.

A side that fails is reported as failed (and the exit status is 1); no figure is printed that
was not measured in this run.  Every namespace is removed at the end, on errors too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vxnet import netns
from vxnet.lab import Lab
from vxnet.lab.kernel import kernel_pair

Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess[str]]

IPERF_PORT = 5201
PING_COUNT = 200
PING_INTERVAL = "0.01"
DATAPLANE = "naive per-frame forwarder; offloads come with the fast-path issue"
_RTT_RE = re.compile(r"time=([0-9.]+) ms")


class BenchFailed(Exception):
    """A measurement could not be taken; the message says which and why."""


@dataclass
class Side:
    """What one side (kernel VXLAN or vxnet) measured: raw samples, or why it failed."""

    name: str
    bits_per_second: list[float] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)
    pings_sent: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.bits_per_second) and bool(self.rtt_ms)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.bits_per_second:
            gbps = [b / 1e9 for b in self.bits_per_second]
            out |= {
                "gbps_min": min(gbps),
                "gbps_median": statistics.median(gbps),
                "gbps_max": max(gbps),
            }
        if self.rtt_ms:
            out |= {
                "rtt_p50_ms": percentile(self.rtt_ms, 50),
                "rtt_p99_ms": percentile(self.rtt_ms, 99),
            }
        return out


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (a value that was measured, never interpolated)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ measuring


def wait_listening(run: Runner, port: int, timeout: float = 15.0) -> None:
    """Wait until something listens on TCP ``port`` where ``run`` runs commands."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(["ss", "-Hltn", f"sport = :{port}"], 10).stdout.strip():
            return
        time.sleep(0.05)
    raise BenchFailed(f"no iperf3 server listening on :{port} after {timeout:.0f} s")


def measure_rtt(side: Side, client: Runner, target: str) -> None:
    client(["ping", "-c", "3", "-i", "0.2", "-W", "1", target], 30)  # warm up caches, ARP
    argv = ["ping", "-n", "-c", str(PING_COUNT), "-i", PING_INTERVAL, "-W", "1", target]
    r = client(argv, PING_COUNT * 0.05 + 30)
    side.pings_sent = PING_COUNT
    side.rtt_ms = [float(m) for m in _RTT_RE.findall(r.stdout)]
    if not side.rtt_ms:
        raise BenchFailed(f"ping {target}: no reply ({(r.stderr or r.stdout).strip()[-300:]})")


def iperf3_once(client: Runner, target: str, duration: int) -> float:
    """One ``iperf3 -c`` run; its received throughput in bit/s."""
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(duration), "-J"]
    error = ""
    for attempt in range(3):  # "the server is busy" right after the previous test: retry
        r = client(argv, duration + 30)
        try:
            report: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            report = {"error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"}
        if "error" not in report and r.returncode == 0:
            bps = float(report["end"]["sum_received"]["bits_per_second"])
            if bps > 0:
                return bps
            error = "0 bit/s received"
        else:
            error = str(report.get("error", f"exit {r.returncode}"))
        progress(f"  iperf3 attempt {attempt + 1} failed: {error}")
        time.sleep(1.0)
    raise BenchFailed(f"iperf3 -c {target}: {error}")


def measure(
    side: Side, client: Runner, server: Runner, target: str, duration: int, repeats: int
) -> None:
    wait_listening(server, IPERF_PORT)
    progress(f"{side.name}: ping {target} x{PING_COUNT}")
    measure_rtt(side, client, target)
    for i in range(repeats):
        progress(f"{side.name}: iperf3 {i + 1}/{repeats} ({duration} s)")
        side.bits_per_second.append(iperf3_once(client, target, duration))
        progress(f"{side.name}:   {side.bits_per_second[-1] / 1e9:.3f} Gbit/s")


def _runner(ns: str) -> Runner:
    def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns.exec_argv(ns, argv), check=False, capture_output=True, text=True, timeout=timeout
        )

    return run


def bench_kernel(duration: int, repeats: int) -> Side:
    side = Side("kernel VXLAN")
    name = "benchk" + secrets.token_hex(3)
    progress(f"kernel VXLAN: building the pair (vx-{name}-*)")
    try:
        with kernel_pair(f"vx-{name}-") as pair:
            srv, cli = pair.containers  # srv behind h1, cli behind h2, as on the vxnet side
            server = subprocess.Popen(
                netns.exec_argv(srv.namespace, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                measure(
                    side, _runner(cli.namespace), _runner(srv.namespace), srv.ip, duration, repeats
                )
            finally:
                server.terminate()
                server.wait(timeout=10)
    except Exception as exc:  # report this side as failed and go on to the other
        side.error = f"{type(exc).__name__}: {exc}"
    _check_removed(side, f"vx-{name}-")
    return side


def bench_vxnet(duration: int, repeats: int, encrypted: bool = False) -> tuple[list[Side], str]:
    """vxnet plain, and (with ``encrypted``) an encrypted overlay beside it in the same lab."""
    sides = [Side("vxnet")] + ([Side("vxnet encrypted")] if encrypted else [])
    name = "benchv" + secrets.token_hex(3)
    dataplane = DATAPLANE
    progress(f"vxnet: building lab {name} (2 hosts)")
    try:
        with Lab(hosts=2, name=name) as lab:
            info = lab.client("h1").get("/info")
            dataplane = str(info.get("dataplane", DATAPLANE))
            networks = ["front"]
            if encrypted:
                lab.manager.post(
                    "/swarm/networks",
                    {"name": "secret", "attachable": True, "options": ["encrypted"]},
                )
                networks.append("secret")
            for side, net in zip(sides, networks, strict=True):
                progress(f"{side.name}: network {net}")
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
                    )
                except Exception as exc:  # this side failed; the other may still be measured
                    side.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # report as failed; Lab.__exit__ has torn it down
        for side in sides:
            side.error = side.error or f"{type(exc).__name__}: {exc}"
    for side in sides:
        _check_removed(side, f"vx-{name}-")
    return sides, dataplane


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


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def _ratio(vx: float | None, k: float | None) -> str:
    if vx is None or k is None or k == 0:
        return "-"
    return f"{vx / k:.3f}"


def render(
    mach: dict[str, Any],
    sides: list[Side],
    dataplane: str,
    duration: int,
    repeats: int,
    ceiling: dict[str, float] | None,
) -> str:
    sums = [s.summary() for s in sides]
    cpu = f" ({mach['cpu']})" if mach["cpu"] else ""
    head = "".join(f"{s.name:>18}" for s in sides)
    ratios = [("vxnet/kernel", 1, 0)] + (
        [("enc/kernel", 2, 0), ("enc/plain", 2, 1)] if len(sides) > 2 else []
    )
    lines = [
        "vxnet bench: kernel VXLAN vs vxnet, same two-host namespace topology (MTU 1450; "
        "encrypted: 1416)",
        f"machine: {mach['nproc']} CPUs{cpu}, Linux {mach['kernel']}, {mach['python']}",
        f"vxnet dataplane: {dataplane}",
        f"iperf3: 1 TCP stream, {duration} s x {repeats}; "
        f"ping: {PING_COUNT} echoes, one every {float(PING_INTERVAL) * 1000:.0f} ms",
        "",
        f"{'':22}{head}" + "".join(f"{r[0]:>14}" for r in ratios),
    ]
    rows = [
        ("TCP Gbit/s   median", "gbps_median"),
        ("TCP Gbit/s   min", "gbps_min"),
        ("TCP Gbit/s   max", "gbps_max"),
        ("ping RTT ms  p50", "rtt_p50_ms"),
        ("ping RTT ms  p99", "rtt_p99_ms"),
    ]
    for label, key in rows:
        vals = [sm.get(key) for sm in sums]
        line = f"{label:22}" + "".join(f"{_fmt(v):>18}" for v in vals)
        line += "".join(f"{_ratio(vals[a], vals[b]):>14}" for _, a, b in ratios)
        lines.append(line)
    replies = [f"{len(s.rtt_ms)}/{s.pings_sent}" if s.pings_sent else "failed" for s in sides]
    lines.append(f"{'ping replies':22}" + "".join(f"{r:>18}" for r in replies))
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


def run_bench(
    duration: int = 10, repeats: int = 3, json_path: str | None = None, encrypted: bool = False
) -> int:
    """Measure every side, print one table; 0 if all were measured, 1 otherwise."""
    if os.geteuid() != 0:
        print("vxnet bench needs root (network namespaces): run it with sudo", file=sys.stderr)
        return 1
    mach = machine()
    kernel = bench_kernel(duration, repeats)
    vx_sides, dataplane = bench_vxnet(duration, repeats, encrypted)
    sides = [kernel, *vx_sides]
    ceiling = aes_gcm_ceiling() if encrypted else None
    print(render(mach, sides, dataplane, duration, repeats, ceiling), flush=True)
    if json_path:
        doc = {
            "machine": mach,
            "dataplane": dataplane,
            "params": {
                "duration": duration,
                "repeats": repeats,
                "ping_count": PING_COUNT,
                "ping_interval_s": float(PING_INTERVAL),
            },
            "aes_gcm_ceiling_gbps": ceiling,
            "sides": {s.name: dict(asdict(s), summary=s.summary(), ok=s.ok) for s in sides},
        }
        Path(json_path).write_text(json.dumps(doc, indent=1) + "\n")
        progress(f"raw samples and summary written to {json_path}")
    return 0 if all(s.ok for s in sides) else 1
