"""Crash recovery: a restarted daemon re-adopts the containers its predecessor left behind.

A daemon holds its containers' TAPs.  They are made persistent (``TUNSETPERSIST``), so when the
daemon dies -- ``kill -9`` included -- the TAPs, the namespaces, their docker_gwbridge links and
the containers' processes all stay; only the frames stop.  The daemon writes what it needs to
take them back (``containers.json``, on every change).  Its successor reads it, and as soon as a
container's networks are programmed again (from the manager's assignments in a swarm, from the
lab in a manual lab) it re-opens the TAPs by name inside the container's namespace, hands them to
the dataplane and republishes the endpoints.  Traffic resumes; nothing is re-created.  This is
what containerlab and Mininet users ask for and do not get.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import trio

from vxnet import netns
from vxnet.daemon import containers as ctr
from vxnet.dataplane.tables import AddPort, endpoint_mac
from vxnet.errors import VxnetError

if TYPE_CHECKING:
    from vxnet.daemon.service import Daemon

log = logging.getLogger("vxnet.adopt")


class Adoption:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        path = daemon.config.state_dir / ctr.STATE_FILE
        self.waiting: dict[str, ctr.Container] = {c.name: c for c in ctr.load_containers(path)}
        self.adopted: list[str] = []
        self.lost: list[str] = []

    async def try_adopt(self) -> None:
        """Adopt every waiting container whose networks are all programmed now."""
        d = self.daemon
        ready = [
            c for c in self.waiting.values() if all(e.network in d.networks for e in c.endpoints)
        ]
        if not ready:
            return
        async with d.lock:
            for c in ready:
                del self.waiting[c.name]
                try:
                    fds = await trio.to_thread.run_sync(ctr.reopen_taps, c)
                except (VxnetError, OSError) as exc:
                    log.warning("cannot re-adopt %s: %s", c.name, exc)
                    await self._lose(c)
                    continue
                for e, fd in zip(c.endpoints, fds, strict=True):
                    ip = ipaddress.IPv4Address(e.ip)
                    spec = d.networks[e.network]
                    await d.program(AddPort(spec.vni, e.port_id(c.name), fd, endpoint_mac(ip), ip))
                d.containers[c.name] = c
                d.mesh.restore(c)
                self.adopted.append(c.name)
                log.info("re-adopted %s (pid %d) on %s", c.name, c.pid,
                         ", ".join(e.network for e in c.endpoints) or "no network")  # fmt: skip
            d.persist()
        for c in ready:
            if c.name not in d.containers:
                continue
            if d.peers is not None:
                for e in c.endpoints:
                    await d.peers.endpoint_up(c.name, e, d.networks[e.network])
            if d.discovery is not None:
                await d.discovery.container_up(c)
        await d.mesh.apply_rules()

    async def drop_unassigned(self, networks: set[str]) -> None:
        """The manager's assignments arrived: a container still waiting on a network this node
        no longer has will never be adopted: it is lost (and its namespace removed)."""
        for c in list(self.waiting.values()):
            if any(e.network not in networks for e in c.endpoints):
                del self.waiting[c.name]
                await self._lose(c)

    async def _lose(self, c: ctr.Container) -> None:
        self.lost.append(c.name)
        await trio.to_thread.run_sync(netns.remove, c.netns)

    def to_json(self) -> dict[str, Any]:
        return {"waiting": sorted(self.waiting), "adopted": self.adopted, "lost": self.lost}
