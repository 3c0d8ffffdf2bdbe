"""The ``virtio_net_hdr`` a TAP opened with ``IFF_VNET_HDR`` puts in front of every frame.

It is how the kernel and the dataplane hand each other offload state (``linux/virtio_net.h``,
little-endian as TUN uses it):

* ``flags``: ``NEEDS_CSUM`` -- the L4 checksum at ``csum_start + csum_offset`` holds only the
  pseudo-header sum; whoever emits the frame on a real wire finishes it.  ``DATA_VALID`` -- the
  checksum was verified.
* ``gso_type``/``gso_size``: a TCP (or UDP) *super-frame* of up to 64 KB, to be cut into
  ``gso_size``-byte segments by whoever needs it cut (often no one: veth and the local stack take
  it whole).
* The tunnel variant (Linux 6.17+, ``TUN_F_UDP_TUNNEL_GSO``) adds ``outer_th_offset`` and
  ``inner_nh_offset`` so a whole VXLAN-encapsulated super-frame can be written in one go.

:class:`VnetHdr` with :func:`decode_untrusted`/:meth:`VnetHdr.encode` is the codec for tests and
slow paths; the hot path uses the ``struct`` objects and byte offsets directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vxnet.errors import BadPacket

# flags
NEEDS_CSUM = 1
DATA_VALID = 2
# gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_UDP_TUNNEL_IPV4 = 0x20
GSO_UDP_TUNNEL_IPV6 = 0x40
GSO_ECN = 0x80
_GSO_BASE = {GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4}

#: ``struct virtio_net_hdr``: what a container TAP reads and writes (TUN's default size).
HDR = struct.Struct("<BBHHHH")
HDR_LEN = HDR.size  # 10
#: ``struct virtio_net_hdr_v1_hash_tunnel``: v1 header (+ num_buffers), hash, tunnel offsets.
TUNNEL_HDR = struct.Struct("<BBHHHHHIHHHH")
TUNNEL_HDR_LEN = TUNNEL_HDR.size  # 24
#: A header that says nothing: a complete frame with finished checksums.
PLAIN = bytes(HDR_LEN)


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def encode(self) -> bytes:
        return HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @property
    def is_gso(self) -> bool:
        return self.gso_type & ~GSO_ECN != GSO_NONE


def decode_untrusted(data: bytes | bytearray | memoryview, frame_len: int) -> VnetHdr:
    """The header in front of a ``frame_len``-byte frame, checked against it, or ``BadPacket``.

    The kernel's own ``hdr_len`` is not trusted (it is a hint); what must hold is that a
    checksum to finish lies inside the frame and a GSO frame has a segment size.
    """
    if len(data) < HDR_LEN:
        raise BadPacket("vnet_truncated", f"{len(data)} bytes")
    flags, gso_type, hdr_len, gso_size, start, offset = HDR.unpack_from(data)
    if flags & ~(NEEDS_CSUM | DATA_VALID):
        raise BadPacket("vnet_bad_flags", f"0x{flags:02x}")
    if gso_type & ~GSO_ECN not in _GSO_BASE:
        raise BadPacket("vnet_bad_gso_type", f"0x{gso_type:02x}")
    if flags & NEEDS_CSUM and start + offset + 2 > frame_len:
        raise BadPacket("vnet_bad_csum_offset", f"{start}+{offset} in {frame_len} bytes")
    if gso_type & ~GSO_ECN and (gso_size == 0 or not flags & NEEDS_CSUM):
        raise BadPacket("vnet_bad_gso", f"gso_type {gso_type} gso_size {gso_size}")
    return VnetHdr(flags, gso_type, hdr_len, gso_size, start, offset)


# ------------------------------------------------------------------ partial checksums


def fold(total: int) -> int:
    """A one's-complement sum reduced to 16 bits (``0`` only for an all-zero input)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_sum_v4(frame: bytes | bytearray | memoryview, l4_len: int, proto: int) -> int:
    """The IPv4 pseudo-header sum (not complemented) of an Ethernet frame: what an L4 checksum
    field holds under ``NEEDS_CSUM``, as Linux leaves it (``~csum_tcpudp_magic``)."""
    return fold(int.from_bytes(frame[26:34], "big") % 0xFFFF + proto + l4_len) or 0xFFFF


def pseudo_sum_v6(frame: bytes | bytearray | memoryview, l4_len: int, proto: int) -> int:
    """The IPv6 pseudo-header sum of an Ethernet frame with no extension headers."""
    return fold(int.from_bytes(frame[22:54], "big") % 0xFFFF + proto + l4_len) or 0xFFFF
