"""Services, tasks and standalone attachments on the manager.  Sans-IO.

A service is desired state; tasks are its containers, one per slot (replicated) or per node
(global).  :func:`reconcile` turns desired state into tasks with the scheduler, and
:func:`assignments` tells each node what it must run.  Addresses come from the networks' pools,
plus one VIP per service and network in ``vip`` endpoint mode.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from vxnet.daemon.containers import IMAGES, check_name
from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.manager.cluster import Cluster, new_id
from vxnet.manager.networks import allocate_address, find_network, summary
from vxnet.manager.scheduler import NodeView, TaskView, plan_global, plan_replicated

MAX_REPLICAS = 1000
_SHORT_PORT = re.compile(r"^(\d+):(\d+)(?:/(tcp|udp|sctp))?$")


def parse_port(spec: str) -> dict[str, Any]:
    """``8080:80``, ``8080:80/udp`` or ``published=8080,target=80,protocol=udp,mode=host``."""
    m = _SHORT_PORT.match(spec)
    if m:
        port = {
            "published": int(m.group(1)),
            "target": int(m.group(2)),
            "protocol": m.group(3) or "tcp",
            "mode": "ingress",
        }
    elif "=" in spec:
        fields = dict(kv.partition("=")[::2] for kv in spec.split(","))
        unknown = set(fields) - {"published", "target", "protocol", "mode"}
        if unknown or "target" not in fields:
            raise UsageError(f"invalid publish {spec!r}: use published=,target=,protocol=,mode=")
        try:
            port = {
                "published": int(fields.get("published", "0")),
                "target": int(fields["target"]),
                "protocol": fields.get("protocol", "tcp"),
                "mode": fields.get("mode", "ingress"),
            }
        except ValueError:
            raise UsageError(f"invalid publish {spec!r}: ports are numbers") from None
    else:
        raise UsageError(f"invalid publish {spec!r}: use 8080:80[/udp] or published=8080,target=80")
    target, published = int(port["target"]), int(port["published"])
    if port["protocol"] not in ("tcp", "udp", "sctp") or port["mode"] not in ("ingress", "host"):
        raise UsageError(f"invalid publish {spec!r}: protocol tcp|udp|sctp, mode ingress|host")
    if not (1 <= target <= 65535 and 0 <= published <= 65535):
        raise UsageError(f"invalid publish {spec!r}: ports are 1-65535")
    return port


#: Docker's dynamic range for an ingress port published without a number (`-p target=80`).
DYNAMIC_PORTS = range(30000, 32768)


def _assign_dynamic_ports(cluster: Cluster, ports: list[dict[str, Any]]) -> None:
    """Give each ingress port published as 0 the lowest free port of the dynamic range."""
    taken = {
        (p["published"], p["protocol"])
        for svc in cluster.store.list("service")
        for p in svc["ports"]
        if p["mode"] == "ingress"
    }
    taken |= {(p["published"], p["protocol"]) for p in ports if p["published"]}
    for p in ports:
        if p["published"] or p["mode"] != "ingress":
            continue
        free = next((n for n in DYNAMIC_PORTS if (n, p["protocol"]) not in taken), None)
        if free is None:
            raise Conflict("no free port in the dynamic range 30000-32767")
        p["published"] = free
        taken.add((free, p["protocol"]))


def _check_published(cluster: Cluster, ports: list[dict[str, Any]], service_id: str) -> None:
    seen = set()
    for p in ports:
        key = (p["published"], p["protocol"])
        if key in seen:
            raise Conflict(f"port {p['published']}/{p['protocol']} is published twice")
        seen.add(key)
    for svc in cluster.store.list("service"):
        if svc["id"] == service_id:
            continue
        for p in svc["ports"]:
            if (p["published"], p["protocol"]) in seen and p["mode"] == "ingress":
                raise Conflict(
                    f"port '{p['published']}' is already in use by service "
                    f"'{svc['name']}' as an ingress port"
                )


def create_service(
    cluster: Cluster,
    now: float,
    *,
    name: str,
    image: str,
    cmd: list[str] | None = None,
    replicas: int | None = None,
    mode: str = "replicated",
    networks: list[str] | None = None,
    ports: list[str] | None = None,
    endpoint_mode: str = "vip",
    dns: list[str] | None = None,
) -> dict[str, Any]:
    check_name("service", name)
    if len(name) > 24:
        raise UsageError("service names are at most 24 characters (task names add to them)")
    if cluster.store.get_by_name("service", name) is not None:
        raise Conflict(f"service {name} already exists")
    if image not in IMAGES and not cmd:
        raise UsageError(f"unknown image {image!r}: built-in images are {', '.join(IMAGES)}")
    if mode not in ("replicated", "global"):
        raise UsageError("--mode must be replicated or global")
    if mode == "global" and replicas is not None:
        raise UsageError("replicas can only be used with replicated mode")
    if endpoint_mode not in ("vip", "dnsrr"):
        raise UsageError("--endpoint-mode must be vip or dnsrr")
    dns = list(dns or [])
    if len(dns) > 3:
        raise UsageError("--dns: at most 3 upstream servers (as Docker)")
    for server in dns:
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            raise UsageError(f"--dns {server!r}: an IPv4 address is needed") from None
    count = 1 if replicas is None else replicas
    if not 0 <= count <= MAX_REPLICAS:
        raise UsageError(f"--replicas must be 0-{MAX_REPLICAS}")
    parsed = [parse_port(p) for p in ports or []]
    if endpoint_mode == "dnsrr" and any(p["mode"] == "ingress" for p in parsed):
        raise UsageError("port published with ingress mode can't be used with dnsrr mode")
    nets = [find_network(cluster, ref) for ref in networks or []]
    for net in nets:
        if net["ingress"]:
            raise UsageError("the ingress network cannot be attached explicitly: publish a port")
    if any(p["mode"] == "ingress" for p in parsed):
        ingress = [n for n in cluster.store.list("network") if n["ingress"]]
        if not ingress:
            raise Conflict("service needs ingress network, but no ingress network is present")
        nets = [ingress[0], *nets]
    svc_id = new_id(cluster.rng)
    _assign_dynamic_ports(cluster, parsed)
    _check_published(cluster, parsed, svc_id)
    svc: dict[str, Any] = {
        "id": svc_id,
        "name": name,
        "image": image,
        "cmd": list(cmd or []),
        "mode": mode,
        "replicas": count if mode == "replicated" else None,
        "network_ids": [n["id"] for n in nets],
        "ports": parsed,
        "endpoint_mode": endpoint_mode,
        "dns": dns,
        "vips": {},
        "created": now,
        "updated": now,
        "pending": 0,
    }
    with cluster.store.transaction():
        if endpoint_mode == "vip":
            svc["vips"] = {n["id"]: allocate_address(cluster, n) for n in nets}
        cluster.store.put("service", svc_id, name, svc)
        reconcile(cluster, now)
    return cluster.store.get("service", svc_id) or svc


def find_service(cluster: Cluster, ref: str) -> dict[str, Any]:
    svc = cluster.store.get_by_name("service", ref) or cluster.store.get("service", ref)
    if svc is None:
        found = [s for s in cluster.store.list("service") if s["id"].startswith(ref)]
        svc = found[0] if len(found) == 1 and len(ref) >= 3 else None
    if svc is None:
        raise NotFound(f"service {ref} not found")
    return svc


def scale_service(cluster: Cluster, ref: str, replicas: int, now: float) -> dict[str, Any]:
    svc = find_service(cluster, ref)
    if svc["mode"] != "replicated":
        raise UsageError(f"{svc['name']}: scale can only be used with replicated mode")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise UsageError(f"replicas must be 0-{MAX_REPLICAS}")
    with cluster.store.transaction():
        svc.update(replicas=replicas, updated=now)
        cluster.store.put("service", svc["id"], svc["name"], svc)
        reconcile(cluster, now)
    return svc


def remove_service(cluster: Cluster, ref: str) -> dict[str, Any]:
    svc = find_service(cluster, ref)
    with cluster.store.transaction():
        for task in tasks_of(cluster, svc["id"]):
            cluster.store.delete("task", task["id"])
        cluster.store.delete("service", svc["id"])
        sync_lb_addresses(cluster)
    return svc


def tasks_of(cluster: Cluster, service_id: str) -> list[dict[str, Any]]:
    return [t for t in cluster.store.list("task") if t["service_id"] == service_id]


def reconcile(cluster: Cluster, now: float) -> None:
    """Bring every service's tasks in line with its desired state and the nodes that are up."""
    nodes = [
        NodeView(n["id"], n["hostname"], n["status"] == "ready", n["availability"])
        for n in cluster.store.list("node")
    ]
    for svc in cluster.store.list("service"):
        tasks = tasks_of(cluster, svc["id"])
        views = [TaskView(t["id"], svc["id"], t["slot"], t["node_id"], t["desired"]) for t in tasks]
        if svc["mode"] == "global":
            plan = plan_global(svc["id"], nodes, views)
        else:
            plan = plan_replicated(svc["id"], svc["replicas"], nodes, views)
        for task_id in plan.stop:
            cluster.store.delete("task", task_id)
        pending = len(plan.pending)
        for slot, node_id in plan.start:
            try:
                _new_task(cluster, svc, slot, node_id, now)
            except Conflict:  # a network is full: the task waits, other services go on
                pending += 1
        if svc.get("pending", 0) != pending:
            svc["pending"] = pending
            cluster.store.put("service", svc["id"], svc["name"], svc)
    sync_lb_addresses(cluster)


def _new_task(cluster: Cluster, svc: dict[str, Any], slot: int, node_id: str, now: float) -> None:
    task_id = new_id(cluster.rng)
    label = str(slot) if svc["mode"] == "replicated" else node_id[:8]
    addresses = {}
    for net_id in svc["network_ids"]:
        net = cluster.store.get("network", net_id)
        if net is not None:
            addresses[net_id] = allocate_address(cluster, net)
    task = {
        "id": task_id,
        "service_id": svc["id"],
        "service_name": svc["name"],
        "slot": slot,
        "node_id": node_id,
        "desired": "running",
        "state": "assigned",
        "message": "",
        "addresses": addresses,
        "container": f"{svc['name']}.{label}.{task_id[:8]}",
        "image": svc["image"],
        "cmd": svc["cmd"],
        "created": now,
        "updated": now,
    }
    cluster.store.put("task", task_id, task_id, task)


def task_status(
    cluster: Cluster, node_id: str, task_id: str, state: str, message: str, now: float
) -> None:
    """An agent reports a task's state; a failed task is replaced by reconciliation."""
    task = cluster.store.get("task", task_id)
    if task is None or task["node_id"] != node_id:
        return  # stale report about a task that moved or was removed
    if state == "failed":
        cluster.store.delete("task", task_id)
        reconcile(cluster, now)
        return
    task.update(state=state, message=message, updated=now)
    cluster.store.put("task", task_id, task_id, task)


# ------------------------------------------------------------------------ attachments


def attach(
    cluster: Cluster, node_id: str, container: str, network: str, ip: str | None
) -> dict[str, Any]:
    """A standalone container joins a swarm network (only an ``--attachable`` one)."""
    net = find_network(cluster, network)
    if not net["attachable"]:
        raise Conflict(
            f"Could not attach to network {net['name']}: network {net['name']} is not manually "
            "attachable (create it with `vxnet network create -d overlay --attachable`)"
        )
    for att in cluster.store.list("attachment"):
        if att["node_id"] == node_id and att["container"] == container:
            raise Conflict(f"container {container} already has an attachment on this node")
    with cluster.store.transaction():
        att = {
            "id": new_id(cluster.rng),
            "node_id": node_id,
            "container": container,
            "network_id": net["id"],
            "ip": allocate_address(cluster, net, ip),
            "aliases": [],
        }
        cluster.store.put("attachment", att["id"], att["id"], att)
        sync_lb_addresses(cluster)
    return {"attachment": att, "network": summary(net)}


def detach(cluster: Cluster, node_id: str, container: str) -> bool:
    for att in cluster.store.list("attachment"):
        if att["node_id"] == node_id and att["container"] == container:
            with cluster.store.transaction():
                cluster.store.delete("attachment", att["id"])
                sync_lb_addresses(cluster)
            return True
    return False


def prune_attachments(cluster: Cluster, node_id: str, alive: set[str]) -> list[str]:
    """Forget a node's attachments whose containers it no longer has (after a crash)."""
    gone = []
    for att in cluster.store.list("attachment"):
        if att["node_id"] == node_id and att["container"] not in alive:
            cluster.store.delete("attachment", att["id"])
            gone.append(att["container"])
    if gone:
        sync_lb_addresses(cluster)
    return gone


# ------------------------------------------------------------------------ assignments


def needed_networks(cluster: Cluster, node_id: str) -> set[str]:
    """The networks a node takes part in: ingress (every node has an ingress sandbox), and
    those of its tasks and attachments."""
    needed = {n["id"] for n in cluster.store.list("network") if n["ingress"]}
    for task in cluster.store.list("task"):
        if task["node_id"] == node_id and task["desired"] == "running":
            needed |= set(task["addresses"])
    for att in cluster.store.list("attachment"):
        if att["node_id"] == node_id:
            needed.add(att["network_id"])
    return needed


def sync_lb_addresses(cluster: Cluster) -> None:
    """One load-balancer address per node and network it takes part in (Docker's ``lb-<net>``
    endpoint): the source address of its NATed VIP traffic, the ingress sandbox's address on
    ``ingress``.  Kept while needed, released with the last task or attachment there."""
    nets = {n["id"]: n for n in cluster.store.list("network")}
    for node in cluster.store.list("node"):
        have: dict[str, str] = dict(node.get("lb_addresses", {}))
        needed = needed_networks(cluster, node["id"]) & set(nets)
        want = {nid: ip for nid, ip in have.items() if nid in needed}
        for nid in sorted(needed - set(want)):
            try:
                want[nid] = allocate_address(cluster, nets[nid])
            except Conflict:  # the network is full: the node's VIP traffic there waits
                continue
        if want != have:
            node["lb_addresses"] = want
            cluster.store.put("node", node["id"], node["id"], node)


def _task_view(cluster: Cluster, task: dict[str, Any]) -> dict[str, Any]:
    view = {
        k: task[k] for k in ("id", "service_name", "slot", "container", "image", "cmd", "addresses")
    }
    svc = cluster.store.get("service", task["service_id"]) or {}
    view.update(
        service_id=task["service_id"],
        endpoint_mode=svc.get("endpoint_mode", "vip"),
        vips=dict(svc.get("vips", {})),
        ports=[p for p in svc.get("ports", []) if p["mode"] == "ingress"],
        host_ports=[p for p in svc.get("ports", []) if p["mode"] == "host"],
        dns=list(svc.get("dns", [])),
    )
    return view


def assignments(cluster: Cluster, node_id: str) -> dict[str, Any]:
    """A node's desired state: the networks it needs, its load-balancer address on each, and
    the tasks it must run (with what service discovery needs: service, VIPs, ports)."""
    nets = {n["id"]: n for n in cluster.store.list("network")}
    needed = needed_networks(cluster, node_id)
    tasks = [
        _task_view(cluster, task)
        for task in cluster.store.list("task")
        if task["node_id"] == node_id and task["desired"] == "running"
    ]
    node = cluster.store.get("node", node_id) or {}
    return {
        "networks": [summary(nets[n]) for n in sorted(needed) if n in nets],
        "tasks": tasks,
        "lb_addresses": {
            nid: ip for nid, ip in node.get("lb_addresses", {}).items() if nid in needed
        },
    }


def service_rows(cluster: Cluster) -> list[dict[str, Any]]:
    rows = []
    for svc in sorted(cluster.store.list("service"), key=lambda s: s["name"]):
        tasks = tasks_of(cluster, svc["id"])
        running = sum(1 for t in tasks if t["state"] == "running")
        desired = svc["replicas"] if svc["mode"] == "replicated" else len(tasks)
        rows.append({**svc, "running": running, "desired": desired})
    return rows
