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
DEFAULT_MTU = DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD  # 1450, Docker's overlay default


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
    """The manager's ``networking:ipsec`` keyring: (Lamport tag, 16-byte key) x 3."""

    keys: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class ResetEspPeer:
    """A peer restarted (new gossip identity): its sequence numbers start again at 1."""

    vtep: ipaddress.IPv4Address


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
)
