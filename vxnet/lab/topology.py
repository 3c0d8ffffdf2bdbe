"""Lab files: a TOML description of hosts, the underlay and the networks.

```toml
name = "mylab"                       # optional; `vxnet lab up --name` wins
[underlay]
subnet = "192.168.100.0/24"          # host k gets .10+k unless it names an address
mtu = 1500                           # 9000: jumbo frames (a swarm is told: --underlay-mtu)
data_port = 4789                     # VXLAN's UDP port (Docker: --data-path-port)
data_subnet = "192.168.200.0/24"     # optional: a second underlay for VXLAN/ESP only
                                     # (--data-path-addr); gossip and 2377 stay on the first
[[host]]
name = "h1"
[[network]]
name = "front"
subnet = "10.0.1.0/24"
vni = 4097
mtu = 1450                           # optional: the network (inner) MTU; default Docker's
                                     # 1450 (less if the underlay is smaller)
[swarm]                              # optional: by default h1 runs `swarm init`, others join
enabled = true                       # false: manual mode, the lab programs every FDB itself
key_rotation_interval = "12h"        # e.g. "2s" to watch rotations
esp_icv_length = 16                  # ESP's integrity tag: 16 bytes, or 8 as Docker
[[fault]]                            # optional: applied once the lab is up (vxnet lab fault)
link = ["h1", "h2"]                  # or host = "h1", or partition = "h1,h2/h3"
loss = "10%"                         # and/or delay_ms, jitter_ms, duplicate, reorder, seed
[[container]]                        # optional: started by `lab up`
name = "web1"
host = "h1"
network = "front"
image = "whoami"
```
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vxnet.daemon.containers import check_name
from vxnet.dataplane.tables import (
    DEFAULT_MTU,
    DEFAULT_UNDERLAY_MTU,
    MAX_UNDERLAY_MTU,
    MIN_UNDERLAY_MTU,
    VXLAN_OVERHEAD,
    default_network_mtu,
)
from vxnet.errors import UsageError
from vxnet.lab.impair import Impairment, parse_percent

LAB_NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
DEFAULT_LAB = "vxnet"
DEFAULT_UNDERLAY = ipaddress.IPv4Network("192.168.100.0/24")
MAX_HOSTS = 64


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class LabNetwork:
    name: str
    subnet: ipaddress.IPv4Network
    vni: int
    mtu: int = DEFAULT_MTU


@dataclass(frozen=True, slots=True)
class LabContainer:
    name: str
    host: str
    network: str
    image: str = "idle"
    ip: str | None = None


@dataclass(frozen=True, slots=True)
class LabSpec:
    name: str
    hosts: tuple[HostSpec, ...]
    networks: tuple[LabNetwork, ...]
    containers: tuple[LabContainer, ...] = ()
    underlay: ipaddress.IPv4Network = DEFAULT_UNDERLAY
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU
    data_port: int = 4789
    swarm: bool = True  # swarm init on the first host, the others join (False: manual mode)
    key_rotation_interval: str = "12h"
    esp_icv_length: int = 16  # 8 as Docker (encrypted MTU 1424), 16 by default (1416)
    #: a second underlay for VXLAN/ESP only (`--data-path-addr`); None: one underlay for all
    data_subnet: ipaddress.IPv4Network | None = None
    faults: tuple[FaultDecl, ...] = ()  # applied once the lab is up (`vxnet lab fault`)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class FaultDecl:
    """A ``[[fault]]`` of a lab file: an impairment on a host or a link, or a partition."""

    impairment: Impairment | None = None
    host: str | None = None
    link: tuple[str, str] | None = None
    partition: str | None = None
    seed: int | None = None


DEFAULT_NETWORKS = (
    LabNetwork("front", ipaddress.IPv4Network("10.0.1.0/24"), 4097),
    LabNetwork("back", ipaddress.IPv4Network("10.0.2.0/24"), 4098),
)


def check_lab_name(name: str) -> str:
    if not isinstance(name, str) or not LAB_NAME_RE.match(name):
        raise UsageError(f"invalid lab name {name!r}: use 1-12 lowercase letters or digits")
    return name


def default_hosts(n: int, underlay: ipaddress.IPv4Network) -> tuple[HostSpec, ...]:
    if not 1 <= n <= MAX_HOSTS:
        raise UsageError(f"--hosts must be between 1 and {MAX_HOSTS}")
    return tuple(HostSpec(f"h{i}", underlay.network_address + 10 + i) for i in range(1, n + 1))


def default_spec(
    name: str = DEFAULT_LAB,
    hosts: int = 3,
    swarm: bool = True,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
) -> LabSpec:
    return LabSpec(
        check_lab_name(name),
        default_hosts(hosts, DEFAULT_UNDERLAY),
        _default_networks(underlay_mtu),
        swarm=swarm,
        underlay_mtu=underlay_mtu,
    )


def _default_networks(underlay_mtu: int) -> tuple[LabNetwork, ...]:
    fit = default_network_mtu(underlay_mtu)
    return tuple(dataclasses.replace(n, mtu=fit) for n in DEFAULT_NETWORKS)


def load_spec(path: Path, name: str | None = None, hosts: int | None = None) -> LabSpec:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read lab file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:  # (a ValueError: first)
        raise UsageError(f"lab file {path} is not valid TOML: {exc}") from None
    except ValueError:  # a path with a NUL byte in it
        raise UsageError(f"cannot read lab file {str(path)!r}: not a valid path") from None
    return parse_spec(data, name=name, hosts=hosts, source=str(path))


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise UsageError(f"{where}: missing {key!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where}: {key!r} must be a {kind.__name__}")
    return value


def _net(text: object, where: str) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise UsageError(f"{where}: a subnet must be a string such as '10.0.1.0/24'")
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_spec(
    data: dict[str, Any],
    name: str | None = None,
    hosts: int | None = None,
    source: str = "lab file",
) -> LabSpec:
    known = {"name", "underlay", "host", "network", "container", "swarm", "check", "fault"}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{source}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    lab_name = check_lab_name(name or data.get("name") or DEFAULT_LAB)
    underlay_t = data.get("underlay", {})
    if not isinstance(underlay_t, dict):
        raise UsageError(f"{source}: [underlay] must be a table")
    underlay = _net(underlay_t.get("subnet", str(DEFAULT_UNDERLAY)), f"{source} [underlay]")
    underlay_mtu = _get(underlay_t, "mtu", int, f"{source} [underlay]", DEFAULT_UNDERLAY_MTU)
    if not 576 <= underlay_mtu <= MAX_UNDERLAY_MTU:
        raise UsageError(f"{source} [underlay]: mtu must be 576-{MAX_UNDERLAY_MTU}")
    data_port = _get(underlay_t, "data_port", int, f"{source} [underlay]", 4789)
    data_text = underlay_t.get("data_subnet")
    data_subnet = None if data_text is None else _net(data_text, f"{source} [underlay]")
    if data_subnet is not None and (
        data_subnet.overlaps(underlay) or data_subnet.num_addresses < underlay.num_addresses
    ):
        raise UsageError(
            f"{source} [underlay]: data_subnet must not overlap the subnet and be as large"
        )
    if not 1024 <= data_port <= 49151 and data_port != 4789:
        raise UsageError(f"{source} [underlay]: data_port must be 4789 or 1024-49151 (as Docker)")
    host_specs = _parse_hosts(data.get("host", []), underlay, hosts, source)
    networks = _parse_networks(data.get("network"), underlay_mtu, source)
    containers = _parse_containers(data.get("container", []), host_specs, networks, source)
    swarm_t = data.get("swarm", {})
    if not isinstance(swarm_t, dict) or set(swarm_t) - {
        "enabled",
        "key_rotation_interval",
        "esp_icv_length",
    }:
        raise UsageError(
            f"{source}: [swarm] takes enabled = true|false, key_rotation_interval, esp_icv_length"
        )
    enabled = _get(swarm_t, "enabled", bool, f"{source} [swarm]", True)
    rotation = _get(swarm_t, "key_rotation_interval", str, f"{source} [swarm]", "12h")
    icv = _get(swarm_t, "esp_icv_length", int, f"{source} [swarm]", 16)
    if enabled and underlay_mtu < MIN_UNDERLAY_MTU:
        raise UsageError(
            f"{source} [underlay]: a swarm needs mtu >= {MIN_UNDERLAY_MTU} "
            "(or [swarm] enabled = false)"
        )
    if icv not in (8, 16):
        raise UsageError(f"{source} [swarm]: esp_icv_length must be 8 (as Docker) or 16")
    return LabSpec(
        lab_name,
        host_specs,
        networks,
        containers,
        underlay,
        underlay_mtu,
        data_port,
        enabled,
        rotation,
        icv,
        data_subnet,
        _parse_faults(data.get("fault", []), {h.name for h in host_specs}, source),
        extra={"check": data["check"]} if "check" in data else {},  # vxnet.lab.validate parses
    )


FAULT_KEYS = {"host", "link", "partition", "loss", "delay_ms", "jitter_ms", "duplicate",
              "reorder", "seed"}  # fmt: skip


def _parse_faults(rows: Any, hosts: set[str], source: str) -> tuple[FaultDecl, ...]:
    """``[[fault]]``: ``host = "h1"`` or ``link = ["h1", "h2"]`` with ``loss = "10%"``,
    ``delay_ms``, ``jitter_ms``, ``duplicate``, ``reorder``, ``seed``; or ``partition``."""
    if not isinstance(rows, list):
        raise UsageError(f"{source}: [[fault]] must be an array of tables")
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{source} fault #{i}"
        if not isinstance(row, dict) or set(row) - FAULT_KEYS:
            raise UsageError(f"{where}: keys are {', '.join(sorted(FAULT_KEYS))}")
        places = [k for k in ("host", "link", "partition") if k in row]
        if len(places) != 1:
            raise UsageError(f"{where}: say exactly one of host, link or partition")
        seed = _get(row, "seed", int, where, 1) if "seed" in row else None
        if "partition" in row:
            text = _get(row, "partition", str, where)
            names = text.replace("/", ",").split(",")
            if "/" not in text or not all(n in hosts for n in names):
                raise UsageError(f'{where}: partition like "h1,h2/h3" with the lab\'s hosts')
            out.append(FaultDecl(partition=text, seed=seed))
            continue
        percents = {}
        for key in ("loss", "duplicate", "reorder"):
            value = row.get(key, "0%")
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise UsageError(f'{where}: {key} is a percentage such as "10%"')
            percents[key] = parse_percent(str(value), key)
        delays = {}
        for key in ("delay_ms", "jitter_ms"):
            value = row.get(key, 0)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UsageError(f"{where}: {key} is a number of milliseconds")
            delays[key] = float(value) / 1000
        imp = Impairment(percents["loss"], delays["delay_ms"], delays["jitter_ms"],
                         percents["duplicate"], percents["reorder"])  # fmt: skip
        if not imp.active:
            raise UsageError(f"{where}: give loss, delay_ms or duplicate")
        if "host" in row:
            host = _get(row, "host", str, where)
            if host not in hosts:
                raise UsageError(f"{where}: no host {host!r}")
            out.append(FaultDecl(imp, host=host, seed=seed))
        else:
            link = row["link"]
            if not (isinstance(link, list) and len(link) == 2 and set(link) <= hosts
                    and link[0] != link[1]):  # fmt: skip
                raise UsageError(f'{where}: link = ["hA", "hB"], two of the lab\'s hosts')
            out.append(FaultDecl(imp, link=(str(link[0]), str(link[1])), seed=seed))
    return tuple(out)


def _parse_hosts(
    rows: Any, underlay: ipaddress.IPv4Network, count: int | None, source: str
) -> tuple[HostSpec, ...]:
    if not isinstance(rows, list):
        raise UsageError(f"{source}: [[host]] must be an array of tables")
    if not rows:
        return default_hosts(count or 3, underlay)
    out: list[HostSpec] = []
    for i, row in enumerate(rows, start=1):
        where = f"{source} host #{i}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: must be a table")
        hname = _get(row, "name", str, where, f"h{i}")
        if not HOST_NAME_RE.match(hname) or hname == "fabric":
            raise UsageError(f"{where}: host name {hname!r}: a letter then up to 11 letters/digits")
        text = row.get("address")
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{where}: address must be a string such as '192.168.100.11'")
        try:
            addr = ipaddress.IPv4Address(text or underlay.network_address + 10 + i)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if addr not in underlay:
            raise UsageError(f"{where}: address {addr} is outside the underlay {underlay}")
        out.append(HostSpec(hname, addr))
    _unique([h.name for h in out], "host name", source)
    _unique([str(h.address) for h in out], "host address", source)
    return tuple(out)


def _parse_networks(rows: Any, underlay_mtu: int, source: str) -> tuple[LabNetwork, ...]:
    if rows is None:
        return _default_networks(underlay_mtu)
    if not isinstance(rows, list):
        raise UsageError(f"{source}: [[network]] must be an array of tables")
    out: list[LabNetwork] = []
    for i, row in enumerate(rows, start=1):
        where = f"{source} network #{i}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: must be a table")
        subnet = _net(_get(row, "subnet", str, where), where)
        vni = _get(row, "vni", int, where, 4096 + i)
        mtu = _get(row, "mtu", int, where, default_network_mtu(underlay_mtu))
        if mtu > underlay_mtu - VXLAN_OVERHEAD:
            raise UsageError(
                f"{where}: mtu {mtu} does not fit the underlay ({underlay_mtu} - 50 = "
                f"{underlay_mtu - VXLAN_OVERHEAD}); VXLAN is never fragmented"
            )
        if not 1 <= vni <= 2**24 - 1:
            raise UsageError(f"{where}: vni must be 1-16777215 (Docker allocates from 4096)")
        out.append(
            LabNetwork(check_name("network", _get(row, "name", str, where)), subnet, vni, mtu)
        )
    _unique([n.name for n in out], "network name", source)
    _unique([n.vni for n in out], "VNI", source)
    for a in out:
        for b in out:
            if a is not b and a.subnet.overlaps(b.subnet):
                raise UsageError(f"{source}: subnets of {a.name} and {b.name} overlap")
    return tuple(out)


def _parse_containers(
    rows: Any, hosts: tuple[HostSpec, ...], networks: tuple[LabNetwork, ...], source: str
) -> tuple[LabContainer, ...]:
    if not isinstance(rows, list):
        raise UsageError(f"{source}: [[container]] must be an array of tables")
    host_names = {h.name for h in hosts}
    net_names = {n.name for n in networks}
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{source} container #{i}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: must be a table")
        c = LabContainer(
            check_name("container", _get(row, "name", str, where)),
            _get(row, "host", str, where),
            _get(row, "network", str, where),
            _get(row, "image", str, where, "idle"),
            _get(row, "ip", str, where, "") or None,
        )
        if c.host not in host_names:
            raise UsageError(f"{where}: no host {c.host!r} in this lab")
        if c.network not in net_names:
            raise UsageError(f"{where}: no network {c.network!r} in this lab")
        out.append(c)
    _unique([c.name for c in out], "container name", source)
    return tuple(out)


def _unique(values: list[Any], what: str, source: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise UsageError(f"{source}: duplicate {what} {v!r}")
        seen.add(v)
