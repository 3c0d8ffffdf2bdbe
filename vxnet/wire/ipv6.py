"""IPv6 (RFC 8200): the fixed header plus a walk over the extension header chain."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, byte_view, check_ipv6, check_uint, need

IPV6_HEADER_LEN = 40

EXT_HOP_BY_HOP = 0
EXT_ROUTING = 43
EXT_FRAGMENT = 44
EXT_AH = 51
EXT_DEST_OPTS = 60
IPPROTO_NONE = 59

#: Extension headers walked by the decoder; any other next-header value is the upper layer.
EXTENSION_HEADERS = frozenset({EXT_HOP_BY_HOP, EXT_ROUTING, EXT_FRAGMENT, EXT_AH, EXT_DEST_OPTS})

_HEADER = struct.Struct("!IHBB16s16s")


@dataclass(frozen=True, slots=True)
class IPv6:
    """An IPv6 packet.

    ``next_header`` is the upper-layer protocol; ``extensions`` holds each extension header in
    order as ``(type, raw bytes)``.  The first byte of each raw header (its own next-header field)
    is rewritten on encode to chain the headers together.
    """

    src: IPv6Address
    dst: IPv6Address
    next_header: int
    payload: bytes
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    extensions: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        """The packet's bytes, with the payload length and the header chain filled in."""
        self._check()
        types = [kind for kind, _ in self.extensions] + [self.next_header]
        chain = b"".join(
            bytes((types[i + 1],)) + raw[1:] for i, (_, raw) in enumerate(self.extensions)
        )
        length = len(chain) + len(self.payload)
        if length > 0xFFFF:
            raise UsageError(f"IPv6 payload of {length} bytes > 65535 (jumbograms unsupported)")
        first = 6 << 28 | self.traffic_class << 20 | self.flow_label
        header = _HEADER.pack(
            first, length, types[0], self.hop_limit, self.src.packed, self.dst.packed
        )
        return header + chain + self.payload

    def _check(self) -> None:
        check_ipv6("src", self.src)
        check_ipv6("dst", self.dst)
        check_uint("next_header", self.next_header, 8)
        check_uint("hop_limit", self.hop_limit, 8)
        check_uint("traffic_class", self.traffic_class, 8)
        check_uint("flow_label", self.flow_label, 20)
        for kind, raw in self.extensions:
            _check_extension(kind, raw)


def _check_extension(kind: int, raw: bytes) -> None:
    if kind not in EXTENSION_HEADERS:
        raise UsageError(f"{kind} is not an IPv6 extension header type")
    if len(raw) < 2 or len(raw) != extension_len(kind, raw[1]):
        raise UsageError(
            f"extension header {kind} of {len(raw)} bytes disagrees with its length "
            "byte (8-byte units past the first 8; AH: 4-byte units past the first 8)"
        )


def extension_len(kind: int, length_field: int) -> int:
    """Total bytes of an extension header from its length byte (AH counts 4-byte units)."""
    if kind == EXT_FRAGMENT:
        return 8
    if kind == EXT_AH:
        return (length_field + 2) * 4
    return (length_field + 1) * 8


def decode_ipv6_untrusted(data: Buffer) -> IPv6:
    """Parse an IPv6 packet and its extension headers; bytes past the payload length are dropped."""
    view = byte_view(data)
    need(view, IPV6_HEADER_LEN, "ipv6_truncated")
    first, length, next_header, hop_limit, src, dst = _HEADER.unpack_from(view)
    if first >> 28 != 6:
        raise BadPacket("ipv6_bad_version", f"version {first >> 28}")
    if IPV6_HEADER_LEN + length > len(view):
        raise BadPacket("ipv6_bad_payload_length", f"{length} > {len(view) - IPV6_HEADER_LEN}")
    body = view[IPV6_HEADER_LEN : IPV6_HEADER_LEN + length]
    extensions, next_header, offset = _walk_extensions(body, next_header)
    return IPv6(
        IPv6Address(bytes(src)),
        IPv6Address(bytes(dst)),
        next_header,
        bytes(body[offset:]),
        hop_limit,
        first >> 20 & 0xFF,
        first & 0xFFFFF,
        extensions,
    )


def _walk_extensions(
    body: memoryview, next_header: int
) -> tuple[tuple[tuple[int, bytes], ...], int, int]:
    """Follow the header chain; return the extensions, the upper-layer type and its offset."""
    extensions: list[tuple[int, bytes]] = []
    offset = 0
    while next_header in EXTENSION_HEADERS:
        need(body, offset + 2, "ipv6_ext_truncated")
        end = offset + extension_len(next_header, body[offset + 1])
        need(body, end, "ipv6_ext_truncated")
        extensions.append((next_header, bytes(body[offset:end])))
        next_header = body[offset]
        offset = end
    return tuple(extensions), next_header, offset
