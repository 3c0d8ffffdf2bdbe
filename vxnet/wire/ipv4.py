"""IPv4 headers (RFC 791): decode with full validation, encode with length and checksum."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, byte_view, check_ipv4, check_uint, need
from vxnet.wire.checksum import internet_checksum

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ESP = 50
IPPROTO_ICMPV6 = 58

IPV4_HEADER_LEN = 20
IPV4_MAX_OPTIONS = 40
FLAG_DF = 0x2
FLAG_MF = 0x1

_HEADER = struct.Struct("!BBHHHBBH4s4s")


@dataclass(frozen=True, slots=True)
class IPv4:
    """An IPv4 packet.  ``flags`` is the 3-bit field (2 = DF); ``tos`` holds DSCP and ECN."""

    src: IPv4Address
    dst: IPv4Address
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0
    flags: int = FLAG_DF
    frag_offset: int = 0
    tos: int = 0
    options: bytes = b""

    @property
    def header_len(self) -> int:
        """20 plus the options."""
        return IPV4_HEADER_LEN + len(self.options)

    @property
    def is_fragment(self) -> bool:
        """True for any piece of a fragmented datagram (MF set or a non-zero offset)."""
        return bool(self.flags & FLAG_MF) or self.frag_offset != 0

    def encode(self) -> bytes:
        """The packet's bytes, with total length and header checksum filled in."""
        self._check()
        header = bytearray(
            _HEADER.pack(
                4 << 4 | self.header_len // 4,
                self.tos,
                self.header_len + len(self.payload),
                self.ident,
                self.flags << 13 | self.frag_offset,
                self.ttl,
                self.proto,
                0,
                self.src.packed,
                self.dst.packed,
            )
        )
        header += self.options
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return bytes(header) + self.payload

    def _check(self) -> None:
        check_ipv4("src", self.src)
        check_ipv4("dst", self.dst)
        for name, value, bits in (
            ("proto", self.proto, 8),
            ("ttl", self.ttl, 8),
            ("ident", self.ident, 16),
            ("flags", self.flags, 3),
            ("frag_offset", self.frag_offset, 13),
            ("tos", self.tos, 8),
        ):
            check_uint(name, value, bits)
        if len(self.options) % 4 or len(self.options) > IPV4_MAX_OPTIONS:
            raise UsageError(
                f"IPv4 options must be a multiple of 4 bytes, at most 40; got {len(self.options)}"
            )
        if self.header_len + len(self.payload) > 0xFFFF:
            raise UsageError(f"IPv4 packet of {self.header_len + len(self.payload)} bytes > 65535")


def decode_ipv4_untrusted(data: Buffer) -> IPv4:
    """Parse and validate an IPv4 packet; bytes past the total length (padding) are dropped."""
    view = byte_view(data)
    need(view, IPV4_HEADER_LEN, "ipv4_truncated")
    ver_ihl, tos, total, ident, frag, ttl, proto, _, src, dst = _HEADER.unpack_from(view)
    if ver_ihl >> 4 != 4:
        raise BadPacket("ipv4_bad_version", f"version {ver_ihl >> 4}")
    header_len = (ver_ihl & 0xF) * 4
    if header_len < IPV4_HEADER_LEN:
        raise BadPacket("ipv4_bad_ihl", f"IHL {ver_ihl & 0xF}")
    need(view, header_len, "ipv4_truncated")
    if total < header_len:
        raise BadPacket("ipv4_bad_total_length", f"total {total} < header {header_len}")
    if total > len(view):
        raise BadPacket("ipv4_truncated", f"total {total} > buffer {len(view)}")
    if internet_checksum(view[:header_len]) != 0:
        raise BadPacket("ipv4_bad_checksum")
    return IPv4(
        IPv4Address(src),
        IPv4Address(dst),
        proto,
        bytes(view[header_len:total]),
        ttl,
        ident,
        frag >> 13,
        frag & 0x1FFF,
        tos,
        bytes(view[IPV4_HEADER_LEN:header_len]),
    )
