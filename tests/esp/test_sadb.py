"""The node's SA database: Docker's SPIs, the middle-key rule and rotations that drop nothing."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

import pytest

from vxnet.errors import BadPacket, UsageError
from vxnet.esp import sadb as sadb_module
from vxnet.esp.sa import esp_overhead
from vxnet.esp.sadb import SADB, KeyChange, SaInfo, encrypted_mtu
from vxnet.esp.spi import IPAddress, derive_spi, salt_for_spi

A = IPv4Address("192.168.99.2")
B = IPv4Address("192.168.99.3")
C = IPv4Address("192.168.99.4")
RING = [(101, bytes([1]) * 16), (102, bytes([2]) * 16), (103, bytes([3]) * 16)]


def node(addr: IPAddress, *peers: IPAddress, keys: Sequence[tuple[int, bytes]] = RING) -> SADB:
    db = SADB(addr, rng=random.Random(str(addr)))
    db.set_keys(keys)
    for peer in peers:
        db.add_peer(peer)
    return db


def deliver(db: SADB, packet: bytes) -> tuple[int, bytes]:
    sa = db.rx(struct.unpack_from("!I", packet)[0])
    if sa is None:
        raise BadPacket("esp_unknown_spi")
    return sa.decrypt_untrusted(packet)


def test_docker_spis_salts_and_primary() -> None:
    a = node(A, B)
    tx = a.tx(B)
    assert a.primary_tag == 102  # the middle key by tag
    assert tx.spi == derive_spi(A, B, 102)
    assert tx.salt == salt_for_spi(tx.spi)
    for tag in (101, 102, 103):
        rx = a.rx(derive_spi(B, A, tag))
        assert rx is not None and rx.salt == salt_for_spi(rx.spi)
    assert a.rx(derive_spi(A, B, 101)) is None  # our own direction is not a receive SA


def test_two_nodes_talk_both_ways() -> None:
    a, b = node(A, B), node(B, A)
    for i in range(50):
        assert deliver(b, a.tx(B).encrypt(b"ping %d" % i)) == (17, b"ping %d" % i)
        assert deliver(a, b.tx(A).encrypt(b"pong %d" % i)) == (17, b"pong %d" % i)


def test_primary_rule() -> None:
    assert SADB.choose_primary([7]) == 7
    assert SADB.choose_primary([7, 9]) == 9  # Docker: keys[1]
    assert SADB.choose_primary([7, 8, 9]) == 8
    db = SADB(A)
    change = db.set_keys([RING[2], RING[0], RING[1]])  # any order: sorted by tag
    assert change == KeyChange(
        added=(101, 102, 103), primary=102, previous_primary=None, removed=()
    )
    assert db.tags == (101, 102, 103)


def test_set_keys_is_idempotent_and_keeps_state() -> None:
    a, b = node(A, B), node(B, A)
    tx = a.tx(B)
    for _ in range(5):
        deliver(b, tx.encrypt(b"x"))
    rx_before = b.rx(tx.spi)
    assert a.set_keys(RING) == KeyChange((), 102, 102, ())
    b.set_keys(list(reversed(RING)))
    assert a.tx(B) is tx and tx.seq == 5
    assert b.rx(tx.spi) is rx_before and rx_before is not None and rx_before.highest_seq == 5


def test_rotation_order_and_result() -> None:
    a = node(A, B, C)
    old_tx = a.tx(B)
    change = a.set_keys([*RING[1:], (104, bytes([4]) * 16)])
    assert change == KeyChange(added=(104,), primary=103, previous_primary=102, removed=(101,))
    assert a.tx(B) is not old_tx and a.tx(B).spi == derive_spi(A, B, 103)
    for peer in (B, C):
        assert a.rx(derive_spi(peer, A, 101)) is None
        for tag in (102, 103, 104):
            assert a.rx(derive_spi(peer, A, tag)) is not None


def test_peers() -> None:
    a = node(A, B)
    spis = [derive_spi(B, A, t) for t, _ in RING]
    a.remove_peer(B)
    a.remove_peer(B)  # idempotent
    assert all(a.rx(s) is None for s in spis)
    assert a.peers == frozenset()
    assert a.tx(C).spi == derive_spi(A, C, 102)  # added lazily on first use
    assert a.peers == {C}
    a.set_peers([B])
    assert a.peers == {B} and a.rx(derive_spi(C, A, 102)) is None
    assert a.rx(0xDEADBEEF) is None  # unknown SPI: the dataplane drops and counts
    with pytest.raises(UsageError):
        a.add_peer(A)


def test_ipv6_peers() -> None:
    x, y = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
    a, b = node(x, y), node(y, x)
    assert a.tx(y).spi == derive_spi(x, y, 102)
    assert deliver(b, a.tx(y).encrypt(b"v6")) == (17, b"v6")


def test_key_checks() -> None:
    db = SADB(A)
    with pytest.raises(UsageError):
        db.add_peer(B)  # no keys yet: Docker's "encryption key is not present"
    with pytest.raises(UsageError):
        db.tx(B)
    for bad in ([], [(1, bytes(15))], [(-1, bytes(16))], [(1, bytes(16)), (1, bytes(16))]):
        with pytest.raises(UsageError):
            db.set_keys(bad)
    with pytest.raises(UsageError):
        db.set_keys([(5, bytes(16)), (5 + (1 << 32), bytes(16))])  # same uint32 tag
    db.set_keys(RING)
    with pytest.raises(UsageError):
        db.set_keys([(101, bytes(16)), *RING[1:]])  # a tag cannot change its key
    with pytest.raises(UsageError):
        SADB(A, icv_len=10)


def test_describe() -> None:
    a, b = node(A, B), node(B, A)
    for _ in range(3):
        deliver(b, a.tx(B).encrypt(b""))
    rows = a.describe()
    assert [r.direction for r in rows] == ["out", "in", "in", "in"]
    assert rows[0] == SaInfo(derive_spi(A, B, 102), "out", B, 102, 3, True)
    assert [r.tag for r in rows[1:]] == [101, 102, 103]
    assert [r.primary for r in rows[1:]] == [False, True, False]
    assert rows[0].spi_hex == f"0x{derive_spi(A, B, 102):08x}" and len(rows[0].spi_hex) == 10
    assert b.describe()[2].seq == 3  # B's receive SA for tag 102 has seen 3 packets
    assert rows[0].to_json() == {
        "spi": rows[0].spi_hex,
        "direction": "out",
        "peer": "192.168.99.3",
        "tag": 102,
        "seq": 3,
        "primary": True,
    }


def test_overhead_and_mtu() -> None:
    assert SADB(A, icv_len=8).overhead == 26  # Docker's pktExpansion
    assert SADB(A).overhead == 34  # ICV 16, vxnet's default
    assert encrypted_mtu(1500, 8) == 1424  # Docker's figure
    assert encrypted_mtu(1500, 16) == 1416
    assert encrypted_mtu(9000, 16) == 8916
    for icv in (8, 12, 16):
        mtu = encrypted_mtu(1500, icv)
        a = SADB(A, icv_len=icv)
        a.set_keys(RING)
        # UDP 8 + VXLAN 8 + Ethernet 14 + a full inner packet, inside a 20-byte IPv4 header.
        esp = a.tx(B).encrypt(bytes(30 + mtu))
        assert 20 + len(esp) <= 1500 < 20 + len(a.tx(B).encrypt(bytes(30 + mtu + 1)))
        assert len(esp) == 30 + mtu + esp_overhead(icv)


def test_restarted_peer_needs_reset() -> None:
    a, b = node(A, B), node(B, A)
    for _ in range(2000):
        deliver(b, a.tx(B).encrypt(b""))
    restarted = node(A, B)  # same keys, counters from 1
    with pytest.raises(BadPacket) as info:
        deliver(b, restarted.tx(B).encrypt(b"hello again"))
    assert info.value.reason == "esp_replay"
    b.reset_peer(A)
    assert deliver(b, restarted.tx(B).encrypt(b"hello again")) == (17, b"hello again")


def test_recreated_sa_never_repeats_an_iv() -> None:
    a = SADB(A)  # SystemRandom masks
    a.set_keys(RING)
    first = a.tx(B).encrypt(b"")
    a.reset_peer(B)
    second = a.tx(B).encrypt(b"")
    assert first[:8] == second[:8]  # same SPI, same sequence number 1 ...
    assert first[8:16] != second[8:16]  # ... but a different IV under the same key and salt


def test_spi_collision_keeps_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sadb_module, "derive_spi", lambda src, dst, tag: 0x1234)
    a = node(A, B)
    assert a.collisions == 2  # three receive SAs wanted SPI 0x1234
    first = a.rx(0x1234)
    assert first is not None
    a.remove_peer(B)
    assert a.rx(0x1234) is None


def test_wireshark_records() -> None:
    a = node(A, B)
    records = a.wireshark_esp_sa()
    assert len(records) == 4
    spi = derive_spi(A, B, 102)
    key = bytes([2]) * 16 + salt_for_spi(spi)
    assert records[0] == (
        f'"IPv4","192.168.99.2","192.168.99.3","0x{spi:08x}",'
        f'"AES-GCM with 16 octet ICV [RFC4106]","0x{key.hex()}","NULL",""'
    )


# -- rotation under traffic ---------------------------------------------------------------------


class NewestKeySADB(SADB):
    """A node that breaks Docker's rule and sends with the newest key."""

    __slots__ = ()

    @staticmethod
    def choose_primary(tags: Sequence[int]) -> int:
        return tags[-1]


def rotate_under_traffic(
    sender_rule: type[SADB], *, rotations: int = 30, per_epoch: int = 100, seed: int = 1
) -> tuple[int, Counter[str]]:
    """Two nodes stream to each other while the keyring rotates ``rotations`` times.

    In every rotation each node applies the new ring at its own moment (up to 40 packets apart,
    either one first) and packets are delivered out of order (from a pool of up to 8 in flight
    each way).  Returns (packets accepted, drops by reason)."""
    rng = random.Random(seed)
    keys = [(5000 + i, rng.randbytes(16)) for i in range(rotations + 3)]
    a = sender_rule(A, rng=random.Random(1))
    b = sender_rule(B, rng=random.Random(2))
    for db, peer in ((a, B), (b, A)):
        db.set_keys(keys[0:3])
        db.add_peer(peer)
    in_flight: list[tuple[SADB, bytes]] = []
    accepted = 0
    drops: Counter[str] = Counter()

    def deliver_one() -> None:
        nonlocal accepted
        dst, packet = in_flight.pop(rng.randrange(len(in_flight)))
        try:
            deliver(dst, packet)
            accepted += 1
        except BadPacket as exc:
            drops[exc.reason] += 1

    for epoch in range(1, rotations + 1):
        switch = {id(a): rng.randrange(40), id(b): rng.randrange(40)}
        for i in range(per_epoch):
            for db in (a, b):
                if switch[id(db)] == i:
                    db.set_keys(keys[epoch : epoch + 3])
            in_flight.append((b, a.tx(B).encrypt(b"a->b %d" % i)))
            in_flight.append((a, b.tx(A).encrypt(b"b->a %d" % i)))
            while len(in_flight) > 16:
                deliver_one()
    while in_flight:
        deliver_one()
    return accepted, drops


def test_rotation_drops_nothing_with_the_middle_key() -> None:
    accepted, drops = rotate_under_traffic(SADB)
    assert drops == Counter()
    assert accepted == 2 * 30 * 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rotation_drops_packets_with_the_newest_key(seed: int) -> None:
    """The control: sending with the newest key loses whatever reaches a node not yet rotated."""
    accepted, drops = rotate_under_traffic(NewestKeySADB, seed=seed)
    assert drops["esp_unknown_spi"] > 0
    assert accepted + drops.total() == 2 * 30 * 100
