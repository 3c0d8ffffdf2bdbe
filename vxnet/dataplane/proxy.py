"""Proxy ARP and IPv6 neighbour discovery: the switch answers from its neighbour table.

Docker's overlay never floods: a container's ARP request or neighbour solicitation is answered
on the spot from the table the control plane programmed.  Each function takes the request frame
and the network's neighbour table and returns ``(reply, None)`` or ``(None, drop reason)``.
"""

from __future__ import annotations

import struct

from vxnet.wire.checksum import internet_checksum

ARP_ETH_IPV4_REQUEST = b"\x00\x01\x08\x00\x06\x04\x00\x01"
ARP_ETH_IPV4_REPLY = b"\x00\x01\x08\x00\x06\x04\x00\x02"
ETYPE_ARP = b"\x08\x06"
ETYPE_IPV6 = b"\x86\xdd"
_ICMPV6_NA_FLAGS = b"\x60\x00\x00\x00"  # Solicited | Override
_IPV6_UNSPECIFIED = bytes(16)


def is_neighbour_solicitation(frame: bytes) -> bool:
    return len(frame) >= 78 and frame[20] == 58 and frame[54] == 135


def arp_reply(frame: bytes, neigh: dict[bytes, bytes]) -> tuple[bytes | None, str | None]:
    if len(frame) < 42 or frame[14:22] != ARP_ETH_IPV4_REQUEST:
        return None, "arp_not_request"
    sender_mac, sender_ip, target_ip = frame[22:28], frame[28:32], frame[38:42]
    target_mac = neigh.get(target_ip)
    if target_ip == sender_ip:
        return None, "arp_gratuitous"
    if target_mac is None:
        return None, "arp_unknown_target"
    reply = (
        sender_mac
        + target_mac
        + ETYPE_ARP
        + ARP_ETH_IPV4_REPLY
        + target_mac
        + target_ip
        + sender_mac
        + sender_ip
    )
    return reply, None


def nd_advertisement(frame: bytes, neigh: dict[bytes, bytes]) -> tuple[bytes | None, str | None]:
    src_ip, target = frame[22:38], frame[62:78]
    target_mac = neigh.get(target)
    if src_ip == _IPV6_UNSPECIFIED:
        return None, "nd_dad"
    if target_mac is None:
        return None, "nd_unknown_target"
    icmp = bytearray(b"\x88\x00\x00\x00" + _ICMPV6_NA_FLAGS + target + b"\x02\x01" + target_mac)
    pseudo = target + src_ip + struct.pack("!I3xB", len(icmp), 58)
    struct.pack_into("!H", icmp, 2, internet_checksum(pseudo + icmp))
    ip6 = b"\x60\x00\x00\x00" + struct.pack("!HBB", len(icmp), 58, 255) + target + src_ip
    return frame[6:12] + target_mac + ETYPE_IPV6 + ip6 + bytes(icmp), None
