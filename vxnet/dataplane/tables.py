"""The narrow interface between the control plane and the per-frame hot path.

The control plane (trio, the lab, later gossip and the manager) never touches the switch's
dictionaries.  It describes *what it wants* with the frozen records below and hands them to
:meth:`vxnet.dataplane.engine.Dataplane.submit`; the dataplane thread applies them between
frames.  This file is the whole vocabulary of that conversation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Underlay IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): the VXLAN tax.
VXLAN_OVERHEAD = 50
DEFAULT_UNDERLAY_MTU = 1500
MIN_UNDERLAY_MTU = 1280  # a swarm's: room for a 576-byte network MTU with VXLAN and ESP
MAX_UNDERLAY_MTU = 9000  # jumbo frames
DEFAULT_MTU = DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD  # 1450, Docker's overlay default


def default_network_mtu(underlay_mtu: int) -> int:
    """Docker's default network MTU, unless the underlay is too small for it.  A bigger
    underlay is used only by asking (``com.docker.network.driver.mtu``), as in Docker."""
    return min(DEFAULT_MTU, underlay_mtu - VXLAN_OVERHEAD)


def endpoint_mac(ip: ipaddress.IPv4Address) -> bytes:
    """Docker's endpoint MAC: ``02:42`` followed by the four IPv4 octets."""
    return b"\x02\x42" + ip.packed


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """One overlay network as the dataplane sees it: a VNI, an L2 segment and its MTU."""

    name: str
    vni: int
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    mtu: int = DEFAULT_MTU
    encrypted: bool = False  # every VXLAN datagram travels as ESP; plaintext is dropped

    @property
    def gateway_mac(self) -> bytes:
        return endpoint_mac(self.gateway)


@dataclass(frozen=True, slots=True)
class AddNetwork:
    spec: NetworkSpec


@dataclass(frozen=True, slots=True)
class RemoveNetwork:
    vni: int


@dataclass(frozen=True, slots=True)
class AddPort:
    """A local container endpoint: its TAP file descriptor (owned by the daemon) on a network."""

    vni: int
    port_id: str
    fd: int
    mac: bytes
    ip: IPAddress


@dataclass(frozen=True, slots=True)
class RemovePort:
    port_id: str


@dataclass(frozen=True, slots=True)
class AddPeer:
    """A remote endpoint: Docker's ``PeerRecord{EndpointIP, EndpointMAC, TunnelEndpointIP}``.

    Programs one FDB entry (MAC -> VTEP) and one neighbour entry (IP -> MAC), both permanent.
    ``origin`` says who installed it (``lab``, ``manual``, later ``gossip``) so that one source
    never removes another's entries.
    """

    vni: int
    mac: bytes
    ip: IPAddress
    vtep: ipaddress.IPv4Address
    origin: Literal["lab", "manual", "gossip"] = "manual"


@dataclass(frozen=True, slots=True)
class RemovePeer:
    vni: int
    mac: bytes


@dataclass(frozen=True, slots=True)
class SetUnderlay:
    """Move the VTEP: listen and send on ``address``:``port`` (``--data-path-addr``/``-port``)."""

    address: str
    port: int


@dataclass(frozen=True, slots=True)
class SetIpsecKeys:
    """The manager's ``networking:ipsec`` keyring: (Lamport tag, 16-byte key) x 3, and the
    swarm's ICV length (16, or 8 as Docker), fixed at ``swarm init``."""

    keys: tuple[tuple[int, bytes], ...]
    icv_len: int = 16


@dataclass(frozen=True, slots=True)
class ResetEspPeer:
    """A peer restarted (new gossip identity): its sequence numbers start again at 1."""

    vtep: ipaddress.IPv4Address


# ------------------------------------------------------------------ VIP load balancing


@dataclass(frozen=True, slots=True)
class SetLoadBalancer:
    """This node's load-balancer address on network ``vni`` (Docker's ``lb-<network>`` endpoint).

    Connections to a VIP leave this node SNATed to ``ip`` (MAC ``endpoint_mac(ip)``), so replies
    come back here.  ``ip`` may be a local port's own address (the ingress sandbox): replies that
    match no connection then go on to that port.  Other nodes need a peer record for it.
    """

    vni: int
    ip: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class Backend:
    """One task behind a VIP.  Weight 0 drains it: its connections go on, new ones avoid it."""

    ip: ipaddress.IPv4Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class PortMap:
    """A published port of the routing mesh: ``published`` on the VIP -> ``target`` on a task."""

    protocol: Literal["tcp", "udp"]
    published: int
    target: int


@dataclass(frozen=True, slots=True)
class SetService:
    """A service VIP on network ``vni`` and its backends: sent again, it replaces them.

    Empty ``ports``: VIP mode, any TCP/UDP port to the VIP goes to the same port on a backend.
    Otherwise only the published ports are served (the ingress network's routing mesh).
    A backend missing from a new record has its TCP connections reset and its UDP flows dropped.
    """

    vni: int
    vip: ipaddress.IPv4Address
    backends: tuple[Backend, ...]
    ports: tuple[PortMap, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveService:
    vni: int
    vip: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class LbSettings:
    """Connection-table timeouts in seconds (idle time since the last packet) and its size.

    Unlike IPVS (900 s for an established connection, which silently kills idle TCP:
    moby#31208), an established connection lives 7500 s idle: longer than Linux's default
    ``tcp_keepalive_time`` of 7200 s, so a keepalive probe refreshes the entry before it expires.
    A half-closed connection (one FIN seen) may legitimately carry data in the other direction
    for as long as it likes; IPVS gives it 60 s and then resets it (moby#29655), we give it the
    established timeout.  SYN handshakes and TIME_WAIT get ``tcp_transitory`` (as nf_conntrack),
    a reset connection ``tcp_closed``.  A UDP flow lives ``udp_idle`` until a reply was seen,
    then ``udp_assured_idle`` (nf_conntrack's 30 s / 180 s).  When ``max_connections`` entries
    exist on one network, new connections are dropped (``lb_table_full``).
    """

    tcp_established_idle: float = 7500.0
    tcp_half_closed_idle: float = 7500.0
    tcp_transitory: float = 120.0
    tcp_closed: float = 10.0
    udp_idle: float = 30.0
    udp_assured_idle: float = 180.0
    max_connections: int = 65536


TableUpdate = (
    AddNetwork
    | RemoveNetwork
    | AddPort
    | RemovePort
    | AddPeer
    | RemovePeer
    | SetUnderlay
    | SetIpsecKeys
    | ResetEspPeer
    | SetLoadBalancer
    | SetService
    | RemoveService
    | LbSettings
)
