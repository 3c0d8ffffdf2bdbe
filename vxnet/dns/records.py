"""Service-discovery records: Docker's ``EndpointRecord`` and the per-network name directory.

Every endpoint of a swarm network publishes one ``EndpointRecord`` in networkdb's
``endpoint_table``, keyed by endpoint id, so every node of the network builds the same
:class:`Directory` and every embedded resolver answers the same.

What a record makes resolvable, in the networks it belongs to (Docker's ``addServiceBinding``
and ``addContainerNameResolution``):

* ``name`` (the task or container name) and each of ``task_aliases`` -> ``endpoint_ip``;
* ``service_name`` and each of ``aliases`` -> ``virtual_ip`` when the service has one
  (endpoint-mode vip), otherwise the endpoint IPs of all its tasks (dnsrr);
* ``tasks.<service_name>`` and ``tasks.<alias>`` -> the endpoint IPs of all its tasks;
* reverse: ``endpoint_ip`` -> ``<name>.<network>``, ``virtual_ip`` -> ``<service_name>.<network>``.

A record with ``service_disabled`` (a task being stopped gracefully) contributes nothing but its
service's VIP, which stays until the service's last record is deleted, as in Docker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address
from typing import Any

import msgpack

from vxnet.errors import BadPacket, UsageError

MAX_NAME = 253  # a DNS name, without the final dot
MAX_ALIASES = 64
MAX_PORTS = 256
PROTOCOLS = ("tcp", "udp", "sctp")
MAX_RECORD = 64 * 1024
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def is_dns_name(text: str) -> bool:
    """Whether ``text`` is a relative DNS name made of letters, digits, ``_`` and ``-``."""
    if not text or len(text) > MAX_NAME:
        return False
    return all(_LABEL.fullmatch(label) for label in text.split("."))


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """Docker's ``EndpointRecord`` (libnetwork/agent.proto), one per endpoint in endpoint_table."""

    name: str  # task or container name
    service_name: str
    service_id: str
    virtual_ip: str  # "" for dnsrr services and standalone containers
    endpoint_ip: str
    aliases: tuple[str, ...] = ()  # service-level network aliases
    task_aliases: tuple[str, ...] = ()  # the container's --network-alias
    service_disabled: bool = False  # graceful stop: weight 0, out of DNS
    ingress_ports: tuple[tuple[str, int, int], ...] = ()  # (protocol, published, target)

    def __post_init__(self) -> None:
        for label, value in (("endpoint_ip", self.endpoint_ip), ("virtual_ip", self.virtual_ip)):
            if value or label == "endpoint_ip":
                try:
                    IPv4Address(value)
                except AddressValueError:
                    raise UsageError(f"{label} {value!r} is not an IPv4 address") from None

    def encode(self) -> bytes:
        body: bytes = msgpack.packb(
            {
                "Name": self.name,
                "ServiceName": self.service_name,
                "ServiceID": self.service_id,
                "VirtualIP": self.virtual_ip,
                "EndpointIP": self.endpoint_ip,
                "Aliases": list(self.aliases),
                "TaskAliases": list(self.task_aliases),
                "ServiceDisabled": self.service_disabled,
                "IngressPorts": [
                    {"Protocol": proto, "PublishedPort": published, "TargetPort": target}
                    for proto, published, target in self.ingress_ports
                ],
            },
            use_bin_type=True,
        )
        return body


# ----------------------------------------------------------------------------- decoding


def decode_endpoint_record_untrusted(data: bytes) -> EndpointRecord:
    """Decode an ``endpoint_table`` value.  Raises only :class:`BadPacket`.

    ``Name`` and ``EndpointIP`` are required; the other fields default as in Docker's protobuf
    (Go's nil slices arrive as msgpack nil).  Names must be DNS names; IPs plain IPv4.
    """
    if len(data) > MAX_RECORD:
        raise BadPacket("endpoint_record_too_long")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise BadPacket("endpoint_record_not_msgpack") from None
    if not isinstance(value, dict):
        raise BadPacket("endpoint_record_not_a_map")
    name = _name(value, "Name", required=True)
    service_name = _name(value, "ServiceName")
    return EndpointRecord(
        name=name,
        service_name=service_name,
        service_id=_text(value, "ServiceID"),
        virtual_ip=_ip(value, "VirtualIP", required=False),
        endpoint_ip=_ip(value, "EndpointIP", required=True),
        aliases=_names(value, "Aliases"),
        task_aliases=_names(value, "TaskAliases"),
        service_disabled=_bool(value, "ServiceDisabled"),
        ingress_ports=_ports(value.get("IngressPorts")),
    )


def _text(m: dict[str, Any], key: str) -> str:
    value = m.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise BadPacket("endpoint_record_bad_field", key)
    return value


def _name(m: dict[str, Any], key: str, required: bool = False) -> str:
    value = _text(m, key)
    if (value or required) and not is_dns_name(value):
        raise BadPacket("endpoint_record_bad_name", key)
    return value


def _names(m: dict[str, Any], key: str) -> tuple[str, ...]:
    value = m.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ALIASES:
        raise BadPacket("endpoint_record_bad_field", key)
    if not all(isinstance(v, str) and is_dns_name(v) for v in value):
        raise BadPacket("endpoint_record_bad_name", key)
    return tuple(value)


def _ip(m: dict[str, Any], key: str, required: bool) -> str:
    value = _text(m, key)
    if not value and not required:
        return ""
    try:
        return str(IPv4Address(value))
    except AddressValueError:
        raise BadPacket("endpoint_record_bad_ip", key) from None


def _bool(m: dict[str, Any], key: str) -> bool:
    value = m.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadPacket("endpoint_record_bad_field", key)
    return value


def _port(m: dict[str, Any], key: str) -> int:
    value = m.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise BadPacket("endpoint_record_bad_port", key)
    return value


def _ports(value: Any) -> tuple[tuple[str, int, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PORTS:
        raise BadPacket("endpoint_record_bad_field", "IngressPorts")
    out = []
    for item in value:
        if not isinstance(item, dict) or item.get("Protocol") not in PROTOCOLS:
            raise BadPacket("endpoint_record_bad_port", "Protocol")
        out.append((str(item["Protocol"]), _port(item, "PublishedPort"), _port(item, "TargetPort")))
    return tuple(out)


# ----------------------------------------------------------------------------- directory


@dataclass(slots=True)
class _Index:
    """One network's records, as the resolver reads them (lower-case names)."""

    names: dict[str, list[IPv4Address]] = field(default_factory=dict)
    ptr: dict[IPv4Address, list[str]] = field(default_factory=dict)


def _add(table: dict[Any, dict[Any, None]], key: Any, value: Any) -> None:
    table.setdefault(key, {})[value] = None


def _build_index(network: str, records: dict[str, EndpointRecord]) -> _Index:
    names: dict[str, dict[IPv4Address, None]] = {}
    vips: dict[str, dict[IPv4Address, None]] = {}
    dnsrr: dict[str, dict[IPv4Address, None]] = {}
    ptr: dict[IPv4Address, dict[str, None]] = {}
    for key in sorted(records):
        r = records[key]
        ip = IPv4Address(r.endpoint_ip)
        live = not r.service_disabled
        if live:
            for n in _valid((r.name, *r.task_aliases)):
                _add(names, n.lower(), ip)
            for n in _valid((f"{r.name}.{network}",)):
                _add(ptr, ip, n)
        if not r.service_name:
            continue
        services = [n.lower() for n in _valid((r.service_name, *r.aliases))]
        if r.virtual_ip:
            vip = IPv4Address(r.virtual_ip)
            for n in services:
                _add(vips, n, vip)
            for n in _valid((f"{r.service_name}.{network}",)):
                _add(ptr, vip, n)
        elif live:
            for n in services:
                _add(dnsrr, n, ip)
        if live:
            for n in services:
                _add(names, "tasks." + n, ip)
    for n, ips in dnsrr.items():
        if n not in vips:
            names.setdefault(n, {}).update(ips)
    for n, ips in vips.items():
        names.setdefault(n, {}).update(ips)
    return _Index(
        {n: list(ips) for n, ips in names.items()},
        {ip: list(ns) for ip, ns in ptr.items()},
    )


def _valid(candidates: Iterable[str]) -> list[str]:
    return [c for c in candidates if is_dns_name(c)]


class Directory:
    """Per network name, endpoint key -> :class:`EndpointRecord`; name and address lookups.

    Lookups are scoped to the networks of the asking container.  Indexes are rebuilt lazily, per
    network, on the first lookup after a change.
    """

    def __init__(self) -> None:
        self._records: dict[str, dict[str, EndpointRecord]] = {}
        self._indexes: dict[str, _Index] = {}

    def put(self, network: str, key: str, record: EndpointRecord) -> None:
        self._records.setdefault(network, {})[key] = record
        self._indexes.pop(network, None)

    def delete(self, network: str, key: str) -> None:
        records = self._records.get(network)
        if records is not None and records.pop(key, None) is not None:
            self._indexes.pop(network, None)
            if not records:
                del self._records[network]

    def drop_network(self, network: str) -> None:
        self._records.pop(network, None)
        self._indexes.pop(network, None)

    def records(self, network: str) -> dict[str, EndpointRecord]:
        return dict(self._records.get(network, {}))

    def networks(self) -> list[str]:
        return sorted(self._records)

    def lookup_a(self, networks: Sequence[str], name: str) -> list[IPv4Address] | None:
        """The IPv4 addresses of ``name`` in ``networks``; None when no such name there.

        Like Docker, ``name.<network>`` resolves ``name`` in that one network (when the asker is
        on it), tried only when the full name is unknown.
        """
        key = name.rstrip(".").lower()
        found: dict[IPv4Address, None] = {}
        for network in networks:
            found.update(dict.fromkeys(self._index(network).names.get(key, ())))
        if not found:
            by_lower = {n.lower(): n for n in networks}
            labels = key.split(".")
            for cut in range(len(labels) - 1, 0, -1):
                scope = by_lower.get(".".join(labels[cut:]))
                if scope is not None:
                    hit = self._index(scope).names.get(".".join(labels[:cut]), ())
                    found.update(dict.fromkeys(hit))
        return list(found) if found else None

    def lookup_ptr(self, networks: Sequence[str], ip: IPv4Address | str) -> list[str] | None:
        """The names (``<name>.<network>``) of address ``ip`` in ``networks``; None if unknown."""
        try:
            address = IPv4Address(ip)
        except AddressValueError:
            return None
        found: dict[str, None] = {}
        for network in networks:
            found.update(dict.fromkeys(self._index(network).ptr.get(address, ())))
        return list(found) if found else None

    def _index(self, network: str) -> _Index:
        index = self._indexes.get(network)
        if index is None:
            records = self._records.get(network)
            if not records:
                return _Index()
            index = self._indexes[network] = _build_index(network, records)
        return index
