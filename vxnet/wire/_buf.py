"""Small helpers shared by the wire codecs: buffer views and caller-side checks.

Decoders take ``bytes | bytearray | memoryview`` and turn it into a flat byte view first, so that
``len()`` counts bytes and slicing never fails on an odd memoryview shape.  Encoders check the
caller's field values and raise :class:`~vxnet.errors.UsageError` (never ``struct.error``).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

from vxnet.errors import BadPacket, UsageError

Buffer: TypeAlias = bytes | bytearray | memoryview
IPAddress: TypeAlias = IPv4Address | IPv6Address


def byte_view(data: Buffer) -> memoryview:
    """A one-dimensional, unsigned-byte view of ``data`` (copies only if it must)."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    return memoryview(view.tobytes())


def need(view: memoryview, length: int, reason: str) -> None:
    """Raise ``BadPacket(reason)`` unless ``view`` holds at least ``length`` bytes."""
    if len(view) < length:
        raise BadPacket(reason, f"{len(view)} bytes, need {length}")


def check_uint(name: str, value: int, bits: int) -> None:
    """Raise UsageError unless ``value`` fits in an unsigned field of ``bits`` bits."""
    if not 0 <= value < (1 << bits):
        raise UsageError(f"{name}={value!r} does not fit in {bits} bits")


def check_len(name: str, value: bytes, length: int) -> None:
    """Raise UsageError unless ``value`` is exactly ``length`` bytes long."""
    if len(value) != length:
        raise UsageError(f"{name} must be {length} bytes, got {len(value)}")


def check_ipv4(name: str, value: object) -> IPv4Address:
    """Return ``value`` if it is an IPv4Address, else raise UsageError."""
    if not isinstance(value, IPv4Address):
        raise UsageError(f"{name} must be an IPv4Address, got {value!r}")
    return value


def check_ipv6(name: str, value: object) -> IPv6Address:
    """Return ``value`` if it is an IPv6Address, else raise UsageError."""
    if not isinstance(value, IPv6Address):
        raise UsageError(f"{name} must be an IPv6Address, got {value!r}")
    return value
