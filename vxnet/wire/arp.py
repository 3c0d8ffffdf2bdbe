"""ARP (RFC 826) for Ethernet and IPv4 only: the only kind an overlay proxies."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, byte_view, check_ipv4, check_len, check_uint, need
from vxnet.wire.ethernet import ETH_P_IP, MAC_LEN

OP_REQUEST = 1
OP_REPLY = 2

ARP_LEN = 28
HTYPE_ETHERNET = 1

_ARP = struct.Struct("!HHBBH6s4s6s4s")
_PREFIX = (HTYPE_ETHERNET, ETH_P_IP, MAC_LEN, 4)


@dataclass(frozen=True, slots=True)
class Arp:
    """An Ethernet/IPv4 ARP message."""

    op: int
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address

    def encode(self) -> bytes:
        """The 28 ARP bytes (the Ethernet header and padding are the caller's)."""
        check_uint("op", self.op, 16)
        check_len("sender_mac", self.sender_mac, MAC_LEN)
        check_len("target_mac", self.target_mac, MAC_LEN)
        sender_ip = check_ipv4("sender_ip", self.sender_ip)
        target_ip = check_ipv4("target_ip", self.target_ip)
        return _ARP.pack(
            *_PREFIX,
            self.op,
            self.sender_mac,
            sender_ip.packed,
            self.target_mac,
            target_ip.packed,
        )


def decode_arp_untrusted(data: Buffer) -> Arp:
    """Parse an ARP message; trailing bytes (Ethernet padding) are ignored."""
    view = byte_view(data)
    need(view, ARP_LEN, "arp_truncated")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(view)
    if (htype, ptype, hlen, plen) != _PREFIX:
        raise BadPacket("arp_unsupported", f"htype={htype} ptype={ptype:#06x} {hlen}/{plen}")
    return Arp(op, sha, IPv4Address(spa), tha, IPv4Address(tpa))


def arp_reply_for(request: Arp, mac: bytes) -> Arp:
    """The reply to ``request`` saying that its target IP is at ``mac``."""
    if request.op != OP_REQUEST:
        raise UsageError(f"can only answer an ARP request (op 1), got op {request.op}")
    check_len("mac", mac, MAC_LEN)
    return Arp(OP_REPLY, mac, request.target_ip, request.sender_mac, request.sender_ip)


def arp_request(sender_mac: bytes, sender_ip: IPv4Address, target_ip: IPv4Address) -> Arp:
    """A who-has request for ``target_ip`` (target MAC zero, as RFC 826 leaves it)."""
    return Arp(OP_REQUEST, sender_mac, sender_ip, b"\x00" * MAC_LEN, target_ip)
