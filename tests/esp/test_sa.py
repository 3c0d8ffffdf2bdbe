"""One ESP SA: RFC 4303 framing, RFC 4106 AES-GCM, anti-replay, ESN, sequence exhaustion."""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import BadPacket, UsageError, VxnetError
from vxnet.esp.sa import (
    DEFAULT_ESN,
    DEFAULT_ICV_LEN,
    DEFAULT_REPLAY_WINDOW,
    MAX_ESP_LEN,
    SecurityAssociation,
    SequenceExhausted,
    esp_overhead,
)

KEY = bytes(range(16))
SALT = b"\xca\xfe\xba\xbe"
SPI = 0x12345678
ICVS = (8, 12, 16)
FUZZ = settings(max_examples=300, deadline=None)


def pair(
    icv_len: int = 16, esn: bool = False, window: int = 64, **kw: int
) -> tuple[SecurityAssociation, SecurityAssociation]:
    def make() -> SecurityAssociation:
        return SecurityAssociation(
            SPI, KEY, SALT, icv_len=icv_len, esn=esn, replay_window=window, **kw
        )

    return make(), make()


def drop(sa: SecurityAssociation, packet: bytes) -> str:
    """The reason ``sa`` drops ``packet`` (fails the test if it accepts it)."""
    with pytest.raises(BadPacket) as info:
        sa.decrypt_untrusted(packet)
    return info.value.reason


def test_defaults() -> None:
    sa = SecurityAssociation(SPI, KEY, SALT)
    assert (sa.icv_len, sa.replay_window, sa.esn) == (16, 1024, True)
    assert (DEFAULT_ICV_LEN, DEFAULT_REPLAY_WINDOW, DEFAULT_ESN) == (16, 1024, True)
    assert "0x12345678" in repr(sa) and KEY.hex() not in repr(sa)


def test_overhead() -> None:
    assert esp_overhead(8) == 26  # Docker's pktExpansion
    assert esp_overhead(12) == 30
    assert esp_overhead(16) == 34
    with pytest.raises(UsageError):
        esp_overhead(4)


@pytest.mark.parametrize("icv_len", ICVS)
@pytest.mark.parametrize("esn", [False, True])
def test_round_trip_all_lengths(icv_len: int, esn: bool) -> None:
    tx, rx = pair(icv_len, esn)
    for n in [*range(70), 1400, 1472, 9000, 60000]:
        payload = random.Random(n).randbytes(n)
        for kind in (bytes, bytearray, memoryview):
            packet = tx.encrypt(kind(payload), next_header=17)
            assert len(packet) % 4 == 0
            assert len(packet) == 16 + n + (-(n + 2) % 4) + 2 + icv_len
            assert rx.decrypt_untrusted(packet) == (17, payload)
    assert tx.seq == rx.highest_seq == 74 * 3


def test_input_kinds_for_decrypt() -> None:
    tx, rx = pair()
    for kind in (bytes, bytearray, memoryview):
        assert rx.decrypt_untrusted(kind(tx.encrypt(b"abcd"))) == (17, b"abcd")
    # A memoryview of another format is read as its bytes.
    packet = tx.encrypt(b"wxyz")
    assert rx.decrypt_untrusted(memoryview(packet).cast("I")) == (17, b"wxyz")


@pytest.mark.parametrize("next_header", [0, 4, 17, 41, 59, 255])
def test_next_header(next_header: int) -> None:
    tx, rx = pair()
    assert rx.decrypt_untrusted(tx.encrypt(b"x", next_header)) == (next_header, b"x")


@pytest.mark.parametrize("esn", [False, True])
def test_wire_layout_against_raw_aes_gcm(esn: bool) -> None:
    """SPI | seq | IV=seq | GCM(salt|IV, AAD) of payload|1,2,..|padlen|nh, ICV 16."""
    tx, _ = pair(16, esn)
    tx.advance_for_test(tx_seq=(1 << 32) + 41 if esn else 41)
    payload = b"hello, vxlan"  # 12 bytes: 2 of padding
    packet = tx.encrypt(payload, 17)
    spi, seq, iv = struct.unpack_from("!IIQ", packet)
    full = (1 << 32) + 42 if esn else 42
    assert (spi, seq, iv) == (SPI, full & 0xFFFFFFFF, full)
    aad = struct.pack("!III", SPI, full >> 32, seq) if esn else packet[:8]
    plain = AESGCM(KEY).decrypt(SALT + packet[8:16], packet[16:], aad)
    assert plain == payload + b"\x01\x02" + b"\x02\x11"


def test_iv_mask() -> None:
    tx = SecurityAssociation(SPI, KEY, SALT, iv_mask=0xA5A5A5A5A5A5A5A5)
    rx = SecurityAssociation(SPI, KEY, SALT)
    packet = tx.encrypt(b"p")
    assert struct.unpack_from("!Q", packet, 8)[0] == 1 ^ 0xA5A5A5A5A5A5A5A5
    assert rx.decrypt_untrusted(packet) == (17, b"p")  # the IV is explicit


@pytest.mark.parametrize("icv_len", ICVS)
@pytest.mark.parametrize("esn", [False, True])
def test_tamper_any_bit(icv_len: int, esn: bool) -> None:
    tx, rx = pair(icv_len, esn)
    tx.advance_for_test(tx_seq=4)  # seq 5: no single bit flip makes it 0
    packet = tx.encrypt(bytes(range(37)))
    for bit in range(len(packet) * 8):
        bad = bytearray(packet)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        got = drop(rx, bytes(bad))
        if bit < 32:
            assert got == "esp_wrong_spi", bit
        elif bit < 64 and esn:  # seq 5 with bit 31 set reads as 2**31 behind: dropped unread
            assert got == ("esp_replay" if bit == 32 else "esp_auth_failed"), bit
        else:
            assert got == "esp_auth_failed", bit
    assert rx.highest_seq == 0  # failures never move the window
    assert rx.decrypt_untrusted(packet) == (17, bytes(range(37)))


@pytest.mark.parametrize("icv_len", ICVS)
def test_truncated_at_every_length(icv_len: int) -> None:
    tx, rx = pair(icv_len)
    packet = tx.encrypt(bytes(50))
    for n in range(len(packet)):
        assert drop(rx, packet[:n]) in {
            "esp_truncated",
            "esp_auth_failed",
        }
    for n in range(16 + 2 + icv_len):
        assert drop(rx, packet[:n]) == "esp_truncated"
    assert rx.decrypt_untrusted(packet) == (17, bytes(50))


@pytest.mark.parametrize("icv_len", ICVS)
def test_wrong_key_and_wrong_salt(icv_len: int) -> None:
    tx, _ = pair(icv_len)
    packet = tx.encrypt(b"secret")
    wrong_key = SecurityAssociation(SPI, bytes(16), SALT, icv_len=icv_len, esn=False)
    wrong_salt = SecurityAssociation(SPI, KEY, bytes(4), icv_len=icv_len, esn=False)
    wrong_esn = SecurityAssociation(SPI, KEY, SALT, icv_len=icv_len, esn=True)
    for sa in (wrong_key, wrong_salt, wrong_esn):
        assert drop(sa, packet) == "esp_auth_failed"


def test_wrong_spi() -> None:
    tx, _ = pair()
    other = SecurityAssociation(SPI + 1, KEY, SALT)
    assert drop(other, tx.encrypt(b"x")) == "esp_wrong_spi"


def test_replay_of_accepted_packet() -> None:
    tx, rx = pair()
    packet = tx.encrypt(b"once")
    assert rx.decrypt_untrusted(packet) == (17, b"once")
    assert drop(rx, packet) == "esp_replay"


@pytest.mark.parametrize("esn", [False, True])
def test_out_of_order_within_window_accepted_once(esn: bool) -> None:
    tx, rx = pair(16, esn, window=128)
    packets = [tx.encrypt(i.to_bytes(2, "big")) for i in range(128)]
    order = list(range(128))
    random.Random(7).shuffle(order)
    for i in order:
        assert rx.decrypt_untrusted(packets[i]) == (17, i.to_bytes(2, "big"))
    for i in order:
        assert drop(rx, packets[i]) == "esp_replay"


@pytest.mark.parametrize("esn", [False, True])
def test_window_edges_and_too_old(esn: bool) -> None:
    tx, rx = pair(16, esn, window=64)
    packets = [tx.encrypt(b"") for _ in range(200)]  # seq 1..200
    assert rx.decrypt_untrusted(packets[199]) == (17, b"")  # highest = 200
    assert drop(rx, packets[200 - 64 - 1]) == "esp_replay"  # 136
    assert drop(rx, packets[0]) == "esp_replay"
    assert rx.decrypt_untrusted(packets[200 - 64]) == (17, b"")  # seq 137: the window's edge
    assert rx.decrypt_untrusted(packets[198]) == (17, b"")


def test_window_slides_past_a_big_jump() -> None:
    tx, rx = pair(16, False, window=64)
    first = tx.encrypt(b"a")
    tx.advance_for_test(tx_seq=10_000)
    late = tx.encrypt(b"b")
    assert rx.decrypt_untrusted(late) == (17, b"b")
    assert drop(rx, first) == "esp_replay"


def test_sequence_zero_is_never_accepted() -> None:
    tx, rx = pair()
    tx.advance_for_test(tx_seq=0)
    packet = bytearray(tx.encrypt(b"z"))
    packet[4:8] = bytes(4)
    assert drop(rx, bytes(packet)) == "esp_replay"


def _forge(plain: bytes, seq: int = 1, icv_len: int = 16) -> bytes:
    """An authentic packet around any plaintext (to test the checks after authentication)."""
    header = struct.pack("!IIQ", SPI, seq, seq)
    sealed = AESGCM(KEY).encrypt(SALT + header[8:], plain, header[:8])
    return header + sealed[: len(sealed) - 16 + icv_len]


@pytest.mark.parametrize("icv_len", ICVS)
def test_bad_padding(icv_len: int) -> None:
    rx = SecurityAssociation(SPI, KEY, SALT, icv_len=icv_len, esn=False)
    assert rx.decrypt_untrusted(_forge(b"ab\x01\x02\x02\x11", 1, icv_len)) == (17, b"ab")
    for plain in (b"ab\x00\x00\x02\x11", b"ab\x02\x01\x02\x11", b"\x05\x11", b"abcd\xff\x11"):
        assert drop(rx, _forge(plain, 2, icv_len)) == ("esp_bad_padding")
    # The bad packets did not move the window: a good one with the same number is accepted.
    assert rx.highest_seq == 1
    assert rx.decrypt_untrusted(_forge(b"\x01\x02\x02\x11", 2, icv_len)) == (17, b"")


def test_seq_exhaustion_without_esn() -> None:
    tx, rx = pair(16, esn=False)
    tx.advance_for_test(tx_seq=2**32 - 3)
    rx.advance_for_test(rx_highest=2**32 - 3)
    for _ in range(2):
        assert rx.decrypt_untrusted(tx.encrypt(b"x")) == (17, b"x")
    assert tx.seq == 2**32 - 1 and tx.seq_remaining == 0
    for _ in range(3):
        with pytest.raises(SequenceExhausted) as info:
            tx.encrypt(b"x")
        assert info.value.reason == "esp_seq_exhausted"
        assert isinstance(info.value, VxnetError) and not isinstance(info.value, BadPacket)
    assert tx.seq == 2**32 - 1  # refused, not wrapped


@pytest.mark.parametrize("icv_len", ICVS)
def test_esn_crosses_2_32(icv_len: int) -> None:
    tx, rx = pair(icv_len, esn=True, window=1024)
    start = 2**32 - 100
    tx.advance_for_test(tx_seq=start)
    rx.advance_for_test(rx_highest=start)
    packets = [tx.encrypt(i.to_bytes(4, "big")) for i in range(200)]
    wire_seqs = [struct.unpack_from("!I", p, 4)[0] for p in packets]
    assert wire_seqs[97:101] == [2**32 - 2, 2**32 - 1, 0, 1]  # the low half wraps on the wire
    # Deliver with reordering across the boundary; every packet once, then none again.
    order = list(range(200))
    random.Random(3).shuffle(order)
    order.sort(key=lambda i: i // 20)  # shuffled within blocks of 20
    for i in order:
        assert rx.decrypt_untrusted(packets[i]) == (17, i.to_bytes(4, "big"))
    assert rx.highest_seq == start + 200 > 2**32
    for i in (0, 99, 100, 199):
        assert drop(rx, packets[i]) == "esp_replay"
    assert tx.seq_remaining == 2**64 - 1 - tx.seq


def test_esn_late_packet_from_previous_subspace() -> None:
    """Window spanning two 2**32 subspaces (RFC 4303 A2.1 case B): seq_hi = Th - 1."""
    tx, rx = pair(16, esn=True, window=1024)
    tx.advance_for_test(tx_seq=2**32 - 10)
    late = [tx.encrypt(b"late") for _ in range(5)]  # 2**32-9 .. 2**32-5
    tx.advance_for_test(tx_seq=2**32 + 5)
    rx.advance_for_test(rx_highest=2**32 - 20)
    assert rx.decrypt_untrusted(tx.encrypt(b"new")) == (17, b"new")  # 2**32+6
    for packet in late:
        assert rx.decrypt_untrusted(packet) == (17, b"late")


def test_esn_inference_never_overflows() -> None:
    _, rx = pair(16, esn=True, window=64)
    rx.advance_for_test(rx_highest=2**64 - 1)
    packet = _forge(b"\x01\x02\x02\x11", seq=5)
    assert drop(rx, packet) == "esp_replay"
    fresh = SecurityAssociation(SPI, KEY, SALT, esn=True, replay_window=64)
    # A fresh receiver reads seq_lo near 2**32 as "before the start": seq_hi would be -1.
    assert drop(fresh, _forge(b"\x11\x11", seq=2**32 - 2)) == ("esp_replay")


def test_oversize() -> None:
    tx, rx = pair()
    with pytest.raises(UsageError):
        tx.encrypt(bytes(MAX_ESP_LEN))
    biggest = 65532 - 16 - 16 - 2  # the largest ESP packet that is a multiple of 4: 65532
    with pytest.raises(UsageError):
        tx.encrypt(bytes(biggest + 1))  # 3 bytes of padding would make it 65536
    packet = tx.encrypt(bytes(biggest))
    assert len(packet) == 65532
    assert rx.decrypt_untrusted(packet) == (17, bytes(biggest))
    assert drop(rx, bytes(MAX_ESP_LEN + 1)) == "esp_oversize"


def test_constructor_checks() -> None:
    with pytest.raises(UsageError):
        SecurityAssociation(-1, KEY, SALT)
    with pytest.raises(UsageError):
        SecurityAssociation(1 << 32, KEY, SALT)
    for key in (b"", bytes(15), bytes(20)):
        with pytest.raises(UsageError):
            SecurityAssociation(SPI, key, SALT)
    with pytest.raises(UsageError):
        SecurityAssociation(SPI, KEY, b"abc")
    for icv in (0, 4, 32):
        with pytest.raises(UsageError):
            SecurityAssociation(SPI, KEY, SALT, icv_len=icv)
    for window in (0, 32, 63, (1 << 16) + 1):
        with pytest.raises(UsageError):
            SecurityAssociation(SPI, KEY, SALT, replay_window=window)
    with pytest.raises(UsageError):
        SecurityAssociation(SPI, KEY, SALT, iv_mask=1 << 64)
    for key in (bytes(24), bytes(32)):
        tx = SecurityAssociation(SPI, key, SALT)
        assert SecurityAssociation(SPI, key, SALT).decrypt_untrusted(tx.encrypt(b"k")) == (
            17,
            b"k",
        )
    sa = SecurityAssociation(SPI, KEY, SALT)
    with pytest.raises(UsageError):
        sa.encrypt(b"x", 256)
    with pytest.raises(UsageError):
        sa.advance_for_test(tx_seq=-1)
    with pytest.raises(UsageError):
        SecurityAssociation(SPI, KEY, SALT, esn=False).advance_for_test(rx_highest=1 << 32)


# -- fuzz: one way out ------------------------------------------------------------------------

_RX = {icv: SecurityAssociation(SPI, KEY, SALT, icv_len=icv, replay_window=64) for icv in ICVS}


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(ICVS))
def test_fuzz_random_bytes(data: bytes, icv_len: int) -> None:
    with contextlib.suppress(BadPacket):
        _RX[icv_len].decrypt_untrusted(data)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(ICVS), st.booleans())
def test_fuzz_with_our_spi(tail: bytes, icv_len: int, esn: bool) -> None:
    rx = SecurityAssociation(SPI, KEY, SALT, icv_len=icv_len, esn=esn, replay_window=64)
    with contextlib.suppress(BadPacket):
        rx.decrypt_untrusted(struct.pack("!I", SPI) + tail)


@FUZZ
@given(
    st.binary(max_size=80),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.sampled_from(ICVS),
)
def test_fuzz_mutated_packets(payload: bytes, edits: list[tuple[int, int]], icv_len: int) -> None:
    tx, rx = pair(icv_len, esn=True)
    original = tx.encrypt(payload)
    packet = bytearray(original)
    for where, value in edits:
        packet[where % len(packet)] = value
    if packet == original:
        assert rx.decrypt_untrusted(bytes(packet)) == (17, payload)
    else:
        with pytest.raises(BadPacket):
            rx.decrypt_untrusted(bytes(packet))


# -- micro-benchmark (printed, never asserted) -----------------------------------------------


def _per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _bench(size: int, icv_len: int, n: int) -> str:
    payload = random.Random(size).randbytes(size)
    tx, rx = pair(icv_len, esn=True, window=1024)
    packets = iter([tx.encrypt(payload) for _ in range(n)])
    enc = _per_call(lambda: tx.encrypt(payload), n)
    dec = _per_call(lambda: rx.decrypt_untrusted(next(packets)), n)
    aead = AESGCM(KEY)
    nonce, aad = bytes(12), bytes(12)
    sealed = aead.encrypt(nonce, payload, aad)
    raw_enc = _per_call(lambda: aead.encrypt(nonce, payload, aad), n)
    raw_dec = _per_call(lambda: aead.decrypt(nonce, sealed, aad), n)
    return (
        f"  {size:>6} B ICV {icv_len:>2}: encrypt {enc:7.2f}  decrypt {dec:7.2f}  "
        f"| raw AESGCM encrypt {raw_enc:7.2f}  decrypt {raw_dec:7.2f}  "
        f"| vxnet/raw {((enc + dec) / (raw_enc + raw_dec)):.2f}x"
    )


def test_benchmark_print(capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["", "ESP cost per packet (us) on this machine; raw AESGCM on the same bytes = ceiling"]
    for size, n in ((1400, 4000), (64_000, 300)):
        for icv_len in (16, 8):
            lines.append(_bench(size, icv_len, n))
    with capsys.disabled():
        print("\n".join(lines))
