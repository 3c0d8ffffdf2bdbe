"""What one side of ``vxnet bench`` measures, and how: iperf3, ping, /proc.

Every figure is a raw sample kept in :class:`Side`; summaries are computed from them only, so
nothing is printed that was not measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess[str]]

IPERF_PORT = 5201
PING_COUNT = 200
PING_INTERVAL = "0.01"
UDP_PAYLOAD = 1372  # a 1400-byte IP packet: fits every overlay MTU here (encrypted: 1416)
_RTT_RE = re.compile(r"time=([0-9.]+) ms")
_HZ = os.sysconf("SC_CLK_TCK")


class BenchFailed(Exception):
    """A measurement could not be taken; the message says which and why."""


@dataclass
class Side:
    """What one side measured: raw samples, or why it failed."""

    name: str
    tcp1_bps: list[float] = field(default_factory=list)
    tcpn_bps: list[float] = field(default_factory=list)
    udp_pps: list[float] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)
    pings_sent: int = 0
    cores_per_gbps: list[float] = field(default_factory=list)  # whole machine, TCP 1 stream
    daemon_cores_per_gbps: list[float] = field(default_factory=list)  # vxnet daemons only
    rss_idle_mb: float | None = None  # the larger of the two hosts' daemons
    rss_peak_mb: float | None = None
    hop_us: dict[str, list[float]] = field(default_factory=dict)  # --hops: per hop, us
    path: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.tcp1_bps) and bool(self.rtt_ms)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, samples, scale in (
            ("tcp1_gbps", self.tcp1_bps, 1e-9),
            ("tcpn_gbps", self.tcpn_bps, 1e-9),
            ("udp_kpps", self.udp_pps, 1e-3),
            ("cores_per_gbps", self.cores_per_gbps, 1.0),
            ("daemon_cores_per_gbps", self.daemon_cores_per_gbps, 1.0),
        ):
            if samples:
                values = [s * scale for s in samples]
                out[f"{key}_min"] = min(values)
                out[f"{key}_median"] = statistics.median(values)
                out[f"{key}_max"] = max(values)
        if self.rtt_ms:
            out["rtt_p50_ms"] = percentile(self.rtt_ms, 50)
            out["rtt_p99_ms"] = percentile(self.rtt_ms, 99)
        if self.rss_idle_mb is not None:
            out["rss_idle_mb"] = self.rss_idle_mb
        if self.rss_peak_mb is not None:
            out["rss_peak_mb"] = self.rss_peak_mb
        return out


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (a value that was measured, never interpolated)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def wait_listening(run: Runner, port: int, timeout: float = 15.0) -> None:
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


def iperf3(client: Runner, target: str, duration: int, extra: Sequence[str]) -> dict[str, Any]:
    """One ``iperf3 -c`` run's JSON report (retried when the server is still busy)."""
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(duration), "-J", *extra]
    error = ""
    for attempt in range(3):
        r = client(argv, duration + 30)
        try:
            report: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            report = {"error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"}
        if "error" not in report and r.returncode == 0:
            return report
        error = str(report.get("error", f"exit {r.returncode}"))
        progress(f"  iperf3 attempt {attempt + 1} failed: {error}")
        time.sleep(1.0)
    raise BenchFailed(f"iperf3 -c {target} {' '.join(extra)}: {error}")


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def _proc_jiffies(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(parts[11]) + int(parts[12])  # utime, stime
    return total


def rss_mb(pids: Sequence[int], key: str = "VmRSS") -> float | None:
    """The largest ``VmRSS`` (or ``VmHWM``, the peak) among ``pids``, in MB."""
    best = None
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    mb = int(line.split()[1]) / 1024
                    best = mb if best is None else max(best, mb)
        except OSError:
            continue
    return best


def measure(
    side: Side,
    client: Runner,
    server: Runner,
    target: str,
    duration: int,
    repeats: int,
    streams: int,
    daemons: Sequence[int] = (),
) -> None:
    """Ping, then ``repeats`` x (TCP 1 stream, TCP ``streams`` streams, UDP 1400-byte pps)."""
    wait_listening(server, IPERF_PORT)
    side.rss_idle_mb = rss_mb(daemons)
    progress(f"{side.name}: ping {target} x{PING_COUNT}")
    measure_rtt(side, client, target)
    for i in range(repeats):
        progress(f"{side.name}: round {i + 1}/{repeats} ({duration} s per test)")
        busy, mine, t0 = _busy_jiffies(), _proc_jiffies(daemons), time.monotonic()
        report = iperf3(client, target, duration, [])
        elapsed = time.monotonic() - t0
        bps = float(report["end"]["sum_received"]["bits_per_second"])
        side.tcp1_bps.append(bps)
        gbps = bps / 1e9
        if gbps > 0:
            side.cores_per_gbps.append((_busy_jiffies() - busy) / _HZ / elapsed / gbps)
            if daemons:
                cores = (_proc_jiffies(daemons) - mine) / _HZ / elapsed
                side.daemon_cores_per_gbps.append(cores / gbps)
        report = iperf3(client, target, duration, ["-P", str(streams)])
        side.tcpn_bps.append(float(report["end"]["sum_received"]["bits_per_second"]))
        report = iperf3(client, target, duration, ["-u", "-b", "0", "-l", str(UDP_PAYLOAD)])
        s = report["end"]["sum"]
        seconds = float(s.get("seconds") or duration)
        side.udp_pps.append((int(s["packets"]) - int(s.get("lost_packets", 0))) / seconds)
        progress(
            f"{side.name}:   TCP {gbps:.2f} Gbit/s, x{streams} {side.tcpn_bps[-1] / 1e9:.2f}, "
            f"UDP {side.udp_pps[-1] / 1e3:.1f} kpps"
        )
    side.rss_peak_mb = rss_mb(daemons, "VmHWM")


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores usable here, CPU model, kernel, Python."""
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
