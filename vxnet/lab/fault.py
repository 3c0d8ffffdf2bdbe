"""``vxnet lab fault``: loss, delay, jitter, duplication, reordering and partitions on the fabric.

This kernel has no netem, so the lab impairs its own cables:

* **Impairments** (``--loss/--delay/--jitter/--duplicate/--reorder``, on a host or on the link
  between two hosts) take the host's fabric port out of the fabric bridge and put a userspace
  relay (:mod:`vxnet.lab.relay`, in the fabric's namespace) in its place.  The relay copies every
  frame across, when and as often as the seeded :class:`vxnet.lab.impair.Impairer` decides.
  Everything the host sends or receives is impaired alike -- VXLAN, ESP, gossip, the manager's
  TLS -- as with netem on the host's NIC.  While a port is relayed, segmentation and checksum
  offloads are off on both of its ends, so every frame on the relay is a real, finished one.
* **Partitions** (``--partition h1,h2/h3``) are an nftables ``bridge`` filter in the fabric:
  frames between the two groups' ports are dropped, in the kernel, both ways.

The lab's state file records every fault, so ``lab inspect`` shows them and ``--clear`` (or
``lab down``) removes them.  Blocking; called by the CLI and by :class:`vxnet.lab.Lab`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pyroute2 import Ethtool

from vxnet import netns, nft
from vxnet.errors import LabError, UsageError
from vxnet.lab import builder
from vxnet.lab.impair import Impairment

TABLE = "vxfault"
#: what is switched off on both ends of a relayed port, so frames are finished and MTU-sized
OFFLOADS = ("tx-checksum", "segmentation")


def _hosts(state: dict[str, Any], names: list[str]) -> list[str]:
    for name in names:
        if name not in state["hosts"]:
            raise UsageError(f"lab {state['name']} has no host {name!r}")
    return names


def _ports(state: dict[str, Any], host: str) -> list[tuple[str, str, str]]:
    """(fabric port, bridge, host interface) of each underlay the host is on."""
    h = state["hosts"][host]
    out = [(h["fabric_port"], builder.FABRIC_BRIDGE, h["underlay_if"])]
    if h.get("data_port"):
        out.append((h["data_port"], builder.DATA_BRIDGE, h["data_if"]))
    return out


def _addresses(state: dict[str, Any], host: str) -> list[str]:
    h = state["hosts"][host]
    return [h["address"], *([h["data_path_addr"]] if h.get("data_path_addr") else [])]


def faults(state: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = state.setdefault(
        "faults", {"rules": [], "partitions": [], "relays": {}, "seed": 1}
    )
    return f


# ------------------------------------------------------------------------------ commands


def add_impairment(
    lab: str, impairment: Impairment, host: str | None = None, link: tuple[str, str] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Impair everything ``host`` sends and receives, or only what crosses ``link``."""
    state = builder.load_state(lab)
    if (host is None) == (link is None):
        raise UsageError("say where: --host HOST or --link HOST_A,HOST_B")
    if not impairment.active:
        raise UsageError("nothing to do: give --loss, --delay or --duplicate")
    f = faults(state)
    if seed is not None:
        f["seed"] = seed
    if host is not None:
        _hosts(state, [host])
        f["rules"] = [r for r in f["rules"] if not (r["host"] == host and r["peer"] is None)]
        f["rules"].append({"host": host, "peer": None, "impairment": impairment.to_json()})
    else:
        assert link is not None
        a, b = _hosts(state, list(link))
        if a == b:
            raise UsageError("--link needs two different hosts")
        f["rules"] = [r for r in f["rules"] if (r["host"], r["peer"]) != (a, b)]
        f["rules"].append({"host": a, "peer": b, "impairment": impairment.to_json()})
    return apply(lab, state)


def add_partition(lab: str, text: str) -> dict[str, Any]:
    """``h1,h2/h3``: nothing crosses between {h1, h2} and {h3}."""
    state = builder.load_state(lab)
    left, sep, right = text.partition("/")
    groups = [[h for h in side.split(",") if h] for side in (left, right)]
    if not sep or not all(groups):
        raise UsageError("--partition HOSTS/HOSTS, e.g. h1,h2/h3")
    _hosts(state, groups[0] + groups[1])
    if set(groups[0]) & set(groups[1]):
        raise UsageError("a host cannot be on both sides of a partition")
    faults(state)["partitions"].append(groups)
    return apply(lab, state)


def clear(lab: str) -> dict[str, Any]:
    state = builder.load_state(lab)
    f = faults(state)
    f["rules"], f["partitions"] = [], []
    return apply(lab, state)


def show(lab: str) -> dict[str, Any]:
    """The faults in force, with each relay's counters."""
    state = builder.load_state(lab)
    f = faults(state)
    out = {"rules": f["rules"], "partitions": f["partitions"], "seed": f["seed"], "relays": {}}
    for port, relay in f["relays"].items():
        try:
            counters = json.loads(Path(relay["stats"]).read_text())
        except (OSError, ValueError):
            counters = {}
        out["relays"][port] = {**relay, "counters": counters}
    return out


# --------------------------------------------------------------------- making it so


def apply(lab: str, state: dict[str, Any]) -> dict[str, Any]:
    """Make the fabric match the recorded faults: relays where rules are, bridge filter."""
    f = faults(state)
    wanted: dict[str, list[dict[str, Any]]] = {}
    for host in state["hosts"]:
        rules = [r for r in f["rules"] if r["host"] == host and r["peer"] is not None]
        rules += [r for r in f["rules"] if r["host"] == host and r["peer"] is None]
        if not rules:
            continue
        spec = [
            {"impairment": r["impairment"],
             "peers": _addresses(state, r["peer"]) if r["peer"] else []}
            for r in rules
        ]  # fmt: skip
        for port, _, _ in _ports(state, host):
            wanted[port] = spec
    for port in list(f["relays"]):
        relay = f["relays"][port]
        if wanted.get(port) != relay["rules"]:
            _remove_relay(state, port)
            del f["relays"][port]
            builder.save_state(lab, state)
    for port, spec in wanted.items():
        if port not in f["relays"]:
            f["relays"][port] = _add_relay(lab, state, port, spec, f["seed"])
            builder.save_state(lab, state)
    _apply_partitions(state)
    builder.save_state(lab, state)
    return show(lab)


def _owner(state: dict[str, Any], port: str) -> tuple[str, str, str]:
    for host in state["hosts"]:
        for p, bridge, ifname in _ports(state, host):
            if p == port:
                return host, bridge, ifname
    raise LabError(f"no host owns fabric port {port}")


def _set_offloads(ns: str, ifname: str, enable: bool) -> None:
    def action() -> None:
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(ifname)
            for name, feature in features.features.items():
                if name.startswith("tx-") and any(k in name for k in OFFLOADS):
                    feature.enable = enable
            with contextlib.suppress(Exception):  # some features are fixed: set what can be
                ethtool.set_features(ifname, features)
        finally:
            ethtool.close()

    netns.run_in(ns, action, f"switch offloads of {ifname} {'on' if enable else 'off'}")


def _add_relay(
    lab: str, state: dict[str, Any], port: str, spec: list[dict[str, Any]], seed: int
) -> dict[str, Any]:
    host, bridge, host_if = _owner(state, port)
    fabric = state["fabric"]["netns"]
    relay_side, bridge_side = f"{port}r", f"{port}b"
    mtu = int(state["underlay"]["mtu"])
    netns.add_veth(fabric, relay_side, fabric, bridge_side, mtu=mtu)
    netns.set_master(fabric, bridge_side, bridge)
    _set_offloads(fabric, bridge_side, enable=False)
    _set_offloads(fabric, relay_side, enable=False)
    _set_offloads(state["hosts"][host]["netns"], host_if, enable=False)
    stats = builder.run_dir(lab) / f"fault-{port}.json"
    argv = [
        sys.executable, "-m", "vxnet.lab.relay", "--netns", fabric, "--a", port,
        "--b", relay_side, "--rules", json.dumps(spec), "--seed", str(seed),
        "--stats", str(stats),
    ]  # fmt: skip
    log_fd = os.open(builder.run_dir(lab) / f"fault-{port}.log", os.O_WRONLY | os.O_CREAT
                     | os.O_APPEND, 0o600)  # fmt: skip
    try:  # detached, like the daemons: it outlives the command that started it
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions,
                             setsid=True)  # fmt: skip
    finally:
        os.close(log_fd)
    netns.set_link(fabric, port, master=0)  # from now on the relay is the cable
    return {"pid": pid, "rules": spec, "stats": str(stats), "bridge_port": bridge_side}


def _remove_relay(state: dict[str, Any], port: str) -> None:
    relay = state["faults"]["relays"][port]
    host, bridge, host_if = _owner(state, port)
    fabric = state["fabric"]["netns"]
    netns.kill_pids([int(relay["pid"])])
    with contextlib.suppress(ChildProcessError):  # reap it if we started it
        os.waitpid(int(relay["pid"]), os.WNOHANG)
    with contextlib.suppress(LabError):
        netns.set_master(fabric, port, bridge)
    with netns.ipr(fabric) as ip, contextlib.suppress(Exception):
        ip.link("del", index=netns.link_index(ip, f"{port}r"))
    with contextlib.suppress(LabError):
        _set_offloads(state["hosts"][host]["netns"], host_if, enable=True)


def _bridge_port(state: dict[str, Any], port: str) -> str:
    relay = state["faults"]["relays"].get(port)
    return str(relay["bridge_port"]) if relay else port


def _apply_partitions(state: dict[str, Any]) -> None:
    fabric = state["fabric"]["netns"]
    partitions = state["faults"]["partitions"]
    if not partitions:
        nft.delete_table(fabric, "bridge", TABLE)
        return
    lines = []
    for left, right in partitions:
        sides = [
            sorted(_bridge_port(state, p) for h in group for p, _, _ in _ports(state, h))
            for group in (left, right)
        ]
        a, b = ("{ " + ", ".join(f'"{p}"' for p in side) + " }" for side in sides)
        lines += [f"iifname {a} oifname {b} drop", f"iifname {b} oifname {a} drop"]
    body = (
        "chain forward {\n  type filter hook forward priority 0; policy accept;\n  "
        + "\n  ".join(lines)
        + "\n}"
    )
    nft.apply_table(fabric, "bridge", TABLE, body)
