"""Segmentation offload done in Python: the fallback for kernels without TAP UDP-tunnel GSO.

Sans-IO.  A TCP super-frame read from a TAP (``virtio_net_hdr`` with ``gso_type`` TCPV4/TCPV6,
``NEEDS_CSUM``, the L4 checksum field holding the pseudo-header sum) is cut into the segments
the sender's TCP asked for, each a complete frame with finished IP and TCP checksums, as
``tcp_gso_segment`` in the kernel would: sequence numbers advance by ``gso_size``, FIN and PSH
only on the last segment, CWR only on the first, IPv4 IDs count up.  :func:`finish_checksum`
completes one unfinished checksum (a single frame read with ``NEEDS_CSUM``).

This is per-segment Python work (slicing, a checksum over every payload byte): correct
everywhere, and the reason the tunnel-GSO path exists.
"""

from __future__ import annotations

from collections.abc import Iterator

from vxnet.errors import BadPacket

ETH_HLEN = 14
_TCP = 6


def _csum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071: the complement of the one's-complement sum of ``data`` plus an earlier sum."""
    total = int.from_bytes(data, "big")
    if len(data) % 2:
        total <<= 8
    total += initial
    s = total % 0xFFFF
    if s == 0 and total:
        s = 0xFFFF  # a non-zero sum that folds to all ones ("negative zero")
    return ~s & 0xFFFF


def finish_checksum(frame: bytearray | memoryview, start: int, offset: int) -> None:
    """Complete a ``NEEDS_CSUM`` frame in place: sum from ``start`` (the field holds the
    pseudo-header sum) and store the result at ``start + offset``."""
    if start + offset + 2 > len(frame):
        raise BadPacket("vnet_bad_csum_offset", f"{start}+{offset} in {len(frame)} bytes")
    c = _csum(frame[start:])
    if offset == 6 and c == 0:  # UDP: a computed 0 is sent as all ones (RFC 768)
        c = 0xFFFF
    at = start + offset
    frame[at] = c >> 8
    frame[at + 1] = c & 0xFF


def segment_tcp(frame: bytes | bytearray | memoryview, gso_size: int) -> Iterator[bytearray]:
    """The complete segments of a TCP super-frame (IPv4 or IPv6 without extension headers).

    Raises ``BadPacket`` for a frame that is not one (the dataplane counts and drops it).
    """
    if gso_size <= 0 or len(frame) < ETH_HLEN + 40:
        raise BadPacket("gso_bad_frame", f"{len(frame)} bytes, gso_size {gso_size}")
    v4 = frame[12] == 0x08 and frame[13] == 0x00 and frame[14] >> 4 == 4
    v6 = frame[12] == 0x86 and frame[13] == 0xDD and frame[14] >> 4 == 6
    if v4:
        iphl = (frame[14] & 15) * 4
        proto = frame[23]
    elif v6:
        iphl = 40
        proto = frame[20]
    else:
        raise BadPacket("gso_not_ip", "not IPv4 or IPv6")
    l4 = ETH_HLEN + iphl
    if proto != _TCP or iphl < 20 or len(frame) < l4 + 20:
        raise BadPacket("gso_not_tcp", f"protocol {proto}")
    thl = (frame[l4 + 12] >> 4) * 4
    hlen = l4 + thl
    if thl < 20 or len(frame) < hlen:
        raise BadPacket("gso_bad_frame", f"TCP header length {thl}")
    header = bytes(frame[:hlen])
    payload = memoryview(frame)[hlen:]
    seq = int.from_bytes(header[l4 + 4 : l4 + 8], "big")
    flags = header[l4 + 13]
    ip_id = int.from_bytes(header[18:20], "big") if v4 else 0
    src_dst = int.from_bytes(header[26:34] if v4 else header[22:54], "big") % 0xFFFF
    n = len(payload)
    for i, off in enumerate(range(0, n, gso_size)):
        chunk = payload[off : off + gso_size]
        seg = bytearray(header)
        seg += chunk
        last = off + gso_size >= n
        seg[l4 + 4 : l4 + 8] = ((seq + off) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags if last else flags & ~0x09  # FIN and PSH only on the last segment
        if i:
            f &= ~0x80  # CWR only on the first
        seg[l4 + 13] = f
        l4_len = thl + len(chunk)
        if v4:
            seg[16:18] = (iphl + l4_len).to_bytes(2, "big")
            seg[18:20] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            seg[24:26] = b"\x00\x00"
            seg[24:26] = _csum(seg[14:l4]).to_bytes(2, "big")
        else:
            seg[18:20] = l4_len.to_bytes(2, "big")
        seg[l4 + 16 : l4 + 18] = b"\x00\x00"
        seg[l4 + 16 : l4 + 18] = _csum(memoryview(seg)[l4:], src_dst + _TCP + l4_len).to_bytes(
            2, "big"
        )
        yield seg
