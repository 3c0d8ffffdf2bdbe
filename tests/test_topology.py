"""Lab files: valid ones parse, bad ones give one UsageError with a reason (never anything else)."""

from __future__ import annotations

import contextlib
import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.lab.topology import default_spec, load_spec, parse_spec

LAB_DIR = Path(__file__).parent.parent / "lab"


def test_shipped_lab_files_parse() -> None:
    files = sorted(LAB_DIR.glob("*.toml"))
    assert files
    for path in files:
        spec = load_spec(path)
        assert spec.hosts and spec.networks


def test_two_networks_file() -> None:
    spec = load_spec(LAB_DIR / "two-networks.toml")
    assert spec.name == "twonets"
    assert [h.address for h in spec.hosts] == [
        ipaddress.IPv4Address("192.168.100.11"),
        ipaddress.IPv4Address("192.168.100.12"),
    ]
    assert {n.name: (n.vni, n.mtu) for n in spec.networks} == {
        "web": (5001, 1450),
        "db": (5002, 1400),
    }
    assert spec.containers[0].ip == "10.10.1.2"


def test_data_port() -> None:
    assert parse_spec({"underlay": {"data_port": 4790}}).data_port == 4790
    assert parse_spec({}).data_port == 4789


def test_swarm_settings() -> None:
    spec = parse_spec({"swarm": {"key_rotation_interval": "2s", "esp_icv_length": 8}})
    assert (spec.swarm, spec.key_rotation_interval, spec.esp_icv_length) == (True, "2s", 8)
    assert parse_spec({}).esp_icv_length == 16


def test_faults_in_a_lab_file() -> None:
    spec = parse_spec({"fault": [
        {"link": ["h1", "h2"], "loss": "10%", "seed": 3},
        {"host": "h3", "delay_ms": 50, "jitter_ms": 5, "reorder": "25%"},
        {"partition": "h1,h2/h3"},
    ]})  # fmt: skip
    link, host, part = spec.faults
    assert link.link == ("h1", "h2") and link.impairment and link.impairment.loss == 0.1
    assert link.seed == 3
    assert host.host == "h3" and host.impairment and host.impairment.delay == 0.05
    assert part.partition == "h1,h2/h3" and part.impairment is None


def test_defaults() -> None:
    spec = default_spec("x", 4)
    assert [h.name for h in spec.hosts] == ["h1", "h2", "h3", "h4"]
    assert [n.vni for n in spec.networks] == [4097, 4098]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "Bad-Name"}, "invalid lab name"),
        ({"surprise": 1}, "unknown keys"),
        ({"host": [{"name": "h1"}, {"name": "h1"}]}, "duplicate host name"),
        ({"host": [{"name": "fabric"}]}, "host name"),
        ({"host": [{"name": "h1", "address": "10.1.1.1"}]}, "outside the underlay"),
        (
            {
                "network": [
                    {"name": "a", "subnet": "10.0.0.0/16"},
                    {"name": "b", "subnet": "10.0.1.0/24"},
                ]
            },
            "overlap",
        ),
        ({"network": [{"name": "a", "subnet": "10.0.0.0/24", "mtu": 1480}]}, "never fragmented"),
        ({"network": [{"name": "a", "subnet": "nonsense"}]}, "network #1"),
        ({"network": [{"name": "a", "subnet": "10.0.0.0/24", "vni": "x"}]}, "must be a int"),
        ({"container": [{"name": "c", "host": "h7", "network": "front"}]}, "no host"),
        ({"underlay": {"mtu": 100}}, "mtu must be"),
        ({"underlay": {"mtu": 1000}}, r"a swarm needs mtu >= 1280 \(or \[swarm\] enabled = false"),
        ({"underlay": {"data_port": 80}}, "data_port must be"),
        ({"swarm": {"esp_icv_length": 12}}, "esp_icv_length must be 8"),
        ({"swarm": {"esp_icv_length": "8"}}, "must be a int"),
        ({"swarm": {"icv": 8}}, "esp_icv_length"),
        ({"fault": [{"loss": "10%"}]}, "exactly one of host, link or partition"),
        ({"fault": [{"host": "h9", "loss": "10%"}]}, "no host"),
        ({"fault": [{"host": "h1"}]}, "give loss"),
        ({"fault": [{"link": ["h1", "h1"], "loss": "1%"}]}, "two of the lab's hosts"),
        ({"fault": [{"partition": "h1"}]}, "partition like"),
        ({"fault": [{"host": "h1", "loss": "200%"}]}, "0-100%"),
        ({"fault": [{"host": "h1", "delay_ms": "fast"}]}, "milliseconds"),
        ({"fault": [{"host": "h1", "reorder": "5%"}]}, "needs --delay"),
        ({"fault": {"host": "h1"}}, "array of tables"),
    ],
)
def test_bad_lab_files_are_explained(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_spec(data)


def test_networks_default_to_dockers_mtu_unless_the_underlay_is_smaller() -> None:
    assert {n.mtu for n in default_spec("x", 2, underlay_mtu=9000).networks} == {1450}
    assert {n.mtu for n in default_spec("x", 2, underlay_mtu=1400).networks} == {1350}
    row = {"name": "a", "subnet": "10.0.0.0/24"}
    assert parse_spec({"underlay": {"mtu": 9000}, "network": [row]}).networks[0].mtu == 1450
    big = parse_spec({"underlay": {"mtu": 9000}, "network": [{**row, "mtu": 8950}]})
    assert big.networks[0].mtu == 8950


def test_a_small_underlay_is_fine_without_a_swarm() -> None:
    spec = parse_spec({"underlay": {"mtu": 1000}, "swarm": {"enabled": False}})
    assert (spec.underlay_mtu, spec.networks[0].mtu) == (1000, 950)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[host]\nname=")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_spec(bad)


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
lab_like = st.fixed_dictionaries(
    {},
    optional={
        "name": toml_values,
        "underlay": st.dictionaries(
            st.sampled_from(["subnet", "mtu", "x"]), toml_values, max_size=2
        ),
        "host": st.lists(
            st.dictionaries(st.sampled_from(["name", "address"]), toml_values), max_size=3
        ),
        "network": st.lists(
            st.dictionaries(st.sampled_from(["name", "subnet", "vni", "mtu"]), toml_values),
            max_size=3,
        ),
        "container": toml_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(lab_like)
def test_any_lab_file_is_parsed_or_refused_with_a_usage_error(data: dict[str, Any]) -> None:
    try:
        parse_spec({k: v for k, v in data.items() if v is not None})
    except UsageError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_as_a_lab_file(text: str) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(UsageError):
        parse_spec(data)
