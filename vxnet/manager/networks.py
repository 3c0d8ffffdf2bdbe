"""Swarm networks on the manager: Docker's rules, Docker's kind of messages.  Sans-IO.

``com.docker.network.driver.mtu`` is the **network** MTU in vxnet (what the containers' ``eth0``
gets), as Docker's documentation describes it; Docker's code treats it as the underlay MTU and
subtracts 50.  vxnet refuses a value the swarm's underlay cannot carry without fragmenting: 1500
bytes unless ``swarm init --underlay-mtu`` said otherwise (a jumbo-frame fabric, 9000).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from vxnet.daemon.containers import check_name
from vxnet.dataplane.tables import DEFAULT_UNDERLAY_MTU, VXLAN_OVERHEAD, default_network_mtu
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.esp.sa import DEFAULT_ICV_LEN
from vxnet.esp.sadb import encrypted_mtu
from vxnet.manager.cluster import Cluster, new_id
from vxnet.manager.ipam import (
    VXLANID_LIST_OPTION,
    AddressPools,
    NetworkAddressing,
    allocate_ip,
    check_subnet,
    choose_vnis,
    make_addressing,
)

MTU_OPTION = "com.docker.network.driver.mtu"
ENCRYPTED_OPTION = "encrypted"
KNOWN_OPTIONS = {MTU_OPTION, ENCRYPTED_OPTION, VXLANID_LIST_OPTION}
INGRESS = "ingress"


def mtu_ceilings(underlay_mtu: int, icv_len: int = DEFAULT_ICV_LEN) -> tuple[int, int]:
    """The largest plain and encrypted network MTUs ``underlay_mtu`` carries unfragmented."""
    return underlay_mtu - VXLAN_OVERHEAD, encrypted_mtu(underlay_mtu, icv_len)


def network_mtu(
    options: dict[str, str],
    icv_len: int = DEFAULT_ICV_LEN,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
) -> int:
    """The MTU option, checked, or the default.

    The ceiling is what the underlay carries unfragmented: underlay - 50 for VXLAN, and for an
    encrypted overlay underlay - 50 - ESP's expansion, rounded down to a multiple of 4.  ESP
    with vxnet's ICV of 16 bytes expands a datagram by 34 bytes (SPI, sequence number, IV, pad
    length, next header, ICV): 1416 on 1500 bytes.  Docker's ICV of 8 (``swarm init
    --esp-icv-length 8``) expands it by 26: Docker's 1424.  The default is Docker's (1450 or
    the encrypted ceiling of a 1500-byte underlay) whatever the underlay, as in Docker, where
    a jumbo fabric is used only by asking for it; smaller only if the underlay is smaller.
    """
    encrypted = ENCRYPTED_OPTION in options
    plain_ceiling, encrypted_ceiling = mtu_ceilings(underlay_mtu, icv_len)
    ceiling = encrypted_ceiling if encrypted else plain_ceiling
    if MTU_OPTION not in options:
        if not encrypted:
            return default_network_mtu(underlay_mtu)
        return min(encrypted_mtu(DEFAULT_UNDERLAY_MTU, icv_len), ceiling)
    try:
        mtu = int(options[MTU_OPTION])
    except ValueError:
        raise UsageError(
            f"invalid {MTU_OPTION} {options[MTU_OPTION]!r}: a number is needed"
        ) from None
    if not 576 <= mtu <= ceiling:
        raise UsageError(
            f"{MTU_OPTION}={mtu} is out of range: the network MTU must be 576-{ceiling} on a "
            f"{underlay_mtu}-byte underlay (VXLAN is never fragmented)"
        )
    return mtu


def parse_options(opts: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in KNOWN_OPTIONS:
            raise UsageError(
                f"unknown overlay driver option {key!r} (known: {sorted(KNOWN_OPTIONS)})"
            )
        out[key] = value
    return out


def addressing_of(net: dict[str, Any]) -> NetworkAddressing:
    return make_addressing(net["subnet"], net["gateway"], net.get("ip_range"))


def used_addresses(cluster: Cluster, net_id: str) -> set[IPv4Address]:
    used: set[IPv4Address] = set()
    for task in cluster.store.list("task"):
        if net_id in task.get("addresses", {}):
            used.add(IPv4Address(task["addresses"][net_id]))
    for svc in cluster.store.list("service"):
        if net_id in svc.get("vips", {}):
            used.add(IPv4Address(svc["vips"][net_id]))
    for att in cluster.store.list("attachment"):
        if att["network_id"] == net_id:
            used.add(IPv4Address(att["ip"]))
    for node in cluster.store.list("node"):
        if net_id in node.get("lb_addresses", {}):
            used.add(IPv4Address(node["lb_addresses"][net_id]))
    return used


def allocate_address(cluster: Cluster, net: dict[str, Any], wanted: str | None = None) -> str:
    want = None
    if wanted is not None:
        try:
            want = IPv4Address(wanted)
        except ValueError:
            raise UsageError(f"invalid IP address {wanted!r}") from None
    ip = allocate_ip(
        addressing_of(net),
        used_addresses(cluster, net["id"]),
        want,
        after=_last_allocated(net),
        network=net["name"],
    )
    net["last_ip"] = str(ip)
    cluster.store.put("network", net["id"], net["name"], net)
    return str(ip)


def _last_allocated(net: dict[str, Any]) -> IPv4Address | None:
    return IPv4Address(net["last_ip"]) if net.get("last_ip") else None


def create_network(
    cluster: Cluster,
    name: str,
    now: float,
    *,
    driver: str = "overlay",
    attachable: bool = False,
    ingress: bool = False,
    subnet: str | None = None,
    gateway: str | None = None,
    ip_range: str | None = None,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    check_name("network", name)
    options = dict(options or {})
    if driver != "overlay":
        raise UsageError(
            f"driver {driver!r} is not a swarm driver: the manager creates overlay networks "
            "(bridge networks such as docker_gwbridge are local to a node)"
        )
    store = cluster.store
    if store.get_by_name("network", name) is not None:
        raise Conflict(f"network with name {name} already exists")
    networks = store.list("network")
    if ingress and any(n["ingress"] for n in networks):
        raise Conflict("only one ingress network is allowed to exist: remove the current one first")
    if ingress and attachable:
        raise UsageError("the ingress network cannot be attachable")
    used = {n["name"]: IPv4Network(n["subnet"]) for n in networks}
    if subnet is None:
        pools = AddressPools.from_text(
            cluster.info["default_addr_pool"], cluster.info["default_addr_pool_mask_length"]
        )
        subnet = str(pools.allocate_subnet(used.values()))
    addressing = make_addressing(subnet, gateway, ip_range)
    if any(addressing.subnet.overlaps(s) for s in used.values()):
        try:
            check_subnet(addressing.subnet, used)
        except Conflict as exc:
            raise Conflict(
                f"invalid pool request: Pool overlaps with other one on this address space ({exc})"
            ) from None
    used_vnis = {v for n in networks for v in n["vnis"]}
    vnis = choose_vnis(options.get(VXLANID_LIST_OPTION), used_vnis)
    net = {
        "id": new_id(cluster.rng),
        "name": name,
        "driver": "overlay",
        "scope": "swarm",
        "attachable": attachable,
        "ingress": ingress,
        "internal": False,
        "encrypted": ENCRYPTED_OPTION in options,
        "vni": vnis[0],
        "vnis": vnis,
        "subnet": str(addressing.subnet),
        "gateway": str(addressing.gateway),
        "ip_range": str(addressing.ip_range) if addressing.ip_range else None,
        "mtu": network_mtu(options, cluster.esp_icv_length, cluster.underlay_mtu),
        "options": options,
        "created": now,
    }
    store.put("network", str(net["id"]), name, net)
    return net


def find_network(cluster: Cluster, ref: str) -> dict[str, Any]:
    """A network by name, id or id prefix."""
    store = cluster.store
    net = store.get_by_name("network", ref) or store.get("network", ref)
    if net is None:
        found = (
            [n for n in store.list("network") if n["id"].startswith(ref)] if len(ref) >= 3 else []
        )
        if len(found) == 1:
            net = found[0]
    if net is None:
        raise NotFound(f"network {ref} not found")
    return net


def users_of(cluster: Cluster, net_id: str) -> list[str]:
    """Services and standalone containers using a network."""
    users = [
        f"service {s['name']}" for s in cluster.store.list("service") if net_id in s["network_ids"]
    ]
    users += [
        f"container {a['container']}"
        for a in cluster.store.list("attachment")
        if a["network_id"] == net_id
    ]
    return users


def remove_network(cluster: Cluster, ref: str) -> dict[str, Any]:
    net = find_network(cluster, ref)
    if net["ingress"]:
        publishers = [
            s["name"]
            for s in cluster.store.list("service")
            if s["ports"] and any(p["mode"] == "ingress" for p in s["ports"])
        ]
        if publishers:
            raise Conflict(
                f"ingress network cannot be removed because service "
                f"{', '.join(publishers)} depends on it"
            )
    users = users_of(cluster, net["id"])
    if users:
        raise Conflict(f"network {net['name']} is in use by {', '.join(users)}")
    cluster.store.delete("network", net["id"])
    return net


def inspect_network(cluster: Cluster, net: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """Docker's field names: Name, Id, Driver, Scope, Attachable, Ingress, IPAM, Options, ..."""
    containers: dict[str, Any] = {}
    peers: dict[str, dict[str, str]] = {}
    nodes = {n["id"]: n for n in cluster.store.list("node")}
    for task in cluster.store.list("task"):
        ip = task.get("addresses", {}).get(net["id"])
        if ip:
            containers[task["id"]] = {
                "Name": task["container"],
                "IPv4Address": f"{ip}/{net['subnet'].split('/')[1]}",
                "MacAddress": _mac(ip),
                "Node": task["node_id"],
            }
            _add_peer(peers, nodes.get(task["node_id"]))
    for att in cluster.store.list("attachment"):
        if att["network_id"] == net["id"]:
            containers[att["id"]] = {
                "Name": att["container"],
                "IPv4Address": f"{att['ip']}/{net['subnet'].split('/')[1]}",
                "MacAddress": _mac(att["ip"]),
                "Node": att["node_id"],
            }
            _add_peer(peers, nodes.get(att["node_id"]))
    options = {
        "com.docker.network.driver.overlay.vxlanid_list": ",".join(map(str, net["vnis"])),
        MTU_OPTION: str(net["mtu"]),
        **net["options"],
    }
    out: dict[str, Any] = {
        "Name": net["name"],
        "Id": net["id"],
        "Created": net["created"],
        "Scope": net["scope"],
        "Driver": net["driver"],
        "EnableIPv6": False,
        "Internal": net["internal"],
        "Attachable": net["attachable"],
        "Ingress": net["ingress"],
        "IPAM": {
            "Driver": "default",
            "Config": [
                {
                    "Subnet": net["subnet"],
                    "Gateway": net["gateway"],
                    **({"IPRange": net["ip_range"]} if net.get("ip_range") else {}),
                }
            ],
        },
        "Options": options,
        "Containers": containers,
    }
    if verbose:
        out["Peers"] = list(peers.values())
    return out


def _add_peer(peers: dict[str, dict[str, str]], node: dict[str, Any] | None) -> None:
    if node is not None:
        peers[node["id"]] = {"Name": node["hostname"], "IP": node["data_path_addr"]}


def _mac(ip: str) -> str:
    return "02:42:" + ":".join(f"{int(o):02x}" for o in ip.split("."))


def summary(net: dict[str, Any]) -> dict[str, Any]:
    """What an agent needs to program its dataplane for this network."""
    return {
        k: net[k]
        for k in (
            "id",
            "name",
            "vni",
            "subnet",
            "gateway",
            "mtu",
            "encrypted",
            "attachable",
            "ingress",
        )
    }


def ensure_ingress(cluster: Cluster, now: float) -> dict[str, Any]:
    """``swarm init`` creates the ``ingress`` overlay from the next free block of the pool."""
    existing = [n for n in cluster.store.list("network") if n["ingress"]]
    if existing:
        return existing[0]
    return create_network(cluster, INGRESS, now, ingress=True)
