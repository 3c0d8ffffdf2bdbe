"""Local (node-scoped) bridge network objects, ``docker_gwbridge`` first among them.

Docker creates ``docker_gwbridge`` on every node as it enters a swarm (a bridge network, ICC
off, masquerade on) unless the user created one first, in which case it is kept as is: that is
how the seed's "customise docker_gwbridge" flow works.  Here the objects and that rule are
kept; the bridge's data path (a kernel bridge with nftables masquerade) arrives with the
load-balancing issue, and ``vxnet network inspect docker_gwbridge`` says so.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from pathlib import Path
from typing import Any

from vxnet.daemon.containers import check_name
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.files import write_private

GWBRIDGE = "docker_gwbridge"
BRIDGE_OPTIONS = {
    "com.docker.network.bridge.name",
    "com.docker.network.bridge.enable_icc",
    "com.docker.network.bridge.enable_ip_masquerade",
    "com.docker.network.driver.mtu",
}
#: Docker's local pools: 172.17-31.0.0/16, then 192.168.0.0/20 blocks (172.17 is docker0's).
LOCAL_POOLS = [ipaddress.IPv4Network(f"172.{i}.0.0/16") for i in range(18, 32)]


class LocalNetworks:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, dict[str, Any]] = {}
        if path.exists():
            self.items = json.loads(path.read_text())

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.path, json.dumps(self.items, indent=1))

    def create(
        self,
        name: str,
        subnet: str | None = None,
        gateway: str | None = None,
        options: dict[str, str] | None = None,
        *,
        created_by: str = "user",
    ) -> dict[str, Any]:
        check_name("network", name)
        if name in self.items:
            raise Conflict(f"network with name {name} already exists")
        options = dict(options or {})
        unknown = set(options) - BRIDGE_OPTIONS
        if unknown:
            raise UsageError(f"unknown bridge driver options {sorted(unknown)}")
        for key in (
            "com.docker.network.bridge.enable_icc",
            "com.docker.network.bridge.enable_ip_masquerade",
        ):
            if key in options and options[key] not in ("true", "false"):
                raise UsageError(f"{key} must be true or false")
        used = [ipaddress.IPv4Network(n["subnet"]) for n in self.items.values()]
        try:
            net = ipaddress.IPv4Network(subnet) if subnet else self._free(used)
            gw = ipaddress.IPv4Address(gateway) if gateway else net.network_address + 1
        except ValueError as exc:
            raise UsageError(f"bad subnet or gateway: {exc}") from None
        if gw not in net:
            raise UsageError(f"gateway {gw} is not in subnet {net}")
        for other in used:
            if other.overlaps(net):
                raise Conflict(
                    "invalid pool request: Pool overlaps with other one on this address space"
                )
        item = {
            "Name": name,
            "Id": secrets.token_hex(32),
            "Driver": "bridge",
            "Scope": "local",
            "Created": time.time(),
            "IPAM": {"Config": [{"Subnet": str(net), "Gateway": str(gw)}]},
            "Options": options,
            "subnet": str(net),
            "created_by": created_by,
            "DataPath": "a kernel bridge in the host's namespace once the node is in a swarm "
            "(docker_gwbridge: ICC by port isolation, masquerade by nftables)",
        }
        self.items[name] = item
        self._save()
        return item

    def _free(self, used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        for pool in LOCAL_POOLS:
            if not any(pool.overlaps(u) for u in used):
                return pool
        raise Conflict("no free local address pool for a bridge network")

    def ensure_gwbridge(self) -> dict[str, Any]:
        """Docker's rule: keep a user-made docker_gwbridge, else make the default one."""
        if GWBRIDGE in self.items:
            return self.items[GWBRIDGE]
        return self.create(
            GWBRIDGE,
            options={
                "com.docker.network.bridge.name": GWBRIDGE,
                "com.docker.network.bridge.enable_icc": "false",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
            },
            created_by="swarm",
        )

    def get(self, name: str) -> dict[str, Any]:
        if name not in self.items:
            raise NotFound(f"network {name} not found")
        return self.items[name]

    def remove(self, name: str) -> None:
        self.get(name)
        del self.items[name]
        self._save()
