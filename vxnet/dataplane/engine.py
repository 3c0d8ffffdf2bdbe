"""The dataplane's I/O loop: one thread, one epoll, the TAPs and the underlay UDP socket.

Which path frames take is decided once, at start (:attr:`Dataplane.path`):

* ``tunnel-gso`` (offloads on, Linux 6.17+): container TAPs hand over TCP super-frames with
  unfinished checksums; each leaves in one write to the host's underlay TAP as one VXLAN
  super-frame (:class:`~vxnet.dataplane.encap.TunnelTx`), and one that arrives whole is
  written whole to the container.  Per-64 KB work, not per-packet work.
* ``segment`` (offloads on, no TAP tunnel GSO in this kernel): the same super-frames, cut in
  Python and sent with UDP GSO (:class:`~vxnet.dataplane.encap.SegmentTx`).
* ``per-frame`` (``--no-offload``): one read and one datagram per inner packet, checksums
  finished by the container's kernel: what a learner expects in a capture.

Encrypted networks always run per frame (ESP cannot carry a super-frame unfragmented).

The control plane runs on trio in the daemon's main thread and must never sit on the per-frame
path.  It talks to this thread through exactly one call, :meth:`Dataplane.submit`, which queues
a :mod:`~vxnet.dataplane.tables` record and wakes the loop through an eventfd; the loop applies
queued updates between batches of frames, so the switch's tables are only ever mutated by the
thread that reads them.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import secrets
import select
import socket
import threading
import time
from typing import Any, Literal

from vxnet.dataplane.encap import SegmentTx, TunnelTx
from vxnet.dataplane.switch import Buf, Switch
from vxnet.dataplane.tables import (
    AddPeer,
    AddPort,
    ResetEspPeer,
    SetIpsecKeys,
    SetUnderlay,
    TableUpdate,
)
from vxnet.dataplane.tap import CONTAINER_OFFLOADS, has_vnet_hdr, open_underlay_tap, set_offload
from vxnet.dataplane.vnet import HDR_LEN, PLAIN
from vxnet.errors import VxnetError
from vxnet.esp.sadb import SADB

log = logging.getLogger("vxnet.dataplane")
BATCH = 256  # frames drained per readiness event before looking at other fds
RECV_BUF = 65536 + 64
SOCKET_BUFFER = 4 * 1024 * 1024
TICK = 1.0  # seconds between two Switch.tick() calls: load-balancer connection expiry
IPPROTO_ESP = 50
RT_PRIORITY = 1  # SCHED_FIFO, the lowest real-time priority: see _realtime
Gso = Literal["auto", "segment"]
PATHS = {
    "tunnel-gso": "TAP offloads + UDP-tunnel GSO: one write per TCP super-frame (up to 64 KB)",
    "segment": "TAP offloads, super-frames cut in Python and sent with UDP GSO",
    "per-frame": "offloads off: one read and one datagram per inner packet",
}


def _write_tap(fd: int, vh: Buf, frame: Buf) -> int:
    return os.writev(fd, (vh, frame))


class Dataplane:
    """Owns the underlay socket, the TAP fds handed to it, and the thread that moves frames.

    Ownership: an fd passed in :class:`~vxnet.dataplane.tables.AddPort` belongs to the dataplane
    from then on; it is closed on ``RemovePort``, ``RemoveNetwork`` or :meth:`close`.
    """

    def __init__(
        self, underlay_addr: str, data_port: int = 4789, offload: bool = True, gso: Gso = "auto"
    ) -> None:
        self.underlay_addr = underlay_addr
        self.data_port = data_port
        self._sock = _underlay_socket(underlay_addr, data_port)
        self._esp = _esp_socket(underlay_addr)
        self._tunnel: TunnelTx | None = None
        send_offload = None
        if offload and gso == "auto":
            opened = open_underlay_tap("vxu" + secrets.token_hex(4))
            if opened is not None:
                self._tunnel = TunnelTx(opened[0], opened[1], underlay_addr, data_port)
                send_offload = self._tunnel.send
        if offload and send_offload is None:
            send_offload = SegmentTx(lambda: self._sock).send
        self.path = "per-frame" if not offload else "tunnel-gso" if self._tunnel else "segment"
        self.switch = Switch(
            _write_tap,
            self._send,
            data_port,
            self._send_esp,
            offload=offload,
            send_offload=send_offload,
            is_vnet=has_vnet_hdr,
        )
        self.switch.coalesce_rx()
        self._ipsec_keys: tuple[tuple[int, bytes], ...] = ()
        self._icv_len = 16  # the swarm's ESP ICV length, with the keys
        self._pending: collections.deque[TableUpdate] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._sock.fileno(), select.EPOLLIN)
        self._epoll.register(self._esp.fileno(), select.EPOLLIN)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._running = False
        self._thread: threading.Thread | None = None
        self._applied = threading.Condition()
        self._generation = 0  # number of updates applied, for wait_applied()
        self._submitted = 0
        self._watched: set[int] = set()
        self.update_errors = 0  # updates the switch refused (the daemon validates first)
        self._refused: dict[int, str] = {}  # seq -> why, until the submitter asks (bounded)
        self.realtime = False  # the thread runs SCHED_FIFO (see _realtime)

    def _rebind(self, update: SetUnderlay) -> None:
        """Runs in the dataplane thread: swap the underlay socket, keep everything else."""
        if (update.address, update.port) == (self.underlay_addr, self.data_port):
            return
        new = _underlay_socket(update.address, update.port)  # OSError leaves the old one
        self._epoll.unregister(self._sock.fileno())
        self._sock.close()
        self._sock = new
        self._epoll.register(new.fileno(), select.EPOLLIN)
        if update.address != self.underlay_addr:  # the VTEP moved: ESP socket and SAs follow
            esp = _esp_socket(update.address)
            self._epoll.unregister(self._esp.fileno())
            self._esp.close()
            self._esp = esp
            self._epoll.register(esp.fileno(), select.EPOLLIN)
            self.switch.sadb = None
        self.underlay_addr, self.data_port = update.address, update.port
        self.switch.set_data_port(update.port)
        if self._tunnel is not None:
            self._tunnel.rebind(update.address, update.port)
        if self.switch.sadb is None and self._ipsec_keys:
            self._set_ipsec_keys(SetIpsecKeys(self._ipsec_keys, self._icv_len))

    def _send_esp(self, packet: Buf, vtep: str) -> int:
        return self._esp.sendto(packet, (vtep, 0))

    def _set_ipsec_keys(self, update: SetIpsecKeys) -> None:
        """Runs in the dataplane thread.  Docker's rotation order lives in SADB.set_keys."""
        self._ipsec_keys = update.keys
        self._icv_len = update.icv_len
        if self.switch.sadb is not None and self.switch.sadb.icv_len != update.icv_len:
            self.switch.sadb = None  # a different ICV: every SA is derived again
        if self.switch.sadb is None:
            sadb = SADB(ipaddress.IPv4Address(self.underlay_addr), icv_len=update.icv_len)
            sadb.set_keys(update.keys)  # keys first: add_peer refuses a SADB without keys
            for net in self.switch.nets.values():
                for vtep, _ in net.remote.values():
                    sadb.add_peer(ipaddress.IPv4Address(vtep))
            self.switch.sadb = sadb
        else:
            self.switch.sadb.set_keys(update.keys)

    def _apply_esp(self, update: TableUpdate) -> None:
        sadb = self.switch.sadb
        if isinstance(update, SetIpsecKeys):
            self._set_ipsec_keys(update)
        elif isinstance(update, ResetEspPeer) and sadb is not None:
            sadb.reset_peer(update.vtep)
        elif isinstance(update, AddPeer) and sadb is not None:
            sadb.add_peer(update.vtep)

    def _send(self, parts: Any, addr: tuple[str, int]) -> int:
        return self._sock.sendmsg(parts, (), 0, addr)

    # --------------------------------------------------------------------- control side

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="vxnet-dataplane", daemon=True)
        self._thread.start()

    def submit(self, update: TableUpdate) -> int:
        """Queue one table update (thread-safe, never blocks).  Returns its sequence number."""
        with self._applied:
            self._submitted += 1
            seq = self._submitted
            self._pending.append(update)
        os.eventfd_write(self._wake, 1)
        return seq

    def wait_applied(self, seq: int, timeout: float = 5.0) -> bool:
        """Block until update ``seq`` has been applied by the dataplane thread."""
        with self._applied:
            return self._applied.wait_for(lambda: self._generation >= seq, timeout)

    def refusal(self, seq: int) -> str | None:
        """Why the switch refused update ``seq`` (once applied), or None if it took it."""
        with self._applied:
            return self._refused.pop(seq, None)

    def close(self) -> None:
        self._running = False
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for port in list(self.switch.ports.values()):
            _close_quietly(port.fd)
        self._epoll.close()
        self._sock.close()
        self._esp.close()
        if self._tunnel is not None:
            os.close(self._tunnel.fd)
        os.close(self._wake)

    # ---------------------------------------------------------------------- the loop

    def _run(self) -> None:
        """The thread: a bug while handling one batch is logged and counted, never fatal.

        A dataplane that silently stops is the worst failure a node can have, so an
        unexpected exception (a bug: decoders raise only BadPacket, which the switch counts)
        becomes the drop reason ``internal_error`` and the loop goes on.
        """
        self.realtime = _realtime()
        while self._running:
            try:
                self._loop()
            except Exception:
                drops = self.switch.counters.drops
                drops["internal_error"] = drops.get("internal_error", 0) + 1
                if drops["internal_error"] <= 10:
                    log.exception("dataplane: unexpected error while handling frames")

    def _loop(self) -> None:
        buf = bytearray(RECV_BUF)
        view = memoryview(buf)
        hdr = bytearray(HDR_LEN)  # a TAP frame's virtio_net_hdr ...
        tap_buf = bytearray(RECV_BUF)  # ... and the frame, read with one readv
        tap_view = memoryview(tap_buf)
        iov = (hdr, tap_buf)
        switch = self.switch
        ports_by_fd = switch.ports_by_fd
        readv = os.readv
        readinto = os.readv
        monotonic = time.monotonic
        next_tick = 0.0
        while self._running:
            now = monotonic()  # once per wakeup, never per frame: the switch has no clock
            if now >= next_tick:
                switch.tick(now)
                next_tick = now + TICK
            sock_fd = self._sock.fileno()  # the sockets change only in _apply_pending, below
            esp_fd = self._esp.fileno()
            recvfrom_into = self._sock.recvfrom_into
            for fd, _events in self._epoll.poll(TICK):
                if fd == esp_fd:
                    for _ in range(BATCH):
                        try:
                            n, src = self._esp.recvfrom_into(buf)
                        except BlockingIOError:
                            break
                        switch.from_esp(view[:n], src[0])
                    switch.flush_rx()  # segments merged while draining go to their TAPs
                elif fd == sock_fd:
                    for _ in range(BATCH):
                        try:
                            n, src = recvfrom_into(buf)
                        except BlockingIOError:
                            break
                        switch.from_underlay(view[:n], src)
                elif fd == self._wake:
                    self._apply_pending()
                else:
                    port = ports_by_fd.get(fd)
                    if port is None:
                        continue
                    if port.vnet:
                        for _ in range(BATCH):
                            try:
                                n = readv(fd, iov) - HDR_LEN
                            except BlockingIOError:
                                break
                            except OSError:  # the TAP went away under us; RemovePort follows
                                break
                            if n >= 0:
                                switch.from_tap(port, tap_view[:n], hdr)
                        continue
                    for _ in range(BATCH):
                        try:
                            n = readinto(fd, (tap_buf,))
                        except BlockingIOError:
                            break
                        except OSError:
                            break
                        switch.from_tap(port, tap_view[:n], PLAIN)

    def _apply_pending(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            with self._applied:
                if not self._pending:
                    self._applied.notify_all()
                    return
                update = self._pending.popleft()
            released: list[int] = []
            try:
                if isinstance(update, SetUnderlay):
                    self._rebind(update)
                elif isinstance(update, SetIpsecKeys | ResetEspPeer):
                    self._apply_esp(update)
                else:
                    released = self.switch.apply(update)
                    self._apply_esp(update)
            except (VxnetError, OSError) as exc:
                self.update_errors += 1
                released = [update.fd] if isinstance(update, AddPort) else []
                with self._applied:
                    self._refused[self._generation + 1] = f"{type(update).__name__}: {exc}"
                    while len(self._refused) > 256:  # submitters that never ask
                        del self._refused[next(iter(self._refused))]
            else:
                if isinstance(update, AddPort):
                    port = self.switch.ports.get(update.port_id)
                    if port is not None and port.vnet:
                        set_offload(update.fd, CONTAINER_OFFLOADS if port.offload else 0)
                    self._epoll.register(update.fd, select.EPOLLIN)
                    self._watched.add(update.fd)
            for fd in released:
                if fd in self._watched:
                    self._watched.discard(fd)
                    self._epoll.unregister(fd)
                _close_quietly(fd)
            with self._applied:
                self._generation += 1

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "realtime": self.realtime, **self.switch.stats()}

    def fdb(self) -> list[dict[str, Any]]:
        return self.switch.fdb()

    def lb_table(self) -> list[dict[str, Any]]:
        return self.switch.lb_table()

    def conntrack(self) -> list[dict[str, Any]]:
        return self.switch.conntrack()


def _underlay_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _esp_socket(address: str) -> socket.socket:
    """A raw IPv4 socket for protocol 50: the kernel here has no ESP, vxnet is the IPsec stack.

    Bound to the VTEP address, it receives every ESP packet to it (with the IP header) and,
    being bound, stops the kernel from answering "protocol unreachable".
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.bind((address, 0))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _realtime() -> bool:
    """Run the calling thread (the dataplane's) SCHED_FIFO at the lowest real-time priority.

    The kernel's own dataplane runs in softirq context, ahead of every task; a userspace one
    that waits its turn behind busy tasks waits for the next scheduler tick (4 ms at HZ=250):
    that was the p99 of a ping on a loaded machine, and most of the encrypted throughput lost.
    The thread blocks in epoll when there is nothing to do, and the kernel's real-time
    throttling (95 % of a CPU) still applies.

    Opt-in (``VXNET_DATAPLANE_RT=1``): on 2 cores, under a ping flood and an iperf3 stream
    through an encrypted network, two real-time dataplanes starved the containers' own
    processes and ping lost ~40 of 4300 replies in its socket queue, with no drop anywhere in
    vxnet; with the default policy it lost none.  A lab is for correctness first; a benchmark
    may ask for it.  Without CAP_SYS_NICE this is a no-op.
    """
    if os.environ.get("VXNET_DATAPLANE_RT", "0") != "1":
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except OSError:
        return False
    return True


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
