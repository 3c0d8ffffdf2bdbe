"""Where a ping's round trip goes: timestamps at three points, per hop (``vxnet bench --hops``).

A ping from the client container (behind host h2) to the server (behind h1) is seen at three
points, each an ``AF_PACKET`` socket with kernel receive timestamps (``SO_TIMESTAMPNS``, one
clock for every namespace of the machine):

* the client's ``eth0`` (request out, reply in),
* h2's port on the fabric bridge (VXLAN out and in: this is "on the wire"),
* the server's ``eth0`` (request in, reply out).

An echo is matched across the points by its ICMP identifier and sequence number (inside VXLAN
on the fabric), so each hop is a difference of two timestamps of the same packet::

    client eth0 --(h2 sends)--> fabric --(h1 receives)--> server eth0
         ^                                                     | (server's kernel replies)
         +--(h2 receives)-- fabric <--(h1 sends)---------------+

The kernel VTEP does each hop in softirq, in the context of whoever sent; vxnet's hops are a
daemon thread waking up, reading, switching in Python and writing.  ``ping`` (what ping's own
RTT adds to the client's ``eth0`` round trip) is the client's stack and ping's own wake-up.
Encrypted networks carry ESP on the fabric, which is not matched here: their hops are not shown.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bench.measure import PING_COUNT, PING_INTERVAL, BenchFailed, Runner, Side, percentile
from vxnet import netns
from vxnet.errors import BadPacket
from vxnet.wire import (
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    decode_ethernet_untrusted,
    decode_icmp_echo_untrusted,
    decode_ipv4_untrusted,
    decode_udp_untrusted,
    decode_vxlan_untrusted,
)

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF = 4 * 1024 * 1024
ECHO_REQUEST, ECHO_REPLY = 8, 0
HOPS = (
    ("h2 sends (client eth0 -> fabric)", 0, 1),
    ("h1 receives (fabric -> server eth0)", 1, 2),
    ("server's kernel replies", 2, 3),
    ("h1 sends (server eth0 -> fabric)", 3, 4),
    ("h2 receives (fabric -> client eth0)", 4, 5),
    ("round trip at the client's eth0", 0, 5),
)

Key = tuple[int, int, int]  # (ICMP type, identifier, sequence)


@dataclass
class Point:
    """One capture point: a namespace's interface and, after the run, what it saw when."""

    ns: str
    ifname: str
    vxlan_port: int | None = None  # the fabric: echoes inside VXLAN to/from this port
    seen: dict[Key, float] = field(default_factory=dict)  # first timestamp of each echo

    def open(self) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                # read only after the run: room for every frame, past rmem_max (root)
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                sock.bind((self.ifname, 0))
            except OSError:
                sock.close()
                raise
            return sock

        return netns.call_in(self.ns, make)

    def drain(self, sock: socket.socket) -> None:
        """Read every frame queued on ``sock`` (after the pings) and note its echoes."""
        sock.setblocking(False)
        size = socket.CMSG_SPACE(16)
        while True:
            try:
                frame, anc, _, _ = sock.recvmsg(65535, size)
            except BlockingIOError:
                return
            key = self._echo(frame)
            if key is None or key in self.seen:
                continue
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", data[:16])
                    self.seen[key] = sec + nsec / 1e9

    def _echo(self, frame: bytes) -> Key | None:
        try:
            eth = decode_ethernet_untrusted(frame)
            if eth.ethertype != ETH_P_IP:
                return None
            ip = decode_ipv4_untrusted(eth.payload)
            if self.vxlan_port is not None:  # unwrap VXLAN: the echo is the inner frame
                if ip.proto != IPPROTO_UDP:
                    return None
                udp = decode_udp_untrusted(ip.payload)
                if udp.dport != self.vxlan_port:
                    return None
                inner = decode_ethernet_untrusted(decode_vxlan_untrusted(udp.payload).payload)
                if inner.ethertype != ETH_P_IP:
                    return None
                ip = decode_ipv4_untrusted(inner.payload)
            if ip.proto != IPPROTO_ICMP:
                return None
            echo = decode_icmp_echo_untrusted(ip.payload)
        except BadPacket:
            return None
        return echo.type, echo.ident, echo.seq


@contextlib.contextmanager
def watching(points: Sequence[Point]) -> Iterator[None]:
    """Capture at ``points`` for the duration of the block, then sort what was seen."""
    socks: list[socket.socket] = []
    try:
        for point in points:
            socks.append(point.open())
        yield
        for point, sock in zip(points, socks, strict=True):
            point.drain(sock)
    finally:
        for sock in socks:
            sock.close()


def hop_samples(points: Sequence[Point]) -> dict[str, list[float]]:
    """Microseconds per hop, for every echo seen whole at all three points (both ways)."""
    client, fabric, server = points
    out: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    for kind, ident, seq in client.seen:
        if kind != ECHO_REQUEST:
            continue
        request, reply = (kind, ident, seq), (ECHO_REPLY, ident, seq)
        try:
            times = (
                client.seen[request],
                fabric.seen[request],
                server.seen[request],
                server.seen[reply],
                fabric.seen[reply],
                client.seen[reply],
            )
        except KeyError:  # lost, or the buffer overflowed: not a sample
            continue
        for name, a, b in HOPS:
            out[name].append((times[b] - times[a]) * 1e6)
    return out


def measure_hops(side: Side, client: Runner, target: str, points: Sequence[Point]) -> None:
    """A second ping series, watched at ``points``: ``side.hop_us`` gets the per-hop samples.

    Separate from the RTT measurement, so that the capturing sockets (a copy of each frame at
    each point) do not weigh on the figure compared with the kernel.
    """
    argv = ["ping", "-n", "-q", "-c", str(PING_COUNT), "-i", PING_INTERVAL, "-W", "1", target]
    with watching(points):
        r = client(argv, PING_COUNT * 0.05 + 30)
    side.hop_us = hop_samples(points)
    if not any(side.hop_us.values()):
        raise BenchFailed(f"hops: no echo seen at all three points ({r.stdout.strip()[-200:]})")


def summarize(samples: dict[str, list[float]]) -> dict[str, tuple[float, float, int]]:
    """Per hop: (p50, p90, count)."""
    return {
        name: (percentile(v, 50), percentile(v, 90), len(v)) for name, v in samples.items() if v
    }


def render_hops(sides: Sequence[tuple[str, dict[str, tuple[float, float, int]]]]) -> str:
    """One table: per hop, p50/p90 in microseconds for each side."""
    if not any(hops for _, hops in sides):
        return ""
    lines = [
        "",
        "where a ping's round trip goes (us, p50 / p90; timestamps at the client's eth0, "
        "h2's fabric port, the server's eth0)",
        f"{'':38}" + "".join(f"{name:>20}" for name, _ in sides),
    ]
    for name, _, _ in HOPS:
        cells = []
        for _, hops in sides:
            cell = hops.get(name)
            cells.append("-" if cell is None else f"{cell[0]:.1f} / {cell[1]:.1f}")
        lines.append(f"{name:38}" + "".join(f"{c:>20}" for c in cells))
    counts = [str(max((c for _, _, c in hops.values()), default=0)) for _, hops in sides]
    lines.append(f"{'echoes seen at all three points':38}" + "".join(f"{c:>20}" for c in counts))
    return "\n".join(lines)
