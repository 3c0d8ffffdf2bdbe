"""VIP load balancing: Docker's IPVS service per VIP, as a connection table in the dataplane.

The kernel vxnet runs on has no IPVS, so the switch is the load balancer.  What it reproduces
(moby ``libnetwork/service_linux.go``): one service per VIP on each network, the ``rr``
scheduler with weight 1 per task (weight 0 drains a task on graceful stop: its connections go
on, new ones avoid it), and NAT mode with SNAT of the client to this node's load-balancer
address on the network, so that the backend's replies come back through this node.  The routing
mesh is the same machinery on the ingress network with a published -> target port map.

A :class:`LoadBalancer` is one network's state: its address, its :class:`Vip` s and the
connection table.  It is sans-IO and has no clock: the switch hands it frames, and time only
arrives through :meth:`LoadBalancer.tick` (about once a second), whose ``now`` stamps the
entries until the next tick.  The per-frame methods, :meth:`~LoadBalancer.forward` and
:meth:`~LoadBalancer.reverse`, are flat: fixed offsets, one dictionary lookup, the NAT done with
precomputed per-connection deltas (incremental checksums, RFC 1624), no objects but the output.

TCP states follow the flags seen in both directions (:mod:`vxnet.dataplane.nat`); each state
has its idle timeout (:class:`~vxnet.dataplane.tables.LbSettings`).  Expired entries vanish
silently, as in IPVS and conntrack; a backend that leaves its service has its TCP clients reset.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from vxnet.dataplane.nat import (
    EV_SYN,
    EV_SYNACK,
    EVENT,
    NEXT,
    REASONS,
    STATE_NAMES,
    SYN_SENT,
    TCP,
    TIME_WAIT,
    UDP,
    UDP_ASSURED,
    UDP_NEW,
    delta,
    fold,
    l4_offset,
    reset_frame,
    rewrite,
)
from vxnet.dataplane.tables import (
    Backend,
    LbSettings,
    PortMap,
    RemoveService,
    SetLoadBalancer,
    SetService,
    endpoint_mac,
)
from vxnet.errors import UsageError

if TYPE_CHECKING:
    from vxnet.dataplane.model import Counters

_PROTO = {"tcp": TCP, "udp": UDP}
MAX_WEIGHT = 255
SNAT_LOW = 1024  # SNAT ports are taken from 1024..65535
HEAP_SLACK = 1024  # superseded heap entries tolerated beyond one per connection


def timeouts(settings: LbSettings) -> tuple[float, ...]:
    """The idle timeout of each state, indexed by state."""
    s = settings
    return (
        s.tcp_transitory,  # SYN_SENT
        s.tcp_transitory,  # SYN_RECV
        s.tcp_established_idle,
        s.tcp_half_closed_idle,  # FIN_WAIT
        s.tcp_half_closed_idle,  # CLOSE_WAIT
        s.tcp_transitory,  # TIME_WAIT
        s.tcp_closed,
        s.udp_idle,
        s.udp_assured_idle,
    )


def check_settings(settings: LbSettings) -> None:
    if min(timeouts(settings)) <= 0 or settings.max_connections < 1:
        raise UsageError("LbSettings: every timeout must be > 0 s and max_connections >= 1")


# ---------------------------------------------------------------------------- the records


class BackendState:
    """A task behind a VIP: weight and the number of connections it holds."""

    __slots__ = ("active", "ip", "weight")

    def __init__(self, ip: bytes, weight: int) -> None:
        self.ip = ip
        self.weight = weight
        self.active = 0


class Vip:
    """One service's virtual IP on this network, its backends and port map."""

    __slots__ = ("backends", "ip", "mac", "port_maps", "ports", "rr", "schedule")

    def __init__(self, ip: bytes) -> None:
        self.ip = ip
        self.mac = endpoint_mac(ipaddress.IPv4Address(ip))
        self.backends: dict[bytes, BackendState] = {}
        self.schedule: list[BackendState] = []  # round-robin order, one slot per unit of weight
        self.rr = 0
        self.ports: dict[int, int] | None = None  # proto << 16 | published -> target; None: any
        self.port_maps: tuple[PortMap, ...] = ()


class Conn:
    """One translated connection.  ``f_*`` rewrite client -> backend, ``r_*`` the replies."""

    __slots__ = (
        "alive",
        "backend",
        "client_ack",
        "client_mac",
        "expires",
        "f_eth",
        "f_ipd",
        "f_ips",
        "f_l4d",
        "f_ports",
        "fkey",
        "queued",
        "r_eth",
        "r_ipd",
        "r_ips",
        "r_l4d",
        "r_ports",
        "rkey",
        "state",
        "vip",
    )

    def __init__(self, vip: Vip, backend: BackendState, fkey: bytes, rkey: bytes) -> None:
        self.vip = vip
        self.backend = backend
        self.fkey = fkey  # proto, client ip, VIP, client port, published port
        self.rkey = rkey  # proto, backend ip, LB ip, target port, SNAT port
        self.alive = True
        self.state = UDP_NEW
        self.expires = self.queued = 0.0
        # the next sequence number the client accepts from the backend (in SYN_SENT: its ISN + 1)
        self.client_ack = 0
        self.client_mac = b""
        self.f_eth = self.f_ips = self.f_ports = self.r_eth = self.r_ips = self.r_ports = b""
        self.f_ipd = self.f_l4d = self.r_ipd = self.r_l4d = 0


def _schedule(backends: Iterable[BackendState]) -> list[BackendState]:
    """IPVS's weighted round robin as one fixed cycle: with Docker's weights of 1, plain ``rr``.

    A backend of weight ``w`` appears ``w / gcd`` times, interleaved with the others as the
    ``wrr`` scheduler does it (highest weights first in each round).
    """
    live = [b for b in backends if b.weight > 0]
    if not live:
        return []
    step = math.gcd(*(b.weight for b in live))
    out: list[BackendState] = []
    current = max(b.weight for b in live)
    while current > 0:
        out.extend(b for b in live if b.weight >= current)
        current -= step
    return out


# ------------------------------------------------------------------------ the load balancer


class LoadBalancer:
    """One network's VIPs and connection table.  ``forward``/``reverse`` are the hot path."""

    def __init__(self, counters: Counters, settings: LbSettings) -> None:
        self.counters = counters
        self.ip: bytes | None = None  # this node's LB address on the network
        self.mac = b""
        self.vips: dict[bytes, Vip] = {}  # by VIP MAC
        # every MAC the switch must hand to us: VIP MACs -> Vip, our own LB MAC -> None
        self.macs: dict[bytes, Vip | None] = {}
        self.fwd: dict[bytes, Conn] = {}
        self.rev: dict[bytes, Conn] = {}
        self.now = 0.0
        self._heap: list[tuple[float, int, Conn]] = []  # (deadline, tie-break, connection)
        self._pushes = 0
        self._cursor = SNAT_LOW
        self.configure(settings)

    def configure(self, settings: LbSettings) -> None:
        """New timeouts apply from each connection's next packet on."""
        check_settings(settings)
        self.timeouts = timeouts(settings)
        self.max_connections = settings.max_connections

    def _drop(self, reason: str) -> None:
        drops = self.counters.drops
        drops[reason] = drops.get(reason, 0) + 1

    # ---------------------------------------------------------------------------- hot path

    def forward(
        self, vip: Vip, frame: bytes, neigh: dict[bytes, bytes], partial: bool = False
    ) -> bytes | None:
        """A client's frame to ``vip``'s MAC: the frame for the backend, or None (counted).

        ``partial``: the L4 checksum is unfinished (``NEEDS_CSUM``), it holds only the
        pseudo-header sum; a TCP super-frame may be one too, it is rewritten all the same."""
        l4 = l4_offset(frame)
        if l4 < 0:
            self._drop(REASONS[-l4])
            return None
        if frame[30:34] != vip.ip:
            self._drop("lb_not_vip")
            return None
        fkey = frame[23:24] + frame[26:34] + frame[l4 : l4 + 4]
        conn = self.fwd.get(fkey)
        if frame[23] == TCP:
            flags = frame[l4 + 13]
            ev = EVENT[flags & 0x17]
            if conn is None or (ev == EV_SYN and conn.state >= TIME_WAIT):
                if conn is not None:  # the client reuses its port: a new connection
                    self._end(conn)
                conn = self._open(vip, frame, l4, fkey, neigh, ev)
                if conn is None:
                    return None
            else:
                conn.state = NEXT[conn.state * 10 + ev]
                if flags & 0x10:
                    conn.client_ack = int.from_bytes(frame[l4 + 8 : l4 + 12], "big")
        elif conn is None:
            conn = self._open(vip, frame, l4, fkey, neigh, EV_SYN)
            if conn is None:
                return None
        expires = self.now + self.timeouts[conn.state]
        conn.expires = expires
        if expires < conn.queued:
            self._queue(conn, expires)
        l4d = conn.f_ipd if partial else conn.f_l4d
        return bytes(
            rewrite(frame, l4, conn.f_eth, conn.f_ips, conn.f_ports, conn.f_ipd, l4d, partial)
        )

    def reverse(self, frame: bytes, partial: bool = False) -> tuple[bytes, bytearray] | None:
        """A frame to our LB MAC: ``(client MAC, frame for the client)``, or None: no entry."""
        l4 = l4_offset(frame)
        if l4 < 0:
            return None
        conn = self.rev.get(frame[23:24] + frame[26:34] + frame[l4 : l4 + 4])
        if conn is None:
            return None
        if frame[23] == TCP:
            ev = EVENT[frame[l4 + 13] & 0x17]
            conn.state = NEXT[conn.state * 10 + 5 + ev]
            if ev == EV_SYNACK:  # the client will accept the backend's ISN + 1 next
                conn.client_ack = (int.from_bytes(frame[l4 + 4 : l4 + 8], "big") + 1) & 0xFFFFFFFF
        else:
            conn.state = UDP_ASSURED
        expires = self.now + self.timeouts[conn.state]
        conn.expires = expires
        if expires < conn.queued:
            self._queue(conn, expires)
        l4d = conn.r_ipd if partial else conn.r_l4d
        out = rewrite(frame, l4, conn.r_eth, conn.r_ips, conn.r_ports, conn.r_ipd, l4d, partial)
        return conn.client_mac, out

    def _open(
        self, vip: Vip, frame: bytes, l4: int, fkey: bytes, neigh: dict[bytes, bytes], ev: int
    ) -> Conn | None:
        """A new connection: pick a backend, allocate the SNAT port, precompute the NAT."""
        if ev != EV_SYN:
            self._drop("lb_no_conn")
            return None
        proto = frame[23]
        dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
        ports = vip.ports
        target = dport if ports is None else ports.get(proto << 16 | dport, -1)
        if target < 0:
            self._drop("lb_port_not_published")
            return None
        lb_ip = self.ip
        if lb_ip is None:
            self._drop("lb_no_address")
            return None
        if len(self.fwd) >= self.max_connections:
            self._drop("lb_table_full")
            return None
        schedule = vip.schedule
        if not schedule:
            self._drop("lb_no_backend")
            return None
        backend = schedule[vip.rr % len(schedule)]
        vip.rr += 1
        mac = neigh.get(backend.ip)
        if mac is None or mac in self.macs:
            self._drop("lb_backend_unknown")
            return None
        target_b = target.to_bytes(2, "big")
        base = frame[23:24] + backend.ip + lb_ip + target_b
        sport = (frame[l4] << 8) | frame[l4 + 1]
        snat = self._snat_port(base, sport)
        if snat < 0:
            self._drop("lb_snat_exhausted")
            return None
        rkey = base + snat.to_bytes(2, "big")
        conn = Conn(vip, backend, fkey, rkey)
        client_ip, client_port = frame[26:30], frame[l4 : l4 + 2]
        old_ips, old_ports = frame[26:34], frame[l4 : l4 + 4]
        conn.client_mac = frame[6:12]
        conn.f_eth = mac + self.mac
        conn.f_ips = lb_ip + backend.ip
        conn.f_ports = snat.to_bytes(2, "big") + target_b
        conn.f_ipd = delta(old_ips, conn.f_ips)
        conn.f_l4d = fold(conn.f_ipd + delta(old_ports, conn.f_ports))
        conn.r_eth = conn.client_mac + vip.mac
        conn.r_ips = vip.ip + client_ip
        conn.r_ports = frame[l4 + 2 : l4 + 4] + client_port
        reply_ips = backend.ip + lb_ip
        reply_ports = target_b + conn.f_ports[0:2]
        conn.r_ipd = delta(reply_ips, conn.r_ips)
        conn.r_l4d = fold(conn.r_ipd + delta(reply_ports, conn.r_ports))
        if proto == TCP:  # until the backend answers, the RST would acknowledge the SYN
            conn.state = SYN_SENT
            conn.client_ack = (int.from_bytes(frame[l4 + 4 : l4 + 8], "big") + 1) & 0xFFFFFFFF
        self.fwd[fkey] = conn
        self.rev[rkey] = conn
        backend.active += 1
        c = self.counters
        c.lb_new += 1
        c.lb_active += 1
        conn.queued = math.inf  # forward() queues it at its first deadline
        return conn

    def _snat_port(self, base: bytes, preferred: int) -> int:
        """A source port on the LB address free towards this backend ip:port, or -1.

        The client's own port is kept when it is free (as Linux SNAT does), so a trace still
        shows it; otherwise the next free one from a rotating cursor.
        """
        rev = self.rev
        if preferred >= SNAT_LOW and base + preferred.to_bytes(2, "big") not in rev:
            return preferred
        cursor = self._cursor
        for _ in range(65536 - SNAT_LOW):
            port = cursor
            cursor = cursor + 1 if cursor < 65535 else SNAT_LOW
            if base + port.to_bytes(2, "big") not in rev:
                self._cursor = cursor
                return port
        return -1

    # ------------------------------------------------------------------------- expiry

    def _queue(self, conn: Conn, deadline: float) -> None:
        """Make ``deadline`` the connection's authoritative entry in the heap."""
        conn.queued = deadline
        self._pushes += 1
        heapq.heappush(self._heap, (deadline, self._pushes, conn))

    def tick(self, now: float) -> None:
        """Advance the clock to ``now`` and forget every connection idle past its timeout.

        Each live connection has one authoritative heap entry at or before its deadline;
        packets only move ``expires`` later, so a popped entry that is not due yet is pushed
        again at the real deadline.  Entries superseded by an earlier deadline (a state change)
        or left by a connection ended early are skipped, and the heap is rebuilt when they
        outnumber the live ones, so a busy table does not hoard them for hours.
        """
        self.now = now
        heap = self._heap
        if len(heap) > 2 * len(self.fwd) + HEAP_SLACK:  # mostly superseded entries: rebuild
            first = self._pushes + 1  # tie-breaks stay unique: a Conn is never compared
            heap = self._heap = [(c.queued, first + i, c) for i, c in enumerate(self.fwd.values())]
            self._pushes += len(heap)
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            if not conn.alive or deadline != conn.queued:
                continue
            if conn.expires <= now:
                self._end(conn)
            else:
                self._queue(conn, conn.expires)

    def _end(self, conn: Conn) -> bytes | None:
        """Forget ``conn``; return the RST its client should get if it was an open TCP one."""
        if not conn.alive:
            return None
        conn.alive = False
        self.fwd.pop(conn.fkey, None)
        self.rev.pop(conn.rkey, None)
        conn.backend.active -= 1
        self.counters.lb_active -= 1
        if conn.state >= TIME_WAIT:
            return None
        return reset_frame(conn.r_eth, conn.r_ips, conn.r_ports, conn.state, conn.client_ack)

    def _end_where(self, doomed: Iterable[Conn]) -> list[tuple[bytes, bytes]]:
        rsts: list[tuple[bytes, bytes]] = []
        for conn in list(doomed):
            rst = self._end(conn)
            if rst is not None:
                rsts.append((conn.client_mac, rst))
        return rsts

    # --------------------------------------------------------------------- control side

    def apply(
        self,
        update: SetLoadBalancer | SetService | RemoveService,
        neigh: dict[bytes, bytes],
        local: Mapping[bytes, object],
    ) -> list[tuple[bytes, bytes]]:
        """Apply one record to this network's LB; return ``(client MAC, RST frame)`` s to send."""
        if isinstance(update, SetLoadBalancer):
            return self.set_address(update.ip, neigh, local)
        if isinstance(update, SetService):
            if endpoint_mac(update.vip) in local:
                raise UsageError(f"VIP {update.vip} is the address of a local endpoint")
            return self.set_service(update.vip, update.backends, update.ports, neigh)
        return self.remove_service(update.vip, neigh)

    def set_address(
        self, ip: ipaddress.IPv4Address, neigh: dict[bytes, bytes], local: Mapping[bytes, object]
    ) -> list[tuple[bytes, bytes]]:
        """Move this node's LB address: connections SNATed to the old one are reset."""
        if ip.packed == self.ip:
            return []
        if endpoint_mac(ip) in self.vips:
            raise UsageError(f"the load-balancer address {ip} is a service VIP")
        rsts = self._end_where(self.fwd.values())
        if self.ip is not None:
            self.macs.pop(self.mac, None)
            if neigh.get(self.ip) == self.mac and self.mac not in local:
                del neigh[self.ip]
        self.ip, self.mac = ip.packed, endpoint_mac(ip)
        self.macs[self.mac] = None
        neigh[self.ip] = self.mac
        return rsts

    def set_service(
        self,
        vip_ip: ipaddress.IPv4Address,
        backends: tuple[Backend, ...],
        ports: tuple[PortMap, ...],
        neigh: dict[bytes, bytes],
    ) -> list[tuple[bytes, bytes]]:
        """Create or replace a service; return the RSTs for the clients of removed backends."""
        _check_service(vip_ip, backends, ports)
        mac = endpoint_mac(vip_ip)
        if mac == self.mac:
            raise UsageError(f"VIP {vip_ip} is this node's load-balancer address")
        vip = self.vips.get(mac)
        if vip is None:
            vip = self.vips[mac] = Vip(vip_ip.packed)
            self.macs[mac] = vip
            neigh[vip.ip] = mac
        wanted = {b.ip.packed: b.weight for b in backends}
        gone = {b for ip, b in vip.backends.items() if ip not in wanted}
        states: dict[bytes, BackendState] = {}
        for ip, weight in wanted.items():
            state = vip.backends.get(ip) or BackendState(ip, weight)
            state.weight = weight
            states[ip] = state
        vip.backends = states
        vip.schedule = _schedule(states.values())
        vip.port_maps = ports
        vip.ports = {_PROTO[p.protocol] << 16 | p.published: p.target for p in ports} or None
        return self._end_where(c for c in self.fwd.values() if c.backend in gone)

    def remove_service(
        self, vip_ip: ipaddress.IPv4Address, neigh: dict[bytes, bytes]
    ) -> list[tuple[bytes, bytes]]:
        mac = endpoint_mac(vip_ip)
        vip = self.vips.pop(mac, None)
        if vip is None:
            return []
        self.macs.pop(mac, None)
        if neigh.get(vip.ip) == mac:
            del neigh[vip.ip]
        return self._end_where(c for c in self.fwd.values() if c.vip is vip)

    # ------------------------------------------------------------------------ read side

    def services(self) -> list[dict[str, Any]]:
        """The VIPs, their port maps and backends (safe from another thread: copies first)."""
        rows: list[dict[str, Any]] = []
        for vip in list(self.vips.values()):
            rows.append(
                {
                    "vip": str(ipaddress.IPv4Address(vip.ip)),
                    "lb_ip": None if self.ip is None else str(ipaddress.IPv4Address(self.ip)),
                    "ports": [
                        {"protocol": p.protocol, "published": p.published, "target": p.target}
                        for p in vip.port_maps
                    ],
                    "backends": [
                        {
                            "ip": str(ipaddress.IPv4Address(b.ip)),
                            "weight": b.weight,
                            "active": b.active,
                        }
                        for b in list(vip.backends.values())
                    ],
                }
            )
        return rows

    def connections(self) -> list[dict[str, Any]]:
        """The connection table, one row per connection (safe from another thread)."""
        rows: list[dict[str, Any]] = []
        for conn in list(self.fwd.values()):
            f, r = conn.fkey, conn.rkey
            rows.append(
                {
                    "proto": "tcp" if f[0] == TCP else "udp",
                    "state": STATE_NAMES[conn.state],
                    "client": _endpoint(f[1:5], f[9:11]),
                    "vip": _endpoint(f[5:9], f[11:13]),
                    "snat": _endpoint(r[5:9], r[11:13]),
                    "backend": _endpoint(r[1:5], r[9:11]),
                    "expires_in": round(conn.expires - self.now, 1),
                }
            )
        return rows


def _endpoint(ip: bytes, port: bytes) -> str:
    return f"{ipaddress.IPv4Address(ip)}:{int.from_bytes(port, 'big')}"


def _check_service(
    vip: ipaddress.IPv4Address, backends: tuple[Backend, ...], ports: tuple[PortMap, ...]
) -> None:
    for b in backends:
        if not 0 <= b.weight <= MAX_WEIGHT:
            raise UsageError(f"backend {b.ip} of {vip}: weight must be 0..{MAX_WEIGHT}")
        if b.ip == vip:
            raise UsageError(f"backend {b.ip} is the VIP itself")
    seen: set[tuple[str, int]] = set()
    for p in ports:
        if p.protocol not in _PROTO or not (0 < p.published < 65536 and 0 < p.target < 65536):
            raise UsageError(f"port map {p} of {vip}: protocol tcp/udp, ports 1..65535")
        if (p.protocol, p.published) in seen:
            raise UsageError(f"port {p.protocol}/{p.published} published twice on {vip}")
        seen.add((p.protocol, p.published))
