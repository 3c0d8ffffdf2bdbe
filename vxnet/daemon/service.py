"""The per-host vxnet daemon: local networks, containers, the FDB, and the dataplane thread.

Layers: this trio service owns the control side and the HTTP API; the frames move in
:class:`vxnet.dataplane.engine.Dataplane`'s own thread, reached only through ``submit``.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import trio

from vxnet import __version__, netns
from vxnet.daemon import containers as ctr
from vxnet.daemon import views
from vxnet.daemon.adopt import Adoption
from vxnet.daemon.http import Request, Router, serve_http
from vxnet.daemon.localnets import LocalNetworks
from vxnet.daemon.mesh import Mesh, PortSpec, parse_publish
from vxnet.daemon.peers import Peers
from vxnet.daemon.swarm import Swarm
from vxnet.daemon.views import body_field, body_strings
from vxnet.dataplane.engine import PATHS, Dataplane
from vxnet.dataplane.tables import (
    DEFAULT_MTU,
    AddNetwork,
    AddPort,
    NetworkSpec,
    RemoveNetwork,
    RemovePort,
    TableUpdate,
    endpoint_mac,
)
from vxnet.dns.server import check_upstreams
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.wire.vxlan import VNI_MAX

if TYPE_CHECKING:
    from vxnet.daemon.discovery import Discovery

log = logging.getLogger("vxnet.daemon")
MIN_MTU = 68


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    host: str
    socket_path: Path
    state_dir: Path
    underlay_addr: str
    data_port: int = 4789
    netns: str | None = None  # the host namespace the daemon lives in
    ns_prefix: str = "vxc-"  # container namespaces are named prefix + container name
    offload: bool = True  # TAP offloads (--no-offload: one datagram per inner packet)
    gso: Literal["auto", "segment"] = "auto"  # segment: the Python fallback, forced


def parse_network(body: Any) -> NetworkSpec:
    name = ctr.check_name("network", body_field(body, "name", str))
    vni = body_field(body, "vni", int)
    if not 1 <= vni <= VNI_MAX:
        raise UsageError(f"VNI {vni} out of range 1-{VNI_MAX}")
    try:
        subnet = ipaddress.IPv4Network(body_field(body, "subnet", str))
        gw_text = body_field(body, "gateway", str, required=False)
        gateway = ipaddress.IPv4Address(gw_text) if gw_text else next(subnet.hosts())
    except (ValueError, StopIteration) as exc:
        raise UsageError(f"bad subnet or gateway: {exc}") from None
    if gateway not in subnet or subnet.prefixlen > 30:
        raise UsageError(
            f"gateway {gateway} must be a host address of subnet {subnet} (/30 or larger)"
        )
    mtu = body_field(body, "mtu", int, required=False) or DEFAULT_MTU
    if not MIN_MTU <= mtu <= 65535 - 50:
        raise UsageError(f"MTU {mtu} out of range {MIN_MTU}-{65535 - 50}")
    return NetworkSpec(name=name, vni=vni, subnet=subnet, gateway=gateway, mtu=mtu)


class Attacher(Protocol):
    """How a swarm node gets an address on a swarm network for a standalone container."""

    async def attach(
        self, container: str, network: str, ip: str | None
    ) -> tuple[NetworkSpec, ipaddress.IPv4Address]: ...

    async def detach(self, container: str) -> None: ...


class Daemon:
    def __init__(self, config: DaemonConfig, dataplane: Dataplane) -> None:
        self.config = config
        self.dataplane = dataplane
        self.networks: dict[str, NetworkSpec] = {}
        self.containers: dict[str, ctr.Container] = {}
        self.lock = trio.Lock()  # serialises changes to networks and containers
        self.attacher: Attacher | None = None  # set when the node is in a swarm
        self.swarm_networks: set[str] = set()  # networks programmed from the manager
        # networks a container is being attached to right now: the manager has given it an
        # address, the container is not made yet, and an assignment computed before the
        # attachment must not prune the network from under it (a dead TAP in the scale bench)
        self.attaching: collections.Counter[str] = collections.Counter()
        self.network_ids: dict[str, str] = {}  # swarm network name -> id (networkdb's key)
        self.network_names: dict[str, str] = {}  # and back
        self.peers: Peers | None = None  # gossip's overlay_peer_table, once the node gossips
        self.discovery: Discovery | None = None  # endpoint_table, DNS and VIPs, likewise
        self.ingress_networks: set[str] = set()  # swarm networks made with --ingress
        self.lb_addresses: dict[str, ipaddress.IPv4Address] = {}  # the manager's, per network
        self.mesh = Mesh(self)
        self.adoption = Adoption(self)  # what a previous run of this daemon left running
        self.router = Router()
        self._routes()
        self.localnets = LocalNetworks(config.state_dir / "local-networks.json")
        self.swarm = Swarm(self)

    def persist(self) -> None:
        """Write what a restarted daemon needs to re-adopt the containers (after every change)."""
        ctr.save_containers(
            self.config.state_dir / ctr.STATE_FILE,
            [*self.containers.values(), *self.adoption.waiting.values()],
        )

    def swarm_ingress(self, network: str) -> bool:
        return network in self.ingress_networks

    @contextlib.contextmanager
    def _attaching(self, network: str) -> Iterator[None]:
        """Keep ``network`` from being pruned while a container is being attached to it."""
        self.attaching[network] += 1
        try:
            yield
        finally:
            self.attaching[network] -= 1
            if not self.attaching[network]:
                del self.attaching[network]

    async def program(self, update: TableUpdate, *, check: bool = False) -> None:
        """Hand one table update to the dataplane thread and wait until it is applied.

        With ``check``, an update the switch refused (a port for a network it no longer has)
        raises :class:`UsageError`; otherwise it is only counted (``update_errors``).
        """
        seq = self.dataplane.submit(update)
        await trio.to_thread.run_sync(self.dataplane.wait_applied, seq)
        why = self.dataplane.refusal(seq)
        if check and why is not None:
            raise UsageError(f"the dataplane refused {why}")

    async def ensure_network(self, spec: NetworkSpec, network_id: str | None = None) -> None:
        """Program a swarm network (idempotent; a changed definition replaces the old one).

        Raises :class:`Conflict` when a network this host programmed itself (a ``--no-swarm``
        lab's) has the name or the VNI: replacing it would take its containers' ports.
        """
        for name, other in self.networks.items():
            if name in self.swarm_networks:
                continue
            if name == spec.name or other.vni == spec.vni:
                raise Conflict(
                    f"swarm network {spec.name} (VNI {spec.vni}) collides with this host's own "
                    f"network {name} (VNI {other.vni}), programmed outside the swarm: remove "
                    "that one first"
                )
        # a removed network whose VNI the manager gave again (ingress removed and re-created):
        # retire it first, or removing it later would take the new one's VNI with it
        for name, other in list(self.networks.items()):
            if name != spec.name and other.vni == spec.vni and name in self.swarm_networks:
                await self._retire_network(name)
        if network_id is not None:
            self.network_ids[spec.name] = network_id
            self.network_names[network_id] = spec.name
        async with self.lock:
            current = self.networks.get(spec.name)
            if current == spec:
                return
            if current is not None and current.vni != spec.vni:
                await self.program(RemoveNetwork(current.vni))
            await self.program(AddNetwork(spec))
            self.networks[spec.name] = spec
            self.swarm_networks.add(spec.name)
        await self.adoption.try_adopt()

    async def _retire_network(self, name: str) -> None:
        """Remove a swarm network the manager no longer has (its only user can be the node's
        ingress sandbox: the manager refuses to remove a network that tasks use)."""
        if self.mesh.sandbox is not None and self.mesh.sandbox.network == name:
            await self.mesh.remove_sandbox()
        async with self.lock:
            await self._drop_swarm_network(name)

    async def prune_networks(self, keep: set[str]) -> None:
        """Remove swarm networks not in ``keep`` that no local container uses any more."""
        async with self.lock:
            in_use = {e.network for c in self.containers.values() for e in c.endpoints}
            in_use |= set(self.attaching)
            for name in sorted(self.swarm_networks - keep - in_use):
                await self._drop_swarm_network(name)

    async def _drop_swarm_network(self, name: str) -> None:
        """Forget swarm network ``name`` here and in the dataplane (the caller holds the lock)."""
        spec = self.networks.pop(name, None)
        self.swarm_networks.discard(name)
        self.network_names.pop(self.network_ids.pop(name, ""), None)
        if spec is not None:
            await self.program(RemoveNetwork(spec.vni))
            if self.discovery is not None:
                self.discovery.forget_network(name, spec.vni)

    def _network(self, name: str) -> NetworkSpec:
        spec = self.networks.get(name)
        if spec is None:
            raise NotFound(f"network {name} not found")
        return spec

    def _container(self, name: str) -> ctr.Container:
        c = self.containers.get(name)
        if c is None:
            raise NotFound(f"no such container: {name}")
        return c

    # ---------------------------------------------------------------------------- routes

    def _routes(self) -> None:
        r = self.router
        views.register(self, r)  # the read side, the FDB by hand, local networks, LB settings
        r.route("GET", "/info")(self.info)
        r.route("GET", "/networks")(self.list_networks)
        r.route("POST", "/networks")(self.create_network)
        r.route("DELETE", "/networks/{name}")(self.remove_network)
        r.route("GET", "/containers")(self.list_containers)
        r.route("POST", "/containers")(self.create_container)
        r.route("GET", "/containers/{name}")(self.inspect_container)
        r.route("POST", "/containers/{name}/stop")(self.stop_container)
        r.route("DELETE", "/containers/{name}")(self.remove_container)

    async def info(self, req: Request) -> Any:
        c = self.config
        return {
            "host": c.host,
            "version": __version__,
            "pid": os.getpid(),
            "netns": c.netns,
            "underlay_addr": c.underlay_addr,
            "dataplane": PATHS[self.dataplane.path],
            "dataplane_path": self.dataplane.path,
            "data_port": c.data_port,
            "networks": len(self.networks),
            "containers": len(self.containers),
        }

    async def list_networks(self, req: Request) -> Any:
        return [
            dict(_network_json(s), swarm=s.name in self.swarm_networks)
            for s in self.networks.values()
        ]

    async def create_network(self, req: Request) -> Any:
        spec = parse_network(req.body)
        async with self.lock:
            if spec.name in self.networks:
                raise Conflict(f"network with name {spec.name} already exists")
            for other in self.networks.values():
                if other.vni == spec.vni:
                    raise Conflict(f"VNI {spec.vni} is already used by network {other.name}")
                if other.subnet.overlaps(spec.subnet):
                    raise Conflict(
                        f"subnet {spec.subnet} overlaps network {other.name} ({other.subnet})"
                    )
            await self.program(AddNetwork(spec))
            self.networks[spec.name] = spec
        log.info("network %s vni %d subnet %s mtu %d", spec.name, spec.vni, spec.subnet, spec.mtu)
        await self.adoption.try_adopt()
        return _network_json(spec)

    async def remove_network(self, req: Request) -> Any:
        async with self.lock:
            spec = self._network(req.params["name"])
            users = [
                c.name
                for c in self.containers.values()
                if any(e.network == spec.name for e in c.endpoints)
            ]
            if users:
                raise Conflict(
                    f"network {spec.name} has active endpoints ({', '.join(users)}): "
                    "remove them first"
                )
            await self.program(RemoveNetwork(spec.vni))
            del self.networks[spec.name]
        return {"removed": spec.name}

    async def list_containers(self, req: Request) -> Any:
        for c in self.containers.values():
            c.poll()
        return [c.to_json() for c in self.containers.values() if not c.sandbox]

    async def inspect_container(self, req: Request) -> Any:
        c = self._container(req.params["name"])
        c.poll()
        return c.to_json()

    async def create_container(self, req: Request) -> Any:
        body = req.body
        name = ctr.check_name("container", body_field(body, "name", str))
        image = body_field(body, "image", str)
        cmd = body_field(body, "cmd", list, required=False) or []
        if not all(isinstance(a, str) for a in cmd):
            raise UsageError("field 'cmd' must be a list of strings")
        network = body_field(body, "network", str)
        wanted = body_field(body, "ip", str, required=False)
        publish = [parse_publish(p) for p in body_strings(body, "publish")]
        aliases = [ctr.check_name("network alias", a) for a in body_strings(body, "aliases")]
        dns = body_strings(body, "dns")
        check_upstreams([(ip, 53) for ip in dns])
        swarm_net = network in self.swarm_networks or network not in self.networks
        if swarm_net and self.attacher is not None:
            # a swarm network (programmed here already or not): the manager decides
            # (attachable?) and gives the address, never this node's own pick
            if name in self.containers:
                raise Conflict(f'the container name "{name}" is already in use')
            with self._attaching(network):  # the name asked for, then the network's own
                spec, ip = await self.attacher.attach(name, network, wanted)
                with self._attaching(spec.name):
                    try:
                        container = await self.start_container(
                            name, [(spec, ip)], image, cmd, publish=publish, aliases=aliases,
                            dns=dns, attached=True,
                        )  # fmt: skip
                    except BaseException:
                        await self.attacher.detach(name)
                        raise
            return container.to_json()
        spec = self._network(network)
        if publish and spec.name not in self.swarm_networks:
            raise UsageError("-p publishes through docker_gwbridge: use a swarm network")
        async with self.lock:
            ip = self._pick_ip(spec, wanted)
        return (
            await self.start_container(
                name, [(spec, ip)], image, cmd, publish=publish, aliases=aliases, dns=dns
            )
        ).to_json()

    async def start_container(
        self,
        name: str,
        attach: list[tuple[NetworkSpec, ipaddress.IPv4Address]],
        image: str,
        cmd: list[str],
        task_id: str | None = None,
        *,
        service: dict[str, Any] | None = None,
        publish: list[PortSpec] | None = None,
        aliases: list[str] | None = None,
        dns: list[str] | None = None,
        attached: bool = False,
    ) -> ctr.Container:
        """Namespace, one TAP per network handed to the dataplane, then the process; in a
        swarm, the docker_gwbridge interface, published ports, records and resolver too."""
        argv = ctr.image_argv(image, cmd)
        self.mesh.check_free(list(publish or []))  # before anything is made
        async with self.lock:
            if name in self.containers:
                raise Conflict(f'the container name "{name}" is already in use')
            ns, made = await trio.to_thread.run_sync(
                ctr.create_container, self.config.ns_prefix, name, attach
            )
            endpoints = [e for e, _ in made]
            container = ctr.Container(name, endpoints, ns, image, cmd, task_id, attached)
            for index, ((spec, ip), (endpoint, fd)) in enumerate(zip(attach, made, strict=True)):
                try:
                    await self.program(
                        AddPort(spec.vni, endpoint.port_id(name), fd, endpoint_mac(ip), ip),
                        check=True,
                    )
                except UsageError:  # the switch closed this fd; the rest are still ours
                    for _, later in made[index + 1 :]:
                        os.close(later)
                    container.endpoints = endpoints[:index]
                    await self._unwind(container)
                    raise
            container.service = service
            container.publish = list(publish or [])
            container.aliases = list(aliases or [])
            container.dns = list(dns or (service or {}).get("dns", []))
            if task_id or any(e.network in self.swarm_networks for e in endpoints):
                try:
                    await self.mesh.attach(container)  # before the process: its default route
                except BaseException:
                    await self._unwind(container)
                    raise
            log_path = self.config.state_dir / "containers" / f"{name}.log"
            try:
                container.proc = await trio.to_thread.run_sync(
                    ctr.start_process, ns, name, argv, log_path
                )
            except BaseException:
                await self._unwind(container)
                raise
            container.pid = container.proc.pid
            self.containers[name] = container
            self.persist()
        if self.peers is not None:
            for spec, endpoint in zip((s for s, _ in attach), endpoints, strict=True):
                await self.peers.endpoint_up(name, endpoint, spec)
        if container.publish:
            await self.mesh.publish(name, container.publish)
        if self.discovery is not None:
            await self.discovery.container_up(container)
        log.info(
            "container %s on %s image %s%s",
            name,
            ", ".join(f"{e.network} {e.ip}" for e in endpoints),
            image,
            f" (task {task_id})" if task_id else "",
        )
        return container

    async def _unwind(self, c: ctr.Container) -> None:
        """Undo a half-made container: its ports, its gwbridge address, its namespace."""
        for endpoint in c.endpoints:
            await self.program(RemovePort(endpoint.port_id(c.name)))
        await self.mesh.release(c.name)
        await trio.to_thread.run_sync(netns.remove, c.netns)

    async def destroy(self, name: str) -> None:
        """Kill a container's processes, release its TAPs, delete its namespace.

        A task is drained first (weight 0 on every node's load balancer, out of DNS), as
        Docker's graceful stop does, so that new connections go elsewhere before it dies.
        """
        c = self._container(name)
        if self.discovery is not None and c.exit_code is None:
            await self.discovery.drain(c)
        async with self.lock:
            c = self._container(name)
            del self.containers[c.name]  # first, so the peers see the endpoint gone
            if self.discovery is not None:
                await self.discovery.container_down(c)
            for endpoint in c.endpoints:
                if self.peers is not None:
                    await self.peers.endpoint_down(c.name, endpoint)
                await self.program(RemovePort(endpoint.port_id(c.name)))
            await trio.to_thread.run_sync(ctr.destroy_container, c)
            await self.mesh.release(c.name)
            self.persist()
        if c.attached and self.attacher is not None:
            await self.attacher.detach(c.name)

    def _pick_ip(self, spec: NetworkSpec, wanted: str | None) -> ipaddress.IPv4Address:
        used = {
            ipaddress.IPv4Address(e.ip)
            for c in self.containers.values()
            for e in c.endpoints
            if e.network == spec.name
        }
        used.add(spec.gateway)
        used |= {
            ipaddress.IPv4Address(row["ip"])
            for row in self.dataplane.fdb()
            if row["network"] == spec.name and ":" not in row["ip"]
        }
        if wanted is not None:
            try:
                ip = ipaddress.IPv4Address(wanted)
            except ValueError:
                raise UsageError(f"invalid IP address {wanted!r}") from None
            if ip not in spec.subnet or ip in (
                spec.subnet.network_address,
                spec.subnet.broadcast_address,
            ):
                raise UsageError(
                    f"address {ip} is not a host address of {spec.name} ({spec.subnet})"
                )
            if ip in used:
                raise Conflict(f"address {ip} is already in use on network {spec.name}")
            return ip
        for ip in spec.subnet.hosts():
            if ip not in used:
                return ip
        raise Conflict(f"no free address left in {spec.name} ({spec.subnet})")

    async def stop_container(self, req: Request) -> Any:
        c = self._container(req.params["name"])
        await trio.to_thread.run_sync(ctr.stop_container, c)
        return c.to_json()

    async def remove_container(self, req: Request) -> Any:
        force = req.query.get("force") in ("1", "true")
        c = self._container(req.params["name"])
        c.poll()
        if c.task_id is not None:
            raise Conflict(
                f"container {c.name} is a task of service {c.name.split('.')[0]}: "
                "scale or remove the service instead"
            )
        if c.exit_code is None and not force:
            raise Conflict(
                f"cannot remove container {c.name}: it is running; stop it or use `rm -f`"
            )
        await self.destroy(c.name)
        return {"removed": c.name}

    async def reap(self) -> None:
        """Notice containers whose main process exited (and reap the zombies)."""
        while True:
            await trio.sleep(1)
            for c in list(self.containers.values()):
                c.poll()


def _network_json(spec: NetworkSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vni": spec.vni,
        "subnet": str(spec.subnet),
        "gateway": str(spec.gateway),
        "mtu": spec.mtu,
    }


async def _serve(daemon: Daemon, config: DaemonConfig) -> None:
    path = config.socket_path
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    log.info(
        "daemon %s listening on %s, VXLAN on %s:%d",
        config.host,
        path,
        config.underlay_addr,
        config.data_port,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, daemon.router, listener)
        nursery.start_soon(daemon.reap)
        await daemon.adoption.try_adopt()  # containers on no network need nothing programmed
        await daemon.swarm.resume(nursery)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                nursery.cancel_scope.cancel()
                break


def run_daemon(config: DaemonConfig) -> None:
    """Enter the host namespace, start the dataplane thread, then serve the API on trio."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if config.netns:
        netns.enter(config.netns)  # before any thread exists: every later thread inherits it
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dataplane = Dataplane(config.underlay_addr, config.data_port, config.offload, config.gso)
    dataplane.start()
    daemon = Daemon(config, dataplane)
    try:
        trio.run(_serve, daemon, config)
    finally:
        dataplane.close()
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
