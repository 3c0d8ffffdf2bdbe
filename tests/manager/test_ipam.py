"""Subnet, address and VNI allocation: Docker's rules, and properties checked with hypothesis."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import Conflict, UsageError
from vxnet.manager.ipam import (
    DEFAULT_MASK,
    DEFAULT_POOL,
    POOLS_EXHAUSTED,
    VNI_MAX,
    VNI_START,
    AddressPools,
    NetworkAddressing,
    allocate_ip,
    allocate_vni,
    check_subnet,
    choose_vnis,
    make_addressing,
    parse_vxlanid_list,
)

N = IPv4Network
A = IPv4Address

# -- pools and subnets ------------------------------------------------------------------------


def test_defaults_are_dockers() -> None:
    pools = AddressPools()
    assert pools.pools == (DEFAULT_POOL,) == (N("10.0.0.0/8"),)
    assert pools.mask_length == DEFAULT_MASK == 24


def test_first_subnets_come_in_order() -> None:
    pools = AddressPools()
    used: list[IPv4Network] = []
    for _ in range(3):
        used.append(pools.allocate_subnet(used))
    assert used == [N("10.0.0.0/24"), N("10.0.1.0/24"), N("10.0.2.0/24")]


def test_allocation_skips_overlaps_of_any_size() -> None:
    pools = AddressPools()
    used = [N("10.0.0.0/23"), N("10.0.2.128/25"), N("10.0.3.7/32")]
    assert pools.allocate_subnet(used) == N("10.0.4.0/24")


def test_used_networks_outside_the_pools_are_ignored() -> None:
    assert AddressPools().allocate_subnet([N("192.168.0.0/16")]) == N("10.0.0.0/24")


def test_second_pool_used_when_first_is_full() -> None:
    pools = AddressPools([N("10.10.0.0/23"), N("172.30.0.0/16")], 24)
    used = [N("10.10.0.0/24"), N("10.10.1.0/24")]
    assert pools.allocate_subnet(used) == N("172.30.0.0/24")


def test_exhaustion_uses_dockers_wording() -> None:
    pools = AddressPools([N("10.10.0.0/23")], 24)
    with pytest.raises(Conflict) as info:
        pools.allocate_subnet([N("10.10.0.0/24"), N("10.10.1.0/24")])
    assert str(info.value) == POOLS_EXHAUSTED
    assert "non-overlapping IPv4 address pool among the defaults" in POOLS_EXHAUSTED


def test_a_used_supernet_exhausts_the_pool() -> None:
    with pytest.raises(Conflict):
        AddressPools().allocate_subnet([N("0.0.0.0/0")])


def test_from_text() -> None:
    pools = AddressPools.from_text(["10.20.0.0/16", "10.30.0.0/16"], 26)
    assert pools.allocate_subnet([]) == N("10.20.0.0/26")
    with pytest.raises(UsageError, match="default-addr-pool"):
        AddressPools.from_text(["bogus"])


@pytest.mark.parametrize(
    ("pools", "mask", "message"),
    [
        ([N("10.0.0.0/8")], 30, "out of range"),
        ([N("10.0.0.0/8")], 0, "out of range"),
        ([N("10.0.0.0/16")], 8, "at least 16"),
        ([N("10.0.0.0/8"), N("10.1.0.0/16")], 24, "overlap"),
        ([], 24, "at least one"),
    ],
)
def test_bad_pools_are_refused(pools: list[IPv4Network], mask: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        AddressPools(pools, mask)


def test_mask_29_is_allowed() -> None:
    assert AddressPools(mask_length=29).allocate_subnet([N("10.0.0.0/29")]) == N("10.0.0.8/29")


def test_check_subnet_names_the_network() -> None:
    used = {"web": N("10.0.1.0/24"), "db": N("10.0.2.0/24")}
    check_subnet(N("10.0.3.0/24"), used)
    with pytest.raises(Conflict, match=r"overlaps with network 'db' \(10.0.2.0/24\)"):
        check_subnet(N("10.0.2.128/25"), used)
    with pytest.raises(Conflict, match="'db'"):  # several overlaps: the first name, sorted
        check_subnet(N("10.0.0.0/16"), used)


def _naive_first(pools: AddressPools, used: list[IPv4Network]) -> IPv4Network | None:
    for pool in pools.pools:
        for candidate in pool.subnets(new_prefix=pools.mask_length):
            if not any(candidate.overlaps(u) for u in used):
                return candidate
    return None


small_networks = st.builds(
    lambda value, prefix: N((value, prefix), strict=False),
    st.integers(0x0A000000, 0x0A0003FF),
    st.integers(20, 32),
)


@settings(max_examples=300, deadline=None)
@given(used=st.lists(small_networks, max_size=12), mask=st.integers(24, 29))
def test_subnet_is_the_first_free_block(used: list[IPv4Network], mask: int) -> None:
    pools = AddressPools([N("10.0.0.0/22"), N("10.0.8.0/24")], mask)
    expected = _naive_first(pools, used)
    if expected is None:
        with pytest.raises(Conflict):
            pools.allocate_subnet(used)
        return
    got = pools.allocate_subnet(used)
    assert got == expected
    assert got.prefixlen == mask
    assert not any(got.overlaps(u) for u in used)


@settings(max_examples=50, deadline=None)
@given(mask=st.integers(24, 28))
def test_repeated_allocation_never_overlaps_until_exhausted(mask: int) -> None:
    pools = AddressPools([N("10.1.0.0/24"), N("10.2.0.0/24")], mask)
    used: list[IPv4Network] = []
    while True:
        try:
            subnet = pools.allocate_subnet(used)
        except Conflict:
            break
        assert not any(subnet.overlaps(u) for u in used)
        used.append(subnet)
    assert len(used) == 2 * 2 ** (mask - 24)


# -- addressing -------------------------------------------------------------------------------


def test_gateway_defaults_to_first_host() -> None:
    addressing = make_addressing("10.0.9.0/24", None, None)
    assert addressing == NetworkAddressing(N("10.0.9.0/24"), A("10.0.9.1"), None)


def test_explicit_gateway_and_range() -> None:
    addressing = make_addressing("10.0.9.0/24", "10.0.9.254", "10.0.9.128/25")
    assert addressing.gateway == A("10.0.9.254")
    assert addressing.ip_range == N("10.0.9.128/25")


@pytest.mark.parametrize(
    ("subnet", "gateway", "ip_range", "message"),
    [
        ("10.0.9.0/33", None, None, "invalid subnet"),
        ("banana", None, None, "invalid subnet"),
        ("10.0.9.0", None, None, "invalid subnet"),
        ("fd00::/64", None, None, "invalid subnet"),
        ("10.0.9.1/24", None, None, "it should be 10.0.9.0/24"),
        ("10.0.9.0/31", None, None, "too small"),
        ("10.0.9.0/24", "10.0.8.1", None, "gateway 10.0.8.1 is not in subnet"),
        ("10.0.9.0/24", "10.0.9.0", None, "network or broadcast"),
        ("10.0.9.0/24", "10.0.9.255", None, "network or broadcast"),
        ("10.0.9.0/24", "nope", None, "invalid gateway"),
        ("10.0.9.0/24", "fd00::1", None, "invalid gateway"),
        ("10.0.9.0/24", None, "10.0.8.0/25", "ip_range 10.0.8.0/25 is not within"),
        ("10.0.9.0/24", None, "10.0.0.0/16", "not within"),
        ("10.0.9.0/24", None, "x/25", "invalid ip_range"),
    ],
)
def test_bad_addressing_names_the_field(
    subnet: str, gateway: str | None, ip_range: str | None, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        make_addressing(subnet, gateway, ip_range)


def test_ip_allocation_skips_gateway_and_used() -> None:
    addressing = make_addressing("10.0.9.0/24", None, None)
    assert allocate_ip(addressing, set()) == A("10.0.9.2")
    assert allocate_ip(addressing, {A("10.0.9.2"), A("10.0.9.3")}) == A("10.0.9.4")


def test_ip_allocation_uses_the_range_for_automatic_addresses() -> None:
    addressing = make_addressing("10.0.9.0/24", None, "10.0.9.128/26")
    assert allocate_ip(addressing, set()) == A("10.0.9.128")
    assert allocate_ip(addressing, set(), A("10.0.9.20")) == A("10.0.9.20")  # static: any host


def test_range_at_subnet_edges_skips_network_and_broadcast() -> None:
    addressing = make_addressing("10.0.9.0/24", "10.0.9.1", "10.0.9.0/30")
    assert allocate_ip(addressing, set()) == A("10.0.9.2")
    addressing = make_addressing("10.0.9.0/24", "10.0.9.1", "10.0.9.252/30")
    assert allocate_ip(addressing, {A("10.0.9.252"), A("10.0.9.253")}) == A("10.0.9.254")
    with pytest.raises(Conflict):
        allocate_ip(addressing, {A("10.0.9.252"), A("10.0.9.253"), A("10.0.9.254")})


def test_serial_allocation_starts_after_the_last_one_and_wraps() -> None:
    addressing = make_addressing("10.0.9.0/29", None, None)  # hosts .1-.6, gateway .1
    assert allocate_ip(addressing, set(), after=A("10.0.9.3")) == A("10.0.9.4")
    assert allocate_ip(addressing, {A("10.0.9.4")}, after=A("10.0.9.6")) == A("10.0.9.2")
    assert allocate_ip(addressing, set(), after=A("192.168.0.1")) == A("10.0.9.2")


def test_exhaustion_message() -> None:
    addressing = make_addressing("10.0.9.0/30", None, None)
    used = {A("10.0.9.2")}
    with pytest.raises(Conflict, match=r"no available IPv4 addresses on network 10.0.9.0/30"):
        allocate_ip(addressing, used)
    with pytest.raises(Conflict, match=r"on network 'web' \(10.0.9.0/30\)"):
        allocate_ip(addressing, used, network="web")


@pytest.mark.parametrize(
    ("wanted", "error", "message"),
    [
        ("10.0.8.5", UsageError, "not in the subnet"),
        ("10.0.9.0", UsageError, "network or broadcast"),
        ("10.0.9.255", UsageError, "network or broadcast"),
        ("10.0.9.1", Conflict, "is the gateway"),
        ("10.0.9.7", Conflict, "already in use"),
    ],
)
def test_bad_static_addresses(wanted: str, error: type[Exception], message: str) -> None:
    addressing = make_addressing("10.0.9.0/24", None, "10.0.9.128/25")
    with pytest.raises(error, match=message):
        allocate_ip(addressing, {A("10.0.9.7")}, A(wanted))


@st.composite
def addressing_and_used(draw: st.DrawFn) -> tuple[NetworkAddressing, set[IPv4Address]]:
    prefix = draw(st.integers(24, 30))
    subnet = N((0x0A000900, prefix))
    hosts = list(subnet.hosts())
    gateway = draw(st.sampled_from(hosts))
    ip_range = None
    if draw(st.booleans()):
        range_prefix = draw(st.integers(prefix, 32))
        ip_range = draw(st.sampled_from(list(subnet.subnets(new_prefix=range_prefix))))
    used = set(draw(st.lists(st.sampled_from(hosts), max_size=len(hosts))))
    return NetworkAddressing(subnet, gateway, ip_range), used


@settings(max_examples=300, deadline=None)
@given(case=addressing_and_used(), after_offset=st.none() | st.integers(0, 255))
def test_allocated_ip_is_free_and_in_range(
    case: tuple[NetworkAddressing, set[IPv4Address]], after_offset: int | None
) -> None:
    addressing, used = case
    after = None if after_offset is None else addressing.subnet.network_address + after_offset
    pool = addressing.ip_range or addressing.subnet
    free = [
        a
        for a in addressing.subnet.hosts()
        if a in pool and a != addressing.gateway and a not in used
    ]
    if not free:
        with pytest.raises(Conflict, match="no available IPv4 addresses"):
            allocate_ip(addressing, used, after=after)
        return
    got = allocate_ip(addressing, used, after=after)
    assert got in free
    if after is None:
        assert got == free[0]


@settings(max_examples=50, deadline=None)
@given(case=addressing_and_used())
def test_filling_a_network_hands_out_each_address_once(
    case: tuple[NetworkAddressing, set[IPv4Address]],
) -> None:
    addressing, used = case
    taken = set(used)
    last = None
    while True:
        try:
            address = allocate_ip(addressing, taken, after=last)
        except Conflict:
            break
        assert address not in taken
        assert address != addressing.gateway
        taken.add(address)
        last = address
    pool = addressing.ip_range or addressing.subnet
    assert all(
        a in taken or a == addressing.gateway for a in addressing.subnet.hosts() if a in pool
    )


# -- VNIs -------------------------------------------------------------------------------------


def test_vni_allocation_starts_at_4096() -> None:
    assert VNI_START == 4096
    assert VNI_MAX == 16_777_215
    assert allocate_vni(set()) == 4096
    assert allocate_vni({4096, 4097, 4099}) == 4098
    assert allocate_vni({1, 2, 4095}) == 4096


def test_vni_exhaustion() -> None:
    with pytest.raises(Conflict, match="no available VXLAN id"):
        allocate_vni(set(range(VNI_START, VNI_MAX + 1)))


@given(st.sets(st.integers(VNI_START, VNI_START + 300), max_size=200))
def test_allocated_vni_is_lowest_free(used: set[int]) -> None:
    vni = allocate_vni(used)
    assert vni not in used
    assert VNI_START <= vni <= VNI_MAX
    assert all(v in used for v in range(VNI_START, vni))


def test_parse_vxlanid_list() -> None:
    assert parse_vxlanid_list("4200") == [4200]
    assert parse_vxlanid_list("4200, 4201,300") == [4200, 4201, 300]
    assert parse_vxlanid_list(str(VNI_MAX)) == [VNI_MAX]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid vxlan id value ''"),
        ("42,", "invalid vxlan id value ''"),
        ("abc", "invalid vxlan id value 'abc'"),
        ("4.5", "invalid vxlan id"),
        ("0", "out of range"),
        ("-5", "out of range"),
        (str(VNI_MAX + 1), "out of range"),
        ("4200,4200", "twice"),
    ],
)
def test_bad_vxlanid_lists(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_vxlanid_list(text)


@given(st.lists(st.integers(1, VNI_MAX), min_size=1, max_size=8, unique=True))
def test_vxlanid_list_round_trip(vnis: list[int]) -> None:
    assert parse_vxlanid_list(",".join(map(str, vnis))) == vnis


def test_choose_vnis() -> None:
    assert choose_vnis(None, {4096}) == [4097]
    assert choose_vnis("5000,5001", {4096}) == [5000, 5001]
    with pytest.raises(Conflict, match="vxlan id 5001 is already used"):
        choose_vnis("5000,5001", {5001})
