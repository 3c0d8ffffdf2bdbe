"""The switch's narrow table-update interface, and what it shows of its tables.

The control plane changes the dataplane only through :meth:`SwitchTables.apply`, with the
records of :mod:`vxnet.dataplane.tables`, applied on the dataplane's own thread between two
batches of frames; the per-frame code in :mod:`vxnet.dataplane.switch` only reads what is
built here.  The read side (``stats``, ``fdb``, ``lb_table``, ``conntrack``) copies what it
shows, so another thread may call it.

:class:`~vxnet.dataplane.switch.Switch` inherits this; the split keeps the hot path's module
about frames and this one about tables.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vxnet.dataplane.gro import Coalescer
from vxnet.dataplane.lb import LoadBalancer, check_settings
from vxnet.dataplane.model import Counters, Net, Port
from vxnet.dataplane.tables import (
    AddNetwork,
    AddPeer,
    AddPort,
    LbSettings,
    NetworkSpec,
    RemoveNetwork,
    RemovePeer,
    RemovePort,
    RemoveService,
    SetLoadBalancer,
    SetService,
    TableUpdate,
)
from vxnet.errors import UsageError


class SwitchTables:
    """The tables of a switch: networks, ports, peers, load balancers, and their updates."""

    nets: dict[int, Net]
    ports: dict[str, Port]
    ports_by_fd: dict[int, Port]
    peers: dict[int, dict[bytes, tuple[str, str, str]]]  # VNI -> MAC -> (IP, VTEP, origin)
    counters: Counters
    offload: bool
    data_port: int
    lb_settings: LbSettings
    now: float
    gro: Coalescer | None
    _is_vnet: Callable[[int], bool]

    if TYPE_CHECKING:  # the switch's port writer (the hot path's), for the LB's resets

        def _write_port(self, port: Port, frame: bytearray | memoryview) -> bool: ...

    def apply(self, update: TableUpdate) -> list[int]:
        """Apply one control-plane update; return the TAP fds it released (stop watching them).

        Raises :class:`UsageError` for an update that names a VNI this switch does not have.
        """
        if isinstance(update, AddNetwork):
            self._add_network(update.spec)
        elif isinstance(update, RemoveNetwork):
            return self._remove_network(update.vni)
        elif isinstance(update, AddPort):
            self._add_port(update)
        elif isinstance(update, RemovePort):
            fd = self._remove_port(update.port_id)
            return [] if fd is None else [fd]
        elif isinstance(update, AddPeer):
            self._add_peer(update)
        elif isinstance(update, RemovePeer):
            self._remove_peer(update.vni, update.mac)
        elif isinstance(update, SetLoadBalancer | SetService | RemoveService | LbSettings):
            self._apply_lb(update)
        return []

    def _apply_lb(self, update: SetLoadBalancer | SetService | RemoveService | LbSettings) -> None:
        if isinstance(update, LbSettings):
            check_settings(update)  # UsageError before anything changed
            for net in self.nets.values():
                if net.lb is not None:
                    net.lb.configure(update)
            self.lb_settings = update
            return
        net = self._net(update.vni)
        lb = net.lb
        if lb is None:
            lb = net.lb = LoadBalancer(net.counters, self.lb_settings)
            lb.now = self.now
            net.lb_macs = lb.macs
        for mac, rst in lb.apply(update, net.neigh, net.local):  # RSTs for clients that lost
            port = net.local.get(mac)  # their backend: they fail now, not after 2 h of silence
            if port is not None:
                self._write_port(port, bytearray(rst))

    def set_data_port(self, port: int) -> None:
        """Every remote VTEP is now reached on ``port`` (the cluster's data-path port)."""
        self.data_port = port
        for net in self.nets.values():
            net.remote = {mac: (vtep, port) for mac, (vtep, _) in net.remote.items()}

    def _net(self, vni: int) -> Net:
        net = self.nets.get(vni)
        if net is None:
            raise UsageError(f"no network with VNI {vni} on this host")
        return net

    def _add_network(self, spec: NetworkSpec) -> None:
        old = self.nets.get(spec.vni)
        net = Net(spec, self.offload)
        if old is not None:  # re-programming keeps endpoints, peers and counters
            net.local, net.remote, net.counters = old.local, old.remote, old.counters
            net.lb, net.lb_macs = old.lb, old.lb_macs
            net.neigh.update(old.neigh)
            for port in net.local.values():
                port.net = net
                port.offload = port.vnet and net.offload
        self.nets[spec.vni] = net
        self.peers.setdefault(spec.vni, {})

    def _remove_network(self, vni: int) -> list[int]:
        net = self.nets.pop(vni, None)
        self.peers.pop(vni, None)
        if net is None:
            return []
        released = [self._remove_port(port.port_id) for port in list(net.local.values())]
        return [fd for fd in released if fd is not None]

    def _add_port(self, update: AddPort) -> None:
        net = self._net(update.vni)
        vnet = self._is_vnet(update.fd)
        port = Port(update.port_id, update.fd, update.mac, update.ip.packed, net, vnet)
        self.ports[port.port_id] = port
        self.ports_by_fd[port.fd] = port
        net.local[port.mac] = port
        net.neigh[port.ip] = port.mac

    def _remove_port(self, port_id: str) -> int | None:
        port = self.ports.pop(port_id, None)
        if port is None:
            return None
        self.ports_by_fd.pop(port.fd, None)
        if self.gro is not None:
            self.gro.forget(port)
        net = port.net
        if net.local.get(port.mac) is port:
            del net.local[port.mac]
        if net.neigh.get(port.ip) == port.mac and port.mac not in net.lb_macs:
            del net.neigh[port.ip]  # (the LB address stays answered after the ingress sandbox)
        return port.fd

    def _add_peer(self, update: AddPeer) -> None:
        net = self._net(update.vni)
        net.remote[update.mac] = (str(update.vtep), self.data_port)
        net.neigh[update.ip.packed] = update.mac
        self.peers[update.vni][update.mac] = (str(update.ip), str(update.vtep), update.origin)

    def _remove_peer(self, vni: int, mac: bytes) -> None:
        net = self.nets.get(vni)
        entry = self.peers.get(vni, {}).pop(mac, None)
        if net is None or entry is None:
            return
        net.remote.pop(mac, None)
        ip = ipaddress.ip_address(entry[0]).packed
        if net.neigh.get(ip) == mac:
            del net.neigh[ip]

    # ------------------------------------------------------------------------- read side

    def stats(self) -> dict[str, Any]:
        return {
            "global": self.counters.as_dict(),
            "networks": {
                net.spec.name: {"vni": vni, **net.counters.as_dict()}
                for vni, net in list(self.nets.items())
            },
        }

    def lb_table(self) -> list[dict[str, Any]]:
        """Every VIP with its port map and backends (weight, active connections)."""
        return self._lb_rows(LoadBalancer.services)

    def conntrack(self) -> list[dict[str, Any]]:
        """Every load-balanced connection: client, VIP, SNAT and backend ends, state, expiry."""
        return self._lb_rows(LoadBalancer.connections)

    def _lb_rows(
        self, rows: Callable[[LoadBalancer], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:  # safe from another thread, as stats() is
        return [
            {"network": net.spec.name, "vni": vni, **row}
            for vni, net in list(self.nets.items())
            if net.lb is not None
            for row in rows(net.lb)
        ]

    def fdb(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for vni, peers in list(self.peers.items()):
            net = self.nets.get(vni)
            name = net.spec.name if net else "?"
            for mac, (ip, vtep, origin) in list(peers.items()):
                rows.append(
                    {
                        "network": name,
                        "vni": vni,
                        "mac": mac.hex(":"),
                        "ip": ip,
                        "vtep": vtep,
                        "origin": origin,
                    }
                )
        return rows
