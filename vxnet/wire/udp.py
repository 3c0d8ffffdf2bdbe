"""UDP (RFC 768), with the pseudo-header checksum for IPv4 and IPv6."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, IPAddress, byte_view, check_uint, need
from vxnet.wire.checksum import transport_checksum
from vxnet.wire.ipv4 import IPPROTO_UDP

UDP_HEADER_LEN = 8

_HEADER = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class Udp:
    """A UDP datagram.

    ``checksum`` is the value on the wire after decoding.  On encode, an explicit ``checksum`` is
    written as is; ``None`` means "compute it" (from the IPs given to :meth:`encode`, else 0).
    Use ``dataclasses.replace(udp, checksum=None)`` before re-encoding a changed datagram.
    """

    sport: int
    dport: int
    payload: bytes
    checksum: int | None = None

    def encode(self, src_ip: IPAddress | None = None, dst_ip: IPAddress | None = None) -> bytes:
        """The datagram's bytes; the checksum covers the pseudo header of ``src_ip``/``dst_ip``."""
        check_uint("sport", self.sport, 16)
        check_uint("dport", self.dport, 16)
        length = UDP_HEADER_LEN + len(self.payload)
        if length > 0xFFFF:
            raise UsageError(f"UDP datagram of {length} bytes > 65535")
        if self.checksum is not None:
            check_uint("checksum", self.checksum, 16)
            return _HEADER.pack(self.sport, self.dport, length, self.checksum) + self.payload
        segment = bytearray(_HEADER.pack(self.sport, self.dport, length, 0))
        segment += self.payload
        if src_ip is not None or dst_ip is not None:
            if src_ip is None or dst_ip is None:
                raise UsageError("give both src_ip and dst_ip to compute a UDP checksum")
            # A computed 0 is sent as 0xFFFF: 0 on the wire means "no checksum" (RFC 768).
            csum = transport_checksum(src_ip, dst_ip, IPPROTO_UDP, segment) or 0xFFFF
            struct.pack_into("!H", segment, 6, csum)
        return bytes(segment)

    def verify_checksum(self, src_ip: IPAddress, dst_ip: IPAddress) -> bool:
        """True if the checksum is right for these IPs (0 counts as right on IPv4 only)."""
        if self.checksum is None:
            return False
        if self.checksum == 0:
            return not isinstance(src_ip, IPv6Address)
        return transport_checksum(src_ip, dst_ip, IPPROTO_UDP, self.encode()) == 0


def decode_udp_untrusted(data: Buffer) -> Udp:
    """Parse a UDP datagram; bytes past its length field (padding) are dropped.

    The checksum is kept, not checked: that needs the IP addresses (:meth:`Udp.verify_checksum`).
    """
    view = byte_view(data)
    need(view, UDP_HEADER_LEN, "udp_truncated")
    sport, dport, length, checksum = _HEADER.unpack_from(view)
    if length < UDP_HEADER_LEN:
        raise BadPacket("udp_bad_length", f"length field {length}")
    need(view, length, "udp_truncated")
    return Udp(sport, dport, bytes(view[UDP_HEADER_LEN:length]), checksum)


def verify_udp_checksum_untrusted(segment: Buffer, src_ip: IPAddress, dst_ip: IPAddress) -> bool:
    """Check a received datagram's checksum straight from its bytes, without decoding it.

    ``segment`` must be exactly the UDP datagram (as delimited by the IP layer).
    """
    view = byte_view(segment)
    if len(view) < UDP_HEADER_LEN:
        return False
    if view[6] == 0 and view[7] == 0:
        return not isinstance(src_ip, IPv6Address)
    return transport_checksum(src_ip, dst_ip, IPPROTO_UDP, view) == 0
