"""Services, tasks and attachments on the manager: placement, addresses, ports, reconciliation."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.manager import networks as nets
from vxnet.manager import pki
from vxnet.manager import services as svcs
from vxnet.manager.cluster import HEARTBEAT_GRACE, HEARTBEAT_PERIOD, Cluster
from vxnet.manager.store import Store

NOW = 1_700_000_000.0
CSR = pki.make_csr(pki.new_node_key())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "m.db") as s:
        yield s


def new_cluster(store: Store, seed: int = 1) -> Cluster:
    return Cluster.initialize(
        store,
        random.Random(seed),
        NOW,
        hostname="mgr",
        advertise_addr="192.168.50.1",
        data_path_addr="192.168.50.1",
    )


@pytest.fixture
def cluster(store: Store) -> Cluster:
    cluster = new_cluster(store)
    nets.ensure_ingress(cluster, NOW)
    return cluster


def add_node(cluster: Cluster, n: int, now: float = NOW) -> str:
    """A worker registered with cluster.issue and made ready by hello; returns its id."""
    addr = f"192.168.50.{10 + n}"
    issued = cluster.issue("worker", CSR, f"w{n}", addr, addr, now)
    cluster.hello(issued.node_id, now, {})
    return issued.node_id


@pytest.fixture
def three(cluster: Cluster) -> list[str]:
    return [add_node(cluster, n) for n in (1, 2, 3)]


def tasks(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    svc = svcs.find_service(cluster, name)
    return sorted(svcs.tasks_of(cluster, svc["id"]), key=lambda t: t["slot"])


def ingress_id(cluster: Cluster) -> str:
    return str(nets.find_network(cluster, "ingress")["id"])


def all_addresses(cluster: Cluster) -> list[tuple[str, str]]:
    """Every (network id, IP) held by a task, a VIP, an attachment or a node's load balancer,
    duplicates kept."""
    held = [(n, ip) for t in cluster.store.list("task") for n, ip in t["addresses"].items()]
    held += [(n, ip) for s in cluster.store.list("service") for n, ip in s["vips"].items()]
    held += [(a["network_id"], a["ip"]) for a in cluster.store.list("attachment")]
    held += lb_addresses(cluster)
    return held


def lb_addresses(cluster: Cluster, net_id: str | None = None) -> list[tuple[str, str]]:
    return [
        (n, ip)
        for node in cluster.store.list("node")
        for n, ip in node.get("lb_addresses", {}).items()
        if net_id in (None, n)
    ]


def assert_addresses_sound(cluster: Cluster) -> None:
    held = all_addresses(cluster)
    dupes = [k for k, count in Counter(held).items() if count > 1]
    assert dupes == [], f"addresses handed out twice: {dupes}"
    networks = {n["id"]: n for n in cluster.store.list("network")}
    for net_id, ip in held:
        net = networks[net_id]
        subnet = IPv4Network(net["subnet"])
        assert IPv4Address(ip) in subnet
        assert ip != net["gateway"]
        assert IPv4Address(ip) not in (subnet.network_address, subnet.broadcast_address)


# ----------------------------------------------------------------------------------- ports


@pytest.mark.parametrize(
    ("spec", "port"),
    [
        ("8080:80", {"published": 8080, "target": 80, "protocol": "tcp", "mode": "ingress"}),
        ("8080:80/udp", {"published": 8080, "target": 80, "protocol": "udp", "mode": "ingress"}),
        ("53:53/sctp", {"published": 53, "target": 53, "protocol": "sctp", "mode": "ingress"}),
        (
            "published=8080,target=80,protocol=udp,mode=host",
            {"published": 8080, "target": 80, "protocol": "udp", "mode": "host"},
        ),
        (
            "target=80,published=9090",
            {"published": 9090, "target": 80, "protocol": "tcp", "mode": "ingress"},
        ),
        ("65535:1", {"published": 65535, "target": 1, "protocol": "tcp", "mode": "ingress"}),
    ],
)
def test_parse_port(spec: str, port: dict[str, Any]) -> None:
    assert svcs.parse_port(spec) == port


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "80",
        "garbage",
        "8080:80/icmp",
        "8080:80/",
        "8080:0",
        "70000:80",
        "8080:70000",
        ":80",
        "8080:",
        "a:b",
        "8080-8081:80",
        "published=8080",
        "published=8080,target=http",
        "published=8080,target=80,mode=routing",
        "published=8080,target=80,protocol=icmp",
        "published=8080,target=80,color=red",
        "published=8080,target=80,",
        "target=0",
        "target=80,published=-1",
    ],
)
def test_parse_port_refuses_garbage(spec: str) -> None:
    with pytest.raises(UsageError, match="invalid publish"):
        svcs.parse_port(spec)


# ------------------------------------------------------------------------------ placement


def test_replicas_spread_over_ready_nodes(cluster: Cluster, three: list[str]) -> None:
    nets.create_network(cluster, "back", NOW)
    svc = svcs.create_service(
        cluster, NOW, name="web", image="whoami", replicas=6, networks=["back"]
    )
    ts = tasks(cluster, "web")
    assert [t["slot"] for t in ts] == [1, 2, 3, 4, 5, 6]
    assert Counter(t["node_id"] for t in ts) == dict.fromkeys(three, 2)
    assert all(t["desired"] == "running" and t["state"] == "assigned" for t in ts)
    assert all(t["container"] == f"web.{t['slot']}.{t['id'][:8]}" for t in ts)
    assert all(t["service_id"] == svc["id"] and t["image"] == "whoami" for t in ts)
    assert svc["pending"] == 0
    assert_addresses_sound(cluster)


def test_only_ready_active_nodes_get_tasks(cluster: Cluster, three: list[str]) -> None:
    silent = cluster.issue("worker", CSR, "silent", "192.168.50.40", "192.168.50.40", NOW)
    drained = add_node(cluster, 5)
    node = cluster.node(drained)
    node["availability"] = "drain"
    cluster.store.put("node", drained, drained, node)
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=9)
    assert {t["node_id"] for t in tasks(cluster, "web")} == set(three)
    assert silent.node_id not in {t["node_id"] for t in cluster.store.list("task")}


def test_no_ready_node_leaves_tasks_pending(cluster: Cluster) -> None:
    svc = svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=3)
    assert svc["pending"] == 3
    assert tasks(cluster, "web") == []
    add_node(cluster, 1)
    svcs.reconcile(cluster, NOW + 1)
    assert len(tasks(cluster, "web")) == 3
    assert svcs.find_service(cluster, "web")["pending"] == 0


def test_each_task_has_a_unique_ip_per_network_and_a_vip(
    cluster: Cluster, three: list[str]
) -> None:
    a = nets.create_network(cluster, "a", NOW)
    b = nets.create_network(cluster, "b", NOW)
    svc = svcs.create_service(
        cluster, NOW, name="web", image="whoami", replicas=5, networks=["a", "b"]
    )
    assert svc["network_ids"] == [a["id"], b["id"]]
    assert set(svc["vips"]) == {a["id"], b["id"]}
    for net in (a, b):
        ips = [t["addresses"][net["id"]] for t in tasks(cluster, "web")]
        assert len(set(ips)) == 5
        assert svc["vips"][net["id"]] not in ips
        assert all(IPv4Address(ip) in IPv4Network(net["subnet"]) for ip in ips)
    assert all(set(t["addresses"]) == {a["id"], b["id"]} for t in tasks(cluster, "web"))
    assert_addresses_sound(cluster)


def test_dnsrr_has_no_vip(cluster: Cluster, three: list[str]) -> None:
    a = nets.create_network(cluster, "a", NOW)
    svc = svcs.create_service(
        cluster, NOW, name="db", image="idle", replicas=2, networks=["a"], endpoint_mode="dnsrr"
    )
    assert svc["vips"] == {}
    assert all(a["id"] in t["addresses"] for t in tasks(cluster, "db"))
    host = svcs.create_service(
        cluster,
        NOW,
        name="h",
        image="idle",
        ports=["mode=host,target=80,published=80"],
        endpoint_mode="dnsrr",
    )
    assert host["vips"] == {}
    assert host["network_ids"] == []


def test_dnsrr_with_an_ingress_port_is_refused(cluster: Cluster, three: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        svcs.create_service(
            cluster, NOW, name="db", image="idle", ports=["8080:80"], endpoint_mode="dnsrr"
        )
    assert str(info.value) == "port published with ingress mode can't be used with dnsrr mode"
    assert cluster.store.list("service") == []


def test_publishing_attaches_ingress(cluster: Cluster, three: list[str]) -> None:
    svc = svcs.create_service(cluster, NOW, name="web", image="whoami", ports=["8080:80"])
    ing = ingress_id(cluster)
    assert svc["network_ids"] == [ing]
    assert set(svc["vips"]) == {ing}
    assert all(set(t["addresses"]) == {ing} for t in tasks(cluster, "web"))
    back = nets.create_network(cluster, "back", NOW)
    both = svcs.create_service(
        cluster, NOW, name="api", image="whoami", ports=["9090:80"], networks=["back"]
    )
    assert both["network_ids"] == [ing, back["id"]]
    # A host-mode port does not use the routing mesh.
    host = svcs.create_service(
        cluster, NOW, name="h", image="whoami", ports=["mode=host,target=80"]
    )
    assert host["network_ids"] == []
    assert_addresses_sound(cluster)


def test_ingress_cannot_be_named_explicitly(cluster: Cluster, three: list[str]) -> None:
    with pytest.raises(UsageError, match="cannot be attached explicitly"):
        svcs.create_service(cluster, NOW, name="web", image="whoami", networks=["ingress"])


def test_publishing_without_ingress_is_a_conflict(store: Store) -> None:
    cluster = new_cluster(store)
    add_node(cluster, 1)
    with pytest.raises(Conflict, match="service needs ingress network"):
        svcs.create_service(cluster, NOW, name="web", image="whoami", ports=["8080:80"])
    assert cluster.store.list("service") == []
    assert cluster.store.list("task") == []


def test_same_published_port_is_refused(cluster: Cluster, three: list[str]) -> None:
    svcs.create_service(cluster, NOW, name="web", image="whoami", ports=["8080:80"])
    before = all_addresses(cluster)
    with pytest.raises(Conflict, match="port '8080' is already in use by service 'web'"):
        svcs.create_service(cluster, NOW, name="web2", image="whoami", ports=["8080:81"])
    assert all_addresses(cluster) == before  # the refused service's VIP was not kept
    assert [s["name"] for s in cluster.store.list("service")] == ["web"]
    # Another protocol on the same number is a different port.
    svcs.create_service(cluster, NOW, name="dns", image="echo", ports=["8080:53/udp"])
    with pytest.raises(Conflict, match="published twice"):
        svcs.create_service(cluster, NOW, name="x", image="whoami", ports=["7000:80", "7000:81"])
    svcs.remove_service(cluster, "web")
    svcs.create_service(cluster, NOW, name="web2", image="whoami", ports=["8080:81"])


def test_ingress_ports_without_a_published_number_get_dynamic_ones(
    cluster: Cluster, three: list[str]
) -> None:
    a = svcs.create_service(cluster, NOW, name="a", image="whoami", ports=["target=80"])
    b = svcs.create_service(cluster, NOW, name="b", image="whoami", ports=["target=80"])
    published = {a["ports"][0]["published"], b["ports"][0]["published"]}
    assert len(published) == 2
    assert all(30000 <= p <= 32767 for p in published)
    c = svcs.create_service(
        cluster, NOW, name="c", image="whoami", ports=["target=53,protocol=udp"]
    )
    assert c["ports"][0]["published"] == 30000  # the ranges are per protocol, as ports are


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"name": "bad name"}, UsageError, "invalid service name"),
        ({"name": "x" * 25}, UsageError, "at most 24"),
        ({"image": "nginx"}, UsageError, "unknown image"),
        ({"mode": "daemonset"}, UsageError, "replicated or global"),
        ({"mode": "global", "replicas": 2}, UsageError, "replicated mode"),
        ({"endpoint_mode": "lb"}, UsageError, "vip or dnsrr"),
        ({"replicas": -1}, UsageError, "0-1000"),
        ({"replicas": 1001}, UsageError, "0-1000"),
        ({"networks": ["nope"]}, NotFound, "network nope not found"),
        ({"ports": ["junk"]}, UsageError, "invalid publish"),
    ],
)
def test_create_service_refusals(
    cluster: Cluster, three: list[str], kw: dict[str, Any], error: type[Exception], message: str
) -> None:
    args: dict[str, Any] = {"name": "web", "image": "whoami", **kw}
    with pytest.raises(error, match=message):
        svcs.create_service(cluster, NOW, **args)
    assert cluster.store.list("service") == []
    assert cluster.store.list("task") == []


def test_duplicate_service_name(cluster: Cluster, three: list[str]) -> None:
    svcs.create_service(cluster, NOW, name="web", image="whoami")
    with pytest.raises(Conflict, match="service web already exists"):
        svcs.create_service(cluster, NOW, name="web", image="echo")


def test_custom_command_allows_any_image(cluster: Cluster, three: list[str]) -> None:
    svc = svcs.create_service(cluster, NOW, name="c", image="alpine", cmd=["sleep", "1"])
    assert tasks(cluster, "c")[0]["cmd"] == ["sleep", "1"]
    assert svc["replicas"] == 1


# --------------------------------------------------------------------------------- scaling


def test_scale_up_and_down_removes_the_highest_slots(cluster: Cluster, three: list[str]) -> None:
    back = nets.create_network(cluster, "back", NOW)
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=2, networks=["back"])
    kept = {t["slot"]: t["id"] for t in tasks(cluster, "web")}
    svcs.scale_service(cluster, "web", 5, NOW + 1)
    up = tasks(cluster, "web")
    assert [t["slot"] for t in up] == [1, 2, 3, 4, 5]
    assert {t["slot"]: t["id"] for t in up if t["slot"] <= 2} == kept  # nothing restarted
    assert Counter(t["node_id"] for t in up).most_common(1)[0][1] == 2
    freed = {t["addresses"][back["id"]] for t in up if t["slot"] > 2}
    svcs.scale_service(cluster, "web", 2, NOW + 2)
    down = tasks(cluster, "web")
    assert {t["slot"]: t["id"] for t in down} == kept
    held = {ip for _, ip in all_addresses(cluster)}
    assert not freed & held
    assert svcs.find_service(cluster, "web")["replicas"] == 2
    assert svcs.find_service(cluster, "web")["updated"] == NOW + 2
    svcs.scale_service(cluster, "web", 0, NOW + 3)
    assert tasks(cluster, "web") == []
    assert_addresses_sound(cluster)


def test_scale_refusals(cluster: Cluster, three: list[str]) -> None:
    svcs.create_service(cluster, NOW, name="g", image="whoami", mode="global")
    with pytest.raises(UsageError, match="replicated mode"):
        svcs.scale_service(cluster, "g", 3, NOW)
    svcs.create_service(cluster, NOW, name="web", image="whoami")
    with pytest.raises(UsageError, match="0-1000"):
        svcs.scale_service(cluster, "web", 1001, NOW)
    with pytest.raises(NotFound):
        svcs.scale_service(cluster, "nope", 1, NOW)
    assert len(tasks(cluster, "web")) == 1


def test_global_mode_one_task_per_ready_node(cluster: Cluster, three: list[str]) -> None:
    svc = svcs.create_service(cluster, NOW, name="mon", image="idle", mode="global")
    assert svc["replicas"] is None
    ts = tasks(cluster, "mon")
    assert sorted(t["node_id"] for t in ts) == sorted(three)
    assert all(t["slot"] == 0 for t in ts)
    assert all(t["container"] == f"mon.{t['node_id'][:8]}.{t['id'][:8]}" for t in ts)
    fourth = add_node(cluster, 4, NOW + 1)
    svcs.reconcile(cluster, NOW + 1)
    assert sorted(t["node_id"] for t in tasks(cluster, "mon")) == sorted([*three, fourth])
    svcs.reconcile(cluster, NOW + 2)  # idempotent
    assert len(tasks(cluster, "mon")) == 4
    row = next(r for r in svcs.service_rows(cluster) if r["name"] == "mon")
    assert row["desired"] == 4


def test_node_down_moves_its_tasks(cluster: Cluster, three: list[str]) -> None:
    back = nets.create_network(cluster, "back", NOW)
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=6, networks=["back"])
    svcs.create_service(cluster, NOW, name="mon", image="idle", mode="global", networks=["back"])
    victim = three[0]
    before = {t["slot"]: t for t in tasks(cluster, "web")}
    later = NOW + HEARTBEAT_PERIOD * HEARTBEAT_GRACE + 1
    for node in three[1:]:
        cluster.heartbeat(node, later)
    assert cluster.expire_heartbeats(later) == [victim]
    svcs.reconcile(cluster, later)
    after = {t["slot"]: t for t in tasks(cluster, "web")}
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert victim not in {t["node_id"] for t in after.values()}
    assert Counter(t["node_id"] for t in after.values()) == dict.fromkeys(three[1:], 3)
    for slot, task in before.items():  # tasks on healthy nodes were left alone
        if task["node_id"] != victim:
            assert after[slot]["id"] == task["id"]
            assert after[slot]["addresses"] == task["addresses"]
        else:
            assert after[slot]["id"] != task["id"]
    assert sorted(t["node_id"] for t in tasks(cluster, "mon")) == sorted(three[1:])
    assert_addresses_sound(cluster)
    lbs = lb_addresses(cluster, back["id"])  # one per node with a task there, not the victim's
    assert sorted(n["id"] for n in cluster.store.list("node") if back["id"] in n.get(
        "lb_addresses", {})) == sorted(three[1:])  # fmt: skip
    assert len(nets.used_addresses(cluster, back["id"])) == 6 + 2 + 2 + len(lbs)
    # The node returns: the global service comes back to it, replicas do not move back.
    assert cluster.heartbeat(victim, later + 1) is True
    svcs.reconcile(cluster, later + 1)
    assert victim in {t["node_id"] for t in tasks(cluster, "mon")}
    assert {t["slot"]: t["id"] for t in tasks(cluster, "web")} == {
        s: t["id"] for s, t in after.items()
    }
    assert_addresses_sound(cluster)


def test_remove_service_deletes_tasks_and_frees_ips(cluster: Cluster, three: list[str]) -> None:
    back = nets.create_network(cluster, "back", NOW)
    svcs.create_service(cluster, NOW, name="keep", image="whoami", networks=["back"])
    kept = set(all_addresses(cluster))
    svc = svcs.create_service(
        cluster, NOW, name="web", image="whoami", replicas=4, networks=["back"], ports=["80:80"]
    )
    # 4 tasks on back and ingress, 2 VIPs, and back's LB address on the 2 nodes "keep" is not on
    assert len(all_addresses(cluster)) == len(kept) + 4 * 2 + 2 + 2
    assert svcs.remove_service(cluster, "web")["id"] == svc["id"]
    assert svcs.tasks_of(cluster, svc["id"]) == []
    assert set(all_addresses(cluster)) == kept
    # what stays on ingress: one ingress-sandbox address per node
    ingress_lbs = {IPv4Address(ip) for _, ip in lb_addresses(cluster, ingress_id(cluster))}
    assert len(ingress_lbs) == len(cluster.store.list("node"))
    assert nets.used_addresses(cluster, ingress_id(cluster)) == ingress_lbs
    assert len(nets.used_addresses(cluster, back["id"])) == 3  # keep: its task, VIP, LB address
    with pytest.raises(NotFound):
        svcs.remove_service(cluster, "web")


def test_find_service(cluster: Cluster, three: list[str]) -> None:
    svc = svcs.create_service(cluster, NOW, name="web", image="whoami")
    assert svcs.find_service(cluster, svc["id"])["name"] == "web"
    assert svcs.find_service(cluster, svc["id"][:4])["name"] == "web"
    with pytest.raises(NotFound):
        svcs.find_service(cluster, svc["id"][:2])


def test_a_full_network_leaves_tasks_pending_and_blocks_nothing_else(
    cluster: Cluster, three: list[str]
) -> None:
    """A /29 holds five addresses: the VIP and one global task on each of four nodes."""
    nets.create_network(cluster, "tiny", NOW, subnet="10.9.0.0/29")
    fourth = add_node(cluster, 4)
    svcs.create_service(cluster, NOW, name="mon", image="idle", mode="global", networks=["tiny"])
    assert len(tasks(cluster, "mon")) == 4
    fifth = add_node(cluster, 5, NOW + 1)
    # Reconciliation must go on (it runs in the manager's timers and node sessions): the task
    # that finds no address waits, and other services are still created and placed.
    svcs.reconcile(cluster, NOW + 1)
    assert fifth not in {t["node_id"] for t in tasks(cluster, "mon")}
    assert svcs.find_service(cluster, "mon")["pending"] == 1
    svcs.create_service(cluster, NOW + 2, name="web", image="whoami", replicas=2)
    assert len(tasks(cluster, "web")) == 2
    assert_addresses_sound(cluster)
    # When a node goes away, its address goes to the waiting task.
    cluster.mark_down(fourth)
    svcs.reconcile(cluster, NOW + 3)
    assert sorted(t["node_id"] for t in tasks(cluster, "mon")) == sorted([*three, fifth])
    assert svcs.find_service(cluster, "mon")["pending"] == 0
    assert_addresses_sound(cluster)


def test_replicas_beyond_the_subnet_wait_for_addresses(cluster: Cluster, three: list[str]) -> None:
    nets.create_network(cluster, "tiny", NOW, subnet="10.9.0.0/29")
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=6, networks=["tiny"])
    assert [t["slot"] for t in tasks(cluster, "web")] == [1, 2, 3, 4]
    assert svcs.find_service(cluster, "web")["pending"] == 2
    svcs.scale_service(cluster, "web", 3, NOW + 1)
    assert [t["slot"] for t in tasks(cluster, "web")] == [1, 2, 3]
    assert svcs.find_service(cluster, "web")["pending"] == 0
    assert_addresses_sound(cluster)


# ----------------------------------------------------------------------------- task status


def test_task_status(cluster: Cluster, three: list[str]) -> None:
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=2)
    t1, t2 = tasks(cluster, "web")
    svcs.task_status(cluster, t1["node_id"], t1["id"], "running", "", NOW + 1)
    assert tasks(cluster, "web")[0]["state"] == "running"
    # A report from another node about this task is stale and ignored.
    other = next(n for n in three if n != t2["node_id"])
    svcs.task_status(cluster, other, t2["id"], "running", "", NOW + 1)
    assert tasks(cluster, "web")[1]["state"] == "assigned"
    svcs.task_status(cluster, t2["node_id"], "ghost", "running", "", NOW + 1)
    rows = svcs.service_rows(cluster)
    assert [(r["name"], r["running"], r["desired"]) for r in rows] == [("web", 1, 2)]
    # A failed task is replaced in the same slot.
    svcs.task_status(cluster, t2["node_id"], t2["id"], "failed", "exit 1", NOW + 2)
    again = tasks(cluster, "web")
    assert [t["slot"] for t in again] == [1, 2]
    assert again[1]["id"] != t2["id"]
    assert again[0]["id"] == t1["id"]


# ----------------------------------------------------------------------------- attachments


def test_attach_refused_on_a_non_attachable_network(cluster: Cluster, three: list[str]) -> None:
    nets.create_network(cluster, "back", NOW)
    with pytest.raises(Conflict, match="not manually attachable"):
        svcs.attach(cluster, three[0], "box", "back", None)
    with pytest.raises(Conflict, match="not manually attachable"):
        svcs.attach(cluster, three[0], "box", "ingress", None)
    with pytest.raises(NotFound):
        svcs.attach(cluster, three[0], "box", "nope", None)
    assert cluster.store.list("attachment") == []


def test_attach_to_an_attachable_network(cluster: Cluster, three: list[str]) -> None:
    net = nets.create_network(cluster, "att", NOW, attachable=True)
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=3, networks=["att"])
    got = svcs.attach(cluster, three[0], "box", "att", None)
    assert got["network"] == nets.summary(nets.find_network(cluster, "att"))
    att = got["attachment"]
    assert (att["node_id"], att["container"], att["network_id"]) == (three[0], "box", net["id"])
    fixed = svcs.attach(cluster, three[1], "box", "att", "10.0.1.200")["attachment"]
    assert fixed["ip"] == "10.0.1.200"
    with pytest.raises(Conflict, match="already has an attachment"):
        svcs.attach(cluster, three[0], "box", "att", None)
    with pytest.raises(Conflict, match="already in use"):
        svcs.attach(cluster, three[2], "c3", "att", "10.0.1.200")
    assert len(cluster.store.list("attachment")) == 2
    assert_addresses_sound(cluster)
    assert svcs.detach(cluster, three[0], "box") is True
    assert svcs.detach(cluster, three[0], "box") is False
    assert svcs.detach(cluster, three[2], "box") is False  # other node's container of that name
    assert [a["node_id"] for a in cluster.store.list("attachment")] == [three[1]]


def test_prune_attachments(cluster: Cluster, three: list[str]) -> None:
    nets.create_network(cluster, "att", NOW, attachable=True)
    for name in ("a", "b", "c"):
        svcs.attach(cluster, three[0], name, "att", None)
    svcs.attach(cluster, three[1], "a", "att", None)
    assert sorted(svcs.prune_attachments(cluster, three[0], {"b"})) == ["a", "c"]
    left = sorted((a["node_id"], a["container"]) for a in cluster.store.list("attachment"))
    assert left == sorted([(three[0], "b"), (three[1], "a")])
    assert svcs.prune_attachments(cluster, three[0], {"b"}) == []
    assert svcs.prune_attachments(cluster, three[1], set()) == ["a"]


# ----------------------------------------------------------------------------- assignments


def test_assignments_are_exactly_the_nodes_tasks_and_networks(
    cluster: Cluster, three: list[str]
) -> None:
    a = nets.create_network(cluster, "a", NOW)
    b = nets.create_network(cluster, "b", NOW, attachable=True)
    unused = nets.create_network(cluster, "unused", NOW)
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=3, networks=["a"])
    svcs.attach(cluster, three[2], "box", "b", None)
    ing = ingress_id(cluster)

    def expected_nets(node: str) -> set[str]:
        return {ing, a["id"]} | ({b["id"]} if node == three[2] else set())

    for node in three:
        got = svcs.assignments(cluster, node)
        mine = [t for t in cluster.store.list("task") if t["node_id"] == node]
        assert sorted(t["id"] for t in got["tasks"]) == sorted(t["id"] for t in mine)
        assert len(got["tasks"]) == 1
        task = got["tasks"][0]
        assert set(task) == {"id", "service_name", "slot", "container", "image", "cmd",
                             "addresses", "service_id", "endpoint_mode", "vips", "ports",
                             "host_ports", "dns"}  # fmt: skip
        assert task["service_name"] == "web"
        assert task["vips"] == {a["id"]: svcs.find_service(cluster, "web")["vips"][a["id"]]}
        assert set(got["lb_addresses"]) == expected_nets(node)
        net_ids = {n["id"] for n in got["networks"]}
        assert net_ids == expected_nets(node)
        assert unused["id"] not in net_ids
        assert all(set(n) == set(nets.summary(a)) for n in got["networks"])
    newcomer = add_node(cluster, 9)
    svcs.reconcile(cluster, NOW)
    got = svcs.assignments(cluster, newcomer)
    assert got["networks"] == [nets.summary(nets.find_network(cluster, "ingress"))]
    assert got["tasks"] == []
    assert set(got["lb_addresses"]) == {ing}  # its ingress sandbox


def test_assignments_drop_tasks_of_a_node_that_went_down(
    cluster: Cluster, three: list[str]
) -> None:
    svcs.create_service(cluster, NOW, name="web", image="whoami", replicas=3)
    cluster.mark_down(three[0])
    svcs.reconcile(cluster, NOW + 1)
    assert svcs.assignments(cluster, three[0])["tasks"] == []
    assert sum(len(svcs.assignments(cluster, n)["tasks"]) for n in three[1:]) == 3


def test_service_rows(cluster: Cluster, three: list[str]) -> None:
    svcs.create_service(cluster, NOW, name="b", image="whoami", replicas=2)
    svcs.create_service(cluster, NOW, name="a", image="whoami", mode="global")
    rows = svcs.service_rows(cluster)
    assert [(r["name"], r["desired"], r["running"]) for r in rows] == [("a", 3, 0), ("b", 2, 0)]


# ----------------------------------------------------------------- random operation sequences


class SwarmMachine(RuleBasedStateMachine):
    """Random create/scale/rm/node-down/node-up/attach/detach; addresses never collide."""

    NODES = 4

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vxnet-svc-")
        self.store = Store.open(Path(self.tmp) / "m.db")
        self.cluster = new_cluster(self.store, seed=7)
        nets.ensure_ingress(self.cluster, NOW)
        self.now = NOW
        self.node_ids: list[str] = []
        self.up: set[str] = set()
        self.services: set[str] = set()
        self.attached: set[tuple[str, str]] = set()
        self.serial = 0

    @initialize()
    def setup(self) -> None:
        for n in range(self.NODES):
            self.node_ids.append(add_node(self.cluster, n, self.now))
        self.up = set(self.node_ids)
        nets.create_network(self.cluster, "back", NOW, subnet="10.50.0.0/27")
        nets.create_network(self.cluster, "att", NOW, attachable=True, subnet="10.60.0.0/28")

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def tick(self) -> float:
        self.now += 0.1
        return self.now

    @precondition(lambda self: len(self.services) < 5)
    @rule(
        replicas=st.integers(0, 4),
        mode=st.sampled_from(["replicated", "replicated", "global"]),
        networks=st.sampled_from([[], ["back"], ["att"], ["back", "att"]]),
        port=st.sampled_from([None, "8080:80", "8081:80", "mode=host,target=80"]),
        dnsrr=st.booleans(),
    )
    def create(
        self, replicas: int, mode: str, networks: list[str], port: str | None, dnsrr: bool
    ) -> None:
        self.serial += 1
        name = f"s{self.serial}"
        ports = [port] if port else []
        taken = {
            (p["published"], p["protocol"])
            for s in self.cluster.store.list("service")
            for p in s["ports"]
            if p["mode"] == "ingress"
        }
        mine = {(p["published"], p["protocol"]) for p in map(svcs.parse_port, ports)}
        ingress_port = port is not None and port.startswith("808")
        try:
            svc = svcs.create_service(
                self.cluster,
                self.tick(),
                name=name,
                image="whoami",
                replicas=replicas if mode == "replicated" else None,
                mode=mode,
                networks=networks,
                ports=ports,
                endpoint_mode="dnsrr" if dnsrr else "vip",
            )
        except UsageError as exc:
            if dnsrr and ingress_port:
                assert "dnsrr" in str(exc)
            elif "no available IPv4 addresses" not in str(exc):  # no room for a VIP
                assert isinstance(exc, Conflict)
                assert mine & taken, f"refused without a port clash: {exc}"
            assert self.cluster.store.get_by_name("service", name) is None
            return
        assert not (dnsrr and ingress_port)
        assert not (mine & taken)
        self.services.add(name)
        expected_vips = 0 if dnsrr else len(networks) + ingress_port
        assert len(svc["vips"]) == expected_vips

    @precondition(lambda self: self.services)
    @rule(data=st.data(), replicas=st.integers(0, 6))
    def scale(self, data: st.DataObject, replicas: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.services)))
        svc = svcs.find_service(self.cluster, name)
        if svc["mode"] == "global":
            with pytest.raises(UsageError):
                svcs.scale_service(self.cluster, name, replicas, self.tick())
            return
        svcs.scale_service(self.cluster, name, replicas, self.tick())

    @precondition(lambda self: self.services)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.services)))
        svc = svcs.remove_service(self.cluster, name)
        self.services.discard(name)
        assert svcs.tasks_of(self.cluster, svc["id"]) == []

    @rule(data=st.data())
    def node_down(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(self.node_ids))
        later = self.now + HEARTBEAT_PERIOD * HEARTBEAT_GRACE + 0.5
        for node in self.up - {victim}:
            self.cluster.heartbeat(node, later)
        gone = self.cluster.expire_heartbeats(later)
        assert gone == ([victim] if victim in self.up else [])
        self.now = later
        self.up.discard(victim)
        svcs.reconcile(self.cluster, self.now)

    @rule(data=st.data())
    def node_up(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(self.node_ids))
        revived = self.cluster.heartbeat(node, self.tick())
        assert revived == (node not in self.up)
        self.up.add(node)
        if revived:
            svcs.reconcile(self.cluster, self.now)

    @rule(data=st.data(), container=st.sampled_from(["c1", "c2", "c3"]))
    def attach(self, data: st.DataObject, container: str) -> None:
        node = data.draw(st.sampled_from(self.node_ids))
        network = data.draw(st.sampled_from(["att", "back"]))
        try:
            svcs.attach(self.cluster, node, container, network, None)
        except Conflict as exc:
            assert (
                network == "back"
                or (node, container) in self.attached
                or "no available IPv4 addresses" in str(exc)
            ), str(exc)
            return
        assert network == "att"
        assert (node, container) not in self.attached
        self.attached.add((node, container))

    @precondition(lambda self: self.attached)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        node, container = data.draw(st.sampled_from(sorted(self.attached)))
        assert svcs.detach(self.cluster, node, container) is True
        self.attached.discard((node, container))

    @rule(data=st.data())
    def prune(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(self.node_ids))
        alive = {c for n, c in self.attached if n == node}
        keep = data.draw(st.sets(st.sampled_from(sorted(alive)) if alive else st.nothing()))
        gone = svcs.prune_attachments(self.cluster, node, keep)
        assert sorted(gone) == sorted(alive - keep)
        self.attached -= {(node, c) for c in gone}

    @invariant()
    def addresses_never_collide(self) -> None:
        assert_addresses_sound(self.cluster)
        atts = {(a["node_id"], a["container"]) for a in self.cluster.store.list("attachment")}
        assert atts == self.attached

    @invariant()
    def tasks_match_desired_state(self) -> None:
        store = self.cluster.store
        ready = {n["id"] for n in store.list("node") if n["status"] == "ready"}
        assert ready == self.up
        assert {s["name"] for s in store.list("service")} == self.services
        for svc in store.list("service"):
            mine = svcs.tasks_of(self.cluster, svc["id"])
            nodes = [t["node_id"] for t in mine]
            assert set(nodes) <= ready, "a task stays on a node that is down"
            assert all(set(t["addresses"]) == set(svc["network_ids"]) for t in mine)
            # Tasks that found no free address on a small network wait (pending).
            if svc["mode"] == "global":
                assert len(set(nodes)) == len(nodes)
                assert len(nodes) + svc["pending"] == len(ready)
            else:
                slots = [t["slot"] for t in mine]
                assert len(set(slots)) == len(slots)
                assert set(slots) <= set(range(1, svc["replicas"] + 1))
                assert len(slots) + svc["pending"] == svc["replicas"]
                if not ready:
                    assert mine == []
        known = {s["id"] for s in store.list("service")}
        assert {t["service_id"] for t in store.list("task")} <= known
        for node in self.node_ids:
            assigned = svcs.assignments(self.cluster, node)["tasks"]
            assert len(assigned) == sum(1 for t in store.list("task") if t["node_id"] == node)


SwarmMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_random_operations_never_hand_out_an_address_twice = SwarmMachine.TestCase


def test_lb_addresses_follow_the_nodes_tasks_and_attachments(
    cluster: Cluster, three: list[str]
) -> None:
    """Docker's per-node ``lb-<net>`` endpoint: one address per node and network it is on,
    released with its last task or attachment there; ingress has one on every node."""
    net = nets.create_network(cluster, "app", NOW, attachable=True)

    def holders() -> dict[str, str]:
        return {
            node["id"]: node["lb_addresses"][net["id"]]
            for node in cluster.store.list("node")
            if net["id"] in node.get("lb_addresses", {})
        }

    svcs.create_service(cluster, NOW, name="one", image="whoami", networks=["app"])
    assert len(holders()) == 1
    svcs.attach(cluster, three[2], "box", "app", None)
    assert three[2] in holders()
    first = dict(holders())
    svcs.scale_service(cluster, "one", 3, NOW)
    assert set(holders()) == set(three)
    assert all(holders()[n] == ip for n, ip in first.items())  # an address never moves
    svcs.scale_service(cluster, "one", 0, NOW)
    assert set(holders()) == {three[2]}  # only the attachment keeps one
    assert svcs.detach(cluster, three[2], "box")
    assert holders() == {}
    assert_addresses_sound(cluster)
    ingress = ingress_id(cluster)
    assert all(ingress in n["lb_addresses"] for n in cluster.store.list("node"))
