"""docker_gwbridge's data path: a kernel bridge in the host, veths to containers, nftables NAT.

Docker gives every container on an overlay network a second interface on the node's
``docker_gwbridge`` (a bridge network, ICC off, masquerade on) and makes it the container's
default route, so traffic that leaves the swarm is masqueraded by the node.  Published ports
are DNAT rules in the host namespace:

* routing mesh (``--publish mode=ingress``): host ``:P`` -> the ingress sandbox's address on
  docker_gwbridge; in the sandbox, ``:P`` -> the service's ingress VIP, still port ``P`` (the
  load balancer maps the published port to the target port when it picks a task);
* ``mode=host`` and standalone ``run -p``: host ``:P`` -> the container's gwbridge address.

ICC off is bridge-port isolation (``IFLA_BRPORT_ISOLATED``): isolated ports cannot reach each
other, but all of them reach the bridge itself, i.e. the gateway.  Docker does the same with an
iptables DROP on bridged traffic, which needs br_netfilter; isolation works with it on or off
(with it on, bridged frames meet the NAT chains with the bridge as in/out interface, so the
``iifname != bridge`` / ``oifname != bridge`` rules leave them alone).

Blocking (netlink, fork, the ``nft`` program): the daemon calls these through
``trio.to_thread.run_sync``.  Removal is idempotent.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from pyroute2 import IPRoute, NetlinkError

from vxnet import netns, nft
from vxnet.errors import Conflict, LabError, UsageError

TABLE = "vxnet"
FAMILY = "ip"
PROTOCOLS = ("tcp", "udp", "sctp")
Protocol = Literal["tcp", "udp", "sctp"]
#: What docker calls the ingress sandbox's interface on docker_gwbridge (eth0 is on ingress).
SANDBOX_GW_IFNAME = "eth1"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


# -- rules: pure records and renderers ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dnat:
    """A published port: ``protocol``/``port`` is rewritten to ``to_ip``:``to_port``."""

    protocol: Protocol
    port: int
    to_ip: IPv4Address
    to_port: int

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"protocol {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        for what, port in (("port", self.port), ("to_port", self.to_port)):
            if not 1 <= port <= 65535:
                raise UsageError(f"published {what} {port} must be 1-65535")
        if not isinstance(self.to_ip, IPv4Address):
            raise UsageError(f"DNAT target {self.to_ip!r} must be an IPv4Address")

    def match(self) -> str:
        return f"{self.protocol} dport {self.port}"

    def action(self) -> str:
        return f"dnat to {self.to_ip}:{self.to_port}"


@dataclass(frozen=True, slots=True)
class HostRules:
    """The host's table ``ip vxnet``: published ports, and masquerade of the bridge's subnet."""

    bridge: str
    subnet: IPv4Network
    masquerade: bool
    publish: list[Dnat] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SandboxRules:
    """The ingress sandbox's table ``ip vxnet``: published ports on to the ingress VIPs.

    ``ifname`` is the sandbox's interface on docker_gwbridge.  With ``snat_ifname`` set (the
    sandbox's ingress interface), published-port connections leaving there are masqueraded to
    the sandbox's address, as Docker SNATs to the ingress endpoint IP, so that a task's reply
    comes back through this sandbox (and the client's address is hidden, as in Docker).
    """

    publish: list[Dnat] = field(default_factory=list)
    ifname: str = SANDBOX_GW_IFNAME
    snat_ifname: str | None = None


def render(rules: HostRules | SandboxRules) -> str:
    """The body of table ``ip vxnet`` for ``rules`` (pure: same rules, same text)."""
    if isinstance(rules, HostRules):
        return _render_host(rules)
    return _render_sandbox(rules)


def _render_host(rules: HostRules) -> str:
    bridge = _quoted_ifname(rules.bridge)
    published = _sorted_unique(rules.publish)
    # Packets for one of this host's own addresses, from anywhere but the bridge (a container's
    # hairpin back through the bridge would also need masquerade to see its replies).
    pre = [f"iifname != {bridge} fib daddr type local {d.match()} {d.action()}" for d in published]
    # The host's own processes reach published ports too (not via 127/8, as in Docker).
    local = "ip daddr != 127.0.0.0/8 fib daddr type local"
    out = [f"{local} {d.match()} {d.action()}" for d in published]
    post = [f"ip saddr {rules.subnet} oifname != {bridge} masquerade"] if rules.masquerade else []
    return "\n".join(
        [
            *_chain("prerouting", "prerouting", "dstnat", pre),
            *_chain("output", "output", "-100", out),
            *_chain("postrouting", "postrouting", "srcnat", post),
        ]
    )


def _render_sandbox(rules: SandboxRules) -> str:
    ifname = _quoted_ifname(rules.ifname)
    pre = [f"iifname {ifname} {d.match()} {d.action()}" for d in _sorted_unique(rules.publish)]
    post = []
    if rules.snat_ifname is not None:
        post = [f"oifname {_quoted_ifname(rules.snat_ifname)} ct status dnat masquerade"]
    return "\n".join(
        [
            *_chain("prerouting", "prerouting", "dstnat", pre),
            *_chain("postrouting", "postrouting", "srcnat", post),
        ]
    )


def _chain(name: str, hook: str, priority: str, rules: Sequence[str]) -> list[str]:
    head = f"\ttype nat hook {hook} priority {priority}; policy accept;"
    return [f"chain {name} {{", head, *(f"\t{r}" for r in rules), "}"]


def _sorted_unique(publish: Iterable[Dnat]) -> list[Dnat]:
    seen: dict[tuple[str, int], Dnat] = {}
    for d in sorted(set(publish), key=lambda d: (d.protocol, d.port, int(d.to_ip), d.to_port)):
        other = seen.setdefault((d.protocol, d.port), d)
        if other != d:
            raise Conflict(
                f"port {d.port}/{d.protocol} is published twice: to {other.to_ip}:{other.to_port} "
                f"and to {d.to_ip}:{d.to_port}"
            )
    return list(seen.values())


def _quoted_ifname(name: str) -> str:
    _check_ifname(name)
    return f'"{name}"'


def _check_ifname(name: str) -> None:
    if not _IFNAME.match(name):
        raise UsageError(f"interface name {name!r}: 1-15 letters, digits, '_', '.' or '-'")


def apply_host_rules(host_ns: str, rules: HostRules) -> None:
    """Replace the host's table ``ip vxnet`` by ``rules``, atomically."""
    nft.apply_table(host_ns, FAMILY, TABLE, render(rules))


def apply_sandbox_rules(sandbox_ns: str, rules: SandboxRules) -> None:
    """Replace the ingress sandbox's table ``ip vxnet`` by ``rules``, atomically."""
    nft.apply_table(sandbox_ns, FAMILY, TABLE, render(rules))


def remove_rules(ns: str) -> None:
    """Delete table ``ip vxnet`` from ``ns``.  Idempotent."""
    nft.delete_table(ns, FAMILY, TABLE)


def prepare_sandbox(ns: str) -> None:
    """Let the ingress sandbox forward between its docker_gwbridge and ingress interfaces."""
    netns.sysctl(ns, "net.ipv4.ip_forward", "1")


# -- the bridge and its ports -----------------------------------------------------------------


def ensure_bridge(
    host_ns: str, name: str, subnet: IPv4Network, gateway: IPv4Address, mtu: int = 1500
) -> None:
    """Make ``name`` a bridge holding ``gateway``/prefix in ``host_ns``, up; forwarding on.

    A bridge that already has that address is kept as it is (its ports stay).  A bridge with
    another IPv4 address, or a non-bridge of that name, is an error.
    """
    _check_ifname(name)
    if gateway not in subnet:
        raise UsageError(f"gateway {gateway} is not in subnet {subnet}")
    with netns.ipr(host_ns) as ip:
        index = _bridge_index(ip, name, gateway)
        addresses = _ipv4_addresses(ip, index)
        if (str(gateway), subnet.prefixlen) not in addresses:
            if addresses:
                have = ", ".join(f"{a}/{p}" for a, p in addresses)
                raise LabError(
                    f"bridge {name} in {host_ns} has address {have}, not {gateway}/"
                    f"{subnet.prefixlen}: remove it or give the network its subnet"
                )
            ip.addr("add", index=index, address=str(gateway), prefixlen=subnet.prefixlen)
        ip.link("set", index=index, mtu=mtu, state="up")
    netns.sysctl(host_ns, "net.ipv4.ip_forward", "1")


def remove_bridge(host_ns: str, name: str) -> None:
    """Delete bridge ``name`` from ``host_ns`` (its veths stay, unenslaved).  Idempotent."""
    _delete_link(host_ns, name)


def _bridge_index(ip: IPRoute, name: str, gateway: IPv4Address) -> int:
    found = ip.link_lookup(ifname=name)
    if not found:
        # A fixed MAC (02:42 + the gateway's address) so it does not follow its ports' MACs.
        ip.link("add", ifname=name, kind="bridge", address=_mac(gateway))
        return netns.link_index(ip, name)
    link = ip.get_links(found[0])[0]
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "bridge":
        raise LabError(f"interface {name} exists and is a {kind or 'device'}, not a bridge")
    return int(found[0])


def _ipv4_addresses(ip: IPRoute, index: int) -> list[tuple[str, int]]:
    return [
        (str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
        for a in ip.get_addr(index=index, family=socket.AF_INET)
    ]


def attach(
    host_ns: str,
    bridge: str,
    container_ns: str,
    ifname: str,
    ip: IPv4Address,
    prefixlen: int,
    gateway: IPv4Address,
    *,
    icc: bool,
    mtu: int = 1500,
) -> str:
    """Put ``container_ns`` on ``bridge`` as ``ifname`` = ``ip``/``prefixlen``.

    The container's default route is replaced by one via ``gateway`` on ``ifname`` (an overlay's
    default route, if it had one, is gone: Docker routes out through docker_gwbridge).  With
    ``icc`` False the bridge port is isolated.  Returns the host-side veth's name.
    """
    _check_ifname(ifname)
    veth = "vxg" + secrets.token_hex(6)
    try:
        netns.add_veth(host_ns, veth, container_ns, ifname, mtu=mtu)
    except NetlinkError as exc:
        raise LabError(f"cannot add veth {veth} / {container_ns}:{ifname}: {exc}") from None
    try:
        _enslave(host_ns, veth, bridge, isolated=not icc)
        _address_and_route(container_ns, ifname, ip, prefixlen, gateway)
    except NetlinkError as exc:
        detach(host_ns, veth)
        raise LabError(f"cannot attach {container_ns} to {bridge} in {host_ns}: {exc}") from None
    except BaseException:
        detach(host_ns, veth)
        raise
    return veth


def _address_and_route(
    ns: str, ifname: str, ip: IPv4Address, prefixlen: int, gateway: IPv4Address
) -> None:
    with netns.ipr(ns) as ipr:
        index = netns.link_index(ipr, ifname)
        ipr.link("set", index=index, state="down", address=_mac(ip))
        ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=index)


def detach(host_ns: str, veth: str) -> None:
    """Delete the host-side veth (its container end goes with it).  Idempotent."""
    _delete_link(host_ns, veth)


def _enslave(host_ns: str, veth: str, bridge: str, *, isolated: bool) -> None:
    with netns.ipr(host_ns) as ip:
        index = netns.link_index(ip, veth)
        ip.link("set", index=index, master=netns.link_index(ip, bridge))
        if not isolated:
            return
        try:
            ip.brport("set", index=index, isolated=1)
        except NetlinkError:
            _isolate_with_iproute2(host_ns, veth)


def _isolate_with_iproute2(host_ns: str, veth: str) -> None:
    argv = netns.exec_argv(host_ns, ["bridge", "link", "set", "dev", veth, "isolated", "on"])
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot isolate bridge port {veth}: {exc}") from None
    if proc.returncode != 0:
        raise LabError(f"cannot isolate bridge port {veth}: {proc.stderr.strip()}")


def _delete_link(ns: str, name: str) -> None:
    if not netns.exists(ns):
        return
    with netns.ipr(ns) as ip:
        found = ip.link_lookup(ifname=name)
        if found:
            with contextlib.suppress(NetlinkError):  # gone meanwhile (its peer's netns died)
                ip.link("del", index=found[0])


def _mac(address: IPv4Address) -> str:
    """Docker's MAC for an address: 02:42 and the four octets."""
    return "02:42:" + ":".join(f"{b:02x}" for b in address.packed)
