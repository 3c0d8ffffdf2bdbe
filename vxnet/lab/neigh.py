"""The one ARP table every namespace of a lab shares, and when a lab outgrows it.

Linux keeps the ARP entries of all network namespaces in one table whose limits are
machine-wide (``net.ipv4.neigh.default.gc_thresh1/2/3``, 128/512/1024 by default): at most
``gc_thresh3`` entries, and above ``gc_thresh2`` forced garbage collection that may only evict
entries older than 5 s.  Past the limit the kernel drops the packet and logs "neighbor table
overflow".  Thirty-two real hosts have 32 tables; a 32-host lab has one, and its hosts'
underlay entries alone (every host gossips with every other) come near 1024.
"""

from __future__ import annotations

from pathlib import Path

NEIGH = Path("/proc/sys/net/ipv4/neigh/default")
THRESHOLDS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")


def needed_entries(hosts: int, containers: int = 0) -> int:
    """Entries a lab needs when every host talks to every host and every container to every
    container: the underlay both ways, the containers both ways, a few per host for the
    gateways, load-balancer addresses and ingress sandboxes."""
    return hosts * (hosts - 1) + containers * (containers - 1) + 8 * hosts


def limits() -> dict[str, int]:
    """The kernel's current thresholds (empty if this kernel has no IPv4 neighbour table)."""
    try:
        return {n: int((NEIGH / n).read_text()) for n in THRESHOLDS}
    except (OSError, ValueError):
        return {}


def advice(hosts: int, containers: int = 0) -> str | None:
    """A note for the user when the lab may outgrow the table (None when it fits easily)."""
    have = limits().get("gc_thresh3")
    need = needed_entries(hosts, containers)
    if have is None or need <= have // 2:
        return None
    return (
        f"note: a lab of {hosts} hosts may need ~{need} ARP entries, and this kernel's one "
        f"table for every namespace holds {have} (net.ipv4.neigh.default.gc_thresh3); past it "
        f"packets drop ('neighbor table overflow' in dmesg). To make room, as on a big Docker "
        f"host: sysctl -w net.ipv4.neigh.default.gc_thresh3={4 * need} "
        f"net.ipv4.neigh.default.gc_thresh2={2 * need} net.ipv4.neigh.default.gc_thresh1={need}"
    )
