"""Labs: several Docker-like hosts, an underlay fabric and vxnet daemons on one machine.

The Python API, used by the CLI, the demo and the tests::

    from vxnet.lab import Lab

    with Lab(hosts=3) as lab:                  # `vxnet lab up`, and `lab down` on exit
        lab.run("h1", "web", "front", "whoami")
        lab.run("h2", "client", "front", "idle")
        print(lab.exec("client", ["ping", "-c1", lab.ip("web")]).stdout)

Until the manager and gossip exist, the lab itself is the control plane: it allocates container
addresses across hosts and programs every host's FDB and neighbour table with every other host's
containers (``sync_peers``), origin ``lab``.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vxnet import netns
from vxnet.capture import finish_capture, start_capture
from vxnet.client import DaemonClient
from vxnet.errors import Conflict, LabError, NotFound, UsageError, VxnetError
from vxnet.lab import builder, fault
from vxnet.lab.impair import Impairment
from vxnet.lab.topology import LabSpec, default_spec, load_spec

__all__ = ["Lab", "LabSpec"]


#: How long a swarm lab waits for the FDBs to agree with the endpoints.  Longer than networkdb's
#: periodic bulk sync (30 s): a table event that gossip lost (a busy machine, a full socket
#: buffer) is repaired by the next one, as in Docker, and the lab should not call that a failure.
SYNC_TIMEOUT = 40.0


class Lab:
    """A running lab (``Lab(...)`` builds one; ``Lab.attach(name)`` reattaches to one)."""

    def __init__(
        self,
        hosts: int = 3,
        name: str = "vxnet",
        spec: LabSpec | None = None,
        swarm: bool = True,
        file: str | Path | None = None,
        *,
        _attach: bool = False,
    ) -> None:
        if _attach:
            self.name = name
            self.state = builder.load_state(name)
            return
        if spec is None:
            spec = (
                load_spec(Path(file), name=name, hosts=hosts)
                if file
                else default_spec(name, hosts, swarm)
            )
        self.name = spec.name
        self.state = builder.up(spec)
        try:
            for c in spec.containers:
                self.run(c.host, c.name, c.network, c.image, ip=c.ip)
            for f in spec.faults:  # the lab file's [[fault]]s, as `vxnet lab fault` would
                if f.partition is not None:
                    fault.add_partition(self.name, f.partition)
                elif f.impairment is not None:
                    fault.add_impairment(
                        self.name, f.impairment, host=f.host, link=f.link, seed=f.seed
                    )
        except BaseException:
            self.down()
            raise

    @classmethod
    def attach(cls, name: str) -> Lab:
        return cls(name=name, _attach=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def down(self) -> list[str]:
        return builder.down(self.name)

    # ------------------------------------------------------------------------ addressing

    @property
    def hosts(self) -> list[str]:
        return list(self.state["hosts"])

    def client(self, host: str, timeout: float = 30.0) -> DaemonClient:
        return builder.client(self.state, host, timeout)

    def host_address(self, host: str) -> str:
        return str(self.state["hosts"][host]["address"])

    def host_netns(self, host: str) -> str:
        return str(self.state["hosts"][host]["netns"])

    @property
    def fabric_netns(self) -> str:
        return str(self.state["fabric"]["netns"])

    def containers(self) -> dict[str, dict[str, Any]]:
        """Every container of every host, by name, with its ``host``."""
        out: dict[str, dict[str, Any]] = {}
        for host in self.hosts:
            for c in self.client(host).get("/containers"):
                out[c["name"]] = dict(c, host=host)
        return out

    def find(self, name: str) -> dict[str, Any]:
        c = self.containers().get(name)
        if c is None:
            raise NotFound(f"no such container: {name}")
        return c

    def ip(self, name: str) -> str:
        return str(self.find(name)["ip"])

    # ------------------------------------------------------------------------ containers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(builder.run_dir(self.name) / "lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run(
        self,
        host: str,
        name: str,
        network: str,
        image: str = "idle",
        cmd: Sequence[str] = (),
        ip: str | None = None,
        *,
        publish: Sequence[str] = (),
        aliases: Sequence[str] = (),
        dns: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Start a container on ``host`` and tell every other host about it.

        ``publish``: ``HOST:CONTAINER[/udp|/sctp]`` ports (swarm networks: through
        docker_gwbridge); ``aliases``: extra DNS names on its network (``--network-alias``);
        ``dns``: up to 3 upstream servers for names that are not the swarm's (``--dns``).
        """
        with self._locked():
            existing = self.containers()
            if name in existing:
                raise Conflict(
                    f'the container name "{name}" is already in use (on {existing[name]["host"]})'
                )
            manual = {n["name"] for n in self.state["networks"]} if not self.swarm else set()
            if ip is None and network in manual:  # swarm networks: the manager allocates
                ip = self._free_ip(network, existing)
            body = {
                "name": name,
                "network": network,
                "image": image,
                "cmd": list(cmd),
                "ip": ip,
                "publish": list(publish),
                "aliases": list(aliases),
                "dns": list(dns),
            }
            created: dict[str, Any] = self.client(host).post("/containers", body)
            self.sync_peers()
        return dict(created, host=host)

    def _free_ip(self, network: str, existing: dict[str, dict[str, Any]]) -> str:
        nets = {n["name"]: n for n in self.state["networks"]}
        if network not in nets:
            raise NotFound(f"network {network} not found")
        subnet = ipaddress.IPv4Network(nets[network]["subnet"])
        used = {
            e["ip"] for c in existing.values() for e in c["endpoints"] if e["network"] == network
        }
        used.add(str(next(subnet.hosts())))  # the gateway
        for row in self.client(self.hosts[0]).get("/fdb"):
            if row["network"] == network:
                used.add(row["ip"])
        for ip in subnet.hosts():
            if str(ip) not in used:
                return str(ip)
        raise Conflict(f"no free address left in {network} ({subnet})")

    def rm(self, name: str, force: bool = True) -> None:
        with self._locked():
            c = self.find(name)
            self.client(c["host"]).delete(f"/containers/{name}?force={int(force)}")
            self.sync_peers()

    def sync_peers(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Peers everywhere: in a swarm, wait for gossip to program them; else program them.

        In a swarm every node learns the others' endpoints from networkdb's overlay_peer_table,
        so this only waits until each host's gossip-programmed FDB equals the other hosts'
        endpoints on the networks it has.  In a manual lab the lab is the control plane: it
        makes every host's lab-origin FDB equal to the other hosts' endpoints.
        """
        if self.swarm:
            self._wait_gossip_peers(timeout)
        else:
            self._program_lab_peers()

    def expected_peers(self, host: str, endpoints: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """The remote endpoints ``host`` must know: those on networks where it has endpoints
        itself (a node joins a network's gossip with its first local endpoint, as in Docker)."""
        local_nets = {e["network"] for e in endpoints if e["host"] == host}
        return {
            (e["network"], e["mac"])
            for e in endpoints
            if e["host"] != host and e["network"] in local_nets
        }

    def _wait_gossip_peers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            endpoints = [
                dict(e, host=host)
                for host in self.hosts
                for e in self.client(host).get("/endpoints")
            ]
            missing: dict[str, Any] = {}
            for host in self.hosts:
                want = self.expected_peers(host, endpoints)
                rows = {
                    (r["network"], r["mac"]): r
                    for r in self.client(host).get("/fdb")
                    if r["origin"] == "gossip"
                }
                have = set(rows)
                if want != have:
                    stale = [(*k, rows[k]["ip"], rows[k]["vtep"]) for k in sorted(have - want)]
                    missing[host] = {"missing": sorted(want - have), "stale": stale}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"gossip did not converge in {timeout:.0f}s: {missing}"
                    + self._stale_evidence(missing)
                    + self._log_tails(sorted(missing))
                )
            time.sleep(0.1)

    def _stale_evidence(self, missing: dict[str, Any]) -> str:
        """For each stale FDB row: what the host's networkdb and its claims say of that MAC."""
        out = []
        for host, diff in sorted(missing.items()):
            macs = {row[1] for row in diff["stale"]}
            if not macs:
                continue
            try:
                tables = self.client(host).get("/gossip/tables")
                claims = self.client(host).get("/gossip/claims")
            except VxnetError as exc:
                out.append(f"--- {host}: no evidence ({exc})")
                continue
            for mac in sorted(macs):
                out.append(f"--- {host}, stale MAC {mac}:")
                out += [
                    f"  networkdb {r['key']} owner {r['owner']} l={r['ltime']} "
                    f"deleting={r['deleting']} hidden={r['hidden']}"
                    for r in tables
                    if r.get("endpoint_mac") == mac
                ]
                out += [
                    f"  claim {c['key']} l={c['ltime']} vtep {c['vtep']} "
                    f"programmed={c['programmed']}"
                    for c in claims
                    if c["mac"] == mac
                ]
        return "\n" + "\n".join(out) if out else ""

    def _program_lab_peers(self) -> None:
        endpoints = [
            dict(e, host=c["host"]) for c in self.containers().values() for e in c["endpoints"]
        ]
        for host in self.hosts:
            cl = self.client(host)
            local_nets = {n["name"] for n in cl.get("/networks")}
            want = {
                (e["network"], e["mac"]): e
                for e in endpoints
                if e["host"] != host and e["network"] in local_nets
            }
            have = {(r["network"], r["mac"]): r for r in cl.get("/fdb") if r["origin"] == "lab"}
            for key in have.keys() - want.keys():
                cl.delete(f"/fdb/{key[0]}/{key[1]}")
            for key, e in want.items():
                vtep = self.data_address(e["host"])
                row = have.get(key)
                if row is None or row["vtep"] != vtep or row["ip"] != e["ip"]:
                    body = {"network": e["network"], "mac": e["mac"], "ip": e["ip"], "vtep": vtep}
                    cl.post("/fdb", dict(body, origin="lab"))

    def _log_tails(self, hosts: list[str], lines: int = 25) -> str:
        """The end of each host's daemon log, for an error that has to explain itself."""
        return "".join(
            f"\n--- the last lines of {h}'s daemon log:\n"
            + builder.log_tail(Path(self.state["hosts"][h]["log"]), lines)
            for h in hosts
            if h in self.state["hosts"]
        )

    @property
    def swarm(self) -> bool:
        return "swarm" in self.state

    @property
    def manager(self) -> DaemonClient:
        """The swarm manager's daemon (the first host)."""
        return self.client(self.state["swarm"]["manager"] if self.swarm else self.hosts[0])

    def converge(self, timeout: float = 30.0) -> None:
        """Wait until every host runs exactly the tasks the manager assigned it, then sync peers."""
        deadline = time.monotonic() + timeout
        while self.swarm:
            want: dict[str, str] = {}
            for svc in self.manager.get("/services"):
                for t in self.manager.get(f"/services/{svc['name']}/tasks"):
                    want[t["container"]] = t["node"]
            have = {n: c["host"] for n, c in self.containers().items() if c.get("task_id")}
            if want == have:
                break
            if time.monotonic() > deadline:
                hosts = {want[n] for n in set(want) ^ set(have) if n in want}
                hosts |= {have[n] for n in set(want) ^ set(have) if n in have}
                raise LabError(
                    f"tasks did not converge in {timeout:.0f}s: want {want}, have {have}"
                    + self._log_tails(sorted(hosts | {self.hosts[0]}))
                )
            time.sleep(0.1)
        self.sync_peers()

    def data_address(self, host: str) -> str:
        """The host's VTEP address (its data-path address)."""
        return str(self.state["hosts"][host].get("data_path_addr") or self.host_address(host))

    def exec(
        self, name: str, argv: Sequence[str], timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside container ``name``; capture its output."""
        c = self.find(name)
        return subprocess.run(
            netns.exec_argv(c["netns"], argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def exec_host(
        self, host: str, argv: Sequence[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a host's namespace (where its daemon and underlay live)."""
        if host not in self.state["hosts"]:
            raise UsageError(f"no host {host!r} in lab {self.name}")
        return subprocess.run(
            netns.exec_argv(self.host_netns(host), argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stats(self, host: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client(host).get("/dataplane/stats")
        return result

    def restart(self, host: str) -> dict[str, Any]:
        result = builder.restart(self.name, host)
        self.state = builder.load_state(self.name)
        self.sync_peers()
        return result

    # ------------------------------------------------------------------- fault injection

    def fault(
        self,
        host: str | None = None,
        link: tuple[str, str] | None = None,
        *,
        loss: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Impair a host's fabric cables, or the link between two hosts (as ``lab fault``).

        ``loss``, ``duplicate`` and ``reorder`` are shares (0.1 = 10 %); ``delay`` and ``jitter``
        are seconds.  Returns what is in force, with the relays' counters.
        """
        imp = Impairment(loss, delay, jitter, duplicate, reorder)
        return fault.add_impairment(self.name, imp, host=host, link=link, seed=seed)

    def partition(self, groups: str) -> dict[str, Any]:
        """``"h1,h2/h3"``: the fabric drops everything between the two groups."""
        return fault.add_partition(self.name, groups)

    def clear_faults(self) -> dict[str, Any]:
        return fault.clear(self.name)

    def faults(self) -> dict[str, Any]:
        return fault.show(self.name)

    # -------------------------------------------------------- swarm networks and services

    def create_network(
        self,
        name: str,
        *,
        attachable: bool = True,
        encrypted: bool = False,
        subnet: str | None = None,
        options: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``vxnet network create -d overlay [--attachable] [--opt encrypted] NAME``."""
        opts = [*options, *(["encrypted"] if encrypted else [])]
        body = {"name": name, "attachable": attachable, "subnet": subnet, "options": opts}
        net: dict[str, Any] = self.manager.post("/swarm/networks", body)
        return net

    def create_service(
        self,
        name: str,
        image: str = "whoami",
        *,
        replicas: int | None = None,
        networks: Sequence[str] = (),
        ports: Sequence[str] = (),
        mode: str = "replicated",
        endpoint_mode: str = "vip",
    ) -> dict[str, Any]:
        """``vxnet service create``; returns once every task runs and peers are programmed."""
        body = {"name": name, "image": image, "replicas": replicas, "networks": list(networks),
                "ports": list(ports), "mode": mode, "endpoint_mode": endpoint_mode}  # fmt: skip
        svc: dict[str, Any] = self.manager.post("/services", body)
        self.converge()
        return svc

    def scale_service(self, name: str, replicas: int) -> None:
        self.manager.post(f"/services/{name}/scale", {"replicas": replicas})
        self.converge()

    def remove_service(self, name: str) -> None:
        self.manager.delete(f"/services/{name}")
        self.converge()

    # ------------------------------------------------------------------------ captures

    def capture(
        self,
        on: str = "fabric",
        count: int = 100,
        timeout: float = 3.0,
        udp_port: int | None = None,
    ) -> Capture:
        """Start capturing frames: on the whole ``fabric``, a host's fabric port, or a
        container's ``eth0``.  ``with lab.capture(...) as cap: ...`` then ``cap.frames``; dissect
        them with :func:`vxnet.trace.describe` (or ``vxnet trace`` on the command line)."""
        if on == "fabric":
            where = (self.fabric_netns, builder.FABRIC_BRIDGE)
        elif on in self.state["hosts"]:
            where = (self.fabric_netns, str(self.state["hosts"][on]["fabric_port"]))
        else:
            where = (str(self.find(on)["netns"]), "eth0")
        return Capture(start_capture(*where, count=count, timeout=timeout, udp_port=udp_port),
                       timeout)  # fmt: skip

    # ----------------------------------------------------- extra namespaces on the fabric

    def add_fabric_namespace(self, suffix: str, address: str) -> str:
        """A plain namespace plugged into the fabric with ``address`` (a client, a kernel VTEP).

        It is recorded in the lab's state so ``lab down`` removes it.
        """
        if not suffix.isalnum() or len(suffix) > 10:
            raise UsageError("suffix: up to 10 letters or digits")
        ns = f"{builder.prefix(self.name)}x{suffix}"
        self.state["extra_namespaces"].append(ns)
        builder.save_state(self.name, self.state)
        netns.create(ns)
        port = f"x{suffix}"
        netns.add_veth(self.fabric_netns, port, ns, "eth0", mtu=self.state["underlay"]["mtu"])
        netns.set_master(self.fabric_netns, port, builder.FABRIC_BRIDGE)
        prefixlen = ipaddress.IPv4Network(self.state["underlay"]["subnet"]).prefixlen
        netns.add_address(ns, "eth0", address, prefixlen)
        return ns


class Capture:
    """A capture running in the background; its frames once the ``with`` block ends."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float) -> None:
        self._proc = proc
        self._timeout = timeout
        self.frames: list[bytes] = []

    def __enter__(self) -> Capture:
        time.sleep(0.2)  # the capturing socket is open before the caller sends anything
        return self

    def __exit__(self, *exc: object) -> None:
        self.frames = finish_capture(self._proc, self._timeout)
