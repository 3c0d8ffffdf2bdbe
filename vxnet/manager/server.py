"""The manager service on 2377 (trio): TLS, joins, sessions, heartbeats, key rotation.

Thin glue around the sans-IO :class:`~vxnet.manager.cluster.Cluster`: every decision is made
there; this module moves frames, keeps one task per connected node, and pushes each node its
keys and assignments whenever they change.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import trio

from vxnet.errors import BadPacket, VxnetError
from vxnet.manager import pki
from vxnet.manager.cluster import Cluster
from vxnet.manager.proto import FrameDecoder, encode_frame, field_untrusted
from vxnet.manager.services import assignments, prune_attachments, reconcile, task_status

log = logging.getLogger("vxnet.manager")
_E = TypeVar("_E", bound=BaseException)
HANDSHAKE_TIMEOUT = 10.0
JOIN_TIMEOUT = 30.0
MAX_CONNECTIONS = 256


class Channel:
    """Framed messages over a trio stream (usually a ``trio.SSLStream``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._queued: list[dict[str, Any]] = []
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.stream.send_all(encode_frame(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream.  Garbage raises BadPacket."""
        while not self._queued:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._queued.extend(self._decoder.feed_untrusted(bytes(data)))
        return self._queued.pop(0)


@dataclass
class Session:
    node_id: str
    channel: Channel
    wake: trio.Event = field(default_factory=trio.Event)


class Manager:
    def __init__(
        self,
        cluster: Cluster,
        cert_pem: bytes,
        key_pem: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        self.ssl_context = pki.server_ssl_context(cluster.ca_pem, cert_pem, key_pem, False)
        self.sessions: dict[str, Session] = {}
        self.counters: Counter[str] = Counter()
        self._changed = trio.Event()
        self.listening = trio.Event()  # set once 2377 accepts connections

    # ----------------------------------------------------------------------- life cycle

    async def serve(
        self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.listening.set()
        limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        log.info("manager of cluster %s listening on %s:%d", self.cluster.cluster_id, host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timers)
            task_status.started()

            async def handler(stream: trio.SocketStream) -> None:
                await self._connection(stream, limiter)

            await trio.serve_listeners(handler, listeners)

    def changed(self) -> None:
        """Desired state changed: every session re-sends its node's assignments."""
        for session in self.sessions.values():
            session.wake.set()

    async def _timers(self) -> None:
        period = self.cluster.heartbeat_period
        while True:
            await trio.sleep(period / 2)
            now = self.clock()
            gone = self.cluster.expire_heartbeats(now)
            if gone:
                log.info("nodes down (heartbeats stopped): %s", ", ".join(gone))
                reconcile(self.cluster, now)
                self.changed()
            if self.cluster.rotate_keys_if_due(now):
                log.info("keys rotated: tags %s", [k.tag for k in self.cluster.keys.keys])
                self.changed()

    # ----------------------------------------------------------------------- connections

    async def _connection(self, tcp: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
        """One TCP connection.  Each ends in exactly one of ``tls_handshake_failed``,
        ``bad_frames``, ``refused``, ``connection_lost`` or ``closed`` (the peer hung up, or
        its join or session ended), so they add up to ``connections`` once none is open."""
        self.counters["connections"] += 1
        async with limiter:
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
                self.counters["tls_handshake_failed"] += 1
                # trio wraps the ssl.SSLError that says why (expired, unknown CA, ...)
                log.info("TLS handshake failed: %s", exc.__cause__ or exc)
                await trio.aclose_forcefully(tcp)
                return
            channel = Channel(stream)
            reply = None
            try:
                # errors inside a session's nursery arrive wrapped in an ExceptionGroup
                await self._converse(channel, stream)
            except* BadPacket as group:
                bad = _first(group, BadPacket)
                self.counters["bad_frames"] += 1
                self.counters[f"bad_frame_{bad.reason}"] += 1
                log.info("bad frame from a client: %s", bad)
                reply = f"bad frame: {bad}"
            except* VxnetError as group:
                self.counters["refused"] += 1
                reply = str(_first(group, VxnetError))
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                self.counters["connection_lost"] += 1
            else:
                self.counters["closed"] += 1
            try:
                if reply is not None:
                    await _try_send(channel, {"type": "error", "message": reply})
            finally:
                await trio.aclose_forcefully(stream)

    async def _converse(self, channel: Channel, stream: trio.SSLStream[trio.SocketStream]) -> None:
        der = stream.getpeercert(binary_form=True)
        if der is None:
            with trio.fail_after(JOIN_TIMEOUT):
                await self._join_conversation(channel)
            return
        identity = pki.identity_from_der(
            self.cluster.ca_pem, der, _dt(self.clock()), self.cluster.cluster_id
        )
        if self.cluster.store.get("node", identity.node_id) is None:
            raise VxnetError(f"node {identity.node_id} has been removed from the swarm")
        await self._session(channel, identity.node_id)

    async def _join_conversation(self, channel: Channel) -> None:
        while (msg := await channel.receive()) is not None:
            kind = msg["type"]
            if kind == "ca":
                await channel.send({"type": "ca", "ca": self.cluster.ca_pem})
            elif kind == "join":
                mtu = field_untrusted(msg, "data_path_mtu", int) if "data_path_mtu" in msg else None
                issued = self.cluster.join(
                    field_untrusted(msg, "token", str),
                    field_untrusted(msg, "csr", bytes),
                    field_untrusted(msg, "hostname", str),
                    field_untrusted(msg, "advertise_addr", str),
                    field_untrusted(msg, "data_path_addr", str),
                    self.clock(),
                    data_path_mtu=mtu,
                )
                self.counters["joined"] += 1
                log.info("node %s (%s) joined as %s", issued.node_id, msg["hostname"], issued.role)
                await channel.send(
                    {
                        "type": "joined",
                        "node_id": issued.node_id,
                        "role": issued.role,
                        "cluster_id": issued.cluster_id,
                        "cert": issued.cert_pem,
                        "ca": issued.ca_pem,
                    }
                )
                return
            else:
                raise BadPacket("unexpected_message", f"{kind!r} before joining")

    async def _session(self, channel: Channel, node_id: str) -> None:
        hello = await channel.receive()
        if hello is None or hello["type"] != "hello":
            raise BadPacket("expected_hello")
        addrs = {k: field_untrusted(hello, k, str) for k in ("advertise_addr", "data_path_addr")}
        self.cluster.hello(
            node_id,
            self.clock(),
            {"addr": addrs["advertise_addr"], "data_path_addr": addrs["data_path_addr"]},
        )
        attached = field_untrusted(hello, "attachments", list, [])
        prune_attachments(self.cluster, node_id, {a for a in attached if isinstance(a, str)})
        old = self.sessions.get(node_id)
        session = Session(node_id, channel)
        self.sessions[node_id] = session
        if old is not None:
            await trio.aclose_forcefully(old.channel.stream)
        try:
            await channel.send(
                {
                    "type": "welcome",
                    "node_id": node_id,
                    "heartbeat_period": self.cluster.heartbeat_period,
                }
            )
            reconcile(self.cluster, self.clock())
            self.changed()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pusher, session)
                await self._session_reader(session)
                nursery.cancel_scope.cancel()
        finally:
            if self.sessions.get(node_id) is session:
                del self.sessions[node_id]

    async def _pusher(self, session: Session) -> None:
        sent_keys: list[int] = []
        sent: dict[str, Any] | None = None
        while True:
            tags = [k.tag for k in self.cluster.keys.keys]
            if tags != sent_keys:
                await session.channel.send(
                    {
                        "type": "keys",
                        "keys": self.cluster.keys_json(),
                        "esp_icv_length": self.cluster.esp_icv_length,
                    }
                )
                sent_keys = tags
            current = assignments(self.cluster, session.node_id)
            if current != sent:
                await session.channel.send(
                    {
                        "type": "assignments",
                        **current,
                        "data_path_port": self.cluster.info["data_path_port"],
                    }
                )
                sent = current
            await session.wake.wait()
            session.wake = trio.Event()

    async def _session_reader(self, session: Session) -> None:
        channel = session.channel
        while (msg := await channel.receive()) is not None:
            kind, now = msg["type"], self.clock()
            if kind == "heartbeat":
                if self.cluster.heartbeat(session.node_id, now):
                    reconcile(self.cluster, now)
                    self.changed()
            elif kind == "task_status":
                task_status(
                    self.cluster,
                    session.node_id,
                    field_untrusted(msg, "task_id", str),
                    field_untrusted(msg, "state", str),
                    field_untrusted(msg, "message", str, ""),
                    now,
                )
                self.changed()
            elif kind == "leave":
                log.info("node %s leaves the swarm", session.node_id)
                self.cluster.mark_down(session.node_id)
                reconcile(self.cluster, now)
                self.changed()
                return
            elif kind == "request":
                await channel.send(await self._request(session.node_id, msg))
            else:
                raise BadPacket("unexpected_message", repr(kind))

    async def _request(self, node_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        from vxnet.manager.services import attach, detach

        req_id = field_untrusted(msg, "id", int)
        op = field_untrusted(msg, "op", str)
        try:
            if op == "attach":
                result: Any = attach(
                    self.cluster,
                    node_id,
                    field_untrusted(msg, "container", str),
                    field_untrusted(msg, "network", str),
                    field_untrusted(msg, "ip", str, None) if msg.get("ip") else None,
                )
            elif op == "detach":
                result = detach(self.cluster, node_id, field_untrusted(msg, "container", str))
            elif op == "renew":
                result = self.cluster.renew(
                    node_id, field_untrusted(msg, "csr", bytes), self.clock()
                )
            else:
                raise BadPacket("unknown_request", op)
        except VxnetError as exc:
            return {
                "type": "response",
                "id": req_id,
                "ok": False,
                "error": str(exc),
                "kind": type(exc).__name__,
            }
        self.changed()
        return {"type": "response", "id": req_id, "ok": True, "result": result}


def _first(group: BaseExceptionGroup[Any], kind: type[_E]) -> _E:
    """The first leaf of ``kind`` in an exception group (``except*`` always gives a group)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc, kind)
        if isinstance(exc, kind):
            return exc
    raise AssertionError("except* matched no leaf")  # pragma: no cover


async def _try_send(channel: Channel, message: dict[str, Any]) -> None:
    try:
        with trio.move_on_after(2):
            await channel.send(message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _dt(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)
