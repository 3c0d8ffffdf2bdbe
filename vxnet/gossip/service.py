"""The gossip service on 7946 (trio): memberlist's UDP and TCP, networkdb on top.

Thin glue.  The decisions are made by the sans-IO cores (:class:`~vxnet.gossip.swim.Memberlist`
and :class:`~vxnet.gossip.networkdb.NetworkDB`).  This module moves their datagrams and
streams through :mod:`vxnet.gossip.packet`'s framing, drives their timers, and hands table
changes to whoever watches (the daemon, which programs its FDB from ``overlay_peer_table``).
"""

from __future__ import annotations

import logging
import math
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import trio

from vxnet.errors import BadPacket
from vxnet.gossip.config import Config
from vxnet.gossip.messages import (
    Message,
    NodeState,
    User,
    decode_message_untrusted,
    encode_message,
)
from vxnet.gossip.networkdb import NetworkDB, TableEvent
from vxnet.gossip.packet import (
    Keyring,
    StreamReader,
    decode_packet_untrusted,
    encode_packets,
    encode_stream,
)
from vxnet.gossip.swim import MemberEvent, Memberlist, StreamOp, UserMessage

log = logging.getLogger("vxnet.gossip")
GOSSIP_PORT = 7946
UDP_RECV = 65536
ENCRYPTION_OVERHEAD = 29
STREAM_LIMIT = 8 << 20

TableWatcher = Callable[[TableEvent], Awaitable[None]]
UDP_RECV_BUF = 2 * 1024 * 1024


RECONNECT_INTERVAL = 1.0  # networkdb retries one failed node this often (Docker: 1 s)
FAILED_NODE_REAP = 24 * 3600.0  # and forgets it after a day (nodeReapInterval)


class GossipService:
    """One node's memberlist + networkdb, serving UDP and TCP on ``addr``:``port``."""

    def __init__(
        self,
        name: str,
        addr: str,
        port: int = GOSSIP_PORT,
        *,
        keys: Sequence[bytes] = (),
        primary: bytes | None = None,
        config: Config | None = None,
        watcher: TableWatcher | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.port = port
        self.rng = rng or random.Random()
        self.keyring = Keyring(keys, primary) if keys else None
        base = config or Config()
        self.config = replace(base, encryption_overhead=ENCRYPTION_OVERHEAD if keys else 0)
        self.watcher = watcher
        self.counters: Counter[str] = Counter()
        now = trio.current_time()
        self.ml = Memberlist(self.config, name, addr, port, self.rng, now)
        self.db = NetworkDB(name, self._user_udp, self._user_tcp, self._broadcast, self.rng)
        self.ml.local_state_provider = lambda join: self.db.local_state()
        self._udp: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        # table events, in networkdb's order, to the one task that hands them to the watcher
        self._events_in, self._events_out = trio.open_memory_channel[TableEvent](math.inf)
        # failed (dead, not left) members -> (address, since): networkdb's failedNodes
        self.failed: dict[str, tuple[tuple[str, int], float]] = {}

    # ---------------------------------------------------------------- life cycle

    async def serve(
        self, seeds: Sequence[tuple[str, int]] = (), *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # memberlist asks for 2 MB (net_transport.go, udpRecvBufSize): a busy node's gossip
        # datagrams wait in the kernel instead of being dropped (the kernel caps it at rmem_max)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECV_BUF)
        await udp.bind((self.addr, self.port))
        listeners = await trio.open_tcp_listeners(self.port, host=self.addr)
        self._udp = udp
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._udp_reader, udp)
            nursery.start_soon(trio.serve_listeners, self._tcp_handler, listeners)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._reconnect)
            nursery.start_soon(self.watch_events)
            if seeds:
                self.ml.join(list(seeds), trio.current_time())
                await self._flush()
            log.info(
                "gossip %s on %s:%d (encrypted: %s), seeds %s",
                self.name,
                self.addr,
                self.port,
                self.keyring is not None,
                list(seeds),
            )
            task_status.started()

    def leave(self) -> None:
        self.ml.leave(trio.current_time())
        self._wake.set()

    def set_keys(self, keys: Sequence[bytes], primary: bytes) -> None:
        """Docker's rotation order: add the new key, make the middle one primary, drop the old."""
        if self.keyring is None:
            self.keyring = Keyring(keys, primary)
            self.ml.set_encryption_overhead(ENCRYPTION_OVERHEAD)  # piggyback budget shrinks
            return
        for key in keys:
            if key not in self.keyring.keys:
                self.keyring.add(key)
        self.keyring.use(primary)
        for key in list(self.keyring.keys):
            if key not in keys:
                self.keyring.remove(key)

    # --------------------------------------------------------------- networkdb API

    def join_network(self, network: str) -> None:
        self.db.join_network(network, trio.current_time())
        self._wake.set()

    def leave_network(self, network: str) -> None:
        self.db.leave_network(network, trio.current_time())
        self._wake.set()

    def put(self, network: str, table: str, key: str, value: bytes) -> None:
        now = trio.current_time()
        if self.db.get(network, table, key) is None:
            self.db.create_entry(network, table, key, value, now)
        else:
            self.db.update_entry(network, table, key, value, now)
        self._wake.set()

    def delete(self, network: str, table: str, key: str) -> None:
        self.db.delete_entry(network, table, key, trio.current_time())
        self._wake.set()

    def _user_udp(self, node: str, payload: bytes) -> bool:
        return self.ml.send_user(node, payload)

    def _user_tcp(self, node: str, payload: bytes) -> None:
        member = self.ml.member(node)
        if member is None or self._nursery is None:
            return
        self._nursery.start_soon(self._send_stream_only, (member.addr, member.port), User(payload))

    def _broadcast(self, payload: bytes, key: str) -> None:
        self.ml.queue_broadcast(payload, key)

    # ------------------------------------------------------------------ the loops

    async def _timers(self) -> None:
        while True:
            now = trio.current_time()
            deadlines = [d for d in (self.ml.next_timer(), self.db.next_timer()) if d is not None]
            deadline = min(deadlines) if deadlines else now + 1.0
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self.ml.handle_timer(now)
            self.db.handle_timer(now)
            await self._flush()

    async def _reconnect(self) -> None:
        """networkdb's ``reconnectNode``: every second, try to join one failed member again.

        memberlist alone never heals a partition: once each side has declared the other dead
        and the dead declarations stopped being gossiped, nobody talks across any more (push/pull
        only picks alive members).  Docker's networkdb retries a random failed node every
        second; the push/pull of that join carries each side's "you are dead" to the other,
        both refute, and the cluster is whole again.
        """
        while True:
            await trio.sleep(RECONNECT_INTERVAL)
            now = trio.current_time()
            taken = {(m.addr, m.port) for m in self.ml.members()}  # alive or suspect
            for name, (addr, since) in list(self.failed.items()):
                # gone for a day (Docker's nodeReapInterval), or its address now belongs to a
                # live member (the node restarted under a new name): stop trying
                if now - since > FAILED_NODE_REAP or addr in taken:
                    del self.failed[name]
            if self.failed:
                addr, _ = self.failed[self.rng.choice(sorted(self.failed))]
                self.counters["reconnects"] += 1
                self.ml.join([addr], now)
                await self._flush()

    async def _flush(self) -> None:
        """Send what the cores produced and deliver their events."""
        assert self._udp is not None
        for datagram in self.ml.take_datagrams():
            for packet in encode_packets(
                list(datagram.messages), crc=datagram.crc, compress=True, keyring=self.keyring
            ):
                try:
                    await self._udp.sendto(packet, datagram.dest)
                    self.counters["udp_sent"] += 1
                except OSError:
                    self.counters["udp_send_errors"] += 1
        for op in self.ml.take_stream_ops():
            assert self._nursery is not None
            self._nursery.start_soon(self._stream_op, op)
        await self._deliver()

    async def _deliver(self) -> None:
        now = trio.current_time()
        for remote in self.ml.take_remote_states():
            self.db.merge_remote_state(remote.user_state)
        for event in self.ml.take_events():
            if isinstance(event, UserMessage):
                self.db.handle_message(event.payload, now)
            elif isinstance(event, MemberEvent):
                self._member_event(event, now)
        # _flush runs in several tasks (UDP, each TCP stream, the timers) and a watcher awaits
        # (the dataplane).  Each task once awaited the watcher for the events it took, so a
        # later batch could overtake an earlier one: a delete reached Peers before its key's
        # create, was ignored, and the create then stood (a stale FDB entry over a converged
        # networkdb).  Queued here without an await, they reach the watcher in networkdb's
        # order, from one task, and no reader waits on the dataplane.
        for table_event in self.db.take_events():
            self._events_in.send_nowait(table_event)

    async def watch_events(self) -> None:
        """The one task that hands table events to the watcher, in the order they were made."""
        async for table_event in self._events_out:
            if self.watcher is not None:
                await self.watcher(table_event)

    def _member_event(self, event: MemberEvent, now: float) -> None:
        m = event.member
        log.info("member %s %s (%s:%d, %s)", m.name, event.kind, m.addr, m.port, m.state.name)
        if m.name == self.name:
            return
        if m.state == NodeState.DEAD:
            self.failed[m.name] = ((m.addr, m.port), now)
        else:
            self.failed.pop(m.name, None)
        if event.kind == "join" or (event.kind == "update" and m.state == NodeState.ALIVE):
            self.db.node_alive(m.name)
        elif event.kind == "leave":
            if m.state == NodeState.LEFT:
                self.db.node_left(m.name, now)
            else:
                self.db.node_failed(m.name)

    async def _udp_reader(self, udp: trio.socket.SocketType) -> None:
        while True:
            data, src = await udp.recvfrom(UDP_RECV)
            self.counters["udp_received"] += 1
            try:
                inner = decode_packet_untrusted(
                    data, keyring=self.keyring, require_encryption=self.keyring is not None
                )
                messages = [decode_message_untrusted(m) for m in inner]
            except BadPacket as exc:
                self.counters["udp_bad_packets"] += 1  # udp_received = accepted + bad
                self.counters[f"drop_{exc.reason}"] += 1
                continue
            self.counters["udp_accepted"] += 1
            self.ml.receive(messages, (src[0], src[1]), trio.current_time())
            await self._flush()

    # ---------------------------------------------------------------------- TCP

    async def _tcp_handler(self, stream: trio.SocketStream) -> None:
        """One inbound stream.  Each ends in exactly one of ``tcp_served``,
        ``tcp_closed_early`` (no message), ``tcp_bad_streams`` or ``tcp_errors``, so they add
        up to ``tcp_accepted`` once no stream is open."""
        self.counters["tcp_accepted"] += 1
        try:
            with trio.fail_after(self.config.tcp_timeout):
                request = await self._read_message(stream)
                if request is None:
                    self.counters["tcp_closed_early"] += 1
                    return
                peer = stream.socket.getpeername()
                reply = self.ml.receive_stream(request, (peer[0], peer[1]), trio.current_time())
                if reply is not None:
                    await stream.send_all(self._frame(reply))
            self.counters["tcp_served"] += 1
            await self._flush()
        except BadPacket as exc:
            self.counters["tcp_bad_streams"] += 1
            self.counters[f"drop_tcp_{exc.reason}"] += 1
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            self.counters["tcp_errors"] += 1
        finally:
            await trio.aclose_forcefully(stream)

    def _frame(self, message: Message) -> bytes:
        return encode_stream(encode_message(message), compress=True, keyring=self.keyring)

    async def _read_message(self, stream: trio.abc.ReceiveStream) -> Message | None:
        reader = StreamReader(keyring=self.keyring, require_encryption=self.keyring is not None)
        received = 0
        while True:
            data = await stream.receive_some(65536)
            if not data:
                self.counters["tcp_eof"] += 1
                return None
            received += len(data)
            if received > STREAM_LIMIT:
                raise BadPacket("stream_too_large")
            inner = reader.feed_untrusted(bytes(data))
            if inner is not None:
                return decode_message_untrusted(inner)

    async def _stream_op(self, op: StreamOp) -> None:
        reply: Message | None = None
        try:
            with trio.fail_after(op.timeout):
                stream = await trio.open_tcp_stream(*op.dest)
                try:
                    await stream.send_all(self._frame(op.message))
                    reply = await self._read_message(stream)
                finally:
                    await trio.aclose_forcefully(stream)
        except BadPacket as exc:
            self.counters[f"drop_tcp_{exc.reason}"] += 1
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            self.counters["tcp_op_failures"] += 1
        self.ml.stream_result(op.op_id, reply, trio.current_time())
        await self._flush()

    async def _send_stream_only(self, dest: tuple[str, int], message: Message) -> None:
        """A reliable user message: connect, send, close (no reply expected)."""
        try:
            with trio.fail_after(self.config.tcp_timeout):
                stream = await trio.open_tcp_stream(*dest)
                try:
                    await stream.send_all(self._frame(message))
                finally:
                    await trio.aclose_forcefully(stream)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            self.counters["tcp_user_failures"] += 1

    # --------------------------------------------------------------------- views

    def snapshot(self) -> dict[str, Any]:
        members = [
            {
                "name": m.name,
                "addr": m.addr,
                "port": m.port,
                "state": m.state.name.lower(),
                "incarnation": m.incarnation,
            }
            for m in self.ml.all_members()  # dead and left too: a learner should see them
        ]
        networks = {
            net: {
                "nodes": self.db.network_nodes(net),
                "tables": {
                    t: len(self.db.walk(net, t)) for t in ("overlay_peer_table", "endpoint_table")
                },
            }
            for net in self.db.networks
        }
        return {
            "name": self.name,
            "addr": f"{self.addr}:{self.port}",
            "members": members,
            "awareness": self.ml.awareness_score,
            "memberlist": dict(self.ml.counters),
            "networkdb": dict(self.db.counters),
            "service": dict(self.counters),
            "encrypted": self.keyring is not None,
            "key_count": len(self.keyring.keys) if self.keyring else 0,
            "networks": networks,
        }
