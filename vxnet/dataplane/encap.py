"""Senders for frames with offload state: one system call per TCP super-frame, not per packet.

Both have the switch's ``SendOffload`` shape, ``send(vh, frame, (vtep, port), vxlan_header)``,
and are called for every frame read with ``NEEDS_CSUM`` (a super-frame or not):

* :class:`TunnelTx` (Linux 6.17+): one ``writev`` of the whole VXLAN-in-UDP-in-IPv4 packet to
  the host's underlay TAP, with a ``virtio_net_hdr`` of type ``UDP_TUNNEL_IPV4``.  The kernel
  forwards it to the underlay like any routed packet and segments it only where a device
  needs segments (not over veth: the peer's UDP socket receives it whole, as kernel VXLAN's
  own GSO packets are).  The inner checksum stays unfinished, as the kernel leaves it.
* :class:`SegmentTx` (the fallback): cut in Python (:mod:`vxnet.dataplane.gso`), checksums
  finished, and up to 64 equal segments handed over in one ``sendmsg`` with UDP GSO.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

from vxnet.dataplane.gso import finish_checksum, segment_tcp
from vxnet.dataplane.vnet import GSO_UDP_TUNNEL_IPV4, HDR, TUNNEL_HDR, TUNNEL_HDR_LEN

Buf = bytes | bytearray | memoryview
OUTER = 14 + 20 + 8 + 8  # Ethernet (to the TAP), IPv4, UDP, VXLAN: 50 bytes in front
_ETH_IP_UDP = 14 + 20 + 8
_MAX_IP = 65535
_U16 = struct.Struct("!H")
_TTL = 65  # the kernel forwards it once: it leaves the host with 64
_SRC_MAC = b"\x02\x00\x00\x00\x00\x01"
UDP_SEGMENT = 103  # SOL_UDP options Python 3.11 has no names for
UDP_GRO = 104
SOL_UDP = 17
MAX_GSO_SEGMENTS = 64
MAX_UDP_PAYLOAD = 65507


class TunnelTx:
    """Writes whole VXLAN super-frames to the underlay TAP ``fd`` (see the module docstring)."""

    def __init__(self, fd: int, tap_mac: bytes, source: str, data_port: int) -> None:
        self.fd = fd
        self._mac = tap_mac
        self._buf = bytearray(TUNNEL_HDR_LEN + OUTER)
        self._view = memoryview(self._buf)
        self._outer: dict[tuple[str, int], tuple[bytes, int]] = {}
        self.rebind(source, data_port)

    def rebind(self, source: str, data_port: int) -> None:
        """The VTEP moved (``SetUnderlay``): new source address and UDP source port."""
        self._src = socket.inet_aton(source)
        self._sport = data_port
        self._outer.clear()

    def _template(self, vtep: tuple[str, int]) -> tuple[bytes, int]:
        """Ethernet, IPv4 and UDP headers to ``vtep`` with zero lengths; the IP header's sum."""
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            0,
            0,
            0x4000,  # DF: VXLAN is never fragmented
            _TTL,
            17,
            0,
            self._src,
            socket.inet_aton(vtep[0]),
        )
        udp = struct.pack("!HHHH", self._sport, vtep[1], 0, 0)  # no outer checksum (RFC 7348)
        entry = (self._mac + _SRC_MAC + b"\x08\x00" + ip + udp, int.from_bytes(ip, "big") % 0xFFFF)
        self._outer[vtep] = entry
        return entry

    def send(self, vh: Buf, frame: Buf, vtep: tuple[str, int], vxlan: bytes) -> int:
        n = len(frame)
        total = 20 + 8 + 8 + n
        if total > _MAX_IP:  # cannot be one IP packet: cut it here instead
            return _segmented(self._segment_fallback, vh, frame, vtep, vxlan)
        flags, gso_type, _, gso_size, start, offset = HDR.unpack_from(vh)
        buf = self._buf
        TUNNEL_HDR.pack_into(
            buf,
            0,
            flags,
            gso_type | GSO_UDP_TUNNEL_IPV4 if gso_type else 0,
            0,  # hdr_len: a hint the kernel need not have
            gso_size,
            start + OUTER,
            offset,
            0,  # num_buffers
            0,  # hash
            0,
            0,
            14 + 20,  # outer transport header
            OUTER + 14,  # inner network header
        )
        outer = self._outer.get(vtep) or self._template(vtep)
        h = TUNNEL_HDR_LEN
        buf[h : h + _ETH_IP_UDP] = outer[0]
        s = (outer[1] + total) % 0xFFFF
        _U16.pack_into(buf, h + 16, total)
        _U16.pack_into(buf, h + 24, ~s & 0xFFFF if s else 0)
        _U16.pack_into(buf, h + 38, 16 + n)
        buf[h + _ETH_IP_UDP : h + OUTER] = vxlan
        return os.writev(self.fd, (self._view, frame))

    def _segment_fallback(self, seg: bytearray, vtep: tuple[str, int], vxlan: bytes) -> int:
        return self.send(_PLAIN_HDR, seg, vtep, vxlan)


_PLAIN_HDR = bytes(HDR.size)


def _segmented(
    send: Callable[[bytearray, tuple[str, int], bytes], int],
    vh: Buf,
    frame: Buf,
    vtep: tuple[str, int],
    vxlan: bytes,
) -> int:
    flags, gso_type, _, gso_size, start, offset = HDR.unpack_from(vh)
    if gso_type:
        return sum(send(seg, vtep, vxlan) for seg in segment_tcp(frame, gso_size))
    seg = bytearray(frame)
    if flags & 1:
        finish_checksum(seg, start, offset)
    return send(seg, vtep, vxlan)


class SegmentTx:
    """The fallback: segments cut in Python, sent in batches with UDP GSO (``UDP_SEGMENT``).

    A batch is one buffer of ``[VXLAN | segment]`` datagrams, all ``gso_size`` long but the
    last, and at most 64 of them within one UDP payload; the kernel (or the peer's UDP GRO
    socket) sees the datagrams one by one.
    """

    def __init__(self, sock: Callable[[], socket.socket]) -> None:
        self._sock = sock  # the engine's current underlay socket (it changes on SetUnderlay)
        self._buf = bytearray(MAX_UDP_PAYLOAD)
        self._view = memoryview(self._buf)

    def send(self, vh: Buf, frame: Buf, vtep: tuple[str, int], vxlan: bytes) -> int:
        flags, gso_type, _, gso_size, start, offset = HDR.unpack_from(vh)
        sock = self._sock()
        if not gso_type:
            seg = bytearray(frame)
            if flags & 1:
                finish_checksum(seg, start, offset)
            return sock.sendmsg((vxlan, seg), (), 0, vtep)
        buf, view = self._buf, self._view
        used = count = seg_len = sent = 0
        for seg in segment_tcp(frame, gso_size):
            size = 8 + len(seg)
            if count and (
                count == MAX_GSO_SEGMENTS or used + size > MAX_UDP_PAYLOAD or size > seg_len
            ):
                sent += self._flush(sock, view[:used], seg_len, count, vtep)
                used = count = 0
            if not count:
                seg_len = size
            buf[used : used + 8] = vxlan
            buf[used + 8 : used + size] = seg
            used += size
            count += 1
        if count:
            sent += self._flush(sock, view[:used], seg_len, count, vtep)
        return sent

    @staticmethod
    def _flush(
        sock: socket.socket, data: memoryview, seg_len: int, count: int, vtep: tuple[str, int]
    ) -> int:
        if count == 1:
            return sock.sendmsg((data,), (), 0, vtep)
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg_len))]
        return sock.sendmsg((data,), cmsg, 0, vtep)
