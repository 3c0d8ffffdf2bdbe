"""TCP segments (RFC 9293): header, options as raw bytes, pseudo-header checksum."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, IPAddress, byte_view, check_uint, need
from vxnet.wire.checksum import transport_checksum
from vxnet.wire.ipv4 import IPPROTO_TCP

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80
AE = 0x100  # RFC 9768 AccECN (formerly NS); bits above it are reserved

TCP_HEADER_LEN = 20
TCP_MAX_OPTIONS = 40

_HEADER = struct.Struct("!HHIIHHHH")


@dataclass(frozen=True, slots=True)
class Tcp:
    """A TCP segment.

    ``flags`` holds the 12 bits after the data offset (reserved bits, AE, CWR ... FIN), so any
    header round-trips.  ``options`` are raw bytes, padded by the caller to a multiple of 4.
    ``checksum`` works as in :class:`~vxnet.wire.udp.Udp`: explicit is written as is, ``None`` is
    computed from the IPs given to :meth:`encode` (else 0).
    """

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    urgent: int = 0
    options: bytes = b""
    checksum: int | None = None

    def encode(self, src_ip: IPAddress | None = None, dst_ip: IPAddress | None = None) -> bytes:
        """The segment's bytes; the checksum covers the pseudo header of ``src_ip``/``dst_ip``."""
        self._check()
        offset_flags = (TCP_HEADER_LEN + len(self.options)) // 4 << 12 | self.flags
        fields = (self.sport, self.dport, self.seq, self.ack, offset_flags, self.window)
        if self.checksum is not None:
            check_uint("checksum", self.checksum, 16)
            header = _HEADER.pack(*fields, self.checksum, self.urgent)
            return header + self.options + self.payload
        segment = bytearray(_HEADER.pack(*fields, 0, self.urgent))
        segment += self.options
        segment += self.payload
        if src_ip is not None or dst_ip is not None:
            if src_ip is None or dst_ip is None:
                raise UsageError("give both src_ip and dst_ip to compute a TCP checksum")
            csum = transport_checksum(src_ip, dst_ip, IPPROTO_TCP, segment)
            struct.pack_into("!H", segment, 16, csum)
        return bytes(segment)

    def verify_checksum(self, src_ip: IPAddress, dst_ip: IPAddress) -> bool:
        """True if ``checksum`` is right for a segment sent from ``src_ip`` to ``dst_ip``."""
        if self.checksum is None:
            return False
        return transport_checksum(src_ip, dst_ip, IPPROTO_TCP, self.encode()) == 0

    def _check(self) -> None:
        for name, value, bits in (
            ("sport", self.sport, 16),
            ("dport", self.dport, 16),
            ("seq", self.seq, 32),
            ("ack", self.ack, 32),
            ("flags", self.flags, 12),
            ("window", self.window, 16),
            ("urgent", self.urgent, 16),
        ):
            check_uint(name, value, bits)
        if len(self.options) % 4 or len(self.options) > TCP_MAX_OPTIONS:
            raise UsageError(
                f"TCP options must be padded to a multiple of 4 bytes, at most 40; "
                f"got {len(self.options)}"
            )


def decode_tcp_untrusted(data: Buffer) -> Tcp:
    """Parse a TCP segment: ``data`` must be exactly the segment (as the IP layer delimits it).

    The checksum is kept, not checked: that needs the IP addresses (:meth:`Tcp.verify_checksum`).
    """
    view = byte_view(data)
    need(view, TCP_HEADER_LEN, "tcp_truncated")
    sport, dport, seq, ack, offset_flags, window, checksum, urgent = _HEADER.unpack_from(view)
    header_len = (offset_flags >> 12) * 4
    if header_len < TCP_HEADER_LEN:
        raise BadPacket("tcp_bad_offset", f"data offset {offset_flags >> 12}")
    need(view, header_len, "tcp_truncated")
    return Tcp(
        sport,
        dport,
        seq,
        ack,
        offset_flags & 0xFFF,
        window,
        bytes(view[header_len:]),
        urgent,
        bytes(view[TCP_HEADER_LEN:header_len]),
        checksum,
    )


def verify_tcp_checksum_untrusted(segment: Buffer, src_ip: IPAddress, dst_ip: IPAddress) -> bool:
    """Check a received segment's checksum straight from its bytes, without decoding it."""
    return transport_checksum(src_ip, dst_ip, IPPROTO_TCP, byte_view(segment)) == 0
