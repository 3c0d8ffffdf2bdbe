"""When a lab outgrows the one ARP table its namespaces share (vxnet/lab/neigh.py)."""

from __future__ import annotations

import pytest

from vxnet.lab import neigh


def test_the_entries_a_lab_needs() -> None:
    # 32 hosts gossip with each other (992), 128 containers all-pairs (16,256), 8 per host
    assert neigh.needed_entries(32, 128) == 992 + 16_256 + 256
    assert neigh.needed_entries(3) == 6 + 24


def test_advice_only_when_the_table_may_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neigh, "limits", lambda: {"gc_thresh3": 1024})
    assert neigh.advice(3, 6) is None  # the default lab fits many times over
    note = neigh.advice(32)
    assert note is not None and "gc_thresh3=" in note and "1024" in note
    monkeypatch.setattr(neigh, "limits", lambda: {"gc_thresh3": 100_000})
    assert neigh.advice(32) is None  # someone already made room
    monkeypatch.setattr(neigh, "limits", dict)
    assert neigh.advice(64) is None  # no IPv4 neighbour table to speak of: nothing to say


def test_the_machine_limits_are_read() -> None:
    got = neigh.limits()
    assert set(got) == set(neigh.THRESHOLDS)
    assert got["gc_thresh1"] <= got["gc_thresh2"] <= got["gc_thresh3"]
