"""VXLAN (RFC 7348): ``flags(8) reserved(24) vni(24) reserved(8)`` in front of an Ethernet frame.

The dataclass codec is for control code, tests and tracing; :func:`vxlan_header`,
:func:`pack_vxlan_header_into` and :func:`vxlan_vni_untrusted` serve the per-frame hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vxnet.errors import BadPacket, UsageError
from vxnet.wire._buf import Buffer, byte_view, check_uint, need

VXLAN_PORT = 4789
VXLAN_HEADER_LEN = 8
VXLAN_FLAG_I = 0x08
VNI_MIN_DOCKER = 4096
VNI_MAX = 2**24 - 1

#: The header as two 32-bit words: ``flags << 24 | reserved1`` and ``vni << 8 | reserved2``.
VXLAN_STRUCT = struct.Struct("!II")


@dataclass(frozen=True, slots=True)
class Vxlan:
    """A VXLAN packet.  The reserved fields are kept as received (RFC 7348: ignored on receipt)."""

    vni: int
    payload: bytes
    flags: int = VXLAN_FLAG_I
    reserved1: int = 0
    reserved2: int = 0

    def encode(self) -> bytes:
        """The 8-byte header followed by the payload (the inner Ethernet frame)."""
        _check_vni(self.vni)
        check_uint("flags", self.flags, 8)
        check_uint("reserved1", self.reserved1, 24)
        check_uint("reserved2", self.reserved2, 8)
        header = VXLAN_STRUCT.pack(
            self.flags << 24 | self.reserved1, self.vni << 8 | self.reserved2
        )
        return header + self.payload


def decode_vxlan_untrusted(data: Buffer) -> Vxlan:
    """Parse a VXLAN packet (the UDP payload); the I flag must be set."""
    view = byte_view(data)
    need(view, VXLAN_HEADER_LEN, "vxlan_truncated")
    word1, word2 = VXLAN_STRUCT.unpack_from(view)
    flags = word1 >> 24
    if not flags & VXLAN_FLAG_I:
        raise BadPacket("vxlan_no_i_flag", f"flags {flags:#04x}")
    return Vxlan(word2 >> 8, bytes(view[VXLAN_HEADER_LEN:]), flags, word1 & 0xFFFFFF, word2 & 0xFF)


def vxlan_header(vni: int) -> bytes:
    """The standard 8-byte header for ``vni`` (I flag set, reserved bits zero)."""
    _check_vni(vni)
    return VXLAN_STRUCT.pack(VXLAN_FLAG_I << 24, vni << 8)


def pack_vxlan_header_into(buffer: bytearray | memoryview, offset: int, vni: int) -> None:
    """Write the standard header for ``vni`` into a preallocated ``buffer`` at ``offset``."""
    _check_vni(vni)
    VXLAN_STRUCT.pack_into(buffer, offset, VXLAN_FLAG_I << 24, vni << 8)


def vxlan_vni_untrusted(data: Buffer) -> int:
    """Hot path: the VNI of a VXLAN packet, checking length and I flag, copying nothing."""
    if len(data) < VXLAN_HEADER_LEN:
        raise BadPacket("vxlan_truncated", f"{len(data)} bytes")
    try:
        word1, word2 = VXLAN_STRUCT.unpack_from(data)
    except (struct.error, TypeError, BufferError) as exc:  # an odd memoryview shape
        raise BadPacket("vxlan_truncated", str(exc)) from None
    if not word1 & VXLAN_FLAG_I << 24:
        raise BadPacket("vxlan_no_i_flag", f"flags {word1 >> 24:#04x}")
    vni: int = word2 >> 8
    return vni


def _check_vni(vni: int) -> None:
    if not 0 <= vni <= VNI_MAX:
        raise UsageError(
            f"VNI {vni!r} is out of range 0..{VNI_MAX} (Docker uses {VNI_MIN_DOCKER}+)"
        )
