"""The Internet checksum (RFC 1071), pseudo headers and incremental updates (RFC 1624).

The one's-complement sum of 16-bit words is computed without a per-byte loop: read the whole
buffer as one big integer and reduce it modulo ``0xFFFF`` (``2**16 == 1 (mod 0xFFFF)``, so every
16-bit word contributes its own value).  A remainder of 0 stands for ``0xFFFF`` unless the data is
all zero -- the one's-complement "negative zero" that end-around-carry addition produces.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from vxnet.errors import UsageError
from vxnet.wire._buf import Buffer, IPAddress

_PSEUDO_V4 = struct.Struct("!4s4sBBH")
_PSEUDO_V6 = struct.Struct("!16s16sI3xB")


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` (zero-padded to even length) plus ``initial``.

    ``initial`` is an earlier sum (for example of a pseudo header), so sums can be chained; every
    chunk but the last must then have even length.  The result is in ``0..0xFFFF``.
    """
    total = int.from_bytes(data, "big")
    if _nbytes(data) % 2:
        total <<= 8
    total += initial
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The RFC 1071 checksum of ``data``: the complement of its one's-complement sum.

    Over a header that already holds a correct checksum the result is 0.
    """
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_v4(src: IPv4Address, dst: IPv4Address, proto: int, length: int) -> bytes:
    """The IPv4 pseudo header (RFC 768 / RFC 9293) for an upper-layer segment of ``length``."""
    return _PSEUDO_V4.pack(src.packed, dst.packed, 0, proto, length)


def pseudo_header_v6(src: IPv6Address, dst: IPv6Address, proto: int, length: int) -> bytes:
    """The IPv6 pseudo header (RFC 8200 section 8.1) for an upper-layer packet of ``length``."""
    return _PSEUDO_V6.pack(src.packed, dst.packed, length, proto)


def pseudo_header(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    """The pseudo header of the right family; UsageError if ``src`` and ``dst`` differ in family."""
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        return pseudo_header_v4(src, dst, proto, length)
    if isinstance(src, IPv6Address) and isinstance(dst, IPv6Address):
        return pseudo_header_v6(src, dst, proto, length)
    raise UsageError(f"src {src!r} and dst {dst!r} must both be IPv4Address or both IPv6Address")


def transport_checksum(src: IPAddress, dst: IPAddress, proto: int, segment: Buffer) -> int:
    """The checksum of an upper-layer ``segment`` (UDP, TCP, ICMPv6) with its pseudo header.

    Computed over a segment whose checksum field is zero, it is the value to store; computed over
    a received segment, it is 0 when the checksum is correct.
    """
    length = _nbytes(segment)
    pseudo = pseudo_header(src, dst, proto, length)
    return internet_checksum(segment, ones_complement_sum(pseudo))


def checksum_adjust(csum: int, old16: int, new16: int) -> int:
    """Update checksum ``csum`` after a 16-bit field changed from ``old16`` to ``new16``.

    RFC 1624 equation 3: ``HC' = ~(~HC + ~m + m')``.
    """
    total = (~csum & 0xFFFF) + (~old16 & 0xFFFF) + new16
    return ~_fold(total) & 0xFFFF


def checksum_adjust32(csum: int, old32: int, new32: int) -> int:
    """Update checksum ``csum`` after a 32-bit field (an IPv4 address) changed value.

    Both halves are folded in at once: the field is two 16-bit words of the sum.
    """
    total = (~csum & 0xFFFF) + (~(old32 >> 16) & 0xFFFF) + (~old32 & 0xFFFF)
    total += (new32 >> 16) + (new32 & 0xFFFF)
    return ~_fold(total) & 0xFFFF


def _fold(total: int) -> int:
    """Fold carries back into the low 16 bits (end-around carry)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _nbytes(data: Buffer) -> int:
    """Length of ``data`` in bytes, whatever the memoryview's item format."""
    return data.nbytes if isinstance(data, memoryview) else len(data)
