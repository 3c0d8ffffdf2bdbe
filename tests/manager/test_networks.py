"""Swarm networks on the manager: Docker's allocation rules, refusals, removal and inspect."""

from __future__ import annotations

import random
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from vxnet.errors import Conflict, NotFound, UsageError
from vxnet.manager import ipam, pki
from vxnet.manager import networks as nets
from vxnet.manager import services as svcs
from vxnet.manager.cluster import Cluster
from vxnet.manager.store import Store

NOW = 1_700_000_000.0
CSR = pki.make_csr(pki.new_node_key())
VXLANID = ipam.VXLANID_LIST_OPTION
MTU = nets.MTU_OPTION


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "m.db") as s:
        yield s


def initialize(store: Store, **kw: Any) -> Cluster:
    return Cluster.initialize(
        store,
        random.Random(1),
        NOW,
        hostname="mgr",
        advertise_addr="192.168.50.1",
        data_path_addr="192.168.50.1",
        **kw,
    )


@pytest.fixture
def cluster(store: Store) -> Cluster:
    return initialize(store)


def ready_node(cluster: Cluster, host: str, data_path_addr: str) -> str:
    issued = cluster.issue("worker", CSR, host, "192.168.50.99", data_path_addr, NOW)
    cluster.hello(issued.node_id, NOW, {})
    return issued.node_id


def network_count(cluster: Cluster) -> int:
    return len(cluster.store.list("network"))


# ------------------------------------------------------------------------- subnets and VNIs


def test_default_pool_in_order_with_ingress_first(cluster: Cluster) -> None:
    ingress = nets.ensure_ingress(cluster, NOW)
    a = nets.create_network(cluster, "a", NOW)
    b = nets.create_network(cluster, "b", NOW)
    assert (ingress["name"], ingress["ingress"]) == ("ingress", True)
    assert [n["subnet"] for n in (ingress, a, b)] == ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]
    assert [n["gateway"] for n in (ingress, a, b)] == ["10.0.0.1", "10.0.1.1", "10.0.2.1"]
    assert [n["vni"] for n in (ingress, a, b)] == [4096, 4097, 4098]
    assert [n["vnis"] for n in (ingress, a, b)] == [[4096], [4097], [4098]]
    assert len({n["id"] for n in (ingress, a, b)}) == 3
    assert (a["driver"], a["scope"], a["attachable"], a["ingress"]) == (
        "overlay",
        "swarm",
        False,
        False,
    )
    assert a["mtu"] == 1450
    assert a["created"] == NOW
    # ensure_ingress is idempotent.
    assert nets.ensure_ingress(cluster, NOW + 5) == ingress
    assert network_count(cluster) == 3


def test_without_ingress_the_first_network_takes_the_first_block(cluster: Cluster) -> None:
    assert nets.create_network(cluster, "a", NOW)["subnet"] == "10.0.0.0/24"


def test_freed_subnet_and_vni_are_reused_lowest_first(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        nets.create_network(cluster, name, NOW)
    nets.remove_network(cluster, "b")
    d = nets.create_network(cluster, "d", NOW)
    assert (d["subnet"], d["vni"]) == ("10.0.1.0/24", 4097)
    e = nets.create_network(cluster, "e", NOW)
    assert (e["subnet"], e["vni"]) == ("10.0.3.0/24", 4099)


def test_many_networks_have_unique_vnis_and_disjoint_subnets(cluster: Cluster) -> None:
    nets.ensure_ingress(cluster, NOW)
    made = [nets.create_network(cluster, f"n{i}", NOW) for i in range(40)]
    vnis = [n["vni"] for n in made]
    assert vnis == list(range(4097, 4137))
    subnets = [IPv4Network(n["subnet"]) for n in made]
    for i, s in enumerate(subnets):
        assert s.prefixlen == 24
        assert s.subnet_of(IPv4Network("10.0.0.0/8"))
        assert not any(s.overlaps(o) for o in subnets[i + 1 :])


def test_custom_pool_and_mask_length(store: Store) -> None:
    cluster = initialize(store, pools=("10.20.0.0/16", "172.30.0.0/16"), mask_length=26)
    made = [nets.create_network(cluster, f"n{i}", NOW) for i in range(3)]
    assert [n["subnet"] for n in made] == ["10.20.0.0/26", "10.20.0.64/26", "10.20.0.128/26"]


def test_explicit_subnet_is_skipped_by_the_default_allocation(cluster: Cluster) -> None:
    fixed = nets.create_network(cluster, "fixed", NOW, subnet="10.0.0.0/23", gateway="10.0.1.254")
    assert (fixed["subnet"], fixed["gateway"]) == ("10.0.0.0/23", "10.0.1.254")
    assert nets.create_network(cluster, "auto", NOW)["subnet"] == "10.0.2.0/24"
    outside = nets.create_network(cluster, "outside", NOW, subnet="192.168.77.0/24")
    assert outside["gateway"] == "192.168.77.1"


@pytest.mark.parametrize("subnet", ["10.0.1.0/24", "10.0.0.0/16", "10.0.1.128/25", "10.0.0.0/8"])
def test_overlapping_subnet_is_refused(cluster: Cluster, subnet: str) -> None:
    nets.create_network(cluster, "a", NOW)
    nets.create_network(cluster, "b", NOW)  # 10.0.1.0/24
    with pytest.raises(Conflict, match="overlaps") as info:
        nets.create_network(cluster, "c", NOW, subnet=subnet)
    assert "Pool overlaps" in str(info.value)
    assert network_count(cluster) == 2


def test_duplicate_name_is_a_conflict(cluster: Cluster) -> None:
    first = nets.create_network(cluster, "web", NOW)
    with pytest.raises(Conflict, match="network with name web already exists"):
        nets.create_network(cluster, "web", NOW, subnet="192.168.9.0/24")
    assert nets.find_network(cluster, "web") == first


def test_only_one_ingress(cluster: Cluster) -> None:
    nets.ensure_ingress(cluster, NOW)
    with pytest.raises(Conflict, match="only one ingress network"):
        nets.create_network(cluster, "ingress2", NOW, ingress=True)
    assert network_count(cluster) == 1


def test_ingress_cannot_be_attachable(cluster: Cluster) -> None:
    with pytest.raises(UsageError, match="cannot be attachable"):
        nets.create_network(cluster, "ing", NOW, ingress=True, attachable=True)
    assert network_count(cluster) == 0


@pytest.mark.parametrize("driver", ["bridge", "macvlan", "host", ""])
def test_only_the_overlay_driver(cluster: Cluster, driver: str) -> None:
    with pytest.raises(UsageError, match="not a swarm driver"):
        nets.create_network(cluster, "x", NOW, driver=driver)
    assert network_count(cluster) == 0


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 41, "ünï"])
def test_invalid_names_are_refused(cluster: Cluster, name: str) -> None:
    with pytest.raises(UsageError, match="invalid network name"):
        nets.create_network(cluster, name, NOW)


def test_small_pool_exhausts_with_dockers_message(store: Store) -> None:
    cluster = initialize(store, pools=("10.20.0.0/23",), mask_length=24)
    assert nets.ensure_ingress(cluster, NOW)["subnet"] == "10.20.0.0/24"
    assert nets.create_network(cluster, "a", NOW)["subnet"] == "10.20.1.0/24"
    with pytest.raises(Conflict) as info:
        nets.create_network(cluster, "b", NOW)
    assert str(info.value) == ipam.POOLS_EXHAUSTED
    # An explicit subnet outside the pool still works, and freeing a block makes room again.
    assert nets.create_network(cluster, "c", NOW, subnet="10.30.0.0/24")["vni"] == 4098
    nets.remove_network(cluster, "a")
    assert nets.create_network(cluster, "b", NOW)["subnet"] == "10.20.1.0/24"


def test_vxlanid_list_fixes_the_vni(cluster: Cluster) -> None:
    fixed = nets.create_network(cluster, "fixed", NOW, options={VXLANID: "5000"})
    assert (fixed["vni"], fixed["vnis"]) == (5000, [5000])
    with pytest.raises(Conflict, match="vxlan id 5000 is already used"):
        nets.create_network(cluster, "again", NOW, options={VXLANID: "5000"})
    assert network_count(cluster) == 1
    assert nets.create_network(cluster, "auto", NOW)["vni"] == 4096


def test_automatic_vnis_skip_every_fixed_one(cluster: Cluster) -> None:
    fixed = nets.create_network(cluster, "fixed", NOW, options={VXLANID: "4096,4097"})
    assert fixed["vnis"] == [4096, 4097]
    assert nets.create_network(cluster, "auto", NOW)["vni"] == 4098
    with pytest.raises(Conflict, match="4097"):
        nets.create_network(cluster, "clash", NOW, options={VXLANID: "4097"})
    # A fixed VNI taken by an automatic network is refused too.
    with pytest.raises(Conflict, match="4098"):
        nets.create_network(cluster, "clash", NOW, options={VXLANID: "7000,4098"})


@pytest.mark.parametrize("value", ["abc", "0", "16777216", "5000,5000", ""])
def test_bad_vxlanid_list_is_refused(cluster: Cluster, value: str) -> None:
    with pytest.raises(UsageError, match="vxlan id"):
        nets.create_network(cluster, "x", NOW, options={VXLANID: value})
    assert network_count(cluster) == 0


# -------------------------------------------------------------------------------------- MTU


def test_mtu_defaults() -> None:
    assert nets.network_mtu({}) == 1450
    assert nets.network_mtu({"encrypted": ""}) == 1416  # ICV 16; Docker (ICV 8) has 1424
    assert 1416 % 4 == 0


@pytest.mark.parametrize(("value", "mtu"), [("1400", 1400), ("1450", 1450), ("576", 576)])
def test_mtu_option_sets_the_network_mtu(cluster: Cluster, value: str, mtu: int) -> None:
    net = nets.create_network(cluster, "m", NOW, options={MTU: value})
    assert net["mtu"] == mtu
    assert nets.inspect_network(cluster, net)["Options"][MTU] == str(mtu)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({MTU: "1451"}, "out of range"),
        ({MTU: "9000"}, "out of range"),
        ({MTU: "575"}, "out of range"),
        ({MTU: "-1"}, "out of range"),
        ({MTU: "big"}, "a number is needed"),
        ({MTU: ""}, "a number is needed"),
        ({MTU: "1417", "encrypted": ""}, "576-1416"),
    ],
)
def test_bad_mtu_is_refused(cluster: Cluster, options: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        nets.create_network(cluster, "m", NOW, options=options)
    assert network_count(cluster) == 0


def test_a_jumbo_underlay_raises_the_ceiling_not_the_default(store: Store) -> None:
    """``swarm init --underlay-mtu 9000``: networks may ask for jumbo MTUs; Docker's defaults
    stay (as in Docker, a jumbo fabric is used only by asking for it)."""
    jumbo = initialize(store, underlay_mtu=9000)
    assert jumbo.underlay_mtu == 9000
    assert nets.create_network(jumbo, "d", NOW)["mtu"] == 1450
    assert nets.create_network(jumbo, "de", NOW, options={"encrypted": ""})["mtu"] == 1416
    assert nets.create_network(jumbo, "j", NOW, options={MTU: "8950"})["mtu"] == 8950
    secret = nets.create_network(jumbo, "je", NOW, options={"encrypted": "", MTU: "8916"})
    assert secret["mtu"] == 8916
    with pytest.raises(UsageError, match="576-8950 on a 9000-byte underlay"):
        nets.create_network(jumbo, "x", NOW, options={MTU: "8951"})
    with pytest.raises(UsageError, match="576-8916 on a 9000-byte underlay"):
        nets.create_network(jumbo, "x", NOW, options={"encrypted": "", MTU: "8917"})


def test_a_small_underlay_lowers_the_default_too() -> None:
    assert nets.network_mtu({}, underlay_mtu=1280) == 1230
    assert nets.network_mtu({"encrypted": ""}, underlay_mtu=1280) == 1196  # 1280-50-34, /4
    assert nets.network_mtu({}, underlay_mtu=9000) == 1450


def test_encrypted_network(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "secret", NOW, options={"encrypted": ""})
    assert net["encrypted"] is True
    assert net["mtu"] == 1416
    small = nets.create_network(cluster, "s2", NOW, options={"encrypted": "", MTU: "1400"})
    assert (small["encrypted"], small["mtu"]) == (True, 1400)
    plain = nets.create_network(cluster, "plain", NOW)
    assert plain["encrypted"] is False


def test_docker_icv_swarm_gives_docker_mtu(store: Store) -> None:
    """`swarm init --esp-icv-length 8`: ESP grows 26 bytes, not 34, and the MTU is Docker's 1424."""
    cluster = initialize(store, esp_icv_length=8)
    assert cluster.esp_icv_length == 8
    assert Cluster(store, random.Random(9)).esp_icv_length == 8  # persisted
    net = nets.create_network(cluster, "secret", NOW, options={"encrypted": ""})
    assert net["mtu"] == 1424
    with pytest.raises(UsageError, match="576-1424"):
        nets.create_network(cluster, "big", NOW, options={"encrypted": "", MTU: "1425"})
    assert nets.create_network(cluster, "plain", NOW)["mtu"] == 1450  # plain VXLAN: no ESP


@pytest.mark.parametrize("icv", [0, 4, 12, 32])
def test_other_icv_lengths_are_refused(store: Store, icv: int) -> None:
    with pytest.raises(UsageError, match="esp-icv-length must be 8"):
        initialize(store, esp_icv_length=icv)
    assert store.get_value("cluster") is None


def test_parse_options() -> None:
    assert nets.parse_options([]) == {}
    assert nets.parse_options(["encrypted", f"{MTU}=1400", f"{VXLANID}=5000,5001"]) == {
        "encrypted": "",
        MTU: "1400",
        VXLANID: "5000,5001",
    }
    with pytest.raises(UsageError, match="unknown overlay driver option"):
        nets.parse_options(["com.docker.network.bridge.name=br0"])


# ---------------------------------------------------------------------------------- addresses


def test_allocate_address_is_serial_and_skips_the_gateway(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "a", NOW, subnet="10.9.0.0/29")
    first = nets.allocate_address(cluster, net)
    assert first == "10.9.0.2"
    # Without recording it, the next allocation still moves on (libnetwork's serial order).
    assert nets.allocate_address(cluster, nets.find_network(cluster, "a")) == "10.9.0.3"
    assert nets.find_network(cluster, "a")["last_ip"] == "10.9.0.3"


def test_allocate_address_wanted(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "a", NOW, subnet="10.9.0.0/24", attachable=True)
    assert nets.allocate_address(cluster, net, "10.9.0.77") == "10.9.0.77"
    node = ready_node(cluster, "w1", "192.168.50.11")
    svcs.attach(cluster, node, "c1", "a", "10.9.0.77")
    with pytest.raises(Conflict, match="already in use"):
        nets.allocate_address(cluster, net, "10.9.0.77")
    with pytest.raises(Conflict, match="gateway"):
        nets.allocate_address(cluster, net, "10.9.0.1")
    with pytest.raises(UsageError, match="not in the subnet"):
        nets.allocate_address(cluster, net, "10.8.0.1")
    with pytest.raises(UsageError, match="invalid IP address"):
        nets.allocate_address(cluster, net, "ten")


def test_full_network_says_so(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "tiny", NOW, subnet="10.9.0.0/30", attachable=True)
    node = ready_node(cluster, "w1", "192.168.50.11")
    assert svcs.attach(cluster, node, "c1", "tiny", None)["attachment"]["ip"] == "10.9.0.2"
    with pytest.raises(Conflict, match="no available IPv4 addresses"):
        nets.allocate_address(cluster, nets.find_network(cluster, net["id"]))


# ------------------------------------------------------------------------------- find/remove


def test_find_network_by_name_id_and_prefix(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "web", NOW)
    assert nets.find_network(cluster, "web")["id"] == net["id"]
    assert nets.find_network(cluster, net["id"])["name"] == "web"
    assert nets.find_network(cluster, net["id"][:5])["name"] == "web"
    with pytest.raises(NotFound):
        nets.find_network(cluster, net["id"][:2])  # too short to be a prefix
    with pytest.raises(NotFound, match="network nope not found"):
        nets.find_network(cluster, "nope")


def test_remove_network(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "web", NOW)
    assert nets.remove_network(cluster, "web")["id"] == net["id"]
    assert network_count(cluster) == 0
    with pytest.raises(NotFound):
        nets.remove_network(cluster, "web")


def test_remove_refuses_a_network_used_by_a_service(cluster: Cluster) -> None:
    ready_node(cluster, "w1", "192.168.50.11")
    nets.create_network(cluster, "back", NOW)
    svcs.create_service(cluster, NOW, name="db", image="idle", networks=["back"])
    with pytest.raises(Conflict, match="network back is in use by service db"):
        nets.remove_network(cluster, "back")
    svcs.remove_service(cluster, "db")
    nets.remove_network(cluster, "back")


def test_remove_refuses_a_network_used_by_an_attachment(cluster: Cluster) -> None:
    node = ready_node(cluster, "w1", "192.168.50.11")
    nets.create_network(cluster, "att", NOW, attachable=True)
    svcs.attach(cluster, node, "box", "att", None)
    with pytest.raises(Conflict, match="in use by container box"):
        nets.remove_network(cluster, "att")
    assert svcs.detach(cluster, node, "box")
    nets.remove_network(cluster, "att")


def test_remove_refuses_ingress_while_a_service_publishes(cluster: Cluster) -> None:
    ready_node(cluster, "w1", "192.168.50.11")
    nets.ensure_ingress(cluster, NOW)
    svcs.create_service(cluster, NOW, name="web", image="whoami", ports=["8080:80"])
    svcs.create_service(
        cluster, NOW, name="hostport", image="whoami", ports=["mode=host,target=80"]
    )
    with pytest.raises(Conflict, match="service web depends on it"):
        nets.remove_network(cluster, "ingress")
    svcs.remove_service(cluster, "web")
    # A host-mode port does not need the routing mesh.
    nets.remove_network(cluster, "ingress")
    assert network_count(cluster) == 0


# ------------------------------------------------------------------------------------ inspect


def test_inspect_has_dockers_keys(cluster: Cluster) -> None:
    net = nets.create_network(
        cluster, "web", NOW, attachable=True, options={"encrypted": "", MTU: "1400"}
    )
    out = nets.inspect_network(cluster, net)
    assert out["Name"] == "web"
    assert out["Id"] == net["id"]
    assert out["Driver"] == "overlay"
    assert out["Scope"] == "swarm"
    assert out["Attachable"] is True
    assert out["Ingress"] is False
    assert out["Internal"] is False
    assert out["EnableIPv6"] is False
    assert out["IPAM"]["Driver"] == "default"
    assert out["IPAM"]["Config"] == [{"Subnet": "10.0.0.0/24", "Gateway": "10.0.0.1"}]
    assert out["Options"] == {
        "com.docker.network.driver.overlay.vxlanid_list": "4096",
        "com.docker.network.driver.mtu": "1400",
        "encrypted": "",
    }
    assert out["Containers"] == {}
    assert "Peers" not in out


def test_inspect_ip_range(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "r", NOW, subnet="10.9.0.0/24", ip_range="10.9.0.128/25")
    config = nets.inspect_network(cluster, net)["IPAM"]["Config"][0]
    assert config == {"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.1", "IPRange": "10.9.0.128/25"}
    assert nets.allocate_address(cluster, net) == "10.9.0.128"


def test_inspect_lists_containers_and_verbose_peers(cluster: Cluster) -> None:
    n1 = ready_node(cluster, "w1", "10.99.0.1")
    n2 = ready_node(cluster, "w2", "10.99.0.2")
    ready_node(cluster, "w3", "10.99.0.3")  # runs nothing on the network
    net = nets.create_network(cluster, "web", NOW, attachable=True)
    svc = svcs.create_service(cluster, NOW, name="api", image="whoami", networks=["web"])
    (task,) = svcs.tasks_of(cluster, svc["id"])
    other = n2 if task["node_id"] == n1 else n1
    att = svcs.attach(cluster, other, "box", "web", None)["attachment"]
    out = nets.inspect_network(cluster, nets.find_network(cluster, "web"), verbose=True)
    ip = task["addresses"][net["id"]]
    assert out["Containers"][task["id"]] == {
        "Name": task["container"],
        "IPv4Address": f"{ip}/24",
        "MacAddress": "02:42:" + ":".join(f"{int(o):02x}" for o in ip.split(".")),
        "Node": task["node_id"],
    }
    assert out["Containers"][att["id"]]["Name"] == "box"
    assert out["Containers"][att["id"]]["IPv4Address"] == f"{att['ip']}/24"
    assert out["Containers"][att["id"]]["Node"] == other
    assert len(out["Containers"]) == 2
    hosts = {n1: ("w1", "10.99.0.1"), n2: ("w2", "10.99.0.2")}
    assert sorted((p["Name"], p["IP"]) for p in out["Peers"]) == sorted(
        hosts[n] for n in (task["node_id"], other)
    )
    # The VIP is not a container.
    assert svc["vips"][net["id"]] not in {c["IPv4Address"][:-3] for c in out["Containers"].values()}


def test_inspect_ingress(cluster: Cluster) -> None:
    ingress = nets.ensure_ingress(cluster, NOW)
    out = nets.inspect_network(cluster, ingress, verbose=True)
    assert (out["Name"], out["Ingress"], out["Attachable"]) == ("ingress", True, False)
    assert out["Peers"] == []


def test_summary_has_what_an_agent_needs(cluster: Cluster) -> None:
    net = nets.create_network(cluster, "web", NOW, options={"encrypted": ""})
    assert nets.summary(net) == {
        "id": net["id"],
        "name": "web",
        "vni": 4096,
        "subnet": "10.0.0.0/24",
        "gateway": "10.0.0.1",
        "mtu": 1416,
        "encrypted": True,
        "attachable": False,
        "ingress": False,
    }


def test_used_addresses_counts_tasks_vips_attachments_and_lb_addresses(cluster: Cluster) -> None:
    node = ready_node(cluster, "w1", "192.168.50.11")
    net = nets.create_network(cluster, "web", NOW, attachable=True)
    svc = svcs.create_service(
        cluster, NOW, name="api", image="whoami", replicas=2, networks=["web"]
    )
    att = svcs.attach(cluster, node, "box", "web", None)["attachment"]
    expected = {IPv4Address(svc["vips"][net["id"]]), IPv4Address(att["ip"])}
    expected |= {IPv4Address(t["addresses"][net["id"]]) for t in svcs.tasks_of(cluster, svc["id"])}
    lbs = {
        IPv4Address(n["lb_addresses"][net["id"]])
        for n in cluster.store.list("node")
        if net["id"] in n.get("lb_addresses", {})
    }
    assert len(lbs) == len(cluster.store.list("node"))  # one per node with a task or attachment
    expected |= lbs
    assert nets.used_addresses(cluster, net["id"]) == expected
    assert len(expected) == 4 + len(lbs)
