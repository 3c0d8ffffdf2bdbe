"""The agent: a node's mutually authenticated session with the manager (trio).

It says hello, heartbeats, receives the keyrings and the node's assignments, and makes the
daemon match them: swarm networks programmed into the dataplane, task containers started and
removed.  It reconnects by itself (with backoff) when the manager goes away, and renews its
certificate at a random point between 50 % and 80 % of its lifetime.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vxnet.dataplane.tables import NetworkSpec, SetIpsecKeys, SetUnderlay
from vxnet.errors import BadPacket, Conflict, NotFound, UsageError, VxnetError
from vxnet.esp.sa import DEFAULT_ICV_LEN, DOCKER_ICV_LEN
from vxnet.files import write_private
from vxnet.manager import pki
from vxnet.manager.proto import field_untrusted
from vxnet.manager.server import Channel

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon

log = logging.getLogger("vxnet.agent")
MAX_BACKOFF = 5.0
#: What ends a session without being a bug: the agent reconnects after any of these.
SESSION_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ssl.SSLError,
    BadPacket,
    VxnetError,
)


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


REQUEST_TIMEOUT = 15.0


@dataclass
class NodeFiles:
    """What a node keeps on disk to be a member: ``<state>/swarm/`` (0700, files 0600)."""

    directory: Path

    @property
    def exists(self) -> bool:
        return (self.directory / "node.json").exists()

    def load(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.directory / "node.json").read_text())
        return info

    def save(self, info: dict[str, Any], key: bytes, cert: bytes, ca: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, data in (
            ("node.key", key),
            ("node.crt", cert),
            ("ca.crt", ca),
            ("node.json", json.dumps(info, indent=1).encode()),
        ):
            write_private(self.directory / name, data)

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def replace_cert(self, cert: bytes) -> None:
        write_private(self.directory / "node.crt", cert)


def spec_from_summary(net: dict[str, Any]) -> NetworkSpec:
    return NetworkSpec(
        net["name"],
        int(net["vni"]),
        ipaddress.IPv4Network(net["subnet"]),
        ipaddress.IPv4Address(net["gateway"]),
        int(net["mtu"]),
        bool(net.get("encrypted")),
    )


def ipsec_keys(keys: list[dict[str, Any]]) -> tuple[tuple[int, bytes], ...]:
    """The networking:ipsec keyring as the dataplane takes it: (tag, key), sorted by tag."""
    ring = [
        (int(k["lamport_time"]), bytes.fromhex(str(k["key"])))
        for k in keys
        if k.get("subsystem") == "networking:ipsec"
    ]
    return tuple(sorted(ring))


class Agent:
    def __init__(
        self, daemon: Daemon, files: NodeFiles, clock: Callable[[], float] = time.time
    ) -> None:
        self.daemon = daemon
        self.files = files
        self.info = files.load()
        self.clock = clock
        self.connected = False
        self.keys: list[dict[str, Any]] = []
        self.keys_changed = trio.Event()  # set (and replaced) on every new keyring
        self.networks: dict[str, dict[str, Any]] = {}  # swarm network id -> summary
        self.counters: dict[str, int] = {"sessions": 0, "session_errors": 0, "renewals": 0}
        self.last_error = ""
        self._channel: Channel | None = None
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._assignments: dict[str, Any] | None = None
        self._assigned = trio.Event()
        self._rng = random.Random()

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    # ------------------------------------------------------------------------ the loop

    async def run(self) -> None:
        backoff = 0.2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reconciler)
            while True:
                try:
                    await self._session()
                    backoff = 0.2
                except* SESSION_ERRORS as group:  # a nursery wraps them in a group
                    exc = _leaf(group)
                    self.counters["session_errors"] += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.info("session with the manager ended: %s", self.last_error)
                finally:
                    self.connected = False
                    self._channel = None
                    for waiter in self._waiting.values():
                        waiter.close()
                    self._waiting.clear()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        host, _, port = str(self.info["manager"]).rpartition(":")
        ctx = pki.client_ssl_context(
            self.files.read("ca.crt"), self.files.read("node.crt"), self.files.read("node.key")
        )
        with trio.fail_after(10):
            tcp = await trio.open_tcp_stream(host, int(port))
            stream = trio.SSLStream(tcp, ctx, server_hostname=host)
            await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        peer = pki.identity_from_der(
            self.files.read("ca.crt"), der or b"", datetime.now(UTC), self.info["cluster_id"]
        )
        if peer.role != "swarm-manager":
            await trio.aclose_forcefully(stream)
            raise pki.CertificateRefused(f"peer {peer.node_id} is not a manager ({peer.role})")
        return stream

    async def _session(self) -> None:
        stream = await self._connect()
        channel = Channel(stream)
        try:
            await channel.send(
                {
                    "type": "hello",
                    "hostname": self.info["hostname"],
                    "advertise_addr": self.info["advertise_addr"],
                    "data_path_addr": self.info["data_path_addr"],
                    "tasks": self._local_tasks(),
                    # those waiting to be re-adopted after a restart are still ours
                    "attachments": [
                        c.name
                        for c in (
                            *self.daemon.containers.values(),
                            *self.daemon.adoption.waiting.values(),
                        )
                        if c.attached
                    ],
                }
            )
            welcome = await channel.receive()
            if welcome is None or welcome["type"] != "welcome":
                raise BadPacket("expected_welcome", repr(welcome and welcome.get("message")))
            period = float(field_untrusted(welcome, "heartbeat_period", float))
            self._channel = channel
            self.connected = True
            self.counters["sessions"] += 1
            log.info("session with the manager %s open", self.info["manager"])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, channel, period)
                nursery.start_soon(self._renewal)
                await self._reader(channel)
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _heartbeats(self, channel: Channel, period: float) -> None:
        while True:
            await channel.send({"type": "heartbeat"})
            for c in list(self.daemon.containers.values()):
                c.poll()
                if c.task_id and c.exit_code is not None and not c.reported:
                    await self._report(c.task_id, "failed", f"exited with {c.exit_code}")
                    c.reported = True
            await trio.sleep(period)

    async def _reader(self, channel: Channel) -> None:
        while (msg := await channel.receive()) is not None:
            kind = msg["type"]
            if kind == "keys":
                self.keys = list(field_untrusted(msg, "keys", list))
                icv = int(msg.get("esp_icv_length", DEFAULT_ICV_LEN))
                if icv not in (DOCKER_ICV_LEN, DEFAULT_ICV_LEN):
                    raise BadPacket("bad_icv_length", str(icv))
                await self.daemon.program(SetIpsecKeys(ipsec_keys(self.keys), icv_len=icv))
                self.keys_changed.set()
                self.keys_changed = trio.Event()
                log.info("keys: tags %s", [k.get("lamport_time") for k in self.keys])
            elif kind == "assignments":
                self._assignments = msg
                self._assigned.set()
            elif kind == "response":
                waiter = self._waiting.pop(field_untrusted(msg, "id", int), None)
                if waiter is not None:
                    waiter.send_nowait(msg)
            elif kind == "error":
                raise VxnetError(f"manager: {msg.get('message')}")
            else:
                raise BadPacket("unexpected_message", repr(kind))

    # ------------------------------------------------------------------ requests (RPC)

    async def request(self, op: str, **fields: Any) -> Any:
        channel = self._channel
        if channel is None:
            raise VxnetError(
                f"not connected to the swarm manager at {self.info['manager']} "
                f"({self.last_error or 'connecting'}): try again in a moment"
            )
        self._next_id += 1
        req_id = self._next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[req_id] = send
        await channel.send({"type": "request", "id": req_id, "op": op, **fields})
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                reply = await receive.receive()
        except (trio.EndOfChannel, trio.TooSlowError):
            raise VxnetError(f"the manager did not answer {op!r}") from None
        if not reply.get("ok"):
            kind = {"NotFound": NotFound, "Conflict": Conflict, "UsageError": UsageError}.get(
                str(reply.get("kind")), VxnetError
            )
            raise kind(str(reply.get("error")))
        return reply.get("result")

    async def attach(
        self, container: str, network: str, ip: str | None
    ) -> tuple[NetworkSpec, ipaddress.IPv4Address]:
        result = await self.request("attach", container=container, network=network, ip=ip)
        net = result["network"]
        spec = spec_from_summary(net)
        try:
            await self.daemon.ensure_network(spec, net["id"])
        except VxnetError:  # this host cannot have it: give the manager its address back
            await self.detach(container)
            raise
        self.networks[net["id"]] = net
        return spec, ipaddress.IPv4Address(result["attachment"]["ip"])

    async def detach(self, container: str) -> None:
        try:
            await self.request("detach", container=container)
        except VxnetError as exc:  # the container is gone locally either way
            log.info("detach %s: %s", container, exc)

    async def leave(self) -> None:
        """Tell the manager this node is leaving (it is shown down at once, tasks move)."""
        channel = self._channel
        if channel is not None:
            with trio.move_on_after(2):
                await channel.send({"type": "leave"})

    async def _report(self, task_id: str, state: str, message: str = "") -> None:
        channel = self._channel
        if channel is not None:
            await channel.send(
                {"type": "task_status", "task_id": task_id, "state": state, "message": message}
            )

    # -------------------------------------------------------------- certificate renewal

    async def _renewal(self) -> None:
        while True:
            cert = self.files.read("node.crt")
            due = pki.renewal_time(cert, self._rng).timestamp()
            await trio.sleep(max(0.0, due - self.clock()))
            key = self.files.read("node.key")
            new_cert = await self.request("renew", csr=pki.make_csr(key))
            pki.verify_node_cert(
                self.files.read("ca.crt"), new_cert, datetime.now(UTC), self.info["cluster_id"]
            )
            self.files.replace_cert(new_cert)
            self.counters["renewals"] += 1
            log.info("node certificate renewed")

    # ----------------------------------------------------------- making assignments real

    def _local_tasks(self) -> list[dict[str, Any]]:
        return [
            {"task_id": c.task_id, "container": c.name, "status": c.status}
            for c in self.daemon.containers.values()
            if c.task_id
        ]

    async def _reconciler(self) -> None:
        """Apply the newest assignments; never two at once, never a stale one."""
        while True:
            await self._assigned.wait()
            self._assigned = trio.Event()
            msg = self._assignments
            if msg is not None:
                await self._apply(msg)

    async def _apply_load_balancers(self, nets: dict[str, Any], addresses: Any) -> None:
        """The node's load-balancer address per network; on ingress, the ingress sandbox."""
        d = self.daemon
        if not isinstance(addresses, dict):
            addresses = {}
        lb = {
            nets[nid]["name"]: ipaddress.IPv4Address(ip)
            for nid, ip in addresses.items()
            if nid in nets and isinstance(ip, str)
        }
        d.ingress_networks = {n["name"] for n in nets.values() if n.get("ingress")}
        d.lb_addresses = lb
        ingress = [name for name in d.ingress_networks if name in lb and name in d.networks]
        try:
            if ingress:
                await d.mesh.ensure_sandbox(d.networks[ingress[0]], lb[ingress[0]])
            else:
                await d.mesh.remove_sandbox()
        except (VxnetError, OSError) as exc:
            log.warning("ingress sandbox: %s", exc)
        if d.discovery is not None:
            await d.discovery.set_lb_addresses(lb)

    async def _destroy_unassigned(self, tasks: dict[str, Any]) -> None:
        for c in list(self.daemon.containers.values()):
            if c.task_id and (c.name not in tasks or c.exit_code is not None):
                await self.daemon.destroy(c.name)

    async def _apply(self, msg: dict[str, Any]) -> None:
        d = self.daemon
        nets = {n["id"]: n for n in field_untrusted(msg, "networks", list)}
        port = msg.get("data_path_port")
        port = port if isinstance(port, int) else d.dataplane.data_port
        # VXLAN and ESP leave from the data-path address (`--data-path-addr`), which may be on
        # another interface than the control plane's (2377, 7946)
        addr = str(self.info.get("data_path_addr") or d.dataplane.underlay_addr)
        if (addr, port) != (d.dataplane.underlay_addr, d.dataplane.data_port):
            await d.program(SetUnderlay(addr, port))
        tasks = {t["container"]: t for t in field_untrusted(msg, "tasks", list)}
        # tasks that are no longer ours go first: a network they were on may be retired below
        # (a re-created ingress can get the old one's VNI)
        await self._destroy_unassigned(tasks)
        refused: dict[str, str] = {}
        for nid, net in nets.items():
            try:
                await d.ensure_network(spec_from_summary(net), net["id"])
            except Conflict as exc:  # said once per assignment; its tasks fail below
                refused[nid] = str(exc)
                log.warning("%s", exc)
        nets = {nid: net for nid, net in nets.items() if nid not in refused}
        self.networks = nets
        # a container a previous run left on a network this node no longer has: lost
        await d.adoption.drop_unassigned({n["name"] for n in nets.values()})
        await self._apply_load_balancers(nets, msg.get("lb_addresses"))
        await self._destroy_unassigned(tasks)  # and those just re-adopted that are not ours
        for name, task in tasks.items():
            if name in d.containers:
                continue
            clash = [refused[nid] for nid in task["addresses"] if nid in refused]
            if clash:
                await self._report(task["id"], "failed", clash[0])
                continue
            attach = [
                (spec_from_summary(nets[nid]), ipaddress.IPv4Address(ip))
                for nid, ip in task["addresses"].items()
                if nid in nets
            ]
            host_ports = [
                (str(p["protocol"]), int(p["published"]), int(p["target"]))
                for p in task.get("host_ports", [])
                if p.get("published")
            ]
            try:
                await d.start_container(
                    name, attach, task["image"], task["cmd"], task["id"],
                    service=task, publish=host_ports,
                )  # fmt: skip
            except (VxnetError, OSError) as exc:
                log.warning("task %s failed to start: %s", name, exc)
                await self._report(task["id"], "failed", str(exc))
                continue
            await self._report(task["id"], "running")
        await d.prune_networks(keep={n["name"] for n in nets.values()})
