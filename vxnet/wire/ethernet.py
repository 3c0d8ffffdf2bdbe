"""Ethernet II frames with optional 802.1Q / 802.1ad (QinQ) tags, and MAC address helpers."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from vxnet.errors import UsageError
from vxnet.wire._buf import Buffer, byte_view, check_len, check_uint, need

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

MAC_LEN = 6
ETH_HEADER_LEN = 14
VLAN_TAG_LEN = 4
BROADCAST_MAC = b"\xff" * MAC_LEN
ZERO_MAC = b"\x00" * MAC_LEN

#: Ethertypes that introduce a VLAN tag (the tag protocol identifiers, TPIDs).
VLAN_TPIDS = frozenset({ETH_P_8021Q, ETH_P_8021AD})

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?P<sep>[:-])(?:[0-9a-fA-F]{2}(?P=sep)){4}[0-9a-fA-F]{2}")
_HEADER = struct.Struct("!6s6sH")
_TAG = struct.Struct("!HH")
_ETHERTYPE = struct.Struct("!H")


def mac_to_str(mac: Buffer) -> str:
    """``b'\\x02\\x42...'`` -> ``'02:42:...'`` (lower case, colon separated)."""
    return bytes(mac).hex(":")


def mac_from_str(text: str) -> bytes:
    """``'02:42:0a:00:00:02'`` (or with ``-``) -> 6 bytes; UsageError on anything else."""
    if not isinstance(text, str) or not _MAC_RE.fullmatch(text):
        raise UsageError(f"{text!r} is not a MAC address; write it like '02:42:0a:00:00:02'")
    return bytes.fromhex(text.replace(text[2], ""))


def is_multicast(mac: Buffer) -> bool:
    """True for group addresses (I/G bit set), which include the broadcast address."""
    return bool(mac[0] & 1)


def is_broadcast(mac: Buffer) -> bool:
    """True for ``ff:ff:ff:ff:ff:ff``."""
    return bytes(mac) == BROADCAST_MAC


@dataclass(frozen=True, slots=True)
class Vlan:
    """One VLAN tag.  ``ethertype`` is the TPID that introduced it (0x8100 or 0x88a8)."""

    pcp: int
    dei: int
    vid: int
    ethertype: int = ETH_P_8021Q

    def encode(self) -> bytes:
        """The 4 tag bytes: TPID, then PCP(3) DEI(1) VID(12)."""
        check_uint("pcp", self.pcp, 3)
        check_uint("dei", self.dei, 1)
        check_uint("vid", self.vid, 12)
        if self.ethertype not in VLAN_TPIDS:
            raise UsageError(f"VLAN ethertype {self.ethertype:#06x} must be 0x8100 or 0x88a8")
        return _TAG.pack(self.ethertype, self.pcp << 13 | self.dei << 12 | self.vid)


@dataclass(frozen=True, slots=True)
class Ethernet:
    """An Ethernet II frame; ``ethertype`` is the innermost one, after any VLAN tags."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes
    vlans: tuple[Vlan, ...] = ()

    def encode(self) -> bytes:
        """The frame's bytes (no FCS, no padding to 60 bytes)."""
        check_len("dst", self.dst, MAC_LEN)
        check_len("src", self.src, MAC_LEN)
        check_uint("ethertype", self.ethertype, 16)
        tags = b"".join(vlan.encode() for vlan in self.vlans)
        return b"".join((self.dst, self.src, tags, _ETHERTYPE.pack(self.ethertype), self.payload))

    @property
    def header_len(self) -> int:
        """Bytes before the payload: 14 plus 4 per VLAN tag."""
        return ETH_HEADER_LEN + VLAN_TAG_LEN * len(self.vlans)


def decode_ethernet_untrusted(data: Buffer) -> Ethernet:
    """Parse an Ethernet frame (without FCS), walking stacked VLAN tags."""
    view = byte_view(data)
    need(view, ETH_HEADER_LEN, "eth_truncated")
    dst, src, ethertype = _HEADER.unpack_from(view)
    offset = ETH_HEADER_LEN
    vlans: list[Vlan] = []
    while ethertype in VLAN_TPIDS:
        need(view, offset + VLAN_TAG_LEN, "vlan_truncated")
        tci, inner = _TAG.unpack_from(view, offset)
        vlans.append(Vlan(tci >> 13, tci >> 12 & 1, tci & 0xFFF, ethertype))
        ethertype = inner
        offset += VLAN_TAG_LEN
    return Ethernet(dst, src, ethertype, bytes(view[offset:]), tuple(vlans))


def ethertype_of_untrusted(data: Buffer) -> int:
    """Hot path: the innermost ethertype of a frame, without building an :class:`Ethernet`."""
    view = byte_view(data)
    need(view, ETH_HEADER_LEN, "eth_truncated")
    offset = ETH_HEADER_LEN
    ethertype: int = _ETHERTYPE.unpack_from(view, offset - 2)[0]
    while ethertype in VLAN_TPIDS:
        offset += VLAN_TAG_LEN
        need(view, offset, "vlan_truncated")
        ethertype = _ETHERTYPE.unpack_from(view, offset - 2)[0]
    return ethertype
