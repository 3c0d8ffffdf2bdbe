"""Swarm mode on a daemon: init, join, leave, and the cluster API routes.

A node that runs ``swarm init`` becomes the manager: it opens the store, creates the cluster,
serves 2377 and joins itself through the same agent session every other node uses.  A node that
runs ``swarm join`` fetches the root CA without verification, checks it against the digest in
the join token, presents the token with a CSR, and keeps the certificate it is given.
"""

from __future__ import annotations

import logging
import random
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from vxnet import netns
from vxnet.daemon.agent import Agent, NodeFiles
from vxnet.daemon.discovery import Discovery
from vxnet.daemon.http import Request
from vxnet.daemon.joining import converse, fetch_ca
from vxnet.daemon.peers import Peers
from vxnet.daemon.tables_view import table_rows
from vxnet.daemon.views import body_field
from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU
from vxnet.errors import Conflict, UsageError, VxnetError
from vxnet.esp.sa import DEFAULT_ICV_LEN
from vxnet.gossip.networkdb import TableEvent
from vxnet.gossip.service import GOSSIP_PORT, GossipService
from vxnet.manager import networks as nets
from vxnet.manager import pki, services, tokens
from vxnet.manager.cluster import Cluster, parse_duration
from vxnet.manager.proto import MANAGER_PORT, field_untrusted
from vxnet.manager.server import Manager
from vxnet.manager.store import Store

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon

log = logging.getLogger("vxnet.swarm")
MANAGER_START_TIMEOUT = 10.0  # seconds `swarm init` waits for 2377 to listen

NOT_MANAGER = (
    "This node is not a swarm manager. Worker nodes can't be used to view or modify cluster "
    "state. Please run this command on a manager node or promote the current node to a manager."
)
NOT_IN_SWARM = (
    'This node is not a swarm manager. Use "vxnet swarm init" or "vxnet swarm join" to '
    "connect this node to swarm and try again."
)
MANAGER_JOIN_NOTE = (
    "vxnet supports one manager: joining with the manager token gives this node a manager "
    "certificate and role, but no Raft replica of the store, so it adds no high availability."
)


class Swarm:
    """The swarm side of one daemon (role, agent, and the manager when this node is one)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.files = NodeFiles(daemon.config.state_dir / "swarm")
        self.agent: Agent | None = None
        self.manager: Manager | None = None
        self.store: Store | None = None
        self._scopes: list[trio.CancelScope] = []
        self.gossip: GossipService | None = None
        self.rng = random.Random()
        self._routes()

    # -------------------------------------------------------------------- life cycle

    async def resume(self, nursery: trio.Nursery) -> None:
        """After a restart: rejoin the swarm this node was in (and serve it, if manager)."""
        self._nursery = nursery
        if self.files.exists:
            info = self.files.load()
            await self._start(info)
            log.info("resumed swarm membership as %s (node %s)", info["role"], info["node_id"])

    async def _start(self, info: dict[str, Any]) -> None:
        self._scopes = []
        if info["role"] == "manager" and (self.files.directory / "manager.db").exists():
            self.store = Store.open(self.files.directory / "manager.db")
            cluster = Cluster(self.store, self.rng)
            manager = Manager(cluster, self.files.read("node.crt"), self.files.read("node.key"))
            self.manager = manager
            await self._nursery.start(
                self._supervise, "manager", self._manager_runner(manager, info)
            )
            # `swarm init` answers only once 2377 listens: a `join` right after it (a lab, a
            # script) must not find the port closed
            with trio.move_on_after(MANAGER_START_TIMEOUT):
                await manager.listening.wait()
        await self.daemon.mesh.enable()
        agent = Agent(self.daemon, self.files)
        self.agent = agent
        self.daemon.attacher = agent
        await self._nursery.start(self._supervise, "agent", agent.run)
        await self._nursery.start(self._supervise, "gossip", self._gossip_runner(agent, info))

    @staticmethod
    def _manager_runner(manager: Manager, info: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await manager.serve(info["advertise_addr"], MANAGER_PORT)

        return run

    def _gossip_runner(self, agent: Agent, info: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            while not agent.keys:  # the gossip keyring comes from the manager
                await agent.keys_changed.wait()
            keys, primary = gossip_keys(agent.keys)
            # A fresh name on every start, as Docker's networkdb does: a restarted node is a new
            # member, so its predecessor's entries (lost containers) stay hidden until reaped
            # instead of coming back when "it" returns.
            name = f"{info['node_id'][:12]}-{secrets.token_hex(4)}"
            service = GossipService(name, info["advertise_addr"], keys=keys, primary=primary)
            peers = Peers(self.daemon, service, name, info["data_path_addr"])
            discovery = Discovery(self.daemon, service, name)

            async def watch(event: TableEvent) -> None:
                await peers.on_table_event(event)
                await discovery.on_table_event(event)

            service.watcher = watch
            self.gossip = service
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.serve, self._gossip_seeds(info))
                    self.daemon.peers = peers
                    await peers.publish_all()
                    self.daemon.discovery = discovery
                    await nursery.start(discovery.run)
                    while True:
                        await agent.keys_changed.wait()
                        service.set_keys(*gossip_keys(agent.keys))
            finally:
                self.daemon.peers = None
                self.daemon.discovery = None
                self.gossip = None

        return run

    def _gossip_seeds(self, info: dict[str, Any]) -> list[tuple[str, int]]:
        """Workers join through the manager; a (restarted) manager through the nodes it knows."""
        if self.manager is None:
            host = str(info["manager"]).rpartition(":")[0]
            return [(host, GOSSIP_PORT)]
        return [
            (n["addr"], GOSSIP_PORT)
            for n in self.manager.cluster.nodes()
            if n["id"] != info["node_id"]
        ]

    async def _supervise(
        self,
        what: str,
        run: Callable[[], Awaitable[None]],
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a background service until ``leave``; a bug in it is logged and it restarts."""
        scope = trio.CancelScope()
        self._scopes.append(scope)
        task_status.started()
        with scope:
            while True:
                try:
                    await run()
                except Exception:
                    log.exception("%s failed; restarting it in 1 s", what)
                await trio.sleep(1)

    def _require_manager(self) -> Cluster:
        if self.manager is None:
            raise Conflict(NOT_MANAGER if self.files.exists else NOT_IN_SWARM)
        return self.manager.cluster

    def changed(self) -> None:
        if self.manager is not None:
            self.manager.changed()

    # ------------------------------------------------------------------- init, join

    async def init(self, body: dict[str, Any]) -> dict[str, Any]:
        cfg = self.daemon.config
        advertise = _text(body, "advertise_addr") or cfg.underlay_addr
        data_path = _text(body, "data_path_addr") or advertise
        port = body_field(body, "data_path_port", int, False) or self.daemon.dataplane.data_port
        mask_length = body_field(body, "default_addr_pool_mask_length", int, False) or 24
        icv_length = body_field(body, "esp_icv_length", int, False) or DEFAULT_ICV_LEN
        underlay_mtu = body_field(body, "underlay_mtu", int, False)
        underlay_mtu = DEFAULT_UNDERLAY_MTU if underlay_mtu is None else underlay_mtu
        pools = tuple(body.get("default_addr_pool") or ("10.0.0.0/8",))
        interval = parse_duration(_text(body, "key_rotation_interval") or "12h")
        cert_expiry = parse_duration(_text(body, "cert_expiry") or "2160h")
        if cert_expiry < 10:
            raise UsageError("--cert-expiry must be at least 10s (Docker's minimum is 1h)")
        await _check_underlay_mtu(data_path, underlay_mtu)
        # no await from here to the store's creation: two concurrent inits cannot both pass
        if self.files.exists:
            raise Conflict(
                'This node is already part of a swarm. Use "vxnet swarm leave" to '
                "leave this swarm and join another one."
            )
        self.files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = Store.open(self.files.directory / "manager.db")
        try:
            now = time.time()
            cluster = Cluster.initialize(
                store,
                self.rng,
                now,
                hostname=cfg.host,
                advertise_addr=advertise,
                data_path_addr=data_path,
                data_port=port,
                pools=pools,
                mask_length=mask_length,
                rotation_interval=interval,
                esp_icv_length=icv_length,
                underlay_mtu=underlay_mtu,
            )
            cluster.info["node_cert_lifetime"] = cert_expiry
            store.set_value("cluster", cluster.info)
            nets.ensure_ingress(cluster, now)
            key = pki.new_node_key()
            issued = cluster.issue(
                "manager", pki.make_csr(key), cfg.host, advertise, data_path, now
            )
        except BaseException:
            store.close()
            shutil.rmtree(self.files.directory, ignore_errors=True)
            raise
        store.close()
        info = self._node_info(
            issued.node_id,
            "manager",
            issued.cluster_id,
            advertise,
            data_path,
            f"{advertise}:{MANAGER_PORT}",
        )
        self.files.save(info, key, issued.cert_pem, issued.ca_pem)
        self.daemon.localnets.ensure_gwbridge()
        await self._start(info)
        return {
            "node_id": issued.node_id,
            "cluster_id": issued.cluster_id,
            "worker_token": self._require_manager().token("worker"),
            "manager_addr": info["manager"],
        }

    def _node_info(
        self, node_id: str, role: str, cluster_id: str, advertise: str, data_path: str, manager: str
    ) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "role": role,
            "cluster_id": cluster_id,
            "hostname": self.daemon.config.host,
            "advertise_addr": advertise,
            "data_path_addr": data_path,
            "manager": manager,
            "joined": time.time(),
        }

    async def join(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.files.exists:
            raise Conflict(
                'This node is already part of a swarm. Use "vxnet swarm leave" to '
                "leave this swarm and join another one."
            )
        token = _text(body, "token")
        remote = _text(body, "remote")
        if not token or not remote:
            raise UsageError("swarm join needs --token and the manager's address (HOST:2377)")
        tokens.parse_token(token)
        host, _, port_text = remote.rpartition(":")
        if not host or not port_text.isdigit():
            host, port_text = remote, str(MANAGER_PORT)
        advertise = _text(body, "advertise_addr") or self.daemon.config.underlay_addr
        data_path = _text(body, "data_path_addr") or advertise
        ca = await fetch_ca(host, int(port_text))
        tokens.verify_ca(ca, token)  # TokenRefused: someone else's manager, or a wrong token
        key = pki.new_node_key()
        message: dict[str, Any] = {
            "type": "join",
            "token": token,
            "csr": pki.make_csr(key),
            "hostname": self.daemon.config.host,
            "advertise_addr": advertise,
            "data_path_addr": data_path,
        }
        interface = await trio.to_thread.run_sync(netns.interface_of, data_path)
        if interface is not None:  # the manager refuses a node that carries less than its swarm
            message["data_path_mtu"] = interface[1]
        reply = await converse(host, int(port_text), pki.client_ssl_context(ca), message)
        if reply.get("type") != "joined":
            raise tokens.TokenRefused(f"the manager refused to join: {reply.get('message')}")
        cert = field_untrusted(reply, "cert", bytes)
        identity = pki.verify_node_cert(ca, cert, datetime.now(UTC))
        info = self._node_info(
            identity.node_id,
            field_untrusted(reply, "role", str),
            identity.cluster_id,
            advertise,
            data_path,
            f"{host}:{port_text}",
        )
        self.files.save(info, key, cert, ca)
        self.daemon.localnets.ensure_gwbridge()
        await self._start(info)
        out = {"node_id": identity.node_id, "role": info["role"], "cluster_id": identity.cluster_id}
        if info["role"] == "manager":
            out["note"] = MANAGER_JOIN_NOTE
        return out

    async def leave(self, force: bool) -> dict[str, Any]:
        if not self.files.exists:
            raise Conflict("This node is not part of a swarm")
        info = self.files.load()
        if info["role"] == "manager" and not force:
            raise Conflict(
                "You are attempting to leave the swarm on a node that is participating as a "
                "manager. Removing the last manager erases all current state of the swarm. "
                "Use `--force` to ignore this message."
            )
        if self.gossip is not None:
            self.gossip.leave()
            await trio.sleep(0.3)  # let the leave be gossiped before the sockets close
        if self.agent is not None:
            await self.agent.leave()
        for scope in self._scopes:
            scope.cancel()
        for c in list(self.daemon.containers.values()):
            if c.task_id or c.attached:
                await self.daemon.destroy(c.name)
        await self.daemon.mesh.disable()
        await self.daemon.prune_networks(keep=set())
        if self.store is not None:
            self.store.close()
        self.agent = self.manager = self.store = None
        self.daemon.attacher = None
        shutil.rmtree(self.files.directory, ignore_errors=True)
        return {"left": info["node_id"]}

    # ----------------------------------------------------------------------- routes

    def _routes(self) -> None:
        r = self.daemon.router
        r.route("GET", "/swarm")(self.h_info)
        r.route("POST", "/swarm/init")(lambda req: self.init(_body(req)))
        r.route("POST", "/swarm/join")(lambda req: self.join(_body(req)))
        r.route("POST", "/swarm/leave")(lambda req: self.leave(req.query.get("force") == "1"))
        r.route("GET", "/swarm/join-token/{role}")(self.h_join_token)
        r.route("POST", "/swarm/update")(self.h_update)
        r.route("GET", "/swarm/keys")(self.h_keys)
        r.route("GET", "/gossip")(self.h_gossip)
        r.route("GET", "/gossip/tables")(self.h_gossip_tables)
        r.route("GET", "/gossip/claims")(self.h_gossip_claims)
        r.route("GET", "/nodes")(self.h_nodes)
        r.route("DELETE", "/nodes/{ref}")(self.h_node_rm)
        r.route("GET", "/swarm/networks")(self.h_networks)
        r.route("POST", "/swarm/networks")(self.h_network_create)
        r.route("GET", "/swarm/networks/{ref}")(self.h_network_inspect)
        r.route("DELETE", "/swarm/networks/{ref}")(self.h_network_rm)
        r.route("GET", "/services")(self.h_services)
        r.route("POST", "/services")(self.h_service_create)
        r.route("GET", "/services/{ref}")(self.h_service_inspect)
        r.route("GET", "/services/{ref}/tasks")(self.h_service_ps)
        r.route("POST", "/services/{ref}/scale")(self.h_service_scale)
        r.route("DELETE", "/services/{ref}")(self.h_service_rm)

    async def h_info(self, req: Request) -> Any:
        if not self.files.exists:
            return {"state": "inactive"}
        info = self.files.load()
        agent = self.agent
        out = {
            "state": "active",
            **info,
            "is_manager": self.manager is not None,
            "connected": bool(agent and agent.connected),
            "last_error": agent.last_error if agent else "",
            "agent": agent.counters if agent else {},
        }
        if self.manager is not None:
            out["manager_counters"] = dict(self.manager.counters)
            out["sessions"] = sorted(self.manager.sessions)
        return out

    async def h_join_token(self, req: Request) -> Any:
        cluster = self._require_manager()
        role = req.params["role"]
        token = (
            cluster.rotate_token(role) if req.query.get("rotate") == "1" else cluster.token(role)
        )
        return {
            "role": role,
            "token": token,
            "manager": f"{cluster.managers()[0]['addr']}:{MANAGER_PORT}",
            "note": MANAGER_JOIN_NOTE if role == "manager" else "",
        }

    async def h_update(self, req: Request) -> Any:
        cluster = self._require_manager()
        interval = _text(_body(req), "key_rotation_interval")
        if interval:
            cluster.set_rotation_interval(parse_duration(interval), time.time())
        return {"key_rotation_interval": cluster.keys.interval}

    async def h_keys(self, req: Request) -> Any:
        agent = self.agent
        if agent is None:
            raise Conflict(NOT_IN_SWARM)
        show = req.query.get("show") == "1"
        return [{k: v for k, v in key.items() if show or k != "key"} for key in agent.keys]

    async def h_gossip(self, req: Request) -> Any:
        if self.gossip is None:
            raise Conflict("this node does not gossip yet (not in a swarm, or no keys yet)")
        out = self.gossip.snapshot()
        out["peers"] = self.daemon.peers.counters if self.daemon.peers else {}
        return out

    async def h_gossip_tables(self, req: Request) -> Any:
        """Every networkdb entry this node holds (tombstones and hidden ones too, marked)."""
        if self.gossip is None:
            raise Conflict("this node does not gossip yet (not in a swarm, or no keys yet)")
        return table_rows(self.gossip.db.entries, self.daemon.network_names,
                          req.query.get("network"))  # fmt: skip

    async def h_gossip_claims(self, req: Request) -> Any:
        """What each FDB entry programmed from gossip stands on: every live claim to a MAC."""
        if self.daemon.peers is None:
            raise Conflict("this node does not gossip yet (not in a swarm, or no keys yet)")
        return self.daemon.peers.claim_rows()

    async def h_nodes(self, req: Request) -> Any:
        return self._require_manager().nodes()

    async def h_node_rm(self, req: Request) -> Any:
        cluster = self._require_manager()
        node_id = cluster.remove_node(req.params["ref"], req.query.get("force") == "1")
        services.reconcile(cluster, time.time())
        self.changed()
        return {"removed": node_id}

    async def h_networks(self, req: Request) -> Any:
        return self._require_manager().store.list("network")

    async def h_network_create(self, req: Request) -> Any:
        cluster = self._require_manager()
        body = _body(req)
        opts = body.get("options") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise UsageError("options must be a list of KEY=VALUE strings")
        net = nets.create_network(
            cluster,
            _text(body, "name"),
            time.time(),
            driver=_text(body, "driver") or "overlay",
            attachable=bool(body.get("attachable")),
            ingress=bool(body.get("ingress")),
            subnet=_text(body, "subnet") or None,
            gateway=_text(body, "gateway") or None,
            ip_range=_text(body, "ip_range") or None,
            options=nets.parse_options(opts),
        )
        if net["ingress"]:  # every node gets a sandbox (and an address) on the new ingress
            services.sync_lb_addresses(cluster)
        self.changed()
        return net

    async def h_network_inspect(self, req: Request) -> Any:
        cluster = self._require_manager()
        net = nets.find_network(cluster, req.params["ref"])
        return nets.inspect_network(cluster, net, verbose=req.query.get("verbose") == "1")

    async def h_network_rm(self, req: Request) -> Any:
        cluster = self._require_manager()
        net = nets.remove_network(cluster, req.params["ref"])
        services.sync_lb_addresses(cluster)  # releases the nodes' addresses on it
        self.changed()
        return {"removed": net["name"]}

    async def h_services(self, req: Request) -> Any:
        return services.service_rows(self._require_manager())

    async def h_service_create(self, req: Request) -> Any:
        cluster = self._require_manager()
        b = _body(req)
        svc = services.create_service(
            cluster,
            time.time(),
            name=_text(b, "name"),
            image=_text(b, "image"),
            cmd=_strings(b, "cmd"),
            replicas=b.get("replicas"),
            mode=_text(b, "mode") or "replicated",
            networks=_strings(b, "networks"),
            ports=_strings(b, "ports"),
            endpoint_mode=_text(b, "endpoint_mode") or "vip",
            dns=_strings(b, "dns"),
        )
        self.changed()
        return svc

    async def h_service_inspect(self, req: Request) -> Any:
        return services.find_service(self._require_manager(), req.params["ref"])

    async def h_service_ps(self, req: Request) -> Any:
        cluster = self._require_manager()
        svc = services.find_service(cluster, req.params["ref"])
        hosts = {n["id"]: n["hostname"] for n in cluster.store.list("node")}
        return [
            dict(t, node=hosts.get(t["node_id"], t["node_id"]))
            for t in sorted(services.tasks_of(cluster, svc["id"]), key=lambda t: t["slot"])
        ]

    async def h_service_scale(self, req: Request) -> Any:
        replicas = _body(req).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise UsageError("replicas must be a number")
        svc = services.scale_service(
            self._require_manager(), req.params["ref"], replicas, time.time()
        )
        self.changed()
        return svc

    async def h_service_rm(self, req: Request) -> Any:
        svc = services.remove_service(self._require_manager(), req.params["ref"])
        self.changed()
        return {"removed": svc["name"]}


async def _check_underlay_mtu(data_path: str, underlay_mtu: int) -> None:
    """Refuse an underlay MTU this node's own data-path interface cannot carry: every network
    would otherwise be allowed frames that the first hop drops."""
    found = await trio.to_thread.run_sync(netns.interface_of, data_path)
    if found is not None and found[1] < underlay_mtu:
        raise UsageError(
            f"--underlay-mtu {underlay_mtu} is more than {found[0]} ({data_path}) carries: "
            f"its MTU is {found[1]}"
        )


def gossip_keys(keys: list[dict[str, Any]]) -> tuple[list[bytes], bytes]:
    """The networking:gossip keys, and the primary: the middle one by tag (libnetwork's rule)."""
    ring = sorted(
        (k for k in keys if k.get("subsystem") == "networking:gossip"),
        key=lambda k: int(k["lamport_time"]),
    )
    raw = [bytes.fromhex(str(k["key"])) for k in ring]
    if not raw:
        raise VxnetError("the manager sent no networking:gossip keys")
    return raw, raw[len(raw) // 2]


def _body(req: Request) -> dict[str, Any]:
    if req.body is None:
        return {}
    if not isinstance(req.body, dict):
        raise UsageError("request body must be a JSON object")
    return req.body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"{key} must be a string")
    return value


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{key} must be a list of strings")
    return value
