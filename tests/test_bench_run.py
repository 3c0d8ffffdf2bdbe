"""``vxnet bench``'s report: what it says about the topology it measured (no root)."""

from __future__ import annotations

import pytest

from bench.measure import Side
from bench.run import network_mtus, render

MACHINE = {"nproc": 2, "cpu": "", "kernel": "6.18", "python": "CPython 3.11"}


@pytest.mark.parametrize(
    ("underlay", "plain", "secret"), [(1500, 1450, 1416), (9000, 8950, 8916), (1280, 1230, 1196)]
)
def test_network_mtus_are_the_largest_the_underlay_carries(
    underlay: int, plain: int, secret: int
) -> None:
    assert network_mtus(underlay) == (plain, secret)


def test_the_report_states_the_underlay_and_network_mtus_and_no_unmeasured_figure() -> None:
    kernel = Side("kernel VXLAN", tcp1_bps=[10e9])
    vxnet = Side("vxnet", tcp1_bps=[5e9])
    text = render(MACHINE, [kernel, vxnet], 1, 1, 4, None, underlay_mtu=9000)
    assert "underlay MTU 9000; network MTU 8950, encrypted: 8916" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("TCP 1 stream"))
    assert row.split()[-3:] == ["10.000", "5.000", "0.50"]
    assert "UDP" not in text.split("ping:")[1]  # nothing measured: no UDP row at all
