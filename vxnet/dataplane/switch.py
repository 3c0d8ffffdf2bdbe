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
from collections.abc import Callable, Iterable, Sequence

from vxnet.dataplane.gro import Coalescer
from vxnet.dataplane.gso import finish_checksum, segment_tcp
from vxnet.dataplane.model import ETH_HLEN, Counters, Net, Port
from vxnet.dataplane.model import drop as _drop
from vxnet.dataplane.proxy import (
    ETYPE_ARP,
    ETYPE_IPV6,
    arp_reply,
    is_neighbour_solicitation,
    nd_advertisement,
)
from vxnet.dataplane.switch_tables import SwitchTables
from vxnet.dataplane.tables import (
    LbSettings,
)
from vxnet.dataplane.vnet import GSO_TCPV4, GSO_TCPV6, HDR, NEEDS_CSUM, PLAIN
from vxnet.errors import BadPacket, UsageError
from vxnet.esp.sa import SequenceExhausted
from vxnet.esp.sadb import SADB

VXLAN_HLEN = 8
Buf = bytes | bytearray | memoryview
#: ``(fd, virtio_net_hdr or b"", frame)``: one frame (or super-frame) to a TAP.
WriteFd = Callable[[int, Buf, Buf], int]
SendEsp = Callable[[Buf, str], int]
#: ``(virtio_net_hdr, frame, (VTEP, port), VXLAN header)``: a frame with offload state.
SendOffload = Callable[[Buf, Buf, tuple[str, int], bytes], int]
LAZY_ESP_PEERS = 64  # sources whose SAs may be derived from a first packet, at most
_UDP = struct.Struct("!HHHH")


def _no_esp_socket(packet: Buf, vtep: str) -> int:
    raise OSError("no ESP socket")


def _never(fd: int) -> bool:
    return False


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


SendUdp = Callable[[Sequence[Buf], tuple[str, int]], int]


class Switch(SwitchTables):
    """All VNIs of one host.  ``from_tap`` and ``from_underlay`` are the hot path."""

    def __init__(
        self,
        write_fd: WriteFd,
        send_udp: SendUdp,
        data_port: int = 4789,
        send_esp: SendEsp | None = None,
        offload: bool = False,
        send_offload: SendOffload | None = None,
        is_vnet: Callable[[int], bool] | None = None,
    ) -> None:
        """``offload``: plain networks' ports take partial checksums and TCP super-frames;
        ``send_offload`` sends such a frame to a VTEP (default: :meth:`segment_send`)."""
        self._write = write_fd
        self._send = send_udp
        self.offload = offload
        self._send_offload: SendOffload = send_offload or self.segment_send
        self._rx_hdr = bytearray(PLAIN)  # the header _rx_vnet builds, reused for every frame
        self._is_vnet = is_vnet or _never  # does this fd carry a virtio_net_hdr?
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
        #: Receive coalescing for ESP (the engine turns it on and calls :meth:`flush_rx` after
        #: every batch of reads); None: every decrypted frame is written on its own.
        self.gro: Coalescer | None = None

    def coalesce_rx(self) -> None:
        """Merge decrypted TCP segments into super-frames until :meth:`flush_rx` (``gro.py``)."""
        self.gro = Coalescer(self._emit_rx)

    def flush_rx(self) -> None:
        """A batch of reads is over: frames held for merging go to their TAPs now."""
        if self.gro is not None:
            self.gro.flush()

    def _emit_rx(self, port: Port, vh: Buf, frame: Buf) -> None:
        if self._write_raw(port, vh, frame) and vh[1]:
            port.net.counters.gso_rx += 1

    # ----------------------------------------------------------------------------- hot path

    def from_tap(self, port: Port, frame: Buf, vh: Buf = PLAIN) -> None:
        """A frame a container sent on its ``eth0``, with its ``virtio_net_hdr`` (``vh``).

        ``vh`` says whether the frame is a TCP super-frame (``gso_type``) and whether its L4
        checksum is unfinished (``NEEDS_CSUM``); both travel on with the frame.
        """
        net = port.net
        n = len(frame)
        if n < ETH_HLEN:
            _drop(net.counters, "runt")
            return
        dst = bytes(frame[0:6])
        if dst[0] & 1:  # broadcast or multicast: never flooded, answered here or dropped
            self._from_tap_multicast(port, bytes(frame))
            return
        gso = vh[1]
        if n > net.max_frame and not gso:
            _drop(net.counters, "too_big")
            return
        if dst in net.lb_macs:
            self._lb_from_tap(port, bytes(frame), dst, vh)
            return
        local = net.local.get(dst)
        if local is not None:
            self._deliver(local, frame, vh)
            return
        vtep = net.remote.get(dst)
        if vtep is None:
            _drop(net.counters, "no_route_out" if dst == net.spec.gateway_mac else "unknown_dst")
            return
        if net.encrypted:
            if vh[0] & NEEDS_CSUM:  # offloads are off on encrypted networks: only if misused
                for seg in self._complete(vh, frame, net):
                    self._send_esp(net, seg, vtep[0])
            else:
                self._send_esp(net, frame, vtep[0])
            return
        try:
            if vh[0] & NEEDS_CSUM:
                self._send_offload(vh, frame, vtep, net.hdr)
            else:
                self._send((net.hdr, frame), vtep)
        except BlockingIOError:
            _drop(net.counters, "underlay_busy")
            return
        except BadPacket as exc:
            _drop(net.counters, exc.reason)
            return
        except OSError:
            _drop(net.counters, "underlay_error")
            return
        c = net.counters
        c.tx_frames += 1
        c.tx_bytes += n
        if gso:
            c.gso_tx += 1

    def _complete(self, vh: Buf, frame: Buf, net: Net) -> list[bytearray]:
        """Complete frames from one with offload state: segmented, checksums finished."""
        flags, gso_type, _, gso_size, start, offset = HDR.unpack_from(vh)
        try:
            if gso_type:
                return list(segment_tcp(frame, gso_size))
            out = bytearray(frame)
            if flags & NEEDS_CSUM:
                finish_checksum(out, start, offset)
        except BadPacket as exc:
            _drop(net.counters, exc.reason)
            return []
        return [out]

    def segment_send(self, vh: Buf, frame: Buf, vtep: tuple[str, int], vxlan: bytes) -> int:
        """The simplest offload sender: cut and finish in Python, one datagram per segment."""
        _flags, gso_type, _, gso_size, start, offset = HDR.unpack_from(vh)
        if gso_type:
            segments: Iterable[bytearray] = segment_tcp(frame, gso_size)
        else:
            segments = [bytearray(frame)]
            finish_checksum(segments[0], start, offset)
        sent = 0
        for seg in segments:
            sent += self._send((vxlan, seg), vtep)
        return sent

    def _send_esp(self, net: Net, frame: Buf, vtep: str) -> None:
        """ESP transport mode over the VXLAN datagram: UDP header + VXLAN + frame, encrypted."""
        sadb = self.sadb
        if sadb is None:
            _drop(net.counters, "esp_no_keys")
            return
        n = len(frame)
        head = _UDP.pack(self.data_port, self.data_port, 16 + n, 0) + net.hdr  # UDP sum 0
        try:
            packet = sadb.tx(_ip(vtep)).seal(head, frame)  # a view: sent before the next seal
        except SequenceExhausted:
            _drop(net.counters, "esp_seq_exhausted")
            return
        except UsageError:  # bigger than one ESP packet: never fragmented
            _drop(net.counters, "too_big")
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
        self._from_vxlan(memoryview(bytearray(payload))[8:], encrypted=True)

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
        """A UDP datagram that arrived on the data port: it must be VXLAN for a known VNI.

        ``data`` is writable: with offloads, the inner L4 checksum field is rewritten in place.
        """
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
        if n - VXLAN_HLEN > net.max_frame and not net.offload:
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
        gro = self.gro
        if encrypted and gro is not None and port.vnet:  # held, merged, written at flush_rx
            c = net.counters
            c.rx_frames += 1
            c.rx_bytes += n - VXLAN_HLEN
            c.esp_rx += 1
            gro.push(port, data[VXLAN_HLEN:])
            return
        if self._write_port(port, data[VXLAN_HLEN:]):
            c = net.counters
            c.rx_frames += 1
            c.rx_bytes += n - VXLAN_HLEN
            if encrypted:
                c.esp_rx += 1
            if n - VXLAN_HLEN > net.max_frame:
                c.gso_rx += 1

    def _rx_vnet(self, port: Port, frame: bytearray | memoryview) -> Buf | None:
        """The ``virtio_net_hdr`` for a complete frame from the wire to an offload port.

        A TCP/UDP checksum is handed to the kernel as unfinished (``NEEDS_CSUM``, the field
        rewritten to the pseudo-header sum): a frame from a peer with offloads carries one, and
        only this way can one frame bigger than the MTU, a TCP super-frame, go in whole
        (``gso_size`` from the network MTU).  Anything else goes in as it came.  None: dropped.
        """
        net = port.net
        n = len(frame)
        if n >= 42 and frame[12] == 8 and frame[13] == 0 and frame[14] >> 4 == 4:
            proto = frame[23]
            if proto in {6, 17} and not (frame[20] & 0x3F or frame[21]):
                start = 14 + (frame[14] & 15) * 4
                l4_len = ((frame[16] << 8) | frame[17]) + 14 - start
                addrs = frame[26:34]
                gso = GSO_TCPV4
            else:
                start = 0
        elif n >= 62 and frame[12] == 0x86 and frame[13] == 0xDD and frame[20] in {6, 17}:
            proto = frame[20]
            start = 54
            l4_len = (frame[18] << 8) | frame[19]
            addrs = frame[22:54]
            gso = GSO_TCPV6
        else:
            start = 0
        if start:
            offset = 16 if proto == 6 else 6
            at = start + offset
            if l4_len >= offset + 2 and start + l4_len <= n and at + 2 <= n:
                s = (int.from_bytes(addrs, "big") % 0xFFFF + proto + l4_len) % 0xFFFF or 0xFFFF
                frame[at] = s >> 8
                frame[at + 1] = s & 0xFF
                hdr = self._rx_hdr
                if n <= net.max_frame:
                    HDR.pack_into(hdr, 0, NEEDS_CSUM, 0, 0, 0, start, offset)
                    return hdr
                mss = net.spec.mtu - (start - 14) - (frame[start + 12] >> 4) * 4
                if proto == 6 and mss > 0:
                    HDR.pack_into(hdr, 0, NEEDS_CSUM, gso, 0, mss, start, offset)
                    return hdr
        if n > net.max_frame:
            _drop(net.counters, "too_big")
            return None
        return PLAIN

    # --------------------------------------------------------------- VIP load balancing

    def _lb_from_tap(self, port: Port, frame: bytes, dst: bytes, vh: Buf) -> None:
        """A frame to a VIP (a client's request) or to our LB MAC (a local backend's reply)."""
        net = port.net
        lb = net.lb
        if lb is None:
            return
        if frame[12:14] == ETYPE_ARP:  # a unicast ARP request: the kernel's reachability probe
            self._answer_arp(port, frame)
            return
        vip = net.lb_macs[dst]
        if vip is None:
            self._lb_reply(net, frame, dst, None, vh)
            return
        out = lb.forward(vip, frame, net.neigh, bool(vh[0] & NEEDS_CSUM))
        if out is not None:
            self.from_tap(port, out, vh)  # now addressed to the backend: switched the normal way

    def _lb_reply(
        self, net: Net, frame: bytes, dst: bytes, encrypted: bool | None, vh: Buf = PLAIN
    ) -> None:
        """A frame to a VIP or LB MAC from the underlay (``encrypted`` set) or a local TAP.

        A backend's reply goes back to its client, always local (it was balanced here); one no
        connection claims goes to the port owning the MAC (the ingress sandbox), or is dropped.
        From the underlay, the checksum state is settled on delivery (:meth:`_rx_vnet`).
        """
        lb = net.lb
        partial = encrypted is None and bool(vh[0] & NEEDS_CSUM)
        found = None
        if lb is not None and net.lb_macs[dst] is None:
            found = lb.reverse(frame, partial)
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
            self._deliver(client, out, vh)
            return
        if self._write_port(client, bytearray(out)):
            c = net.counters
            c.rx_frames += 1
            c.rx_bytes += len(out)
            if encrypted:
                c.esp_rx += 1

    def tick(self, now: float) -> None:
        """The engine's clock, about once a second: connections idle too long are forgotten."""
        self.now = now
        for net in list(self.nets.values()):
            if net.lb is not None:
                net.lb.tick(now)

    def _deliver(self, port: Port, frame: Buf, vh: Buf) -> None:
        """Between two local TAPs: offload state goes along (or is settled in Python)."""
        c = port.net.counters
        c.local_frames += 1
        c.local_bytes += len(frame)
        if port.offload:
            self._write_raw(port, vh, frame)
        elif vh[0] & NEEDS_CSUM:
            for seg in self._complete(vh, frame, port.net):
                self._write_raw(port, port.plain, seg)
        else:
            self._write_raw(port, port.plain, frame)

    def _write_port(self, port: Port, frame: bytearray | memoryview) -> bool:
        """A complete frame (from the wire, or made here) to a port; False if dropped."""
        if port.offload:
            vh = self._rx_vnet(port, frame)
            if vh is None:
                return False
        else:
            vh = port.plain
        return self._write_raw(port, vh, frame)

    def _write_raw(self, port: Port, vh: Buf, frame: Buf) -> bool:
        try:
            self._write(port.fd, vh, frame)
        except BlockingIOError:
            _drop(port.net.counters, "tap_full")
            return False
        except OSError:  # EIO: the container's interface is down
            _drop(port.net.counters, "port_down")
            return False
        return True

    # ------------------------------------------------------ proxy ARP and neighbour discovery

    def _from_tap_multicast(self, port: Port, frame: bytes) -> None:
        etype = frame[12:14]
        if etype == ETYPE_ARP:
            self._answer_arp(port, frame)
        elif etype == ETYPE_IPV6 and is_neighbour_solicitation(frame):
            reply, reason = nd_advertisement(frame, port.net.neigh)
            self._answer(port, reply, reason, "nd")
        else:
            _drop(port.net.counters, "flood_suppressed")

    def _answer_arp(self, port: Port, frame: bytes) -> None:
        reply, reason = arp_reply(frame, port.net.neigh)
        self._answer(port, reply, reason, "arp")

    def _answer(self, port: Port, reply: bytes | None, reason: str | None, kind: str) -> None:
        c = port.net.counters
        if reply is None:
            _drop(c, reason or kind)
            return
        if kind == "arp":
            c.arp_replies += 1
        else:
            c.nd_replies += 1
        self._write_raw(port, port.plain, reply)
