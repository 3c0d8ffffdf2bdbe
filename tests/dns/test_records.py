"""EndpointRecord codec and Directory semantics."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.dns.records import Directory, EndpointRecord, decode_endpoint_record_untrusted
from vxnet.errors import BadPacket, UsageError


def task(name: str, ip: str, service: str = "web", vip: str = "", **kw: object) -> EndpointRecord:
    return EndpointRecord(name, service, "sid-" + service, vip, ip, **kw)  # type: ignore[arg-type]


def container(name: str, ip: str, **kw: object) -> EndpointRecord:
    return EndpointRecord(name, "", "", "", ip, **kw)  # type: ignore[arg-type]


def ips(*texts: str) -> list[IPv4Address]:
    return [IPv4Address(t) for t in texts]


# ----------------------------------------------------------------------------- codec

FULL = EndpointRecord(
    name="web.1.x7k2",
    service_name="web",
    service_id="svc1",
    virtual_ip="10.0.1.2",
    endpoint_ip="10.0.1.5",
    aliases=("www",),
    task_aliases=("primary",),
    service_disabled=True,
    ingress_ports=(("tcp", 8080, 80), ("udp", 53, 5353)),
)


def test_round_trip() -> None:
    assert decode_endpoint_record_untrusted(FULL.encode()) == FULL
    plain = container("db", "10.0.1.9")
    assert decode_endpoint_record_untrusted(plain.encode()) == plain


def test_go_field_names() -> None:
    fields = msgpack.unpackb(FULL.encode())
    assert set(fields) == {
        "Name", "ServiceName", "ServiceID", "VirtualIP", "EndpointIP", "Aliases",
        "TaskAliases", "ServiceDisabled", "IngressPorts",
    }  # fmt: skip
    assert fields["IngressPorts"][0] == {"Protocol": "tcp", "PublishedPort": 8080, "TargetPort": 80}


def test_optional_fields_default_like_protobuf() -> None:
    data = msgpack.packb({"Name": "db", "EndpointIP": "10.0.0.3", "Aliases": None})
    assert decode_endpoint_record_untrusted(data) == container("db", "10.0.0.3")


DB = {"Name": "db", "EndpointIP": "10.0.0.3"}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"EndpointIP": "10.0.0.3"}, "endpoint_record_bad_name"),
        ({"Name": "db"}, "endpoint_record_bad_ip"),
        ({"Name": "db", "EndpointIP": "10.0.0.3/24"}, "endpoint_record_bad_ip"),
        ({**DB, "VirtualIP": "fe80::1"}, "endpoint_record_bad_ip"),
        ({"Name": "db bad", "EndpointIP": "10.0.0.3"}, "endpoint_record_bad_name"),
        ({**DB, "Aliases": "x"}, "endpoint_record_bad_field"),
        ({**DB, "Aliases": ["a"] * 65}, "endpoint_record_bad_field"),
        ({**DB, "Aliases": ["ok", "not ok"]}, "endpoint_record_bad_name"),
        ({**DB, "ServiceDisabled": 1}, "endpoint_record_bad_field"),
        ({"Name": "db", "EndpointIP": "10.0.0.3", "IngressPorts": [{"Protocol": "icmp"}]},
         "endpoint_record_bad_port"),
        ({"Name": "db", "EndpointIP": "10.0.0.3",
          "IngressPorts": [{"Protocol": "tcp", "PublishedPort": 70000, "TargetPort": 1}]},
         "endpoint_record_bad_port"),
        ({"Name": "x" * 300, "EndpointIP": "10.0.0.3"}, "endpoint_record_bad_field"),
    ],
)  # fmt: skip
def test_decoder_rejects(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(BadPacket) as caught:
        decode_endpoint_record_untrusted(msgpack.packb(fields))
    assert caught.value.reason == reason


def test_decoder_rejects_non_maps() -> None:
    for data in (b"", b"\xc1", msgpack.packb([1, 2]), b"\x81" * 10, b"x" * 70000):
        with pytest.raises(BadPacket):
            decode_endpoint_record_untrusted(data)


def test_local_records_are_checked() -> None:
    with pytest.raises(UsageError):
        container("db", "not-an-ip")
    with pytest.raises(UsageError):
        task("web.1", "10.0.0.4", vip="10.0.0.300")


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["Name", "ServiceName", "ServiceID", "VirtualIP", "EndpointIP", "Aliases", "TaskAliases",
     "ServiceDisabled", "IngressPorts", "Protocol", "PublishedPort", "TargetPort"]
)  # fmt: skip


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(BadPacket):
        decode_endpoint_record_untrusted(data)


@given(st.dictionaries(_keys, _values, max_size=9))
def test_fuzz_structured(fields: dict[str, object]) -> None:
    try:
        record = decode_endpoint_record_untrusted(msgpack.packb(fields))
    except BadPacket:
        return
    assert decode_endpoint_record_untrusted(record.encode()) == record


@given(st.binary(max_size=120), st.integers(0, 119))
def test_fuzz_mutated(noise: bytes, at: int) -> None:
    data = bytearray(FULL.encode())
    data[at : at + len(noise)] = noise
    with contextlib.suppress(BadPacket):
        decode_endpoint_record_untrusted(bytes(data))


# ----------------------------------------------------------------------------- directory


@pytest.fixture
def directory() -> Directory:
    d = Directory()
    # web: endpoint-mode vip, alias www, on front
    d.put("front", "e1", task("web.1.aaa", "10.0.1.5", vip="10.0.1.2", aliases=("www",)))
    d.put("front", "e2", task("web.2.bbb", "10.0.1.6", vip="10.0.1.2", aliases=("www",)))
    # cache: dnsrr, on front
    d.put("front", "e3", task("cache.1.ccc", "10.0.1.7", service="cache"))
    d.put("front", "e4", task("cache.2.ddd", "10.0.1.8", service="cache"))
    # a standalone container with --network-alias db-primary, on back only
    d.put("back", "e5", container("db", "10.0.2.3", task_aliases=("db-primary",)))
    return d


def test_vip_service(directory: Directory) -> None:
    assert directory.lookup_a(["front"], "web") == ips("10.0.1.2")
    assert directory.lookup_a(["front"], "www") == ips("10.0.1.2")
    assert sorted(directory.lookup_a(["front"], "tasks.web") or []) == ips("10.0.1.5", "10.0.1.6")
    assert sorted(directory.lookup_a(["front"], "tasks.www") or []) == ips("10.0.1.5", "10.0.1.6")


def test_dnsrr_service(directory: Directory) -> None:
    assert sorted(directory.lookup_a(["front"], "cache") or []) == ips("10.0.1.7", "10.0.1.8")
    assert sorted(directory.lookup_a(["front"], "tasks.cache") or []) == ips("10.0.1.7", "10.0.1.8")


def test_names_and_task_aliases(directory: Directory) -> None:
    assert directory.lookup_a(["front"], "web.1.aaa") == ips("10.0.1.5")
    assert directory.lookup_a(["back"], "db") == ips("10.0.2.3")
    assert directory.lookup_a(["back"], "db-primary") == ips("10.0.2.3")


def test_scoped_to_the_askers_networks(directory: Directory) -> None:
    assert directory.lookup_a(["front"], "db") is None
    assert directory.lookup_a(["back"], "web") is None
    assert directory.lookup_a([], "web") is None
    assert directory.lookup_a(["front", "back"], "db") == ips("10.0.2.3")


def test_case_insensitive(directory: Directory) -> None:
    assert directory.lookup_a(["front"], "WeB.") == ips("10.0.1.2")
    assert directory.lookup_a(["front"], "Tasks.CACHE") is not None


def test_several_networks_are_merged_and_deduplicated() -> None:
    d = Directory()
    d.put("a", "e1", container("api", "10.0.1.5"))
    d.put("b", "e2", container("api", "10.0.2.5"))
    d.put("c", "e3", container("api", "10.0.1.5"))
    assert d.lookup_a(["a", "b", "c"], "api") == ips("10.0.1.5", "10.0.2.5")


def test_name_dot_network(directory: Directory) -> None:
    assert directory.lookup_a(["front", "back"], "db.back") == ips("10.0.2.3")
    assert directory.lookup_a(["front"], "db.back") is None  # not on back
    assert directory.lookup_a(["front"], "web.front") == ips("10.0.1.2")


def test_disabled_tasks_are_excluded(directory: Directory) -> None:
    directory.put("front", "e4", task("cache.2.ddd", "10.0.1.8", service="cache",
                                      service_disabled=True))  # fmt: skip
    assert directory.lookup_a(["front"], "cache") == ips("10.0.1.7")
    assert directory.lookup_a(["front"], "tasks.cache") == ips("10.0.1.7")
    assert directory.lookup_a(["front"], "cache.2.ddd") is None
    assert directory.lookup_ptr(["front"], "10.0.1.8") is None
    directory.put("front", "e3", task("cache.1.ccc", "10.0.1.7", service="cache",
                                      service_disabled=True))  # fmt: skip
    assert directory.lookup_a(["front"], "cache") is None


def test_a_vip_stays_while_its_disabled_tasks_remain(directory: Directory) -> None:
    for key, name, ip in (("e1", "web.1.aaa", "10.0.1.5"), ("e2", "web.2.bbb", "10.0.1.6")):
        directory.put("front", key, task(name, ip, vip="10.0.1.2", service_disabled=True))
    assert directory.lookup_a(["front"], "web") == ips("10.0.1.2")
    assert directory.lookup_a(["front"], "tasks.web") is None
    directory.delete("front", "e1")
    directory.delete("front", "e2")
    assert directory.lookup_a(["front"], "web") is None


def test_ptr(directory: Directory) -> None:
    assert directory.lookup_ptr(["front"], "10.0.1.5") == ["web.1.aaa.front"]
    assert directory.lookup_ptr(["front"], IPv4Address("10.0.1.2")) == ["web.front"]
    assert directory.lookup_ptr(["back"], "10.0.2.3") == ["db.back"]
    assert directory.lookup_ptr(["front"], "10.0.2.3") is None
    assert directory.lookup_ptr(["front"], "nonsense") is None


def test_delete_and_drop_network(directory: Directory) -> None:
    directory.delete("back", "e5")
    directory.delete("back", "e5")  # idempotent
    assert directory.lookup_a(["back"], "db") is None
    assert directory.networks() == ["front"]
    directory.drop_network("front")
    assert directory.lookup_a(["front"], "web") is None
    assert directory.networks() == []
