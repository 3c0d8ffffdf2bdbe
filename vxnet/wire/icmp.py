"""ICMPv4 echo (RFC 792), ICMPv6 echo (RFC 4443) and neighbour discovery NS/NA (RFC 4861)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import TypeAlias

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, byte_view, check_ipv6, check_len, check_uint, need
from vxnet.wire.checksum import internet_checksum, transport_checksum
from vxnet.wire.ethernet import MAC_LEN
from vxnet.wire.ipv4 import IPPROTO_ICMPV6

ECHO_REPLY = 0
ECHO_REQUEST = 8
ECHO6_REQUEST = 128
ECHO6_REPLY = 129
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136

ND_OPT_SOURCE_LLADDR = 1
ND_OPT_TARGET_LLADDR = 2

ICMP_HEADER_LEN = 8
ND_LEN = 24  # type, code, checksum, flags/reserved, target

NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000

_ECHO = struct.Struct("!BBHHH")
_ND = struct.Struct("!BBHI16s")
_ECHO_TYPES = frozenset({ECHO_REQUEST, ECHO_REPLY})
_ECHO6_TYPES = frozenset({ECHO6_REQUEST, ECHO6_REPLY})


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    """An ICMPv4 echo request (type 8) or reply (type 0)."""

    type: int
    code: int
    ident: int
    seq: int
    payload: bytes

    def encode(self) -> bytes:
        """The message's bytes, checksum included."""
        message = bytearray(_pack_echo(self.type, self.code, self.ident, self.seq))
        message += self.payload
        struct.pack_into("!H", message, 2, internet_checksum(message))
        return bytes(message)


@dataclass(frozen=True, slots=True)
class Icmpv6Echo:
    """An ICMPv6 echo request (type 128) or reply (type 129)."""

    type: int
    code: int
    ident: int
    seq: int
    payload: bytes

    def encode(self, src: IPv6Address, dst: IPv6Address) -> bytes:
        """The message's bytes, with the checksum over the IPv6 pseudo header."""
        message = _pack_echo(self.type, self.code, self.ident, self.seq) + self.payload
        return _with_icmpv6_checksum(message, src, dst)


@dataclass(frozen=True, slots=True)
class NeighborSolicit:
    """A neighbour solicitation for ``target``, with the sender's MAC if it gave one."""

    target: IPv6Address
    source_mac: bytes | None = None

    def encode(self, src: IPv6Address, dst: IPv6Address) -> bytes:
        """The message's bytes (with a source link-layer address option if ``source_mac``)."""
        check_ipv6("target", self.target)
        option = _lladdr_option(ND_OPT_SOURCE_LLADDR, self.source_mac)
        message = _ND.pack(ND_NEIGHBOR_SOLICIT, 0, 0, 0, self.target.packed) + option
        return _with_icmpv6_checksum(message, src, dst)


@dataclass(frozen=True, slots=True)
class NeighborAdvert:
    """A neighbour advertisement: ``target`` is at ``target_mac``."""

    target: IPv6Address
    target_mac: bytes | None = None
    router: bool = False
    solicited: bool = True
    override: bool = True

    def encode(self, src: IPv6Address, dst: IPv6Address) -> bytes:
        """The message's bytes (with a target link-layer address option if ``target_mac``)."""
        check_ipv6("target", self.target)
        flags = (
            NA_FLAG_ROUTER * self.router
            | NA_FLAG_SOLICITED * self.solicited
            | NA_FLAG_OVERRIDE * self.override
        )
        option = _lladdr_option(ND_OPT_TARGET_LLADDR, self.target_mac)
        message = _ND.pack(ND_NEIGHBOR_ADVERT, 0, 0, flags, self.target.packed) + option
        return _with_icmpv6_checksum(message, src, dst)


Icmpv6Message: TypeAlias = Icmpv6Echo | NeighborSolicit | NeighborAdvert


def echo_reply_for(request: IcmpEcho) -> IcmpEcho:
    """The ICMPv4 echo reply to ``request`` (same identifier, sequence number and data)."""
    if request.type != ECHO_REQUEST:
        raise UsageError(f"can only answer an echo request (type 8), got type {request.type}")
    return IcmpEcho(ECHO_REPLY, 0, request.ident, request.seq, request.payload)


def neighbor_advert_for(
    solicit: NeighborSolicit, mac: bytes, router: bool = False
) -> NeighborAdvert:
    """The solicited advertisement answering ``solicit``: its target is at ``mac``.

    S and O are set, as the Linux VXLAN neighbour proxy sends them.  Answering a duplicate address
    detection probe (source ``::``) needs ``replace(advert, solicited=False)`` sent to ff02::1.
    """
    check_len("mac", mac, MAC_LEN)
    return NeighborAdvert(solicit.target, mac, router=router, solicited=True, override=True)


def decode_icmp_echo_untrusted(data: Buffer) -> IcmpEcho:
    """Parse an ICMPv4 echo request or reply, checking its checksum."""
    view = byte_view(data)
    need(view, ICMP_HEADER_LEN, "icmp_truncated")
    kind, code, _, ident, seq = _ECHO.unpack_from(view)
    if internet_checksum(view) != 0:
        raise BadPacket("icmp_bad_checksum")
    if kind not in _ECHO_TYPES:
        raise BadPacket("icmp_unsupported_type", f"type {kind}")
    return IcmpEcho(kind, code, ident, seq, bytes(view[ICMP_HEADER_LEN:]))


def decode_icmpv6_untrusted(data: Buffer, src: IPv6Address, dst: IPv6Address) -> Icmpv6Message:
    """Parse an ICMPv6 echo, NS or NA message sent from ``src`` to ``dst``, checking its checksum.

    ``data`` must be exactly the ICMPv6 message (as the IPv6 payload length delimits it).
    """
    view = byte_view(data)
    need(view, ICMP_HEADER_LEN, "icmpv6_truncated")
    if transport_checksum(src, dst, IPPROTO_ICMPV6, view) != 0:
        raise BadPacket("icmpv6_bad_checksum")
    kind = view[0]
    if kind in _ECHO6_TYPES:
        _, code, _, ident, seq = _ECHO.unpack_from(view)
        return Icmpv6Echo(kind, code, ident, seq, bytes(view[ICMP_HEADER_LEN:]))
    if kind == ND_NEIGHBOR_SOLICIT:
        target, mac = _decode_nd(view, ND_OPT_SOURCE_LLADDR)
        return NeighborSolicit(target, mac)
    if kind == ND_NEIGHBOR_ADVERT:
        target, mac = _decode_nd(view, ND_OPT_TARGET_LLADDR)
        flags = _ND.unpack_from(view)[3]
        return NeighborAdvert(
            target,
            mac,
            router=bool(flags & NA_FLAG_ROUTER),
            solicited=bool(flags & NA_FLAG_SOLICITED),
            override=bool(flags & NA_FLAG_OVERRIDE),
        )
    raise BadPacket("icmpv6_unsupported_type", f"type {kind}")


def _decode_nd(view: memoryview, wanted_option: int) -> tuple[IPv6Address, bytes | None]:
    """Target address and link-layer address option of an NS or NA (RFC 4861 section 7.1.1)."""
    need(view, ND_LEN, "icmpv6_truncated")
    _, code, _, _, target = _ND.unpack_from(view)
    if code != 0:
        raise BadPacket("nd_bad_code", f"code {code}")
    return IPv6Address(bytes(target)), _find_lladdr(view[ND_LEN:], wanted_option)


def _find_lladdr(options: memoryview, wanted: int) -> bytes | None:
    """The MAC in the first ``wanted`` option; unknown options are skipped (RFC 4861 4.6)."""
    found: bytes | None = None
    offset = 0
    while offset < len(options):
        need(options, offset + 2, "nd_option_truncated")
        length = options[offset + 1] * 8
        if length == 0:
            raise BadPacket("nd_option_zero_length")
        need(options, offset + length, "nd_option_truncated")
        if options[offset] == wanted and found is None:
            found = bytes(options[offset + 2 : offset + 2 + MAC_LEN])
        offset += length
    return found


def _pack_echo(kind: int, code: int, ident: int, seq: int) -> bytes:
    check_uint("type", kind, 8)
    check_uint("code", code, 8)
    check_uint("ident", ident, 16)
    check_uint("seq", seq, 16)
    return _ECHO.pack(kind, code, 0, ident, seq)


def _lladdr_option(kind: int, mac: bytes | None) -> bytes:
    if mac is None:
        return b""
    check_len("mac", mac, MAC_LEN)
    return bytes((kind, 1)) + mac


def _with_icmpv6_checksum(message: bytes, src: IPv6Address, dst: IPv6Address) -> bytes:
    check_ipv6("src", src)
    check_ipv6("dst", dst)
    csum = transport_checksum(src, dst, IPPROTO_ICMPV6, message)
    return message[:2] + csum.to_bytes(2, "big") + message[4:]
