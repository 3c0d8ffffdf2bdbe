"""Discovery's pure parts, without a kernel: records -> VIP bindings, and the mesh's parsers."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vxnet.daemon.discovery import Discovery
from vxnet.daemon.localnets import LocalNetworks
from vxnet.daemon.mesh import Bridge, parse_publish
from vxnet.dataplane.tables import Backend, NetworkSpec, PortMap, SetService
from vxnet.dns.records import EndpointRecord
from vxnet.errors import UsageError

APP = NetworkSpec(
    "app", 4100, ipaddress.IPv4Network("10.0.5.0/24"), ipaddress.IPv4Address("10.0.5.1")
)
INGRESS = NetworkSpec(
    "ingress", 4096, ipaddress.IPv4Network("10.0.0.0/24"), ipaddress.IPv4Address("10.0.0.1")
)
IP = ipaddress.IPv4Address


def discovery() -> Discovery:
    daemon = SimpleNamespace(
        networks={"app": APP, "ingress": INGRESS},
        ingress_networks={"ingress"},
        swarm_ingress=lambda name: name == "ingress",
    )
    gossip = SimpleNamespace(name="me")
    return Discovery(cast(Any, daemon), cast(Any, gossip), "me")


def task(name: str, ip: str, vip: str = "", disabled: bool = False, **kw: Any) -> EndpointRecord:
    service = name.partition(".")[0]
    return EndpointRecord(
        name=name,
        service_name=service,
        service_id="id-" + service,
        virtual_ip=vip,
        endpoint_ip=ip,
        service_disabled=disabled,
        **kw,
    )


def test_bindings_follow_the_records_of_a_network() -> None:
    d = discovery()
    d.directory.put("app", "a", task("web.1", "10.0.5.3", "10.0.5.2"))
    d.directory.put("app", "b", task("web.2", "10.0.5.4", "10.0.5.2"))
    d.directory.put("app", "c", task("web.3", "10.0.5.5", "10.0.5.2", disabled=True))
    d.directory.put("app", "d", task("rr.1", "10.0.5.6"))  # dnsrr: no VIP, no binding
    d.directory.put("app", "e", EndpointRecord("box", "", "", "", "10.0.5.9"))  # standalone
    assert d.bindings("app") == {
        IP("10.0.5.2"): SetService(
            4100,
            IP("10.0.5.2"),
            (Backend(IP("10.0.5.3"), 1), Backend(IP("10.0.5.4"), 1), Backend(IP("10.0.5.5"), 0)),
        )
    }
    d.directory.delete("app", "a")
    d.directory.delete("app", "b")
    d.directory.delete("app", "c")
    assert d.bindings("app") == {}
    assert d.bindings("nowhere") == {}


def test_ingress_bindings_carry_the_published_ports() -> None:
    d = discovery()
    ports = (("tcp", 8080, 80), ("udp", 5353, 53))
    d.directory.put("ingress", "a", task("web.1", "10.0.0.6", "10.0.0.5", ingress_ports=ports))
    d.directory.put("ingress", "b", task("web.2", "10.0.0.7", "10.0.0.5", ingress_ports=ports))
    (binding,) = d.bindings("ingress").values()
    assert binding.ports == (PortMap("tcp", 8080, 80), PortMap("udp", 5353, 53))
    assert [b.ip for b in binding.backends] == [IP("10.0.0.6"), IP("10.0.0.7")]
    # on a network that is not ingress, ports in a record are not a port map
    d.directory.put("app", "x", task("web.1", "10.0.5.3", "10.0.5.2", ingress_ports=ports))
    assert d.bindings("app")[IP("10.0.5.2")].ports == ()


@pytest.mark.parametrize(
    ("text", "want"),
    [("8080:80", ("tcp", 8080, 80)), ("53:53/udp", ("udp", 53, 53)),
     ("9000:9/sctp", ("sctp", 9000, 9))],
)  # fmt: skip
def test_parse_publish(text: str, want: tuple[str, int, int]) -> None:
    assert parse_publish(text) == want


@pytest.mark.parametrize("text", ["80", "a:b", "0:80", "8080:70000", "8080:80/icmp", "", ":"])
def test_parse_publish_refuses_with_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="invalid publish"):
        parse_publish(text)


def test_bridge_options_of_docker_gwbridge(tmp_path: Any) -> None:
    nets = LocalNetworks(tmp_path / "n.json")
    default = Bridge.from_object(nets.ensure_gwbridge())
    assert (default.name, default.icc, default.masquerade, default.mtu) == (
        "docker_gwbridge", False, True, 1500)  # fmt: skip
    assert str(default.subnet) == "172.18.0.0/16" and str(default.gateway) == "172.18.0.1"
    nets.remove("docker_gwbridge")
    nets.create("docker_gwbridge", "10.99.0.0/16", "10.99.0.1", {
        "com.docker.network.bridge.name": "gwbr0",
        "com.docker.network.bridge.enable_icc": "true",
        "com.docker.network.bridge.enable_ip_masquerade": "false",
        "com.docker.network.driver.mtu": "1400",
    })  # fmt: skip
    custom = Bridge.from_object(nets.ensure_gwbridge())  # the user's one is kept as is
    assert (custom.name, custom.icc, custom.masquerade, custom.mtu) == ("gwbr0", True, False, 1400)
