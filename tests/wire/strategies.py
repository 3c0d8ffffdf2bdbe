"""Hypothesis strategies and settings shared by the wire tests."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: For property tests that build packets with scapy (slow on first use: no deadline).
SCAPY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: For fuzz tests of decoders.
FUZZ = settings(max_examples=200, deadline=None)


def uint(bits: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=(1 << bits) - 1)


macs = st.binary(min_size=6, max_size=6)
ipv4s = st.builds(IPv4Address, uint(32))
ipv6s = st.builds(IPv6Address, uint(128))
payloads = st.binary(max_size=64)
