"""Containers: a network namespace whose ``eth0`` is a TAP held by the daemon, and a process.

Blocking (netlink, fork/exec): the daemon calls these through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pyroute2 import NetlinkError

from vxnet import netns
from vxnet.dataplane.tables import NetworkSpec, endpoint_mac
from vxnet.dataplane.tap import open_tap
from vxnet.errors import LabError, UsageError
from vxnet.files import write_private

TUNSETPERSIST = 0x400454CB

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,39}$")
IMAGES = ("whoami", "echo", "iperf3", "idle")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(
            f"invalid {kind} name {name!r}: use 1-40 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def image_argv(image: str, cmd: list[str]) -> list[str]:
    """What a container runs: ``cmd`` if given, else the built-in image's entry point."""
    if cmd:
        return cmd
    if image == "iperf3":
        binary = shutil.which("iperf3")
        if binary is None:
            raise UsageError("image iperf3 needs the iperf3 program (apt-get install iperf3)")
        return [binary, "-s"]
    if image not in IMAGES:
        raise UsageError(f"unknown image {image!r}: built-in images are {', '.join(IMAGES)}")
    return [sys.executable, "-m", "vxnet.images", image]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One interface of a container: ``eth<index>`` on ``network``."""

    network: str
    ip: str
    mac: str
    ifname: str

    def port_id(self, container: str) -> str:
        return f"{container}/{self.ifname}"


@dataclass
class Container:
    name: str
    endpoints: list[Endpoint]
    netns: str
    image: str
    cmd: list[str]
    task_id: str | None = None  # set for a swarm task, None for a standalone container
    attached: bool = False  # a standalone container on a swarm network (the manager's address)
    reported: bool = False  # its exit has been reported to the manager
    sandbox: bool = False  # a namespace with no process of its own (the ingress sandbox)
    gateway_ip: str = ""  # its address on docker_gwbridge, in a swarm
    gateway_veth: str = ""  # the host side of that interface
    publish: list[tuple[str, int, int]] = field(default_factory=list)  # (proto, host, target)
    aliases: list[str] = field(default_factory=list)  # --network-alias
    dns: list[str] = field(default_factory=list)  # --dns: upstreams of its 127.0.0.11
    service: dict[str, Any] | None = None  # a task's service, as the manager assigned it
    pid: int = 0
    created: float = field(default_factory=time.time)
    exit_code: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        return "running" if self.exit_code is None else f"exited ({self.exit_code})"

    def poll(self) -> None:
        if self.proc is not None and self.exit_code is None:
            code = self.proc.poll()
            if code is not None:
                self.exit_code = code
        elif self.proc is None and self.pid and self.exit_code is None and not _alive(self.pid):
            self.exit_code = ADOPTED_EXIT  # re-adopted after a restart: its status is unknown

    @property
    def network(self) -> str:
        return self.endpoints[0].network if self.endpoints else ""

    @property
    def ip(self) -> str:
        return self.endpoints[0].ip if self.endpoints else ""

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("proc",)}
        out["endpoints"] = [asdict(e) for e in self.endpoints]
        mac = self.endpoints[0].mac if self.endpoints else ""
        out.update(network=self.network, ip=self.ip, mac=mac, status=self.status)
        return out


#: the exit code shown for a re-adopted container whose process ended (its parent, the daemon
#: that started it, died: nobody can read the real code)
ADOPTED_EXIT = -1
STATE_FILE = "containers.json"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def save_containers(path: Path, containers: list[Container]) -> None:
    """What a restarted daemon needs to re-adopt its containers (TAPs persist: TUNSETPERSIST)."""
    write_private(path, json.dumps([c.to_json() for c in containers], indent=1))


def load_containers(path: Path) -> list[Container]:
    """The containers a previous run of this daemon left, whose namespaces still exist."""
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise LabError(f"unreadable container state {path}: {exc}") from None
    names = {f.name for f in fields(Container)} - {"proc", "endpoints"}
    out = []
    for row in rows:
        c = Container(
            endpoints=[Endpoint(**e) for e in row["endpoints"]],
            **{k: v for k, v in row.items() if k in names},
        )
        c.publish = [(str(p[0]), int(p[1]), int(p[2])) for p in c.publish]
        if netns.exists(c.netns):
            out.append(c)
    return out


def reopen_taps(container: Container) -> list[int]:
    """The TAP fds of a container whose daemon died: its persistent TAPs, opened by name
    inside its namespace (where they live as eth0, eth1, ...)."""

    def reopen() -> list[int]:
        fds: list[int] = []
        try:
            for e in container.endpoints:
                fds.append(open_tap(e.ifname))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return netns.call_in(container.netns, reopen)


def create_container(
    ns_prefix: str, name: str, attach: list[tuple[NetworkSpec, ipaddress.IPv4Address]]
) -> tuple[str, list[tuple[Endpoint, int]]]:
    """Build the namespace with one TAP per network (``eth0``, ``eth1``, ...).

    Returns the namespace name and, per endpoint, the TAP fd the daemon now holds.  The default
    route goes through the first network's gateway, as Docker's first network does.
    """
    ns = ns_prefix + name
    netns.create(ns)
    made: list[tuple[Endpoint, int]] = []
    try:
        for index, (spec, ip) in enumerate(attach):
            endpoint = Endpoint(spec.name, str(ip), endpoint_mac(ip).hex(":"), f"eth{index}")
            made.append((endpoint, _add_tap(ns, endpoint, spec)))
        if attach:  # a task on no network has only its loopback, as in Docker (gwbridge aside)
            netns.add_route(ns, "0.0.0.0/0", gateway=str(attach[0][0].gateway))
    except Exception:
        for _, fd in made:
            os.close(fd)
        netns.remove(ns)
        raise
    return ns, made


def _add_tap(ns: str, endpoint: Endpoint, spec: NetworkSpec) -> int:
    """The endpoint's TAP, made inside the container's namespace under its final name.

    The calling thread visits the namespace (:func:`netns.call_in`): the TAP is born there, so
    it is never moved or renamed, and one netlink socket configures it.
    """

    def make() -> int:
        fd = open_tap(endpoint.ifname)
        try:
            # persistent: it outlives this daemon, so a restarted one re-adopts the container
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
            with netns.ipr(None) as ip:  # this thread is in the namespace: bound there
                index = netns.link_index(ip, endpoint.ifname)
                ip.link("set", index=index, address=endpoint.mac, mtu=spec.mtu)
                ip.addr("add", index=index, address=endpoint.ip, prefixlen=spec.subnet.prefixlen)
                ip.link("set", index=index, state="up")
        except Exception:
            os.close(fd)
            raise
        return fd

    try:
        return netns.call_in(ns, make)
    except (OSError, NetlinkError) as exc:  # refused: a clear error, and the caller unwinds
        raise LabError(f"cannot make {endpoint.ifname} in {ns}: {exc}") from None


def start_process(ns: str, name: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, VXNET_CONTAINER=name, HOSTNAME=name)
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # root-only, as the rest
    with os.fdopen(fd, "ab") as log:
        try:
            return subprocess.Popen(
                netns.exec_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise LabError(f"cannot start {argv[0]!r} in container {name}: {exc}") from None


def destroy_container(container: Container) -> None:
    """Kill every process in the container's namespace and delete the namespace."""
    netns.remove(container.netns)
    if container.proc is not None:
        try:
            container.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            container.proc.kill()
        container.poll()


def stop_container(container: Container) -> None:
    netns.kill_pids(netns.pids_in(container.netns))
    if container.proc is not None:
        try:
            container.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            container.proc.kill()
            container.proc.wait()
    container.poll()
