from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.manager.keys import (
    DEFAULT_ROTATION,
    GOSSIP,
    IPSEC,
    KEYRING_SIZE,
    SUBSYSTEMS,
    EncryptionKey,
    KeyManager,
)


def manager(seed: int = 1, now: float = 1000.0, interval: float = DEFAULT_ROTATION) -> KeyManager:
    return KeyManager(random.Random(seed), now, interval)


def check_invariants(km: KeyManager) -> None:
    tags = [k.tag for k in km.keys]
    assert len(set(tags)) == len(tags) == KEYRING_SIZE * len(SUBSYSTEMS)
    assert max(tags) == km.lamport_clock
    for subsystem in SUBSYSTEMS:
        ring = km.keys_for(subsystem)
        assert len(ring) == KEYRING_SIZE
        assert [k.tag for k in ring] == sorted(k.tag for k in ring)
        assert all(k.subsystem == subsystem and len(k.key) == 16 for k in ring)
        assert km.primary(subsystem) == ring[1]


def test_constants() -> None:
    assert SUBSYSTEMS == ("networking:gossip", "networking:ipsec")
    assert (KEYRING_SIZE, DEFAULT_ROTATION) == (3, 43200.0)


def test_fresh_keyring() -> None:
    km = manager()
    check_invariants(km)
    tags = [k.tag for k in km.keys]
    start = tags[0] - 1
    assert 0 <= start < 65536  # swarmkit's genSkew
    assert tags == list(range(start + 1, start + 7))  # gossip keys first, then ipsec
    assert [k.subsystem for k in km.keys] == [GOSSIP] * 3 + [IPSEC] * 3
    assert all(k.algorithm == "aes-128-gcm" for k in km.keys)
    assert len({k.key for k in km.keys}) == 6
    assert km.next_deadline() == 1000.0 + DEFAULT_ROTATION


def test_deterministic_with_seed() -> None:
    assert manager(5).keys == manager(5).keys
    assert manager(5).keys != manager(6).keys


def test_handle_timer_rotates_at_the_deadline() -> None:
    km = manager(now=0.0, interval=10.0)
    before = km.keys_for(IPSEC)
    assert not km.handle_timer(9.999)
    assert km.keys_for(IPSEC) == before
    assert km.handle_timer(10.0)
    after = km.keys_for(IPSEC)
    assert after[:2] == before[1:]  # oldest dropped
    assert after[2].tag == km.lamport_clock
    assert km.primary(IPSEC) == before[2]  # last period's newest key is now sent with
    assert km.next_deadline() == 20.0
    check_invariants(km)


def test_missed_intervals_rotate_once_and_reschedule_from_now() -> None:
    km = manager(now=0.0, interval=10.0)
    clock = km.lamport_clock
    assert km.handle_timer(105.0)
    assert km.lamport_clock == clock + 2  # one new key per subsystem
    assert km.next_deadline() == 115.0
    assert not km.handle_timer(110.0)


def test_forced_rotate() -> None:
    km = manager(now=0.0, interval=10.0)
    clock = km.lamport_clock
    km.rotate(3.0)
    assert km.lamport_clock == clock + 2
    assert (km.last_rotation, km.next_deadline()) == (3.0, 13.0)
    check_invariants(km)


def test_set_interval() -> None:
    km = manager(now=0.0, interval=100.0)
    km.set_interval(50.0, now=20.0)
    assert (km.interval, km.next_deadline()) == (50.0, 50.0)
    km.set_interval(10.0, now=20.0)  # the new deadline has passed already: rotate now
    assert km.next_deadline() == 20.0
    assert km.handle_timer(20.0)
    assert km.next_deadline() == 30.0


@pytest.mark.parametrize("interval", [0.0, 0.999, -5.0, math.nan, math.inf])
def test_interval_must_be_at_least_one_second(interval: float) -> None:
    with pytest.raises(UsageError, match=r"at least 1\.0 s"):
        manager().set_interval(interval, 0.0)
    with pytest.raises(UsageError):
        manager(interval=interval)


def test_twelve_hours_of_two_second_rotations() -> None:
    km = manager(seed=3, now=0.0, interval=2.0)
    rotations, now = 0, 0.0
    last_clock = km.lamport_clock
    while now <= 12 * 3600.0:
        primaries = {s: km.primary(s) for s in SUBSYSTEMS}
        newest = {s: km.keys_for(s)[-1] for s in SUBSYSTEMS}
        if km.handle_timer(now):
            rotations += 1
            assert km.lamport_clock == last_clock + 2
            last_clock = km.lamport_clock
            for s in SUBSYSTEMS:
                added = km.keys_for(s)[-1]
                assert added.tag > newest[s].tag
                assert km.primary(s) != added  # the new key is receive-only for a period
                assert km.primary(s) == newest[s]
                assert primaries[s] == km.keys_for(s)[0]
            check_invariants(km)
        now += 0.5
    assert rotations == 12 * 3600 // 2


def test_persistence_round_trip() -> None:
    km = manager(seed=9, now=0.0, interval=60.0)
    km.handle_timer(61.0)
    restored = KeyManager.from_json(random.Random(0), json.loads(json.dumps(km.to_json())))
    assert restored.keys == km.keys
    assert restored.lamport_clock == km.lamport_clock
    assert (restored.interval, restored.last_rotation) == (60.0, 61.0)
    assert restored.next_deadline() == km.next_deadline() == 121.0
    assert restored.handle_timer(121.0)
    assert restored.lamport_clock == km.lamport_clock + 2
    check_invariants(restored)


def test_restore_keeps_a_clock_ahead_of_the_keys() -> None:
    km = manager()
    restored = KeyManager(random.Random(0), 0.0, keys=km.keys, lamport_clock=km.lamport_clock + 50)
    restored.rotate(1.0)
    assert restored.keys_for(GOSSIP)[-1].tag == km.lamport_clock + 51
    with pytest.raises(UsageError, match="behind"):
        KeyManager(random.Random(0), 0.0, keys=km.keys, lamport_clock=km.lamport_clock - 1)


def test_restore_needs_full_rings() -> None:
    keys = manager().keys
    with pytest.raises(UsageError, match="needs 3 keys"):
        KeyManager(random.Random(0), 0.0, keys=keys[1:])
    dup = (*keys[:2], keys[1], *keys[3:])
    with pytest.raises(UsageError, match="same tag"):
        KeyManager(random.Random(0), 0.0, keys=dup)


def _broken(change: dict[str, object]) -> dict[str, object]:
    return {**manager().to_json(), **change}


@pytest.mark.parametrize(
    "data",
    [
        [],
        _broken({"format": 2}),
        _broken({"keys": "nope"}),
        _broken({"keys": [1]}),
        _broken({"interval": "12h"}),
        _broken({"interval": 0.1}),
        _broken({"last_rotation": None}),
        _broken({"last_rotation": math.nan}),
        _broken({"lamport_clock": True}),
        _broken({"lamport_clock": 1.5}),
    ],
)
def test_from_json_rejects_malformed(data: object) -> None:
    with pytest.raises(UsageError):
        KeyManager.from_json(random.Random(0), data)


def test_encryption_key_json_and_validation() -> None:
    key = EncryptionKey(IPSEC, "aes-128-gcm", bytes(range(16)), 42)
    data = key.to_json()
    assert data["key"] == bytes(range(16)).hex()
    assert EncryptionKey.from_json(json.loads(json.dumps(data))) == key
    assert key.tag == 42
    assert bytes(range(16)).hex() not in repr(key)
    for bad in (
        {**data, "key": "zz"},
        {**data, "key": "00"},
        {**data, "subsystem": "x"},
        {**data, "algorithm": "aes-256-gcm"},
        {**data, "lamport_time": -1},
        {**data, "lamport_time": 2**64},
        {**data, "lamport_time": "1"},
        "key",
    ):
        with pytest.raises(UsageError):
            EncryptionKey.from_json(bad)


@given(
    st.integers(0, 2**32),
    st.floats(1.0, 1e5),
    st.lists(st.floats(-1e6, 1e7, allow_nan=False), max_size=60),
)
def test_property_random_now_sequences(seed: int, interval: float, times: list[float]) -> None:
    km = manager(seed=seed, now=0.0, interval=interval)
    seen = {k.tag for k in km.keys}
    for now in times:
        deadline, clock = km.next_deadline(), km.lamport_clock
        old_primaries = {s: km.primary(s) for s in SUBSYSTEMS}
        rotated = km.handle_timer(now)
        assert rotated == (now >= deadline)
        if rotated:
            assert km.lamport_clock == clock + 2
            assert km.next_deadline() == now + interval
            new = {k.tag for k in km.keys} - seen
            assert len(new) == 2 and min(new) > max(seen)
            seen |= new
            for s in SUBSYSTEMS:
                assert km.primary(s).tag not in new
                assert km.primary(s) != old_primaries[s]
        else:
            assert (km.lamport_clock, km.next_deadline()) == (clock, deadline)
        check_invariants(km)
