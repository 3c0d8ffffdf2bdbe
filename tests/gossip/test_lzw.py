"""vxnet.gossip.lzw: Go compress/lzw (LSB, 8-bit literals), without Go (see test_go_wire too)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import BadPacket
from vxnet.gossip import lzw

# What Go 1.19's lzw.NewWriter(w, lzw.LSB, 8) writes (gopeer wire, lzw_compress).
GO_VECTORS = [
    (b"", "000302"),
    (b"a", "00c30404"),
    (b"TOBEORNOTTOBEORTOBEORNOT", "00a93c1152e48914274fa80824687061c183090302"),
    (b"a" * 50, "00c3081c48b0a0c1830813160c08"),
    (b"hellohellohello", "00d19461c3e68d40820607160c08"),
]
# 200 kB over 8 letters (several dictionary resets): Go's output is 90703 bytes with this hash.
GO_BIG_SHA256 = "0db2d11932c92fb5a16798b7a82d0f9406d80e07c47474643a275c79e5249618"


def eight_letters(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.choice(b"abcdefgh") for _ in range(n))


@pytest.mark.parametrize(("data", "go"), GO_VECTORS)
def test_compress_matches_go_vectors(data: bytes, go: str) -> None:
    assert lzw.compress(data).hex() == go
    assert lzw.decompress_untrusted(bytes.fromhex(go)) == data


def test_compress_matches_go_across_dictionary_resets() -> None:
    data = eight_letters(200_000)
    packed = lzw.compress(data)
    assert (len(packed), hashlib.sha256(packed).hexdigest()) == (90703, GO_BIG_SHA256)
    assert lzw.decompress_untrusted(packed) == data


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_round_trip_binary(data: bytes) -> None:
    assert lzw.decompress_untrusted(lzw.compress(data)) == data


@settings(max_examples=100)
@given(st.lists(st.sampled_from([b"a", b"b", b"ab", b"aaa", b"\x00", b"\xff"]), max_size=3000))
def test_round_trip_repetitive(parts: list[bytes]) -> None:
    """Small alphabets make long strings, KwKwK codes and width changes."""
    data = b"".join(parts)
    assert lzw.decompress_untrusted(lzw.compress(data)) == data


@pytest.mark.parametrize("n", [255, 256, 257, 511, 512, 513, 4094, 4095, 4096, 70_000])
def test_round_trip_around_width_changes(n: int) -> None:
    for data in (bytes(range(256)) * (n // 256) + bytes(n % 256), eight_letters(n, n)):
        assert lzw.decompress_untrusted(lzw.compress(data)) == data


def test_kwkwk() -> None:
    # "aaa...": every second code is the one being defined (the KwKwK case).
    for n in range(1, 200):
        assert lzw.decompress_untrusted(lzw.compress(b"a" * n)) == b"a" * n


def _pack_codes(codes: list[tuple[int, int]]) -> bytes:
    bits = nbits = 0
    for code, width in codes:
        bits |= code << nbits
        nbits += width
    return bits.to_bytes((nbits + 7) // 8, "little")


def _frozen_table_encoder(data: bytes) -> bytes:
    """An LZW writer that never resets: Go's reader then freezes the full dictionary."""
    table: dict[int, int] = {}
    codes: list[tuple[int, int]] = []
    width, hi, overflow, code = 9, 257, 512, data[0]
    for x in data[1:]:
        key = code << 8 | x
        if key in table:
            code = table[key]
            continue
        codes.append((code, width))
        code = x
        hi += 1
        if hi == overflow and width < 12:
            width += 1
            overflow <<= 1
        if hi < 4096:
            table[key] = hi
    codes += [(code, width), (257, width)]
    return _pack_codes(codes)


def test_decodes_frozen_dictionary() -> None:
    data = eight_letters(100_000, 7)
    assert lzw.decompress_untrusted(_frozen_table_encoder(data)) == data


def test_decodes_stream_without_leading_clear_and_ignores_trailing_bytes() -> None:
    assert lzw.decompress_untrusted(_pack_codes([(ord("h"), 9), (ord("i"), 9), (257, 9)])) == b"hi"
    assert lzw.decompress_untrusted(lzw.compress(b"hello") + b"garbage") == b"hello"


def test_clear_codes_mid_stream() -> None:
    codes = [(256, 9), (ord("a"), 9), (ord("a"), 9), (258, 9), (256, 9), (258, 9)]
    with pytest.raises(BadPacket) as err:  # after a clear, 258 is not defined yet
        lzw.decompress_untrusted(_pack_codes(codes))
    assert err.value.reason == "lzw_invalid_code"
    codes[-1] = (ord("b"), 9)
    assert lzw.decompress_untrusted(_pack_codes([*codes, (257, 9)])) == b"aaaab"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "lzw_truncated"),
        (bytes.fromhex("00c3"), "lzw_truncated"),  # 'a' then nothing
        (lzw.compress(b"hello world")[:-2], "lzw_truncated"),
        (_pack_codes([(256, 9), (300, 9)]), "lzw_invalid_code"),
        (_pack_codes([(258, 9)]), "lzw_invalid_code"),  # KwKwK with nothing before
        (_pack_codes([(ord("a"), 9), (259, 9)]), "lzw_invalid_code"),
    ],
)
def test_corrupt_input(data: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as err:
        lzw.decompress_untrusted(data)
    assert err.value.reason == reason


def test_decompression_bomb_is_refused() -> None:
    bomb = lzw.compress(bytes(5_000_000))
    assert len(bomb) < 10_000
    with pytest.raises(BadPacket) as err:
        lzw.decompress_untrusted(bomb, max_size=1_000_000)
    assert err.value.reason == "lzw_too_large"
    assert len(lzw.decompress_untrusted(bomb, max_size=5_000_000)) == 5_000_000


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_input_raises_only_bad_packet(data: bytes) -> None:
    try:
        lzw.decompress_untrusted(data, max_size=100_000)
    except BadPacket as exc:
        assert exc.reason.startswith("lzw_")


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=500), st.data())
def test_bit_flips_raise_only_bad_packet(data: bytes, draw: st.DataObject) -> None:
    packed = bytearray(lzw.compress(data))
    for _ in range(draw.draw(st.integers(1, 4))):
        bit = draw.draw(st.integers(0, len(packed) * 8 - 1))
        packed[bit // 8] ^= 1 << (bit % 8)
    try:
        lzw.decompress_untrusted(bytes(packed), max_size=100_000)
    except BadPacket as exc:
        assert exc.reason.startswith("lzw_")
