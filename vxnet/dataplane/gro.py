"""Receive coalescing (GRO done in Python) for frames that arrive one packet at a time: ESP.

An encrypted network cannot carry a TCP super-frame across the underlay (ESP is never
fragmented), so its segments arrive one by one.  Written to the container's TAP one by one, each
costs a system call and a full pass of the container's TCP receive path, and provokes its own
ACK.  :class:`Coalescer` joins consecutive in-order segments of one TCP flow into one super-frame
and writes that once, with a ``virtio_net_hdr`` (``GSO_TCPV4``, ``gso_size`` = the segments'
payload size, ``NEEDS_CSUM`` with the pseudo-header sum), as the kernel's own GRO would hand it
to TCP.  The merge rule is the kernel's (``tcp_gro_receive``): same addresses, ports, ACK,
window and options; sequence numbers contiguous; every segment but the last of the same size;
only ACK or ACK|PSH segments; PSH or a short segment closes the run.  Anything else (ICMP,
UDP, IPv6, SYN/FIN/RST, out of order) flushes the port's run and goes on as it came, so the
order of frames to one port never changes.

The TCP checksums of merged segments are not recomputed: the frame leaves with ``NEEDS_CSUM``,
which the local stack trusts as it trusts a checksum verified by a NIC.  Every byte of it was
authenticated by the ESP ICV (AES-GCM), a far stronger check than the 16-bit sum.

Sans-IO: the caller hands frames in (:meth:`Coalescer.push`) and says when a batch of reads is
over (:meth:`Coalescer.flush`); frames come out through the ``emit(port, vnet_hdr, frame)``
callback, in order.  The hot path is flat: one ``struct`` unpack and one tuple compare per
segment, one copy of its payload into a preallocated buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from vxnet.dataplane.vnet import GSO_TCPV4, HDR, HDR_LEN, NEEDS_CSUM, PLAIN

Buf = bytes | bytearray | memoryview
#: ``(port, virtio_net_hdr, frame)``: one frame or super-frame out, in order.
Emit = Callable[[Any, Buf, Buf], object]

ETH_HLEN = 14
L4 = ETH_HLEN + 20  # only IPv4 without options is merged
MAX_FRAME = ETH_HLEN + 65535  # one IPv4 datagram
_ACK, _PSH = 0x10, 0x08
_IPV4_NO_OPTIONS = 0x45
_TCP = 6
#: The fields every merged segment shares, per TCP header length: Ethernet header, version/IHL
#: and TOS, fragment field/TTL/protocol, addresses and ports, ACK and data offset, window,
#: urgent pointer and options.  Left out (``x``): total length, IP ID, IP checksum, sequence
#: number, flags, TCP checksum.
_KEYS = {thl: struct.Struct(f"!16s4x4s2x12s4x5s1x2s2x{thl - 18}s") for thl in range(20, 61, 4)}
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class _Run:
    """A super-frame being built for one port: the first segment's headers, then payloads."""

    __slots__ = ("buf", "count", "end", "hlen", "key", "mss", "next_seq", "view")

    def __init__(self) -> None:
        self.buf = bytearray(MAX_FRAME)
        self.view = memoryview(self.buf)
        self.key: tuple[bytes, ...] = ()
        self.hlen = self.end = self.mss = self.next_seq = self.count = 0


class Coalescer:
    """Pending runs by port (any hashable); see the module docstring."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._runs: dict[Any, _Run] = {}
        self._free: list[_Run] = []
        self._vh = bytearray(HDR_LEN)
        self.merged = 0  # segments that went out inside a super-frame
        self.superframes = 0  # super-frames written

    def push(self, port: Any, frame: Buf) -> None:
        """A complete Ethernet frame for ``port``: held for merging, or emitted now."""
        runs = self._runs
        run = runs.get(port)
        n = len(frame)
        if (
            n < L4 + 20
            or frame[12] != 8
            or frame[13]
            or frame[14] != _IPV4_NO_OPTIONS
            or frame[23] != _TCP
            or frame[20] & 0x3F
            or frame[21]
        ):
            if run is not None:
                self._close(port, run)
            self._emit(port, PLAIN, frame)
            return
        thl = (frame[L4 + 12] >> 4) * 4
        hlen = L4 + thl
        end = ETH_HLEN + ((frame[16] << 8) | frame[17])
        flags = frame[L4 + 13]
        size = end - hlen
        if thl < 20 or end > n or size <= 0 or flags & ~_PSH != _ACK:
            if run is not None:
                self._close(port, run)
            self._emit(port, PLAIN, frame)
            return
        key = _KEYS[thl].unpack_from(frame)
        seq = _U32.unpack_from(frame, L4 + 4)[0]
        if run is not None:
            if (
                seq == run.next_seq
                and key == run.key
                and size <= run.mss
                and run.end + size <= MAX_FRAME
            ):
                run.buf[run.end : run.end + size] = frame[hlen:end]
                run.end += size
                run.next_seq = (seq + size) & 0xFFFFFFFF
                run.count += 1
                if flags & _PSH or size < run.mss:
                    run.buf[L4 + 13] |= flags
                    self._close(port, run)
                return
            self._close(port, run)
        if flags & _PSH:  # a run of one: nothing to wait for
            self._emit(port, PLAIN, frame)
            return
        run = self._free.pop() if self._free else _Run()
        run.buf[0:end] = frame[0:end]
        run.key, run.hlen, run.end, run.mss = key, hlen, end, size
        run.next_seq = (seq + size) & 0xFFFFFFFF
        run.count = 1
        runs[port] = run

    def flush(self) -> None:
        """A batch of reads is over: every pending run goes out."""
        runs = self._runs
        while runs:
            port = next(iter(runs))
            self._close(port, runs[port])

    def forget(self, port: Any) -> None:
        """Drop ``port``'s pending run unsent (the port is going away)."""
        run = self._runs.pop(port, None)
        if run is not None:
            self._free.append(run)

    def _close(self, port: Any, run: _Run) -> None:
        del self._runs[port]
        self._free.append(run)
        end = run.end
        if run.count == 1:  # never merged: the segment exactly as it came
            self._emit(port, PLAIN, run.view[:end])
            return
        buf = run.buf
        _U16.pack_into(buf, 16, end - ETH_HLEN)  # IPv4 total length ...
        buf[24] = buf[25] = 0
        s = int.from_bytes(buf[ETH_HLEN:L4], "big") % 0xFFFF
        _U16.pack_into(buf, 24, ~s & 0xFFFF)  # ... and its header checksum
        tcp_len = end - L4
        s = (int.from_bytes(buf[26:34], "big") % 0xFFFF + _TCP + tcp_len) % 0xFFFF or 0xFFFF
        _U16.pack_into(buf, L4 + 16, s)  # TCP: the pseudo-header sum, finished by no one
        vh = self._vh
        HDR.pack_into(vh, 0, NEEDS_CSUM, GSO_TCPV4, run.hlen, run.mss, L4, 16)
        self.merged += run.count
        self.superframes += 1
        self._emit(port, vh, run.view[:end])
