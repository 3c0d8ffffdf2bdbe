"""The per-frame hot path: one L2 switch per VNI between local TAPs and remote VTEPs.

This module is the dataplane's own room.  Per-frame code here is flat and allocation-light:
byte slices, one dictionary lookup per decision, no dataclasses, no logging.  Its state changes
only through :meth:`Switch.apply`, fed with the records of :mod:`vxnet.dataplane.tables`.

Docker's model, which this follows: the FDB (MAC -> VTEP) and the neighbour table (IP -> MAC)
are *programmed* by the control plane, never learned from the wire; ARP and IPv6 neighbour
solicitations from containers are answered here from the neighbour table (proxy ARP); nothing
is ever flooded, and a frame to an unknown destination is dropped and counted.

I/O is injected (``write_fd``, ``send_udp``) so the same code runs against the kernel in the
engine and against plain lists in unit tests.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable, Sequence
from typing import Any

from vxnet.dataplane.lb import LoadBalancer, Vip, check_settings
from vxnet.dataplane.tables import (
    AddNetwork,
    AddPeer,
    AddPort,
    LbSettings,
    NetworkSpec,
    RemoveNetwork,
    RemovePeer,
    RemovePort,
    RemoveService,
    SetLoadBalancer,
    SetService,
    TableUpdate,
)
from vxnet.errors import BadPacket, UsageError
from vxnet.esp.sa import SequenceExhausted
from vxnet.esp.sadb import SADB
from vxnet.wire.checksum import internet_checksum
from vxnet.wire.vxlan import vxlan_header

ETH_HLEN = 14
VXLAN_HLEN = 8
_ARP_ETH_IPV4_REQUEST = b"\x00\x01\x08\x00\x06\x04\x00\x01"
_ARP_ETH_IPV4_REPLY = b"\x00\x01\x08\x00\x06\x04\x00\x02"
_ETYPE_ARP = b"\x08\x06"
_ETYPE_IPV6 = b"\x86\xdd"
_ICMPV6_NA_FLAGS = b"\x60\x00\x00\x00"  # Solicited | Override
_IPV6_UNSPECIFIED = bytes(16)

WriteFd = Callable[[int, bytes | bytearray | memoryview], int]
SendEsp = Callable[[bytes, str], int]
LAZY_ESP_PEERS = 64  # sources whose SAs may be derived from a first packet, at most
_UDP = struct.Struct("!HHHH")


def _no_esp_socket(packet: bytes, vtep: str) -> int:
    raise OSError("no ESP socket")


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


SendUdp = Callable[[Sequence[bytes | memoryview], tuple[str, int]], int]


class Counters:
    """Per-network counters: plain attributes, the cheapest thing Python can increment."""

    __slots__ = (
        "arp_replies",
        "drops",
        "esp_rx",
        "esp_tx",
        "lb_active",
        "lb_new",
        "local_bytes",
        "local_frames",
        "nd_replies",
        "rx_bytes",
        "rx_frames",
        "tx_bytes",
        "tx_frames",
    )

    def __init__(self) -> None:
        self.rx_frames = self.rx_bytes = 0  # decapsulated from the underlay
        self.tx_frames = self.tx_bytes = 0  # encapsulated onto the underlay
        self.local_frames = self.local_bytes = 0  # switched between two local TAPs
        self.arp_replies = self.nd_replies = 0
        self.esp_rx = self.esp_tx = 0  # of the frames above, how many travelled as ESP
        self.lb_new = self.lb_active = 0  # VIP connections opened, and in the table now
        self.drops: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["drops"] = dict(self.drops)
        return out


class Port:
    """A local endpoint: a TAP fd on one network."""

    __slots__ = ("fd", "ip", "mac", "net", "port_id")

    def __init__(self, port_id: str, fd: int, mac: bytes, ip: bytes, net: Net) -> None:
        self.port_id = port_id
        self.fd = fd
        self.mac = mac
        self.ip = ip
        self.net = net


class Net:
    """One VNI's switch state."""

    __slots__ = (
        "counters",
        "encrypted",
        "hdr",
        "lb",
        "lb_macs",
        "local",
        "max_frame",
        "neigh",
        "remote",
        "spec",
        "vni",
    )

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.vni = spec.vni
        self.hdr = vxlan_header(spec.vni)
        self.encrypted = spec.encrypted
        self.max_frame = ETH_HLEN + spec.mtu
        self.local: dict[bytes, Port] = {}  # MAC -> local port
        self.remote: dict[bytes, tuple[str, int]] = {}  # MAC -> (VTEP address, port): the FDB
        self.neigh: dict[bytes, bytes] = {spec.gateway.packed: spec.gateway_mac}  # IP -> MAC
        self.counters = Counters()
        self.lb: LoadBalancer | None = None  # VIP load balancing, once a service or LB is set
        # the MACs the load balancer handles (VIPs -> Vip, the LB's own -> None): one lookup
        # per frame, on an empty dict for networks without services
        self.lb_macs: dict[bytes, Vip | None] = {}


def _drop(counters: Counters, reason: str) -> None:
    counters.drops[reason] = counters.drops.get(reason, 0) + 1


class Switch:
    """All VNIs of one host.  ``from_tap`` and ``from_underlay`` are the hot path."""

    def __init__(
        self,
        write_fd: WriteFd,
        send_udp: SendUdp,
        data_port: int = 4789,
        send_esp: SendEsp | None = None,
    ) -> None:
        self._write = write_fd
        self._send = send_udp
        self._send_esp_raw: SendEsp = send_esp or _no_esp_socket
        self.sadb: SADB | None = None  # the node's ESP SAs, once the manager sent ipsec keys
        self._lazy_esp_peers: set[str] = set()  # sources whose SAs were derived on first packet
        self.data_port = data_port
        self.nets: dict[int, Net] = {}
        self.ports: dict[str, Port] = {}
        self.ports_by_fd: dict[int, Port] = {}
        # per VNI, MAC -> (IP, VTEP, origin) of every programmed remote peer: `fdb show`
        self.peers: dict[int, dict[bytes, tuple[str, str, str]]] = {}
        self.counters = Counters()  # frames that belong to no network (bad VXLAN, unknown VNI)
        self.lb_settings = LbSettings()
        self.now = 0.0  # the engine's clock at the last tick()

    # ----------------------------------------------------------------------------- hot path

    def from_tap(self, port: Port, frame: bytes) -> None:
        """A frame a container sent on its ``eth0``."""
        net = port.net
        n = len(frame)
        if n < ETH_HLEN:
            _drop(net.counters, "runt")
            return
        dst = frame[0:6]
        if dst[0] & 1:  # broadcast or multicast: never flooded, answered here or dropped
            self._from_tap_multicast(port, frame)
            return
        if n > net.max_frame:
            _drop(net.counters, "too_big")
            return
        if dst in net.lb_macs:
            self._lb_from_tap(port, frame, dst)
            return
        local = net.local.get(dst)
        if local is not None:
            self._deliver(local, frame)
            return
        vtep = net.remote.get(dst)
        if vtep is None:
            _drop(net.counters, "no_route_out" if dst == net.spec.gateway_mac else "unknown_dst")
            return
        if net.encrypted:
            self._send_esp(net, frame, vtep[0])
            return
        try:
            self._send((net.hdr, frame), vtep)
        except BlockingIOError:
            _drop(net.counters, "underlay_busy")
            return
        except OSError:
            _drop(net.counters, "underlay_error")
            return
        c = net.counters
        c.tx_frames += 1
        c.tx_bytes += n

    def _send_esp(self, net: Net, frame: bytes, vtep: str) -> None:
        """ESP transport mode over the VXLAN datagram: UDP header + VXLAN + frame, encrypted."""
        sadb = self.sadb
        if sadb is None:
            _drop(net.counters, "esp_no_keys")
            return
        n = len(frame)
        udp = _UDP.pack(self.data_port, self.data_port, 16 + n, 0)  # checksum 0 (RFC 7348)
        try:
            packet = sadb.tx(_ip(vtep)).encrypt(udp + net.hdr + frame)
        except SequenceExhausted:
            _drop(net.counters, "esp_seq_exhausted")
            return
        try:
            self._send_esp_raw(packet, vtep)
        except BlockingIOError:
            _drop(net.counters, "underlay_busy")
            return
        except OSError:
            _drop(net.counters, "underlay_error")
            return
        c = net.counters
        c.tx_frames += 1
        c.tx_bytes += n
        c.esp_tx += 1

    def from_esp(self, packet: memoryview, src: str) -> None:
        """An IPv4 packet of protocol 50 (a raw socket gives the IP header too)."""
        n = len(packet)
        ihl = (packet[0] & 0x0F) * 4 if n else 0
        if n < ihl + 8 or ihl < 20:
            _drop(self.counters, "esp_truncated")
            return
        esp = packet[ihl:]
        sadb = self.sadb
        sa = None if sadb is None else sadb.rx(int.from_bytes(esp[0:4], "big"))
        if sa is None and sadb is not None and self._may_derive_for(src, sadb.local):
            # a peer we have not programmed yet (gossip is a moment behind): derive its SAs
            sadb.add_peer(_ip(src))
            self._lazy_esp_peers.add(src)
            sa = sadb.rx(int.from_bytes(esp[0:4], "big"))
        if sa is None:
            _drop(self.counters, "esp_unknown_spi")
            return
        try:
            next_header, payload = sa.decrypt_untrusted(esp)
        except BadPacket as exc:
            _drop(self.counters, exc.reason)
            return
        if next_header != 17 or len(payload) < 8 or _UDP.unpack_from(payload)[1] != self.data_port:
            _drop(self.counters, "esp_not_vxlan")
            return
        self._from_vxlan(memoryview(payload)[8:], encrypted=True)

    def _may_derive_for(
        self, src: str, local: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> bool:
        """Derive SAs on demand only for a bounded set of sources, never for ourselves.

        Each unknown source costs four SAs: an underlay sender spoofing many addresses must not
        grow the table without bound (peers programmed from the FDB are not counted here).
        """
        if src in self._lazy_esp_peers:
            return False  # already derived: the SPI is simply unknown
        return _ip(src) != local and len(self._lazy_esp_peers) < LAZY_ESP_PEERS

    def from_underlay(self, data: memoryview, src: tuple[str, int]) -> None:
        """A UDP datagram that arrived on the data port: it must be VXLAN for a known VNI."""
        self._from_vxlan(data, encrypted=False)

    def _from_vxlan(self, data: memoryview, encrypted: bool) -> None:
        n = len(data)
        if n < VXLAN_HLEN + ETH_HLEN:
            _drop(self.counters, "vxlan_truncated" if n < VXLAN_HLEN else "inner_truncated")
            return
        if not data[0] & 0x08:
            _drop(self.counters, "vxlan_no_i_flag")
            return
        vni = (data[4] << 16) | (data[5] << 8) | data[6]
        net = self.nets.get(vni)
        if net is None:
            _drop(self.counters, "unknown_vni")
            return
        if net.encrypted and not encrypted:  # CVE-2023-28841: never accept cleartext here
            _drop(net.counters, "plaintext_on_encrypted_vni")
            return
        if n - VXLAN_HLEN > net.max_frame:
            _drop(net.counters, "too_big")
            return
        dst = bytes(data[8:14])
        if dst in net.lb_macs:
            self._lb_reply(net, bytes(data[VXLAN_HLEN:]), dst, encrypted)
            return
        port = net.local.get(dst)
        if port is None:
            _drop(net.counters, "not_local")
            return
        c = net.counters
        c.rx_frames += 1
        c.rx_bytes += n - VXLAN_HLEN
        if encrypted:
            c.esp_rx += 1
        self._write_port(port, data[VXLAN_HLEN:])

    # --------------------------------------------------------------- VIP load balancing

    def _lb_from_tap(self, port: Port, frame: bytes, dst: bytes) -> None:
        """A frame to a VIP (a client's request) or to our LB MAC (a local backend's reply)."""
        net = port.net
        lb = net.lb
        if lb is None:
            return
        if frame[12:14] == _ETYPE_ARP:  # a unicast ARP request: the kernel's reachability probe
            self._answer_arp(port, frame)
            return
        vip = net.lb_macs[dst]
        if vip is None:
            self._lb_reply(net, frame, dst, None)
            return
        out = lb.forward(vip, frame, net.neigh)
        if out is not None:
            self.from_tap(port, out)  # now addressed to the backend: switched the normal way

    def _lb_reply(self, net: Net, frame: bytes, dst: bytes, encrypted: bool | None) -> None:
        """A frame to a VIP or LB MAC from the underlay (``encrypted`` set) or a local TAP.

        A backend's reply goes back to its client, always local (it was balanced here); one no
        connection claims goes to the port owning the MAC (the ingress sandbox), or is dropped.
        """
        lb = net.lb
        found = None if lb is None or net.lb_macs[dst] is not None else lb.reverse(frame)
        out: bytes | bytearray = frame
        if found is None:
            client = net.local.get(dst)
            if client is None:
                _drop(net.counters, "lb_no_conn")
                return
        else:
            client = net.local.get(found[0])
            out = found[1]
            if client is None:
                _drop(net.counters, "lb_client_gone")
                return
        if encrypted is None:
            self._deliver(client, out)
            return
        c = net.counters
        c.rx_frames += 1
        c.rx_bytes += len(out)
        if encrypted:
            c.esp_rx += 1
        self._write_port(client, out)

    def tick(self, now: float) -> None:
        """The engine's clock, about once a second: connections idle too long are forgotten."""
        self.now = now
        for net in list(self.nets.values()):
            if net.lb is not None:
                net.lb.tick(now)

    def _deliver(self, port: Port, frame: bytes | bytearray) -> None:
        c = port.net.counters
        c.local_frames += 1
        c.local_bytes += len(frame)
        self._write_port(port, frame)

    def _write_port(self, port: Port, frame: bytes | bytearray | memoryview) -> None:
        try:
            self._write(port.fd, frame)
        except BlockingIOError:
            _drop(port.net.counters, "tap_full")
        except OSError:  # EIO: the container's interface is down
            _drop(port.net.counters, "port_down")

    # ------------------------------------------------------ proxy ARP and neighbour discovery

    def _from_tap_multicast(self, port: Port, frame: bytes) -> None:
        etype = frame[12:14]
        if etype == _ETYPE_ARP:
            self._answer_arp(port, frame)
        elif etype == _ETYPE_IPV6 and len(frame) >= 78 and frame[20] == 58 and frame[54] == 135:
            self._answer_nd(port, frame)
        else:
            _drop(port.net.counters, "flood_suppressed")

    def _answer_arp(self, port: Port, frame: bytes) -> None:
        net = port.net
        if len(frame) < 42 or frame[14:22] != _ARP_ETH_IPV4_REQUEST:
            _drop(net.counters, "arp_not_request")
            return
        sender_mac, sender_ip, target_ip = frame[22:28], frame[28:32], frame[38:42]
        target_mac = net.neigh.get(target_ip)
        if target_ip == sender_ip:
            _drop(net.counters, "arp_gratuitous")
            return
        if target_mac is None:
            _drop(net.counters, "arp_unknown_target")
            return
        reply = (
            sender_mac
            + target_mac
            + _ETYPE_ARP
            + _ARP_ETH_IPV4_REPLY
            + target_mac
            + target_ip
            + sender_mac
            + sender_ip
        )
        net.counters.arp_replies += 1
        self._write_port(port, reply)

    def _answer_nd(self, port: Port, frame: bytes) -> None:
        net = port.net
        src_ip, target = frame[22:38], frame[62:78]
        target_mac = net.neigh.get(target)
        if src_ip == _IPV6_UNSPECIFIED:
            _drop(net.counters, "nd_dad")
            return
        if target_mac is None:
            _drop(net.counters, "nd_unknown_target")
            return
        icmp = bytearray(b"\x88\x00\x00\x00" + _ICMPV6_NA_FLAGS + target + b"\x02\x01" + target_mac)
        pseudo = target + src_ip + struct.pack("!I3xB", len(icmp), 58)
        struct.pack_into("!H", icmp, 2, internet_checksum(pseudo + icmp))
        ip6 = b"\x60\x00\x00\x00" + struct.pack("!HBB", len(icmp), 58, 255) + target + src_ip
        net.counters.nd_replies += 1
        self._write_port(port, frame[6:12] + target_mac + _ETYPE_IPV6 + ip6 + bytes(icmp))

    # ------------------------------------------------------------------ the table interface

    def apply(self, update: TableUpdate) -> list[int]:
        """Apply one control-plane update; return the TAP fds it released (stop watching them).

        Raises :class:`UsageError` for an update that names a VNI this switch does not have.
        """
        if isinstance(update, AddNetwork):
            self._add_network(update.spec)
        elif isinstance(update, RemoveNetwork):
            return self._remove_network(update.vni)
        elif isinstance(update, AddPort):
            self._add_port(update)
        elif isinstance(update, RemovePort):
            fd = self._remove_port(update.port_id)
            return [] if fd is None else [fd]
        elif isinstance(update, AddPeer):
            self._add_peer(update)
        elif isinstance(update, RemovePeer):
            self._remove_peer(update.vni, update.mac)
        elif isinstance(update, SetLoadBalancer | SetService | RemoveService | LbSettings):
            self._apply_lb(update)
        return []

    def _apply_lb(self, update: SetLoadBalancer | SetService | RemoveService | LbSettings) -> None:
        if isinstance(update, LbSettings):
            check_settings(update)  # UsageError before anything changed
            for net in self.nets.values():
                if net.lb is not None:
                    net.lb.configure(update)
            self.lb_settings = update
            return
        net = self._net(update.vni)
        lb = net.lb
        if lb is None:
            lb = net.lb = LoadBalancer(net.counters, self.lb_settings)
            lb.now = self.now
            net.lb_macs = lb.macs
        for mac, rst in lb.apply(update, net.neigh, net.local):  # RSTs for clients that lost
            port = net.local.get(mac)  # their backend: they fail now, not after 2 h of silence
            if port is not None:
                self._write_port(port, rst)

    def set_data_port(self, port: int) -> None:
        """Every remote VTEP is now reached on ``port`` (the cluster's data-path port)."""
        self.data_port = port
        for net in self.nets.values():
            net.remote = {mac: (vtep, port) for mac, (vtep, _) in net.remote.items()}

    def _net(self, vni: int) -> Net:
        net = self.nets.get(vni)
        if net is None:
            raise UsageError(f"no network with VNI {vni} on this host")
        return net

    def _add_network(self, spec: NetworkSpec) -> None:
        old = self.nets.get(spec.vni)
        net = Net(spec)
        if old is not None:  # re-programming keeps endpoints, peers and counters
            net.local, net.remote, net.counters = old.local, old.remote, old.counters
            net.lb, net.lb_macs = old.lb, old.lb_macs
            net.neigh.update(old.neigh)
            for port in net.local.values():
                port.net = net
        self.nets[spec.vni] = net
        self.peers.setdefault(spec.vni, {})

    def _remove_network(self, vni: int) -> list[int]:
        net = self.nets.pop(vni, None)
        self.peers.pop(vni, None)
        if net is None:
            return []
        released = [self._remove_port(port.port_id) for port in list(net.local.values())]
        return [fd for fd in released if fd is not None]

    def _add_port(self, update: AddPort) -> None:
        net = self._net(update.vni)
        port = Port(update.port_id, update.fd, update.mac, update.ip.packed, net)
        self.ports[port.port_id] = port
        self.ports_by_fd[port.fd] = port
        net.local[port.mac] = port
        net.neigh[port.ip] = port.mac

    def _remove_port(self, port_id: str) -> int | None:
        port = self.ports.pop(port_id, None)
        if port is None:
            return None
        self.ports_by_fd.pop(port.fd, None)
        net = port.net
        if net.local.get(port.mac) is port:
            del net.local[port.mac]
        if net.neigh.get(port.ip) == port.mac and port.mac not in net.lb_macs:
            del net.neigh[port.ip]  # (the LB address stays answered after the ingress sandbox)
        return port.fd

    def _add_peer(self, update: AddPeer) -> None:
        net = self._net(update.vni)
        net.remote[update.mac] = (str(update.vtep), self.data_port)
        net.neigh[update.ip.packed] = update.mac
        self.peers[update.vni][update.mac] = (str(update.ip), str(update.vtep), update.origin)

    def _remove_peer(self, vni: int, mac: bytes) -> None:
        net = self.nets.get(vni)
        entry = self.peers.get(vni, {}).pop(mac, None)
        if net is None or entry is None:
            return
        net.remote.pop(mac, None)
        ip = ipaddress.ip_address(entry[0]).packed
        if net.neigh.get(ip) == mac:
            del net.neigh[ip]

    # ------------------------------------------------------------------------- read side

    def stats(self) -> dict[str, Any]:
        return {
            "global": self.counters.as_dict(),
            "networks": {
                net.spec.name: {"vni": vni, **net.counters.as_dict()}
                for vni, net in list(self.nets.items())
            },
        }

    def lb_table(self) -> list[dict[str, Any]]:
        """Every VIP with its port map and backends (weight, active connections)."""
        return self._lb_rows(LoadBalancer.services)

    def conntrack(self) -> list[dict[str, Any]]:
        """Every load-balanced connection: client, VIP, SNAT and backend ends, state, expiry."""
        return self._lb_rows(LoadBalancer.connections)

    def _lb_rows(
        self, rows: Callable[[LoadBalancer], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:  # safe from another thread, as stats() is
        return [
            {"network": net.spec.name, "vni": vni, **row}
            for vni, net in list(self.nets.items())
            if net.lb is not None
            for row in rows(net.lb)
        ]

    def fdb(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for vni, peers in list(self.peers.items()):
            net = self.nets.get(vni)
            name = net.spec.name if net else "?"
            for mac, (ip, vtep, origin) in list(peers.items()):
                rows.append(
                    {
                        "network": name,
                        "vni": vni,
                        "mac": mac.hex(":"),
                        "ip": ip,
                        "vtep": vtep,
                        "origin": origin,
                    }
                )
        return rows
