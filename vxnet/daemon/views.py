"""The daemon's read-side and hand-tuning routes, apart from its life-cycle work.

What a learner or a test asks a node: its counters, FDB (and hand-made entries), the endpoints
it publishes, the routing mesh, discovery, the load balancer and its timeouts, re-adoption after
a restart, and node-local bridge networks.  Handlers close over the :class:`Daemon`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Any

import trio

from vxnet.daemon import gwbridge
from vxnet.daemon.http import Request, Router
from vxnet.daemon.localnets import GWBRIDGE
from vxnet.dataplane.tables import AddPeer, LbSettings, RemovePeer, endpoint_mac
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.wire.ethernet import mac_from_str

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon


def body_strings(body: Any, key: str) -> list[str]:
    value = body_field(body, key, list, required=False) or []
    if not all(isinstance(v, str) for v in value):
        raise UsageError(f"field {key!r} must be a list of strings")
    return list(value)


def body_field(body: Any, key: str, kind: type, required: bool = True) -> Any:
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    value = body.get(key)
    if value is None:
        if required:
            raise UsageError(f"missing field {key!r}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"field {key!r} must be {kind.__name__}")
    return value


def register(d: Daemon, router: Router) -> None:
    async def endpoints(req: Request) -> Any:
        """Every endpoint this node publishes to its peers: containers' interfaces, the
        ingress sandbox's, and its load-balancer addresses."""
        out = [
            {"owner": c.name, "network": e.network, "ip": e.ip, "mac": e.mac}
            for c in d.containers.values()
            for e in c.endpoints
        ]
        if d.discovery is not None:
            out += [
                {"owner": f"lb-{net}", "network": net, "ip": str(ip),
                 "mac": endpoint_mac(ip).hex(":")}
                for net, ip in d.discovery.lb_addresses.items()
                if not d.swarm_ingress(net)
            ]  # fmt: skip
        return out

    async def adoption_info(req: Request) -> Any:
        return d.adoption.to_json()

    async def mesh_info(req: Request) -> Any:
        return d.mesh.to_json()

    async def discovery_info(req: Request) -> Any:
        if d.discovery is None:
            raise NotFound("service discovery runs once this node is in a swarm and gossips")
        return d.discovery.to_json()

    async def lb_info(req: Request) -> Any:
        switch = d.dataplane.switch
        return {
            "services": switch.lb_table(),
            "connections": switch.conntrack(),
            "settings": dataclasses.asdict(switch.lb_settings),
        }

    async def lb_settings(req: Request) -> Any:
        """Change the load balancer's idle timeouts (seconds) or table size on this node."""
        body = req.body if isinstance(req.body, dict) else {}
        current = dataclasses.asdict(d.dataplane.switch.lb_settings)
        unknown = set(body) - set(current)
        if unknown:
            raise UsageError(f"unknown settings {sorted(unknown)}: known are {sorted(current)}")
        for key, value in body.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"{key} must be a positive number")
        settings = LbSettings(**{**current, **body})
        if settings.max_connections != int(settings.max_connections):
            raise UsageError("max_connections must be a whole number")
        await d.program(dataclasses.replace(settings, max_connections=int(
            settings.max_connections)))  # fmt: skip
        return dataclasses.asdict(d.dataplane.switch.lb_settings)

    async def list_local_networks(req: Request) -> Any:
        return list(d.localnets.items.values())

    async def create_local_network(req: Request) -> Any:
        body = req.body
        options = body_field(body, "options", dict, required=False) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
            raise UsageError("options must map strings to strings")
        return d.localnets.create(
            body_field(body, "name", str),
            body_field(body, "subnet", str, required=False),
            body_field(body, "gateway", str, required=False),
            options,
        )

    async def inspect_local_network(req: Request) -> Any:
        return d.localnets.get(req.params["name"])

    async def remove_local_network(req: Request) -> Any:
        name = req.params["name"]
        item = d.localnets.get(name)
        if name == GWBRIDGE and d.mesh.enabled:
            raise Conflict(f"{GWBRIDGE} is in use by the swarm: leave the swarm first")
        d.localnets.remove(name)
        if name == GWBRIDGE and d.config.netns is not None:  # its kernel bridge goes with it
            bridge = item.get("Options", {}).get("com.docker.network.bridge.name", GWBRIDGE)
            await trio.to_thread.run_sync(gwbridge.remove_bridge, d.config.netns, bridge[:15])
        return {"removed": name}

    async def list_fdb(req: Request) -> Any:
        return d.dataplane.fdb()

    async def add_fdb(req: Request) -> Any:
        body = req.body
        spec = d._network(body_field(body, "network", str))
        mac = mac_from_str(body_field(body, "mac", str))
        try:
            ip = ipaddress.ip_address(body_field(body, "ip", str))
            vtep = ipaddress.IPv4Address(body_field(body, "vtep", str))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        origin = body_field(body, "origin", str, required=False) or "manual"
        if origin not in ("lab", "manual"):
            raise UsageError("origin must be 'lab' or 'manual'")
        if isinstance(ip, ipaddress.IPv4Address) and ip not in spec.subnet:
            raise UsageError(f"{ip} is not in network {spec.name} ({spec.subnet})")
        if mac[0] & 1:
            raise UsageError("an FDB entry needs a unicast MAC address")
        await d.program(AddPeer(spec.vni, mac, ip, vtep, origin))  # type: ignore[arg-type]
        return {"network": spec.name, "mac": mac.hex(":"), "ip": str(ip), "vtep": str(vtep)}

    async def remove_fdb(req: Request) -> Any:
        spec = d._network(req.params["network"])
        mac = mac_from_str(req.params["mac"])
        await d.program(RemovePeer(spec.vni, mac))
        return {"removed": mac.hex(":")}

    async def stats(req: Request) -> Any:
        out = d.dataplane.stats()
        out["host"] = d.config.host
        out["update_errors"] = d.dataplane.update_errors
        return out

    router.route("GET", "/fdb")(list_fdb)
    router.route("POST", "/fdb")(add_fdb)
    router.route("DELETE", "/fdb/{network}/{mac}")(remove_fdb)
    router.route("GET", "/dataplane/stats")(stats)
    router.route("GET", "/mesh")(mesh_info)
    router.route("GET", "/adoption")(adoption_info)
    router.route("GET", "/endpoints")(endpoints)
    router.route("GET", "/discovery")(discovery_info)
    router.route("GET", "/dataplane/lb")(lb_info)
    router.route("POST", "/dataplane/lb/settings")(lb_settings)
    router.route("GET", "/local-networks")(list_local_networks)
    router.route("POST", "/local-networks")(create_local_network)
    router.route("GET", "/local-networks/{name}")(inspect_local_network)
    router.route("DELETE", "/local-networks/{name}")(remove_local_network)
