"""The switch's state, one object per thing: a network (VNI), a local port, their counters.

Plain classes with ``__slots__`` and attributes, not dataclasses: the hot path in
:mod:`vxnet.dataplane.switch` reads and increments them per frame, and an attribute on a
slotted object is the cheapest thing Python has.  Only :meth:`Switch.apply` creates or
changes them, from the records of :mod:`vxnet.dataplane.tables`.
"""

from __future__ import annotations

from typing import Any

from vxnet.dataplane.lb import LoadBalancer, Vip
from vxnet.dataplane.tables import NetworkSpec
from vxnet.dataplane.vnet import PLAIN
from vxnet.wire.vxlan import vxlan_header

ETH_HLEN = 14


class Counters:
    """Per-network counters: plain attributes, the cheapest thing Python can increment."""

    __slots__ = (
        "arp_replies",
        "drops",
        "esp_rx",
        "esp_tx",
        "gso_rx",
        "gso_tx",
        "lb_active",
        "lb_new",
        "local_bytes",
        "local_frames",
        "nd_replies",
        "rx_bytes",
        "rx_frames",
        "tx_bytes",
        "tx_frames",
    )

    def __init__(self) -> None:
        self.rx_frames = self.rx_bytes = 0  # decapsulated from the underlay
        self.tx_frames = self.tx_bytes = 0  # encapsulated onto the underlay
        self.local_frames = self.local_bytes = 0  # switched between two local TAPs
        self.arp_replies = self.nd_replies = 0
        self.esp_rx = self.esp_tx = 0  # of the frames above, how many travelled as ESP
        self.gso_rx = self.gso_tx = 0  # of the frames above, how many were TCP super-frames
        self.lb_new = self.lb_active = 0  # VIP connections opened, and in the table now
        self.drops: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["drops"] = dict(self.drops)
        return out


class Port:
    """A local endpoint: a TAP fd on one network."""

    __slots__ = ("fd", "ip", "mac", "net", "offload", "plain", "port_id", "vnet")

    def __init__(
        self, port_id: str, fd: int, mac: bytes, ip: bytes, net: Net, vnet: bool = False
    ) -> None:
        self.port_id = port_id
        self.fd = fd
        self.mac = mac
        self.ip = ip
        self.net = net
        self.vnet = vnet  # frames on this fd carry a virtio_net_hdr
        self.plain = PLAIN if vnet else b""  # the header of a frame with nothing to offload
        self.offload = vnet and net.offload  # partial checksums and super-frames both ways


class Net:
    """One VNI's switch state."""

    __slots__ = (
        "counters",
        "encrypted",
        "hdr",
        "lb",
        "lb_macs",
        "local",
        "max_frame",
        "neigh",
        "offload",
        "remote",
        "spec",
        "vni",
    )

    def __init__(self, spec: NetworkSpec, offload: bool = False) -> None:
        self.spec = spec
        # TAP offloads for this network's ports; never with ESP (it cannot carry super-frames)
        self.offload = offload and not spec.encrypted
        self.vni = spec.vni
        self.hdr = vxlan_header(spec.vni)
        self.encrypted = spec.encrypted
        self.max_frame = ETH_HLEN + spec.mtu
        self.local: dict[bytes, Port] = {}  # MAC -> local port
        self.remote: dict[bytes, tuple[str, int]] = {}  # MAC -> (VTEP address, port): the FDB
        self.neigh: dict[bytes, bytes] = {spec.gateway.packed: spec.gateway_mac}  # IP -> MAC
        self.counters = Counters()
        self.lb: LoadBalancer | None = None  # VIP load balancing, once a service or LB is set
        # the MACs the load balancer handles (VIPs -> Vip, the LB's own -> None): one lookup
        # per frame, on an empty dict for networks without services
        self.lb_macs: dict[bytes, Vip | None] = {}


def drop(counters: Counters, reason: str) -> None:
    """Count one dropped frame under ``reason`` (the drop counters are keyed by reason)."""
    counters.drops[reason] = counters.drops.get(reason, 0) + 1
