"""TAP devices: the container's ``eth0`` is the far end of a file descriptor the daemon holds.

Every container TAP is opened with ``IFF_VNET_HDR``: each frame read or written carries a
``virtio_net_hdr`` (:mod:`vxnet.dataplane.vnet`).  Whether the kernel may hand us unfinished
checksums and TCP super-frames is a second, per-device switch (:func:`set_offload`), which the
dataplane flips when the port is added: on for plain networks, off for encrypted ones and under
``--no-offload``.  The underlay TAP (:func:`open_underlay_tap`) is the host's own, through which
whole VXLAN super-frames leave (kernel UDP-tunnel GSO, Linux 6.17+).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from pathlib import Path

from vxnet.dataplane.vnet import HDR_LEN, TUNNEL_HDR_LEN

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# TUNSETOFFLOAD flags: what the kernel may hand to the reader (and, for tunnels, take from it)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_UDP_TUNNEL_GSO = 0x80
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100
#: A container TAP with offloads: partial checksums and TCP super-frames both ways.
CONTAINER_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
UNDERLAY_OFFLOADS = CONTAINER_OFFLOADS | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM
_IFREQ = struct.Struct("16sH22x")
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCGIFHWADDR = 0x8927
_IFF_UP = 0x1
_IFF_NOARP = 0x80


def open_tap(name: str) -> int:
    """Create (or re-attach to) TAP ``name`` in the caller's namespace; a non-blocking fd.

    The one way to open a container TAP, for new and re-opened (persistent) ones alike: with
    ``IFF_VNET_HDR``, the default 10-byte header, and no offloads until the dataplane sets them.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
    except OSError:
        os.close(fd)
        raise
    return fd


def has_vnet_hdr(fd: int) -> bool:
    """True if ``fd`` is a TAP whose frames carry a ``virtio_net_hdr`` (False for anything else)."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError:
        return False
    return bool(_IFREQ.unpack(ifr)[1] & IFF_VNET_HDR)


def set_offload(fd: int, flags: int) -> bool:
    """Set a TAP's offloads (0: none); False if the kernel refuses them."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError:
        return False
    return True


def open_underlay_tap(name: str) -> tuple[int, bytes] | None:
    """The host's underlay TAP for whole VXLAN super-frames: ``(fd, its MAC)``, or None when
    this kernel has no TAP UDP-tunnel GSO (before 6.17) and the caller must segment itself.

    A frame written to it enters the host's IP stack as if received on ``name`` and is forwarded
    out of the underlay like any routed packet (not fragmented: GSO keeps it whole over veth, and
    any device that cannot take it whole segments it in the kernel).  It carries the VTEP's own
    source address, so ``name`` accepts local sources, forwards, and has no reverse-path filter.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", TUNNEL_HDR_LEN))
        if not set_offload(fd, UNDERLAY_OFFLOADS):
            os.close(fd)
            return None
        conf = Path("/proc/sys/net/ipv4/conf") / name
        for key, value in (("forwarding", "1"), ("accept_local", "1"), ("rp_filter", "0")):
            (conf / key).write_text(value)
        v6 = Path("/proc/sys/net/ipv6/conf") / name / "disable_ipv6"
        if v6.exists():
            v6.write_text("1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16s16x", name.encode())
            mac = fcntl.ioctl(s, _SIOCGIFHWADDR, req)[18:24]
            iff = struct.unpack_from("H", fcntl.ioctl(s, _SIOCGIFFLAGS, req), 16)[0]
            up = iff | _IFF_UP | _IFF_NOARP
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), up))
    except OSError:
        os.close(fd)
        raise
    return fd, bytes(mac)
