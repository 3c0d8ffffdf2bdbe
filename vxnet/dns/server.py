"""The trio service around :class:`~vxnet.dns.resolver.Resolver`: 127.0.0.11:53 in a container.

The daemon is one multi-threaded process in the host's namespace; the resolver must listen inside
each container's namespace.  A socket belongs to the namespace it was *created* in, so
:func:`vxnet.netns.call_in` moves one worker thread into the container's namespace, creates
the sockets and moves the thread back; the event loop then uses them like any other socket.

Upstream queries also leave from sockets created in the container's namespace, so they follow the
container's own routes (in a lab: its bridge and gateway), as the container's traffic would.

TCP (RFC 7766): 2-byte length-prefixed messages, several per connection, answered in order;
an idle connection is closed after :data:`TCP_IDLE_TIMEOUT`; at most :data:`MAX_TCP_CONNECTIONS`
at once; a malformed message gets its FORMERR (when the header parses) and the connection closes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from functools import partial
from ipaddress import AddressValueError, IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import dns.rcode
import trio

from vxnet import netns
from vxnet.dns.resolver import (
    DNS_PORT,
    MAX_UPSTREAMS,
    RESOLVER_IP,
    Answer,
    Drop,
    Forward,
    Resolver,
    Upstream,
)
from vxnet.errors import LabError, UsageError

NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")
RESOLV_CONF = f"nameserver {RESOLVER_IP}\noptions ndots:0\n"
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CONNECTIONS = 64
MAX_FORWARDS = 256  # upstream queries in flight per resolver socket pair
MAX_MESSAGE = 65535

T = TypeVar("T")
_LENGTH = struct.Struct("!H")


# ----------------------------------------------------------------------------- namespaces


async def _sockets_in(
    netns_name: str, make: Callable[[], list[socket.socket]]
) -> list[socket.socket]:
    """``make()`` in a worker thread inside ``netns_name``; nothing leaks if we are cancelled."""
    made: list[socket.socket] = []

    def run() -> None:
        made.extend(netns.call_in(netns_name, make))

    try:
        await trio.to_thread.run_sync(run)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def _bind(address: str, port: int) -> list[socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((address, port))
        tcp.bind((address, port))
        tcp.listen(128)
    except OSError as exc:
        udp.close()
        tcp.close()
        raise LabError(f"cannot listen on {address}:{port} (is lo up?): {exc.strerror}") from None
    return [udp, tcp]


def _new_socket(kind: int) -> list[socket.socket]:
    return [socket.socket(socket.AF_INET, kind)]


def write_resolv_conf(netns_name: str) -> Path:
    """Point the container at 127.0.0.11: ``ip netns exec`` bind-mounts this file."""
    path = _resolv_conf(netns_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("resolv.conf.tmp")
    tmp.write_text(RESOLV_CONF)
    tmp.replace(path)
    return path


def remove_resolv_conf(netns_name: str) -> None:
    """Idempotent."""
    path = _resolv_conf(netns_name)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when nothing else (hosts, ...) is left in it


def _resolv_conf(netns_name: str) -> Path:
    if not netns_name or "/" in netns_name or netns_name in (".", ".."):
        raise UsageError(f"{netns_name!r} is not a network namespace name")
    return ETC_NETNS / netns_name / "resolv.conf"


def check_upstreams(upstreams: Sequence[Upstream]) -> tuple[Upstream, ...]:
    """At most 3 ``(IPv4, port)`` pairs, as Docker takes from the host's resolv.conf."""
    if len(upstreams) > MAX_UPSTREAMS:
        raise UsageError(f"at most {MAX_UPSTREAMS} upstream DNS servers, not {len(upstreams)}")
    out = []
    for ip, port in upstreams:
        try:
            IPv4Address(ip)
        except AddressValueError:
            raise UsageError(f"upstream DNS server {ip!r} is not an IPv4 address") from None
        if not 0 < port < 0x10000:
            raise UsageError(f"upstream DNS port {port} is not in 1-65535")
        out.append((ip, port))
    return tuple(out)


# ----------------------------------------------------------------------------- service


async def serve_resolver(
    netns_name: str,
    resolver: Resolver,
    networks: Callable[[], Sequence[str]],
    upstreams: Sequence[Upstream] = (),
    *,
    address: str = RESOLVER_IP,
    port: int = DNS_PORT,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``resolver`` on UDP and TCP ``address:port`` inside ``netns_name`` until cancelled.

    ``networks()`` is asked on every query: the networks the container is on right now.
    """
    checked = check_upstreams(upstreams)
    raw_udp, raw_tcp = await _sockets_in(netns_name, partial(_bind, address, port))
    udp = trio.socket.from_stdlib_socket(raw_udp)
    tcp = trio.socket.from_stdlib_socket(raw_tcp)
    with udp, tcp:
        async with trio.open_nursery() as nursery:
            service = _Service(netns_name, resolver, networks, checked, nursery)
            nursery.start_soon(service.serve_udp, udp)
            nursery.start_soon(service.serve_tcp, tcp)
            task_status.started()


class _Service:
    def __init__(
        self,
        netns_name: str,
        resolver: Resolver,
        networks: Callable[[], Sequence[str]],
        upstreams: tuple[Upstream, ...],
        nursery: trio.Nursery,
    ) -> None:
        self.netns_name = netns_name
        self.resolver = resolver
        self.networks = networks
        self.upstreams = upstreams
        self.nursery = nursery
        self.forwards = trio.CapacityLimiter(MAX_FORWARDS)
        self.tcp_connections = 0

    def _handle(self, message: bytes, tcp: bool) -> Answer | Forward | Drop:
        return self.resolver.handle_untrusted(
            message, self.networks(), trio.current_time(), tcp=tcp, upstreams=self.upstreams
        )

    # ------------------------------------------------------------------ UDP

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, client = await sock.recvfrom(MAX_MESSAGE)
            self.resolver.count("udp_queries")
            result = self._handle(data, tcp=False)
            if isinstance(result, Answer):
                await self._send_udp(sock, result, client)
            elif isinstance(result, Forward):
                try:
                    self.forwards.acquire_on_behalf_of_nowait(result)
                except trio.WouldBlock:
                    self.resolver.count("forward_busy")
                    await self._send_udp(sock, self.resolver.upstream_failed(result), client)
                else:
                    self.nursery.start_soon(self._forward_udp_client, sock, result, client)

    async def _forward_udp_client(
        self, sock: trio.socket.SocketType, forward: Forward, client: Any
    ) -> None:
        try:
            await self._send_udp(sock, await self.relay(forward), client)
        finally:
            self.forwards.release_on_behalf_of(forward)

    async def _send_udp(self, sock: trio.socket.SocketType, answer: Answer, client: Any) -> None:
        try:
            await sock.sendto(answer.response, client)
        except OSError:
            self.resolver.count("send_error")

    # ------------------------------------------------------------------ TCP

    async def serve_tcp(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as connections:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError:  # out of file descriptors, ...: back off a little
                    self.resolver.count("tcp_accept_error")
                    await trio.sleep(0.1)
                    continue
                if self.tcp_connections >= MAX_TCP_CONNECTIONS:
                    self.resolver.count("tcp_rejected")
                    conn.close()
                    continue
                self.resolver.count("tcp_accepted")
                self.tcp_connections += 1
                connections.start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        try:
            with conn:
                while await self._serve_one(conn):
                    pass
        except OSError:
            self.resolver.count("tcp_error")
        finally:
            self.tcp_connections -= 1

    async def _serve_one(self, conn: trio.socket.SocketType) -> bool:
        """Answer one message; False when the connection should close.

        A connection ends in exactly one of ``tcp_closed`` (by the client), ``tcp_malformed``,
        ``tcp_idle_closed`` or ``tcp_error``: they add up to ``tcp_accepted``.
        """
        with trio.move_on_after(TCP_IDLE_TIMEOUT):
            message = await read_message(conn)
            if message is None:
                self.resolver.count("tcp_closed")
                return False
            self.resolver.count("tcp_queries")
            result = self._handle(message, tcp=True)
            if isinstance(result, Drop):
                self.resolver.count("tcp_malformed")
                return False
            answer = await self.relay(result) if isinstance(result, Forward) else result
            await send_message(conn, answer.response)
            if answer.rcode == dns.rcode.FORMERR:
                self.resolver.count("tcp_malformed")
                return False
            return True
        self.resolver.count("tcp_idle_closed")
        return False

    # ------------------------------------------------------------------ upstreams

    async def relay(self, forward: Forward) -> Answer:
        """Ask each upstream in turn; SERVFAIL when none answered in time."""
        with trio.move_on_at(forward.deadline):
            for upstream in forward.upstreams:
                with trio.move_on_after(forward.timeout):
                    try:
                        answer = await self._ask(forward, upstream)
                    except OSError:
                        self.resolver.count("upstream_error")
                        answer = None
                    if answer is not None:
                        return answer
                self.resolver.count("upstream_unanswered")
        return self.resolver.upstream_failed(forward)

    async def _ask(self, forward: Forward, upstream: Upstream) -> Answer | None:
        kind = socket.SOCK_STREAM if forward.tcp else socket.SOCK_DGRAM
        [raw] = await _sockets_in(self.netns_name, partial(_new_socket, kind))
        with trio.socket.from_stdlib_socket(raw) as sock:
            await sock.connect(upstream)
            if forward.tcp:
                await send_message(sock, forward.query)
            else:
                await sock.send(forward.query)
            while True:
                reply = await read_message(sock) if forward.tcp else await sock.recv(MAX_MESSAGE)
                if reply is None:
                    return None
                answer = self.resolver.upstream_reply_untrusted(forward, reply)
                if answer is not None:
                    return answer


# ----------------------------------------------------------------------------- TCP framing


async def read_message(sock: trio.socket.SocketType) -> bytes | None:
    """One length-prefixed DNS message; None at end of stream (also mid-message)."""
    prefix = await _read_exactly(sock, _LENGTH.size)
    if prefix is None:
        return None
    return await _read_exactly(sock, _LENGTH.unpack(prefix)[0])


async def send_message(sock: trio.socket.SocketType, message: bytes) -> None:
    data = memoryview(_LENGTH.pack(len(message)) + message)
    while data:
        sent = await sock.send(data)
        data = data[sent:]


async def _read_exactly(sock: trio.socket.SocketType, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = await sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
