"""Network namespace and link helpers (pyroute2), shared by the lab, the daemon, bench and tests.

All functions here are blocking netlink calls: trio code calls them through
``trio.to_thread.run_sync``.  Every function that removes something is idempotent, because the
cleanup paths (``lab down`` after a crash, test finalizers) must be safe to run twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, netns

from vxnet.errors import LabError

NETNS_DIR = Path("/var/run/netns")
IFNAMSIZ = 15


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    """Create namespace ``name``, IPv4 only, with its loopback up.

    Every namespace vxnet makes (hosts, fabric, containers) carries IPv4 only, as its overlays
    do: IPv6 goes off before any link exists, so no link ever sends a router solicitation, DAD
    or MLD report into a capture a learner is reading.
    """
    if exists(name):
        raise LabError(f"network namespace {name!r} already exists")
    netns.create(name)
    for scope in ("default", "all"):  # "default" is what links made or moved in later get
        sysctl(name, f"net.ipv6.conf.{scope}.disable_ipv6", "1")
    with ipr(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> None:
    """Kill every process left in namespace ``name``, then delete it.  Idempotent."""
    if not exists(name):
        return
    kill_pids(pids_in(name))
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def list_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


@contextlib.contextmanager
def ipr(ns: str | None = None) -> Iterator[IPRoute]:
    """An ``IPRoute`` bound to namespace ``ns`` (the caller's own when None).

    The netlink socket is made by the calling thread visiting ``ns`` (:func:`call_in`): it
    stays bound there.  pyroute2's own ``IPRoute(netns=...)`` forks a child to make it, which
    costs ~7 ms instead of ~0.6 and, in the threaded daemon, risks a child deadlocked on a
    lock another thread held.
    """
    sock = call_in(ns, IPRoute) if ns else IPRoute()
    try:
        yield sock
    finally:
        sock.close()


def link_index(ip: IPRoute, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"no interface {ifname!r}")
    return int(found[0])


def interface_of(address: str, ns: str | None = None) -> tuple[str, int] | None:
    """(name, MTU) of the interface that holds IPv4 ``address`` in ``ns``, or None."""
    with ipr(ns) as ip:
        for a in ip.get_addr(family=socket.AF_INET):
            # IFA_LOCAL is this end's address (IFA_ADDRESS is the peer's on point-to-point links)
            if (a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")) == address:
                (link,) = ip.get_links(a["index"])
                return str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU"))
    return None


def add_bridge(ns: str, name: str) -> None:
    with ipr(ns) as ip:
        ip.link("add", ifname=name, kind="bridge")
        ip.link("set", index=link_index(ip, name), state="up")


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str, mtu: int = 1500) -> None:
    """A veth pair with end ``name_a`` in ``ns_a`` and ``name_b`` in ``ns_b``, both up."""
    _check_ifname(name_a)
    _check_ifname(name_b)
    with ipr(ns_a) as ip:
        ip.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": ns_b})
        ip.link("set", index=link_index(ip, name_a), mtu=mtu, state="up")
    with ipr(ns_b) as ip:
        ip.link("set", index=link_index(ip, name_b), mtu=mtu, state="up")


def set_master(ns: str, ifname: str, bridge: str) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=link_index(ip, ifname), master=link_index(ip, bridge))


def add_address(ns: str, ifname: str, address: str, prefixlen: int) -> None:
    with ipr(ns) as ip:
        ip.addr("add", index=link_index(ip, ifname), address=address, prefixlen=prefixlen)


def set_link(ns: str | None, link: str, **attrs: object) -> None:
    """``ip link set`` with pyroute2 attributes (mtu=, address=, state=, ifname=, net_ns_fd=)."""
    with ipr(ns) as ip:
        ip.link("set", index=link_index(ip, link), **attrs)


def add_route(ns: str, dst: str, gateway: str | None = None, ifname: str | None = None) -> None:
    with ipr(ns) as ip:
        kwargs: dict[str, object] = {"dst": dst}
        if gateway:
            kwargs["gateway"] = gateway
        if ifname:
            kwargs["oif"] = link_index(ip, ifname)
        ip.route("add", **kwargs)


def run_in(ns: str, action: Callable[[], object], what: str) -> None:
    """Run ``action`` in a forked child that has entered namespace ``ns``.

    For the few kernel calls that act on "the namespace I am in" (sysctls, ethtool ioctls):
    the caller's own namespace, and its threads', stay untouched.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            netns.setns(ns)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise LabError(f"could not {what} in namespace {ns}")


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise LabError(f"setns: {os.strerror(ctypes.get_errno())}")


def call_in(ns: str, make: Callable[[], T]) -> T:
    """Call ``make()`` with the calling *thread* in namespace ``ns``, then move it back.

    For what must be made inside a namespace and used from outside it (a socket, a TAP fd: they
    stay bound to the namespace they were made in).  Blocking: trio code calls it through
    ``trio.to_thread.run_sync``; only the calling thread moves.
    """
    _check_ns_name(ns)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LabError(f"no network namespace {ns!r}") from None
        try:
            _setns(target)
            try:
                return make()
            finally:
                _setns(own)  # the thread goes back to its pool: never leave it elsewhere
        finally:
            os.close(target)
    finally:
        os.close(own)


def _check_ns_name(ns: str) -> None:
    if not ns or "/" in ns or ns in (".", ".."):
        raise LabError(f"{ns!r} is not a network namespace name")


def sysctl(ns: str, key: str, value: str) -> None:
    """Write a ``net.*`` sysctl inside namespace ``ns`` (``/proc/sys/net`` is per thread's
    namespace, so the calling thread visits it: no fork of a big, threaded daemon)."""
    path = Path("/proc/sys/" + key.replace(".", "/"))
    try:
        call_in(ns, lambda: path.write_text(value))
    except OSError as exc:
        raise LabError(f"could not set {key}={value} in namespace {ns}: {exc}") from None


def enter(name: str) -> None:
    """Move the calling process's network namespace to ``name`` (call before starting threads)."""
    netns.setns(name)


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``ns`` (own mount ns, /etc/netns binds)."""
    return ["ip", "netns", "exec", ns, *argv]


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name``."""
    target = _ns_id(str(NETNS_DIR / name))
    if target is None:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ns_id(f"/proc/{entry.name}/ns/net") == target:
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    alive = [p for p in pids if p != os.getpid() and _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _is_alive(p)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":  # a zombie of ours: reap it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _check_ifname(name: str) -> None:
    if not name or len(name) > IFNAMSIZ or "/" in name or " " in name:
        raise LabError(f"interface name {name!r} must be 1-{IFNAMSIZ} characters")
