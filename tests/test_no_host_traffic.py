"""The test suite itself never sends on the machine's own interfaces (see tests/conftest.py)."""

from __future__ import annotations

import pytest

scapy_l2 = pytest.importorskip("scapy.layers.l2")


def test_an_ether_frame_without_a_destination_is_not_resolved_on_the_network() -> None:
    from scapy.layers.inet import IP

    # scapy would ARP for 192.0.2.1 out of the default interface; here it may not
    frame = bytes(scapy_l2.Ether(src="02:42:0a:00:01:02") / IP(src="10.0.1.2", dst="192.0.2.1"))
    assert frame[:6] == b"\xff" * 6
