"""netem-style impairments, decided without a kernel: seeded, counted, validated."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.lab.impair import Impairer, Impairment, Rule, ipv4_pair, packed, parse_percent

A, B, C = "192.168.100.11", "192.168.100.12", "192.168.100.13"


def ipv4_frame(src: str, dst: str) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip


def fates(imp: Impairment, seed: int, n: int = 2000) -> list[list[float]]:
    impairer = Impairer([Rule(imp)], random.Random(seed))
    return [impairer.decide(ipv4_frame(A, B), float(i)) for i in range(n)]


def test_same_seed_same_fates_other_seed_other_fates() -> None:
    imp = Impairment(loss=0.1, delay=0.05, jitter=0.01, duplicate=0.05, reorder=0.1)
    assert fates(imp, 3) == fates(imp, 3)
    assert fates(imp, 3) != fates(imp, 4)


def test_loss_rate_and_counters() -> None:
    impairer = Impairer([Rule(Impairment(loss=0.1))], random.Random(1))
    out = [impairer.decide(ipv4_frame(A, B), 0.0) for _ in range(10_000)]
    dropped = sum(1 for o in out if not o)
    assert 900 <= dropped <= 1100
    assert impairer.counters.dropped == dropped and impairer.counters.frames == 10_000


def test_delay_and_jitter_bounds() -> None:
    for i, times in enumerate(fates(Impairment(delay=0.1, jitter=0.02), 5)):
        (t,) = times
        assert i + 0.08 <= t <= i + 0.12


def test_duplicates_and_reordering_as_netem() -> None:
    out = fates(Impairment(delay=0.1, duplicate=0.2, reorder=0.25), 9, 4000)
    doubles = sum(1 for o in out if len(o) == 2)
    assert 650 <= doubles <= 950
    copies = [t - i for i, o in enumerate(out) for t in o]
    immediate = sum(1 for d in copies if d == 0.0)  # reordered: skipped the delay
    assert 0.2 <= immediate / len(copies) <= 0.3
    assert all(d == 0.0 or abs(d - 0.1) < 1e-9 for d in copies)


def test_link_rules_match_only_their_peer() -> None:
    link = Rule(Impairment(loss=1.0), packed([B]))
    impairer = Impairer([link], random.Random(1))
    assert impairer.decide(ipv4_frame(A, B), 0.0) == []
    assert impairer.decide(ipv4_frame(B, A), 0.0) == []
    assert impairer.decide(ipv4_frame(A, C), 0.0) == [0.0]  # another link: untouched
    assert impairer.counters.passed == 1
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 14 + bytes([192, 168, 100, 12])
    arp += b"\x00" * 6 + bytes([192, 168, 100, 11])
    assert ipv4_pair(arp) == (bytes([192, 168, 100, 12]), bytes([192, 168, 100, 11]))
    assert ipv4_pair(b"\x00" * 20) == (b"", b"")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"loss": 1.5}, "loss must be 0-100%"),
        ({"duplicate": -0.1}, "duplicate must be"),
        ({"delay": 11.0}, "delay must be"),
        ({"delay": 0.01, "jitter": 0.02}, "jitter must be between"),
        ({"reorder": 0.1}, "needs --delay"),
    ],
)
def test_bad_impairments_are_usage_errors(kw: dict[str, float], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Impairment(**kw)


def test_percentages() -> None:
    assert parse_percent("10%", "loss") == 0.1
    assert parse_percent("2.5", "loss") == 0.025
    for bad in ("ten", "101%", "-1"):
        with pytest.raises(UsageError):
            parse_percent(bad, "loss")
    assert Impairment(loss=0.1, delay=0.05, jitter=0.01).describe() == (
        "loss 10%, delay 50 +- 10 ms"
    )


@given(st.binary(max_size=100))
def test_any_frame_gets_a_fate(frame: bytes) -> None:
    impairer = Impairer([Rule(Impairment(loss=0.5, delay=0.01), packed([A]))], random.Random(0))
    assert len(impairer.decide(frame, 1.0)) in (0, 1, 2)
