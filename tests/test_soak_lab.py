"""Soak (root, slow): traffic, key rotation and daemon crashes together, for a while.

Issue 8's soak: all-pairs ping and a TCP stream through an *encrypted* network, keys rotating
every 10 s, and a random daemon killed (-9) and restarted every ``VXNET_SOAK_RESTART`` seconds,
for ``VXNET_SOAK_SECONDS`` (CI: 120 s with a restart every 40 s; the issue's figure is 600 s
with one a minute: ``VXNET_SOAK_SECONDS=600 VXNET_SOAK_RESTART=60``).  What must hold:

* pings are lost only inside the failure windows (a crash until its host is back, plus a bound);
* the TCP stream (echoed and checked byte for byte) completes;
* daemon memory stays flat (RSS at the end within a bound of the most seen early on);
* at the end, every node agrees: the same keys, every member alive, every FDB complete.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique_lab_name
from vxnet import netns
from vxnet.lab import Lab, builder

pytestmark = [pytest.mark.root, pytest.mark.slow]

SECONDS = float(os.environ.get("VXNET_SOAK_SECONDS", "120"))
RESTART_EVERY = float(os.environ.get("VXNET_SOAK_RESTART", "40"))
RECOVERY_BOUND = 15.0  # seconds after a restarted daemon answers, within which loss is allowed
STREAM = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[2])
s = socket.create_connection((sys.argv[1], 7), timeout=60)
sent = got = 0
block = bytes(range(256)) * 64  # 16 KB
while time.monotonic() < end:
    s.sendall(block)
    sent += len(block)
    need = len(block)
    while need:
        chunk = s.recv(need)
        if not chunk:
            raise SystemExit("connection closed")
        if chunk != block[len(block) - need : len(block) - need + len(chunk)]:
            raise SystemExit("corrupted")
        need -= len(chunk)
        got += len(chunk)
    time.sleep(0.05)
print(sent, got)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name("s")
    lab = Lab(hosts=3, name=name)
    try:
        vault = {"name": "vault", "attachable": True, "options": ["encrypted"]}
        lab.manager.post("/swarm/networks", vault)
        for i, host in enumerate(lab.hosts, start=1):
            lab.run(host, f"p{i}", "vault", "echo" if i == 1 else "idle")
        lab.manager.post("/swarm/update", {"key_rotation_interval": "10s"})
        yield lab
    finally:
        lab.down()
        assert netns.list_with_prefix(builder.prefix(name)) == []


@pytest.mark.timeout(SECONDS + 300)
def test_soak(lab: Lab, tmp_path: Path) -> None:
    rng = random.Random(8)
    names = [f"p{i}" for i in range(1, len(lab.hosts) + 1)]
    # ping writes to files: a pipe nobody reads fills after ~3 minutes and blocks ping silently
    logs = {(a, b): tmp_path / f"ping-{a}-{b}.txt" for a in names for b in names if a != b}
    pings = {}
    for (a, b), path in logs.items():
        with open(path, "w") as out:
            pings[(a, b)] = subprocess.Popen(
                netns.exec_argv(lab.find(a)["netns"], ["ping", "-D", "-O", "-i", "0.2", "-W", "1",
                                "-w", str(int(SECONDS) + 5), lab.ip(b)]),
                stdout=out, text=True,
            )  # fmt: skip
    stream = subprocess.Popen(
        netns.exec_argv(lab.find("p2")["netns"], [sys.executable, "-c", STREAM, lab.ip("p1"),
                        str(SECONDS - 5)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _soak(lab, rng, pings, logs, stream)
    finally:
        for proc in [*pings.values(), stream]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _soak(
    lab: Lab,
    rng: random.Random,
    pings: dict[tuple[str, str], subprocess.Popen[str]],
    logs: dict[tuple[str, str], Path],
    stream: subprocess.Popen[str],
) -> None:
    names = [f"p{i}" for i in range(1, len(lab.hosts) + 1)]
    windows: list[tuple[float, float]] = []
    rss: dict[str, list[int]] = {h: [] for h in lab.hosts}
    t0 = time.time()
    next_restart = t0 + RESTART_EVERY / 2
    while time.time() - t0 < SECONDS:
        for host in lab.hosts:
            rss[host].append(rss_kb(int(lab.state["hosts"][host]["pid"])))
        if time.time() >= next_restart:
            host = rng.choice(lab.hosts)
            start = time.time()
            os.kill(int(lab.state["hosts"][host]["pid"]), signal.SIGKILL)
            result = lab.restart(host)  # re-adopts its containers
            assert result["lost_containers"] == [], result
            windows.append((start, time.time() + RECOVERY_BOUND))
            print(f"t={start - t0:.0f}s: {host} killed and restarted in {time.time() - start:.1f}s,"
                  f" re-adopted {result['adopted']}")  # fmt: skip
            next_restart = start + RESTART_EVERY
        time.sleep(1.0)

    out, err = stream.communicate(timeout=120)
    assert stream.returncode == 0, err
    sent, got = (int(x) for x in out.split())
    lost_outside: list[str] = []
    total = lost = 0
    for pair, proc in pings.items():
        proc.wait(timeout=60)
        text = logs[pair].read_text()
        for m in re.finditer(r"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)", text, re.M):
            lost += 1
            when = float(m.group(1))
            if not any(a - 1.0 <= when <= b for a, b in windows):
                lost_outside.append(f"{pair} seq {m.group(2)} at t={when - t0:.1f}s")
        total += len(re.findall(r"bytes from", text))
    print(
        f"soak {SECONDS:.0f}s, {len(windows)} crashes: {total} ping replies, {lost} misses "
        f"(all inside failure windows: {not lost_outside}); TCP {sent} bytes echoed intact"
    )
    assert got == sent and sent > 0
    # every ping was sent: each one either answered or reported missing (ping -O)
    expected = len(pings) * SECONDS / 0.2
    assert total + lost >= 0.9 * expected, (total, lost, expected)
    assert lost_outside == [], lost_outside[:20]

    # memory: the last sample of each daemon within bounds of what it used early on
    for host, samples in rss.items():
        early = max(samples[: max(3, len(samples) // 4)])
        print(f"{host} daemon RSS: early max {early // 1024} MB, last {samples[-1] // 1024} MB")
        assert samples[-1] <= early * 1.5 + 20 * 1024, (host, samples)

    # state: every node agrees
    lab.sync_peers(timeout=40)
    keys = {h: [k["lamport_time"] for k in lab.client(h).get("/swarm/keys")] for h in lab.hosts}
    assert len({tuple(v) for v in keys.values()}) == 1, keys
    for host in lab.hosts:
        members = lab.client(host).get("/gossip")["members"]
        alive = {m["addr"] for m in members if m["state"] == "alive"}
        assert {lab.host_address(h) for h in lab.hosts} <= alive, (host, members)
    for a in names:
        for b in names:
            if a != b:
                r = lab.exec(a, ["ping", "-c", "2", "-i", "0.2", "-W", "2", lab.ip(b)])
                assert r.returncode == 0, (a, b, r.stdout)
