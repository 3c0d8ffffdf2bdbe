"""Live frames from inside a lab namespace, and a pcap writer for Wireshark.

The same AF_PACKET approach as :mod:`vxnet.capture`, without its helper process: the socket is
created in the namespace by a thread that enters it for that one call
(:func:`vxnet.netns.call_in`), and a socket stays in the namespace it was made in.  One
unbound socket sees every interface there; :class:`Where` says which frames to keep:

* the fabric: every host's port, each frame once, on the port it *entered* by (a frame from h1
  to h2 is also seen leaving by h2's port; the bridge device itself sees none of them);
* a host: its underlay interface(s), both directions;
* a container: every interface (``eth0`` on the overlay, ``eth1`` on docker_gwbridge, ``lo``
  where the resolver at 127.0.0.11 answers); on ``lo`` each frame once, as libpcap does.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from vxnet import netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772
RCVBUF = 4 << 20
MAX_FRAME = 65535 + 18

PCAP_MAGIC = 0xA1B2C3D4
PCAP_SNAPLEN = 262144
LINKTYPE_ETHERNET = 1
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class Where:
    """Which namespace to capture in, and which of its frames to keep."""

    netns: str
    label: str  # what the user named: "fabric", "h1", "c1"
    interfaces: tuple[str, ...] = ()  # () = every interface
    exclude: tuple[str, ...] = ()
    ingress_only: bool = False

    def keeps(self, ifname: str, pkttype: int, hatype: int) -> bool:
        outgoing = pkttype == PACKET_OUTGOING
        if self.interfaces and ifname not in self.interfaces:
            return False
        if ifname in self.exclude or (self.ingress_only and outgoing):
            return False
        return not (hatype == ARPHRD_LOOPBACK and outgoing)


@dataclass(frozen=True, slots=True)
class Frame:
    time: float  # time.time() when it was read
    interface: str
    direction: str  # "in" or "out"
    data: bytes


class LiveCapture:
    """An AF_PACKET socket in ``where.netns``; iterate :meth:`frames` to read."""

    def __init__(self, where: Where) -> None:
        self.where = where
        self.sock = netns.call_in(where.netns, _open_packet_socket)

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def frames(self, timeout: float | None = None) -> Iterator[Frame]:
        """Frames as they come, until ``timeout`` seconds have passed (forever if None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not select.select([self.sock], [], [], left)[0]:
                continue
            data, addr = self.sock.recvfrom(MAX_FRAME)
            ifname, _, pkttype, hatype = addr[:4]
            if self.where.keeps(ifname, pkttype, hatype):
                direction = "out" if pkttype == PACKET_OUTGOING else "in"
                yield Frame(time.time(), ifname, direction, data)


def _open_packet_socket() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock


# ------------------------------------------------------------------------------- pcap


def pcap_header(snaplen: int = PCAP_SNAPLEN) -> bytes:
    """The classic libpcap file header (microseconds, Ethernet)."""
    return _PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def pcap_record(timestamp: float, frame: bytes, snaplen: int = PCAP_SNAPLEN) -> bytes:
    """One packet record: its time, captured and original lengths, then the bytes."""
    seconds = int(timestamp)
    micros = min(round((timestamp - seconds) * 1e6), 999_999)
    kept = frame[:snaplen]
    return _PCAP_RECORD.pack(seconds, micros, len(kept), len(frame)) + kept
