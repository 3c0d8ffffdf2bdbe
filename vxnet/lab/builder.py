"""Building and tearing down a lab: namespaces, the fabric bridge, veths and the daemons.

Names (namespace names are files under /var/run/netns, shared with the whole machine):

* fabric:     ``vx-<lab>-fabric``  with bridge ``fabric0`` (no address: the root namespace
  and the fabric have no route into the lab)
* host:       ``vx-<lab>-<host>``  with ``eth0`` on the fabric (its veth peer is named ``<host>``)
* container:  ``vx-<lab>-<host>.<container>``

Lab and host names admit no ``-`` or ``.``, so one lab's prefix never matches another's, and
``lab down`` can remove by prefix even when the state file is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vxnet import netns
from vxnet.client import DaemonClient, DaemonUnavailable
from vxnet.errors import LabError, NotFound, UsageError
from vxnet.files import write_private
from vxnet.lab.topology import HostSpec, LabSpec, check_lab_name

RUN_ROOT = Path(os.environ.get("VXNET_RUN_DIR", "/run/vxnet"))
FABRIC_BRIDGE = "fabric0"
ADOPT_TIMEOUT = 20.0  # seconds a restarted daemon gets to take its containers back
DATA_BRIDGE = "data0"  # the second underlay, when the lab separates data from control
DAEMON_START_TIMEOUT = 15.0


def prefix(lab: str) -> str:
    return f"vx-{lab}-"


def fabric_ns(lab: str) -> str:
    return f"vx-{lab}-fabric"


def host_ns(lab: str, host: str) -> str:
    return f"vx-{lab}-{host}"


def container_prefix(lab: str, host: str) -> str:
    return f"vx-{lab}-{host}."


def run_dir(lab: str) -> Path:
    return RUN_ROOT / lab


def state_path(lab: str) -> Path:
    return run_dir(lab) / "lab.json"


def load_state(lab: str) -> dict[str, Any]:
    try:
        data = json.loads(state_path(lab).read_text())
    except FileNotFoundError:
        raise NotFound(f"no lab named {lab!r} is up (`vxnet lab ls` lists them)") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"lab {lab}: unreadable state file {state_path(lab)}: {exc}") from None
    if not isinstance(data, dict):
        raise LabError(f"lab {lab}: state file is not a JSON object")
    return data


def save_state(lab: str, state: dict[str, Any]) -> None:
    write_private(state_path(lab), json.dumps(state, indent=1))


def list_labs() -> list[str]:
    names = set()
    if RUN_ROOT.is_dir():
        names |= {p.name for p in RUN_ROOT.iterdir() if (p / "lab.json").exists()}
    for ns in netns.list_with_prefix("vx-"):
        names.add(ns.split("-")[1])
    return sorted(names)


# ------------------------------------------------------------------------------------ up


def up(spec: LabSpec) -> dict[str, Any]:
    """Build the whole lab; on any failure tear down what was built and re-raise."""
    lab = check_lab_name(spec.name)
    if state_path(lab).exists() or netns.list_with_prefix(prefix(lab)):
        raise UsageError(f"lab {lab!r} is already up: `vxnet lab down --name {lab}` first")
    d = run_dir(lab)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    state: dict[str, Any] = {
        "name": lab,
        "created": time.time(),
        "fabric": {"netns": fabric_ns(lab), "bridge": FABRIC_BRIDGE},
        "underlay": {"subnet": str(spec.underlay), "mtu": spec.underlay_mtu},
        "data_port": spec.data_port,
        "hosts": {},
        "networks": [_net_json(n) for n in spec.networks],
        "extra_namespaces": [],
    }
    save_state(lab, state)
    try:
        netns.create(fabric_ns(lab))
        netns.add_bridge(fabric_ns(lab), FABRIC_BRIDGE)
        if spec.data_subnet is not None:
            netns.add_bridge(fabric_ns(lab), DATA_BRIDGE)
            state["data_underlay"] = {"subnet": str(spec.data_subnet), "bridge": DATA_BRIDGE}
        for host in spec.hosts:
            state["hosts"][host.name] = _build_host(lab, host, spec)
            save_state(lab, state)
        for host in spec.hosts:
            state["hosts"][host.name]["pid"] = spawn_daemon(lab, state, host.name)
            save_state(lab, state)
        for host in spec.hosts:
            wait_daemon(lab, state, host.name)
        if spec.swarm:
            form_swarm(state, spec)
        else:
            for host in spec.hosts:
                program_networks(lab, state, host.name)
        save_state(lab, state)
    except DaemonUnavailable as exc:  # say why: the daemon's own last words
        known = exc.host in state["hosts"]
        tail = log_tail(Path(state["hosts"][exc.host]["log"]), 25) if known else ""
        down(lab)
        raise LabError(f"lab {lab}: {exc}\n--- the last lines of its log:\n{tail}") from None
    except BaseException:
        down(lab)
        raise
    return state


def _net_json(n: Any) -> dict[str, Any]:
    out = asdict(n)
    out["subnet"] = str(n.subnet)
    return out


def _build_host(lab: str, host: HostSpec, spec: LabSpec) -> dict[str, Any]:
    ns = host_ns(lab, host.name)
    netns.create(ns)
    netns.add_veth(fabric_ns(lab), host.name, ns, "eth0", mtu=spec.underlay_mtu)
    netns.set_master(fabric_ns(lab), host.name, FABRIC_BRIDGE)
    netns.add_address(ns, "eth0", str(host.address), spec.underlay.prefixlen)
    d = run_dir(lab)
    extra: dict[str, Any] = {}
    if spec.data_subnet is not None:  # eth1 on the data underlay, same host number
        offset = int(host.address) - int(spec.underlay.network_address)
        data_addr = spec.data_subnet.network_address + offset
        netns.add_veth(fabric_ns(lab), f"{host.name}d", ns, "eth1", mtu=spec.underlay_mtu)
        netns.set_master(fabric_ns(lab), f"{host.name}d", DATA_BRIDGE)
        netns.add_address(ns, "eth1", str(data_addr), spec.data_subnet.prefixlen)
        extra = {"data_path_addr": str(data_addr), "data_if": "eth1", "data_port": f"{host.name}d"}
    return {
        **extra,
        "netns": ns,
        "underlay_if": "eth0",
        "address": str(host.address),
        "fabric_port": host.name,
        "socket": str(d / f"{host.name}.sock"),
        "log": str(d / f"{host.name}.log"),
        "state_dir": str(d / host.name),
        "pid": 0,
    }


def spawn_daemon(lab: str, state: dict[str, Any], host: str) -> int:
    """Start ``vxnet daemon`` for ``host`` (detached, in its own session); return its pid."""
    h = state["hosts"][host]
    argv = [
        sys.executable,
        "-m",
        "vxnet",
        "daemon",
        "--host",
        host,
        "--netns",
        h["netns"],
        "--socket",
        h["socket"],
        "--state-dir",
        h["state_dir"],
        "--underlay-addr",
        h["address"],
        "--data-port",
        str(state["data_port"]),
        "--container-prefix",
        container_prefix(lab, host),
    ]
    log_fd = os.open(h["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        return os.posix_spawn(
            sys.executable, argv, dict(os.environ), file_actions=actions, setsid=True
        )
    finally:
        os.close(log_fd)


def client(state: dict[str, Any], host: str, timeout: float = 30.0) -> DaemonClient:
    hosts = state["hosts"]
    if host not in hosts:
        raise NotFound(f"lab {state['name']} has no host {host!r} (hosts: {', '.join(hosts)})")
    return DaemonClient(hosts[host]["socket"], host=host, timeout=timeout)


def wait_daemon(lab: str, state: dict[str, Any], host: str) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    c = client(state, host, timeout=2.0)
    pid = state["hosts"][host]["pid"]
    while True:
        try:
            c.get("/info")
            return
        except DaemonUnavailable:
            if not daemon_alive(pid) or time.monotonic() > deadline:
                tail = log_tail(Path(state["hosts"][host]["log"]))
                raise LabError(f"lab {lab}: the daemon of {host} did not start:\n{tail}") from None
            time.sleep(0.05)


def form_swarm(state: dict[str, Any], spec: LabSpec) -> None:
    """`swarm init` on the first host, `swarm join` with the real token on the others, and the
    lab file's networks created through the manager (attachable overlays, fixed VNIs)."""
    first = spec.hosts[0].name
    manager = client(state, first)
    hosts = state["hosts"]

    def addresses(host: str) -> dict[str, str]:
        """--advertise-addr (2377, 7946) and --data-path-addr (VXLAN, ESP) of a host."""
        h = hosts[host]
        return {"advertise_addr": h["address"],
                "data_path_addr": h.get("data_path_addr") or h["address"]}  # fmt: skip

    manager.post("/swarm/init", {"key_rotation_interval": spec.key_rotation_interval,
                                 "data_path_port": spec.data_port,
                                 "esp_icv_length": spec.esp_icv_length,
                                 "underlay_mtu": spec.underlay_mtu,
                                 **addresses(first)})  # fmt: skip
    token = manager.get("/swarm/join-token/worker")["token"]
    remote = f"{hosts[first]['address']}:2377"
    for host in spec.hosts[1:]:
        client(state, host.name).post(
            "/swarm/join", {"token": token, "remote": remote, **addresses(host.name)}
        )
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while not all(n["status"] == "ready" for n in manager.get("/nodes")):  # agents said hello
        if time.monotonic() > deadline:
            raise LabError(
                f"lab {state['name']}: nodes did not become ready: {manager.get('/nodes')}"
            )
        time.sleep(0.05)
    for net in spec.networks:
        manager.post("/swarm/networks", {
            "name": net.name, "driver": "overlay", "attachable": True, "subnet": str(net.subnet),
            "options": [f"com.docker.network.driver.overlay.vxlanid_list={net.vni}",
                        f"com.docker.network.driver.mtu={net.mtu}"],
        })  # fmt: skip
    state["swarm"] = {"manager": first, "manager_addr": remote}


def program_networks(lab: str, state: dict[str, Any], host: str) -> None:
    c = client(state, host)
    existing = {n["name"] for n in c.get("/networks")}
    for net in state["networks"]:
        if net["name"] not in existing:
            c.post("/networks", net)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- liveness


def daemon_alive(pid: int) -> bool:
    """True if ``pid`` is a live vxnet daemon (a recycled pid running something else is not)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return b"vxnet\x00daemon" in cmdline


def stop_daemon(pid: int, grace: float = 3.0) -> None:
    if not daemon_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while daemon_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if daemon_alive(pid):
        os.kill(pid, signal.SIGKILL)
        while daemon_alive(pid) and time.monotonic() < deadline + 2:
            time.sleep(0.05)


# -------------------------------------------------------------------------- down, restart


def down(lab: str) -> list[str]:
    """Remove everything lab ``lab`` made.  Idempotent; works without a state file too."""
    check_lab_name(lab)
    removed: list[str] = []
    try:
        state: dict[str, Any] | None = load_state(lab)
    except (NotFound, LabError):
        state = None
    if state is not None:
        for h in state.get("hosts", {}).values():
            stop_daemon(int(h.get("pid", 0)))
        for ns in state.get("extra_namespaces", []):
            netns.remove(ns)
            removed.append(ns)
    names = netns.list_with_prefix(prefix(lab))
    # containers before hosts before the fabric, so no veth outlives its peer for long
    names.sort(key=lambda n: (0 if "." in n else 2 if n == fabric_ns(lab) else 1, n))
    for ns in names:
        netns.remove(ns)
        removed.append(ns)
    shutil.rmtree(run_dir(lab), ignore_errors=True)
    return removed


def restart(lab: str, host: str) -> dict[str, Any]:
    """Start ``host``'s daemon again (after a crash, or to test one).

    The containers stay: their TAPs are persistent, so the new daemon re-adopts them (see
    :mod:`vxnet.daemon.adopt`) as soon as their networks are programmed again -- by the manager
    in a swarm, by the lab here in a manual lab.  Returns which were adopted and which were lost.
    """
    state = load_state(lab)
    h = state["hosts"].get(host)
    if h is None:
        raise NotFound(f"lab {lab} has no host {host!r}")
    stop_daemon(int(h.get("pid", 0)))
    h["pid"] = spawn_daemon(lab, state, host)
    save_state(lab, state)
    wait_daemon(lab, state, host)
    if "swarm" not in state:  # a swarm node rejoins (and a manager resumes) by itself
        program_networks(lab, state, host)
    daemon = client(state, host)
    deadline = time.monotonic() + ADOPT_TIMEOUT
    adoption = daemon.get("/adoption")
    while adoption["waiting"] and time.monotonic() < deadline:
        time.sleep(0.1)
        adoption = daemon.get("/adoption")
    owned = {c["netns"] for c in daemon.get("/containers")} | {
        container_prefix(lab, host) + "ingress-sbox"
    }
    stray = [ns for ns in netns.list_with_prefix(container_prefix(lab, host)) if ns not in owned]
    for ns in stray:  # nobody will adopt these (their state was lost): do not leak them
        netns.remove(ns)
    lost = sorted(set(adoption["lost"]) | {ns.split(".", 1)[1] for ns in stray})
    return {"host": host, "pid": h["pid"], "adopted": adoption["adopted"], "lost_containers": lost}


def inspect(lab: str) -> dict[str, Any]:
    state = load_state(lab)
    for h in state["hosts"].values():
        h["daemon_running"] = daemon_alive(int(h.get("pid", 0)))
    return state
