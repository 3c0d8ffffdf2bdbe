"""Linux-kernel VXLAN endpoints: interop peers for a vxnet lab, and the baseline for ``bench``.

A *kernel VTEP* is a namespace with an underlay ``eth0``, a kernel ``vxlan`` device (unicast: no
remote, no group, no learning, so only static FDB entries say where a MAC lives) enslaved to a
bridge, and *kernel containers*: namespaces whose ``eth0`` is a veth on that bridge.  This is what
Docker's own overlay driver builds per network (``ov-<vni>-...`` bridge plus ``vxlan0``)::

    from vxnet.lab import Lab
    from vxnet.lab.kernel import add_kernel_vtep_host

    with Lab(hosts=1, name="demo") as lab:
        web = lab.run("h1", "web", "front", "whoami")
        vtep = add_kernel_vtep_host(lab, "kv", "192.168.100.200", vni=4097)
        kc = vtep.add_container("a", "10.0.1.200/24")
        vtep.add_peer(web["mac"], web["ip"], lab.host_address("h1"))   # bridge fdb + ip neigh
        lab.client("h1").post("/fdb", {"network": "front", "mac": kc.mac, "ip": kc.ip,
                                       "vtep": vtep.address})
        kc.exec(["ping", "-c1", web["ip"]])

vxnet never floods, so a kernel container learns vxnet MACs from permanent neighbour entries,
not from ARP.  :func:`kernel_pair` builds a whole two-host kernel-only topology (the bench
baseline) whose namespaces follow the lab naming, so ``vxnet lab down --name <lab>`` also
removes what a crashed run left behind.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import re
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pyroute2.netlink.rtnl.ndmsg import states as nud_states

from vxnet import netns
from vxnet.dataplane.tables import DEFAULT_MTU, DEFAULT_UNDERLAY_MTU, endpoint_mac
from vxnet.errors import LabError, UsageError
from vxnet.lab import Lab, builder
from vxnet.lab.topology import check_lab_name

__all__ = [
    "VXLAN_PORT",
    "KernelContainer",
    "KernelPair",
    "KernelVtep",
    "add_kernel_vtep_host",
    "kernel_pair",
]

VXLAN_PORT = 4789  # IANA; what Docker and vxnet use
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17  # legacy ethtool command: set TX checksum offload (ethtool -K dev tx off)
UNDERLAY_MTU = DEFAULT_UNDERLAY_MTU
_SUFFIX_RE = re.compile(r"^[a-z0-9]{1,10}$")
_PREFIX_RE = re.compile(r"^vx-([a-z0-9]{1,12})-$")


@dataclass(frozen=True, slots=True)
class KernelContainer:
    """A namespace whose ``eth0`` is a veth on a kernel VTEP's bridge."""

    namespace: str
    ip: str
    mac: str

    def exec(
        self, argv: Sequence[str], timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container; capture its output."""
        return subprocess.run(
            netns.exec_argv(self.namespace, argv), capture_output=True, text=True,
            timeout=timeout, check=check,
        )  # fmt: skip

    def add_neighbour(self, ip: str, mac: str) -> None:
        """A permanent ARP entry on ``eth0`` (``ip neigh replace IP lladdr MAC nud permanent``)."""
        _add_neighbour(self.namespace, ip, mac)


@dataclass(frozen=True, slots=True)
class KernelVtep:
    """A kernel VXLAN endpoint: ``vxlan`` device + bridge in ``namespace``, underlay ``address``.

    ``lab`` is set when the VTEP belongs to a vxnet lab: its containers are then recorded in the
    lab state so ``lab down`` removes them.
    """

    namespace: str
    vxlan: str
    bridge: str
    address: str
    vni: int
    mtu: int = DEFAULT_MTU
    lab: Lab | None = field(default=None, repr=False, compare=False)

    def container_namespaces(self) -> list[str]:
        return netns.list_with_prefix(self.namespace + ".")

    def add_container(self, name_suffix: str, ip_cidr: str) -> KernelContainer:
        """Namespace ``<vtep ns>.<name_suffix>``, ``eth0`` (MAC 02:42 + IPv4) on the bridge."""
        if not _SUFFIX_RE.match(name_suffix):
            raise UsageError(f"container suffix {name_suffix!r}: use 1-10 lowercase letters/digits")
        iface = ipaddress.IPv4Interface(ip_cidr)
        ns = f"{self.namespace}.{name_suffix}"
        mac = endpoint_mac(iface.ip).hex(":")
        port = f"c{name_suffix}"  # never clashes with eth0, lo, vxlan<vni>, br<vni>
        if self.lab is not None:  # record first, so `lab down` removes it even if we fail below
            self.lab.state["extra_namespaces"].append(ns)
            builder.save_state(self.lab.name, self.lab.state)
        netns.create(ns)
        netns.add_veth(self.namespace, port, ns, "eth0", mtu=self.mtu)
        netns.set_master(self.namespace, port, self.bridge)
        netns.set_link(ns, "eth0", state="down")
        netns.set_link(ns, "eth0", address=mac)
        netns.set_link(ns, "eth0", state="up")
        netns.add_address(ns, "eth0", str(iface.ip), iface.network.prefixlen)
        return KernelContainer(ns, str(iface.ip), mac)

    def add_peer(self, mac: str, ip: str, vtep: str) -> None:
        """Reach endpoint ``mac``/``ip`` behind underlay address ``vtep``.

        ``bridge fdb append MAC dev <vxlan> dst VTEP self permanent`` here, and a permanent
        neighbour entry in every container of this VTEP (containers added later need
        :meth:`KernelContainer.add_neighbour`).
        """
        with netns.ipr(self.namespace) as ipr:
            # pyroute2's fdb() defaults to NTF_SELF and NUD_PERMANENT|NUD_NOARP, as `bridge` does
            ipr.fdb("append", ifindex=netns.link_index(ipr, self.vxlan), lladdr=mac, dst=vtep)
        for ns in self.container_namespaces():
            _add_neighbour(ns, ip, mac)


@dataclass(frozen=True, slots=True)
class KernelPair:
    """Two kernel VTEP hosts on one fabric, one container each, peered both ways."""

    lab_name: str
    fabric: str
    vteps: tuple[KernelVtep, KernelVtep]
    containers: tuple[KernelContainer, KernelContainer]

    @property
    def namespaces(self) -> list[str]:
        return netns.list_with_prefix(builder.prefix(self.lab_name))


def _add_neighbour(ns: str, ip: str, mac: str) -> None:
    with netns.ipr(ns) as ipr:
        ipr.neigh(
            "replace", dst=ip, lladdr=mac, ifindex=netns.link_index(ipr, "eth0"),
            state=nud_states["permanent"],
        )  # fmt: skip


def add_kernel_vtep_host(
    lab: Lab, suffix: str, address: str, vni: int, mtu: int = DEFAULT_MTU
) -> KernelVtep:
    """A kernel VTEP on ``lab``'s fabric (namespace ``vx-<lab>-x<suffix>``), recorded in the lab."""
    ns = lab.add_fabric_namespace(suffix, address)
    # Frames on a real wire carry finished checksums; a veth passes CHECKSUM_PARTIAL ones on,
    # and a userspace VTEP receiving the datagram over a UDP socket would get inner TCP
    # segments holding only the pseudo-header sum.  Make this host's underlay port behave like
    # a wire: with TX checksumming off, the kernel finishes (and segments) before it sends.
    _tx_checksum_off(ns, "eth0")
    return _build_vtep(ns, address, vni, mtu, lab)


def _tx_checksum_off(ns: str, ifname: str) -> None:
    """``ethtool -K IFNAME tx off`` inside ``ns`` (no ethtool binary needed: one ioctl)."""

    def ioctl() -> None:
        value = array.array("I", [ETHTOOL_STXCSUM, 0])  # struct ethtool_value {cmd, data}
        ifreq = struct.pack("16sP16x", ifname.encode(), value.buffer_info()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCETHTOOL, ifreq)

    netns.run_in(ns, ioctl, f"turn TX checksum offload off on {ifname}")


def _build_vtep(ns: str, address: str, vni: int, mtu: int, lab: Lab | None) -> KernelVtep:
    if not 0 < vni < 1 << 24:
        raise UsageError(f"VNI {vni} out of range 1-16777215")
    vtep = KernelVtep(ns, f"vxlan{vni}", f"br{vni}", address, vni, mtu, lab)
    netns.add_bridge(ns, vtep.bridge)
    with netns.ipr(ns) as ipr:
        ipr.link(
            "add", ifname=vtep.vxlan, kind="vxlan", vxlan_id=vni, vxlan_local=address,
            vxlan_port=VXLAN_PORT, vxlan_learning=0, vxlan_link=netns.link_index(ipr, "eth0"),
        )  # fmt: skip
        ipr.link("set", index=netns.link_index(ipr, vtep.vxlan), mtu=mtu, state="up")
    netns.set_master(ns, vtep.vxlan, vtep.bridge)
    return vtep


@contextlib.contextmanager
def kernel_pair(
    prefix: str, vni: int = 4097, mtu: int = DEFAULT_MTU, underlay_mtu: int = UNDERLAY_MTU
) -> Iterator[KernelPair]:
    """Build the kernel-only two-host topology under ``prefix`` (``vx-<unused lab name>-``).

    Fabric ``<prefix>fabric`` (bridge ``fabric0``), hosts ``<prefix>h1``/``h2`` at
    192.168.100.11/.12, containers ``<prefix>h1.c``/``h2.c`` at 10.0.1.2/.3.  Everything under
    ``prefix`` is removed on exit, exceptions included.
    """
    m = _PREFIX_RE.match(prefix)
    if not m:
        raise UsageError(f"prefix {prefix!r} must look like vx-<lab name>-, e.g. vx-benchk-")
    name = check_lab_name(m.group(1))
    if builder.state_path(name).exists() or netns.list_with_prefix(prefix):
        raise UsageError(f"{prefix}* is in use: `vxnet lab down --name {name}` first")
    fabric = builder.fabric_ns(name)
    underlay = ipaddress.IPv4Network("192.168.100.0/24")
    try:
        netns.create(fabric)
        netns.add_bridge(fabric, builder.FABRIC_BRIDGE)
        vteps = []
        for i in (1, 2):
            host, address = f"h{i}", str(underlay.network_address + 10 + i)
            ns = builder.host_ns(name, host)
            netns.create(ns)
            netns.add_veth(fabric, host, ns, "eth0", mtu=underlay_mtu)
            netns.set_master(fabric, host, builder.FABRIC_BRIDGE)
            netns.add_address(ns, "eth0", address, underlay.prefixlen)
            vteps.append(_build_vtep(ns, address, vni, mtu, None))
        c1 = vteps[0].add_container("c", "10.0.1.2/24")
        c2 = vteps[1].add_container("c", "10.0.1.3/24")
        vteps[0].add_peer(c2.mac, c2.ip, vteps[1].address)
        vteps[1].add_peer(c1.mac, c1.ip, vteps[0].address)
        yield KernelPair(name, fabric, (vteps[0], vteps[1]), (c1, c2))
    finally:
        _remove_all(name)


def _remove_all(name: str) -> None:
    builder.down(name)
    left = netns.list_with_prefix(builder.prefix(name))
    if left:
        raise LabError(f"could not remove namespaces {left}")
