"""Address and VNI allocation for swarm networks: swarmkit's allocator and libnetwork's IPAM rules.

Everything here is a pure function (or a small frozen record) over an explicit "used" set that the
caller reads from the store: no I/O, no hidden state, so the manager can allocate inside one
store transaction and the rules can be tested exhaustively.

* Subnets: ``--default-addr-pool`` (10.0.0.0/8) carved into ``--default-addr-pool-mask-length``
  (/24) blocks; the first block, in pool order, that overlaps nothing in use.
* Addresses: the gateway is the subnet's first host unless given; containers get the lowest free
  address of ``--ip-range`` (or of the subnet).  ``after=`` gives libnetwork's *serial* order that
  swarm uses, so a just-freed address is not handed out again at once (moby #35401).
* VNIs: the lowest free value from 4096 (above the 802.1Q VLAN ids), or the ones fixed with the
  ``com.docker.network.driver.overlay.vxlanid_list`` option.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from vxnet.errors import Conflict, UsageError

DEFAULT_POOL = IPv4Network("10.0.0.0/8")
DEFAULT_MASK = 24
MAX_MASK = 29
#: Smallest network we accept: a gateway and one container.
MAX_SUBNET_PREFIX = 30

VNI_START = 4096
VNI_MAX = 2**24 - 1
VXLANID_LIST_OPTION = "com.docker.network.driver.overlay.vxlanid_list"

POOLS_EXHAUSTED = (
    "could not find an available, non-overlapping IPv4 address pool among the defaults "
    "to assign to the network"
)


# -- subnets ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddressPools:
    """The cluster's default address pools and the size of the subnets carved from them."""

    pools: Sequence[IPv4Network] = (DEFAULT_POOL,)
    mask_length: int = DEFAULT_MASK

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", tuple(self.pools))
        _check_pools(self.pools, self.mask_length)

    @classmethod
    def from_text(cls, pools: Sequence[str], mask_length: int = DEFAULT_MASK) -> AddressPools:
        """Pools as ``swarm init --default-addr-pool`` takes them (CIDR text)."""
        return cls(tuple(_parse_network("default-addr-pool", p) for p in pools), mask_length)

    def allocate_subnet(self, used: Iterable[IPv4Network]) -> IPv4Network:
        """The first ``/mask_length`` block, in pool order, that overlaps nothing in ``used``."""
        blocks = sorted(_span(net) for net in used)
        for pool in self.pools:
            found = _first_free_block(pool, self.mask_length, blocks)
            if found is not None:
                return found
        raise Conflict(POOLS_EXHAUSTED)


def _check_pools(pools: Sequence[IPv4Network], mask_length: int) -> None:
    if not pools:
        raise UsageError("at least one default address pool is needed")
    if not 0 < mask_length <= MAX_MASK:
        raise UsageError(
            f"default address pool mask length {mask_length} is out of range (1-{MAX_MASK})"
        )
    for pool in pools:
        if not isinstance(pool, IPv4Network):
            raise UsageError(f"default address pool {pool!r} is not an IPv4 network")
        if mask_length < pool.prefixlen:
            raise UsageError(
                f"default address pool {pool} cannot be split into /{mask_length} subnets: "
                f"use a mask length of at least {pool.prefixlen}"
            )
    for i, pool in enumerate(pools):
        for other in pools[i + 1 :]:
            if pool.overlaps(other):
                raise UsageError(f"default address pools {pool} and {other} overlap")


def _span(net: IPv4Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _first_free_block(
    pool: IPv4Network, mask_length: int, used: Sequence[tuple[int, int]]
) -> IPv4Network | None:
    """Walk ``used`` (sorted spans) once, jumping the candidate block past each overlap."""
    size = 1 << (32 - mask_length)
    start, end = _span(pool)
    candidate = start
    for low, high in used:
        if high < candidate:
            continue
        if low > candidate + size - 1:
            break
        candidate = start + -(-(high + 1 - start) // size) * size
        if candidate > end:
            return None
    if candidate + size - 1 > end:
        return None
    return IPv4Network((candidate, mask_length))


def check_subnet(subnet: IPv4Network, used: Mapping[str, IPv4Network]) -> None:
    """Refuse ``subnet`` if it overlaps the subnet of any network in ``used`` (name -> subnet)."""
    for name, other in sorted(used.items()):
        if subnet.overlaps(other):
            raise Conflict(
                f"subnet {subnet} overlaps with network {name!r} ({other}): "
                "choose a subnet that does not overlap it"
            )


# -- addresses --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkAddressing:
    """A network's IPv4 configuration: ``--subnet``, ``--gateway`` and ``--ip-range``."""

    subnet: IPv4Network
    gateway: IPv4Address
    ip_range: IPv4Network | None = None


def make_addressing(
    subnet: str, gateway: str | None = None, ip_range: str | None = None
) -> NetworkAddressing:
    """Parse and check ``docker network create``'s addressing flags."""
    net = _parse_network("subnet", subnet)
    if net.prefixlen > MAX_SUBNET_PREFIX:
        raise UsageError(f"subnet {net} is too small: use a prefix of /{MAX_SUBNET_PREFIX} or less")
    gw = _first_host(net) if gateway is None else _parse_gateway(gateway, net)
    rng = None if ip_range is None else _parse_ip_range(ip_range, net)
    return NetworkAddressing(net, gw, rng)


def _parse_network(field: str, text: str) -> IPv4Network:
    try:
        net = ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(
            f"invalid {field} {text!r}: expected IPv4 CIDR such as 10.0.9.0/24"
        ) from None
    if not isinstance(net, IPv4Network) or "/" not in text:
        raise UsageError(f"invalid {field} {text!r}: expected IPv4 CIDR such as 10.0.9.0/24")
    if str(net) != text.strip():
        raise UsageError(f"invalid {field} {text!r}: it should be {net}")
    return net


def _parse_gateway(text: str, subnet: IPv4Network) -> IPv4Address:
    try:
        gw = ip_address(text.strip())
    except ValueError:
        raise UsageError(f"invalid gateway {text!r}: expected an IPv4 address") from None
    if not isinstance(gw, IPv4Address):
        raise UsageError(f"invalid gateway {text!r}: expected an IPv4 address")
    if gw not in subnet:
        raise UsageError(f"gateway {gw} is not in subnet {subnet}")
    if gw in (subnet.network_address, subnet.broadcast_address):
        raise UsageError(f"gateway {gw} is the network or broadcast address of subnet {subnet}")
    return gw


def _parse_ip_range(text: str, subnet: IPv4Network) -> IPv4Network:
    rng = _parse_network("ip_range", text)
    if not rng.subnet_of(subnet):
        raise UsageError(f"ip_range {rng} is not within subnet {subnet}")
    return rng


def _first_host(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address + 1


def allocate_ip(
    addressing: NetworkAddressing,
    used: Set[IPv4Address],
    wanted: IPv4Address | None = None,
    *,
    after: IPv4Address | None = None,
    network: str | None = None,
) -> IPv4Address:
    """An address for a new endpoint: ``wanted`` if free, else the first free one.

    Automatic addresses come from ``ip_range`` (the whole subnet if unset), never the gateway,
    the subnet's network or broadcast address, or anything in ``used``; with ``after``, the search
    starts just past it and wraps around.  A static ``wanted`` address may be anywhere in the
    subnet, as Docker allows.  ``network`` (a name) only improves the messages.
    """
    label = f"{network!r} ({addressing.subnet})" if network else str(addressing.subnet)
    if wanted is not None:
        return _claim(addressing, used, wanted, label)
    for candidate in _candidates(addressing, after):
        if candidate != addressing.gateway and candidate not in used:
            return candidate
    raise Conflict(f"no available IPv4 addresses on network {label}")


def _claim(
    addressing: NetworkAddressing, used: Set[IPv4Address], wanted: IPv4Address, label: str
) -> IPv4Address:
    subnet = addressing.subnet
    if wanted not in subnet:
        raise UsageError(f"address {wanted} is not in the subnet of network {label}")
    if wanted in (subnet.network_address, subnet.broadcast_address):
        raise UsageError(f"address {wanted} is the network or broadcast address of {label}")
    if wanted == addressing.gateway:
        raise Conflict(f"address {wanted} is the gateway of network {label}")
    if wanted in used:
        raise Conflict(f"address {wanted} is already in use on network {label}")
    return wanted


def _candidates(addressing: NetworkAddressing, after: IPv4Address | None) -> Iterator[IPv4Address]:
    subnet = addressing.subnet
    pool = addressing.ip_range or subnet
    low = max(int(pool.network_address), int(subnet.network_address) + 1)
    high = min(int(pool.broadcast_address), int(subnet.broadcast_address) - 1)
    first = low
    if after is not None and low <= int(after) < high:
        first = int(after) + 1
    for value in (*range(first, high + 1), *range(low, first)):
        yield IPv4Address(value)


# -- VNIs -------------------------------------------------------------------------------------


def allocate_vni(used: Set[int]) -> int:
    """The lowest VNI from :data:`VNI_START` that is not in ``used``."""
    vni = VNI_START
    while vni in used:
        vni += 1
    if vni > VNI_MAX:
        raise Conflict(f"no available VXLAN id between {VNI_START} and {VNI_MAX}")
    return vni


def parse_vxlanid_list(text: str) -> list[int]:
    """The VNIs of the ``vxlanid_list`` option (CSV); the first is the network's VNI."""
    vnis: list[int] = []
    for item in text.split(","):
        try:
            vni = int(item.strip(), 10)
        except ValueError:
            raise UsageError(
                f"invalid vxlan id value {item!r} passed in {VXLANID_LIST_OPTION}"
            ) from None
        if not 1 <= vni <= VNI_MAX:
            raise UsageError(
                f"vxlan id {vni} in {VXLANID_LIST_OPTION} is out of range (1-{VNI_MAX})"
            )
        if vni in vnis:
            raise UsageError(f"vxlan id {vni} appears twice in {VXLANID_LIST_OPTION}")
        vnis.append(vni)
    return vnis


def choose_vnis(option: str | None, used: Set[int]) -> list[int]:
    """The VNIs for a new network: the option's (all must be free) or one allocated.

    The first returned VNI is the network's; all returned ones must be recorded as used.
    """
    if option is None:
        return [allocate_vni(used)]
    vnis = parse_vxlanid_list(option)
    for vni in vnis:
        if vni in used:
            raise Conflict(f"vxlan id {vni} is already used by another network")
    return vnis
