"""Per-packet NAT for the load balancer: IPv4 parsing, incremental checksums, TCP states.

Everything here runs per frame (or builds the one frame a reset needs) and knows nothing of
services or tables: :mod:`vxnet.dataplane.lb` owns those.  Offsets are fixed: the overlay
carries untagged Ethernet, so the IPv4 header always starts at byte 14.
"""

from __future__ import annotations

import ipaddress

from vxnet.wire.ipv4 import IPv4
from vxnet.wire.tcp import Tcp

TCP = 6
UDP = 17

# Connection states.  TCP ones are ordered: from TIME_WAIT on, a new SYN opens a new connection.
SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, TIME_WAIT, CLOSED, UDP_NEW, UDP_ASSURED = (
    range(9)
)
STATE_NAMES = (
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "TIME_WAIT",
    "CLOSED",
    "UDP",
    "UDP_ASSURED",
)

# What a TCP segment's flags mean to the table, and from which side it came.
EV_SYN, EV_SYNACK, EV_FIN, EV_RST, EV_ACK = range(5)
FWD, REV = 0, 1  # client -> backend, backend -> client


def _event(flags: int) -> int:
    if flags & 0x04:
        return EV_RST
    if flags & 0x01:
        return EV_FIN
    if flags & 0x02:
        return EV_SYNACK if flags & 0x10 else EV_SYN
    return EV_ACK


#: Event by the flags byte masked with FIN|SYN|RST|ACK (0x17): one tuple index per segment.
EVENT = tuple(_event(f) for f in range(0x18))

#: (state, direction, event) -> new state.  Whatever is not listed keeps its state; a RST from
#: either side closes any TCP state (added below).
TRANSITIONS: dict[tuple[int, int, int], int] = {
    (SYN_SENT, REV, EV_SYNACK): SYN_RECV,
    (SYN_RECV, FWD, EV_ACK): ESTABLISHED,
    (SYN_RECV, FWD, EV_FIN): FIN_WAIT,
    (ESTABLISHED, FWD, EV_FIN): FIN_WAIT,
    (ESTABLISHED, REV, EV_FIN): CLOSE_WAIT,
    (FIN_WAIT, REV, EV_FIN): TIME_WAIT,
    (CLOSE_WAIT, FWD, EV_FIN): TIME_WAIT,
}
for _state in range(CLOSED):
    TRANSITIONS[_state, FWD, EV_RST] = TRANSITIONS[_state, REV, EV_RST] = CLOSED

#: The same table flattened for the hot path: index ``state * 10 + direction * 5 + event``.
NEXT = tuple(
    TRANSITIONS.get((s, d, e), s) for s in range(CLOSED + 1) for d in (FWD, REV) for e in range(5)
)

# IPv4 parse failures, as negative results of l4_offset, and their drop reasons.
REASONS = ("", "lb_not_ipv4", "lb_fragment", "lb_unsupported_proto", "lb_truncated")


def l4_offset(frame: bytes) -> int:
    """Offset of the TCP/UDP header of an IPv4 frame, or minus an index into ``REASONS``."""
    n = len(frame)
    if n < 34 or frame[12] != 8 or frame[13] != 0 or frame[14] >> 4 != 4:
        return -1
    ihl = (frame[14] & 15) * 4
    total = (frame[16] << 8) | frame[17]
    if ihl < 20 or total < ihl or n < 14 + total:
        return -4
    if frame[20] & 0x3F or frame[21]:  # MF or a fragment offset: ports are not in every piece
        return -2
    proto = frame[23]
    if proto == TCP:
        if total < ihl + 20:
            return -4
    elif proto == UDP:
        if total < ihl + 8:
            return -4
    else:
        return -3
    return 14 + ihl


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def delta(old: bytes, new: bytes) -> int:
    """The constant part of RFC 1624 eqn. 3, ``sum(~m + m')`` over the 16-bit words changed."""
    total = 0
    for i in range(0, len(old), 2):
        total += (~int.from_bytes(old[i : i + 2], "big") & 0xFFFF) + int.from_bytes(
            new[i : i + 2], "big"
        )
    return fold(total)


def rewrite(
    frame: bytes,
    l4: int,
    eth: bytes,
    ips: bytes,
    ports: bytes,
    ip_delta: int,
    l4_delta: int,
    partial: bool = False,
) -> bytearray:
    """The frame with new MACs, addresses and ports, both checksums updated incrementally.

    ``partial``: the L4 field holds an unfinished checksum, the pseudo-header sum itself (not
    complemented) that the kernel completes later from the header on: it takes the address
    change alone, added (``l4_delta`` is then the IP delta; the ports are summed later).
    """
    b = bytearray(frame)
    b[0:12] = eth
    b[26:34] = ips
    b[l4 : l4 + 4] = ports
    c = (~((b[24] << 8) | b[25]) & 0xFFFF) + ip_delta
    c = (c & 0xFFFF) + (c >> 16)
    c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF
    b[24] = c >> 8
    b[25] = c & 0xFF
    at = l4 + 16 if b[23] == TCP else l4 + 6
    if partial:
        c = ((b[at] << 8) | b[at + 1]) + l4_delta
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        b[at] = c >> 8
        b[at + 1] = c & 0xFF
        return b
    if b[23] != TCP and not (b[at] or b[at + 1]):
        return b  # a UDP checksum of 0 means "none" and stays so
    c = (~((b[at] << 8) | b[at + 1]) & 0xFFFF) + l4_delta
    c = (c & 0xFFFF) + (c >> 16)
    c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF
    if not c and b[23] == UDP:
        c = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    b[at] = c >> 8
    b[at + 1] = c & 0xFF
    return b


def reset_frame(eth: bytes, ips: bytes, ports: bytes, state: int, client_ack: int) -> bytes:
    """An RST to a client, given the reply direction's Ethernet header, addresses and ports.

    Before the handshake completed (SYN_SENT) the client takes an RST|ACK that acknowledges its
    SYN (``client_ack`` is then its ISN + 1); afterwards an RST whose sequence number is the
    client's last acknowledgment number, the next one it expects (RFC 9293 3.10.7.4).
    """
    src, dst = ipaddress.IPv4Address(ips[0:4]), ipaddress.IPv4Address(ips[4:8])
    if state == SYN_SENT:
        seq, ack, flags = 0, client_ack, 0x14  # RST|ACK
    else:
        seq, ack, flags = client_ack, 0, 0x04
    sport, dport = int.from_bytes(ports[0:2], "big"), int.from_bytes(ports[2:4], "big")
    segment = Tcp(sport, dport, seq, ack, flags, 0, b"").encode(src, dst)
    return eth + b"\x08\x00" + IPv4(src, dst, TCP, segment).encode()
