"""vxnet.gossip.packet: keyring, encryption, UDP packets and TCP streams (no Go needed)."""

from __future__ import annotations

import contextlib
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import BadPacket, UsageError
from vxnet.gossip import lzw
from vxnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Err,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    decode_message_untrusted,
    encode_message,
)
from vxnet.gossip.packet import (
    DecodedPacket,
    Keyring,
    StreamReader,
    decode_packet_detailed_untrusted,
    decode_packet_untrusted,
    decrypt_payload_untrusted,
    encode_packet,
    encode_packets,
    encode_stream,
    encrypt_payload,
    encrypted_length,
)

K1, K2, K3 = bytes(range(16)), bytes(range(1, 25)), bytes(range(2, 34))
IP = bytes([10, 0, 0, 1])


def big_push_pull(n: int = 40, user_state: bytes = b"networkdb state " * 50) -> PushPull:
    nodes = tuple(
        PushNodeState(
            f"node-{i}", bytes([10, 0, i // 256, i % 256]), 7946, None, i, NodeState(i % 4)
        )
        for i in range(n)
    )
    return PushPull(True, nodes, user_state)


UDP_MESSAGES: list[Message] = [
    Ping(1, "node-1", IP, 7946, "node-0"),
    Ack(1, None),
    Suspect(3, "node-2", "node-1"),
    Alive(4, "node-3", IP, 7946, b"meta"),
    Dead(5, "node-4", "node-4"),
    User(b"\x01networkdb gossip" * 3),
]
STREAM_MESSAGES: list[Message] = [
    Ping(9, "node-1"),
    Ack(9, b"payload"),
    Err("push/pull failed"),
    PushPull(False, ()),
    big_push_pull(3, b""),
    big_push_pull(),
    User(b""),
    User(b"\x07reliable user message" * 20),
]
RAW_UDP = [encode_message(m) for m in UDP_MESSAGES]


# --------------------------------------------------------------------------- keyring


def test_keyring_primary_and_order() -> None:
    ring = Keyring([K1, K2], primary=K3)
    assert ring.primary == K3
    assert ring.keys == (K3, K1, K2)
    ring.use(K2)
    assert ring.keys == (K2, K3, K1)
    ring.remove(K1)
    ring.remove(K1)  # not installed: nothing to do, as memberlist
    ring.add(K2)  # installed already: nothing to do
    assert list(ring.keys) == [K2, K3]
    assert Keyring([K1, K2]).primary == K1
    assert Keyring().primary is None


def test_keyring_refuses_misuse() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(UsageError, match="primary"):
        ring.remove(K1)
    with pytest.raises(UsageError, match="not installed"):
        ring.use(K3)
    with pytest.raises(UsageError, match="16, 24 or 32"):
        ring.add(b"short")
    with pytest.raises(UsageError, match="empty"):
        encrypt_payload(Keyring(), b"x", b"")


# --------------------------------------------------------------------------- encryption


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000])
def test_encrypt_round_trip(version: int, size: int) -> None:
    ring = Keyring([K1])
    plain = bytes(range(256)) * 4
    sealed = encrypt_payload(ring, plain[:size], b"aad", version=version)
    assert sealed[0] == version
    assert len(sealed) == encrypted_length(version, size)
    assert decrypt_payload_untrusted(ring, sealed, b"aad") == plain[:size]


def test_decrypt_tries_every_key_and_checks_aad() -> None:
    old = Keyring([K2])
    sealed = encrypt_payload(old, b"hello", b"", rng_nonce=bytes(12))
    assert sealed[1:13] == bytes(12)
    assert decrypt_payload_untrusted(Keyring([K1, K2, K3]), sealed, b"") == b"hello"
    for ring, aad in ((Keyring([K1, K3]), b""), (old, b"other aad")):
        with pytest.raises(BadPacket) as err:
            decrypt_payload_untrusted(ring, sealed, aad)
        assert err.value.reason == "no_installed_key_decrypts"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "encrypt_truncated"),
        (b"\x02" + bytes(40), "encrypt_bad_version"),
        (b"\x01" + bytes(27), "encrypt_truncated"),
        (b"\x00" + bytes(43), "encrypt_truncated"),  # version 0 has at least one pad block
        (b"\x01" + bytes(28), "no_installed_key_decrypts"),
    ],
)
def test_decrypt_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as err:
        decrypt_payload_untrusted(Keyring([K1]), data, b"")
    assert err.value.reason == reason


def test_version0_bad_padding_is_bad_packet() -> None:
    """memberlist trusts the pad byte (a Go panic when it is too large); we refuse it."""
    ring = Keyring([K1])
    nonce = bytes(12)
    sealed = ring.aeads()[0].encrypt(nonce, b"x" * 15 + b"\x20", b"")
    with pytest.raises(BadPacket) as err:
        decrypt_payload_untrusted(ring, b"\x00" + nonce + sealed, b"")
    assert err.value.reason == "encrypt_bad_padding"


# --------------------------------------------------------------------------- UDP packets


def test_single_message_is_sent_as_is() -> None:
    packet = encode_packet(RAW_UDP[:1], crc=False, compress=False, keyring=None)
    assert packet == RAW_UDP[0]


def test_compound_layout() -> None:
    packet = encode_packet(RAW_UDP[:2], crc=False, compress=False, keyring=None)
    a, b = RAW_UDP[:2]
    assert packet == bytes([7, 2]) + len(a).to_bytes(2, "big") + len(b).to_bytes(2, "big") + a + b


def test_compression_only_when_it_helps() -> None:
    small = encode_packet([encode_message(Ack(1))], crc=False, compress=True, keyring=None)
    assert small[0] == 2
    big = encode_packet(RAW_UDP * 3, crc=False, compress=True, keyring=None)
    assert big[0] == 9
    fields = msgpack.unpackb(big[1:], raw=True)
    assert fields[b"Algo"] == 0 and lzw.decompress_untrusted(fields[b"Buf"])[0] == 7


def test_crc_layout() -> None:
    packet = encode_packet(RAW_UDP[:1], crc=True, compress=False, keyring=None)
    assert packet[0] == 12
    assert packet[1:5] == zlib.crc32(RAW_UDP[0]).to_bytes(4, "big") and packet[5:] == RAW_UDP[0]


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("label", [b"", b"cluster-a"])
@pytest.mark.parametrize("count", [1, 2, 6])
def test_packet_round_trip(
    crc: bool, compress: bool, encrypted: bool, label: bytes, count: int
) -> None:
    ring = Keyring([K1]) if encrypted else None
    messages = RAW_UDP[:count]
    packet = encode_packet(messages, crc=crc, compress=compress, keyring=ring, label=label)
    got = decode_packet_untrusted(packet, keyring=ring, require_encryption=encrypted, label=label)
    assert got == messages
    assert [decode_message_untrusted(m) for m in got] == UDP_MESSAGES[:count]


def test_encode_packets_splits_at_255() -> None:
    messages = [encode_message(Ack(i)) for i in range(600)]
    with pytest.raises(UsageError, match="encode_packets"):
        encode_packet(messages, crc=False, compress=False, keyring=None)
    packets = encode_packets(messages, crc=True, compress=True, keyring=Keyring([K1]))
    assert len(packets) == 3
    ring = Keyring([K1])
    got = [
        m
        for p in packets
        for m in decode_packet_untrusted(p, keyring=ring, require_encryption=True)
    ]
    assert got == messages
    assert encode_packets([], crc=False, compress=False, keyring=None) == []


def test_encode_packet_refuses_misuse() -> None:
    for bad in ([], [b""], [b"\x08" + bytes(70_000), b"\x02"]):
        with pytest.raises(UsageError):
            encode_packet(bad, crc=False, compress=False, keyring=None)
    with pytest.raises(UsageError, match="label"):
        encode_packet(RAW_UDP[:1], crc=False, compress=False, keyring=None, label=b"x" * 256)


def _compound(parts: list[bytes], declared: list[int] | None = None) -> bytes:
    sizes = declared or [len(p) for p in parts]
    return bytes([7, len(sizes)]) + b"".join(s.to_bytes(2, "big") for s in sizes) + b"".join(parts)


def test_truncated_compound_keeps_complete_parts() -> None:
    a, b, c = RAW_UDP[:3]
    packet = _compound([a, b, c[:-1]], [len(a), len(b), len(c)])
    decoded = decode_packet_detailed_untrusted(packet, keyring=None, require_encryption=False)
    assert decoded == DecodedPacket((a, b), ("compound_part_truncated",))
    assert decode_packet_untrusted(packet, keyring=None, require_encryption=False) == [a, b]
    with pytest.raises(BadPacket) as err:
        decode_packet_untrusted(
            _compound([a[:2]], [len(a)]), keyring=None, require_encryption=False
        )
    assert err.value.reason == "compound_part_truncated"


def test_nested_compound_and_compressed_parts() -> None:
    a, b, c = RAW_UDP[:3]
    inner = encode_packet([b, c], crc=False, compress=False, keyring=None)
    zipped = bytes([9]) + msgpack.packb({"Algo": 0, "Buf": lzw.compress(inner)}, use_bin_type=False)
    bad = encode_message(PushPull(False, ()))  # not a UDP message
    packet = _compound([a, zipped, bad, b""])
    decoded = decode_packet_detailed_untrusted(packet, keyring=None, require_encryption=False)
    assert decoded.messages == (a, b, c)
    assert decoded.dropped == ("unexpected_message_type", "empty_message")


def _decode_reason(data: bytes, **kw: object) -> str:
    args: dict[str, object] = {"keyring": None, "require_encryption": False, **kw}
    with pytest.raises(BadPacket) as err:
        decode_packet_untrusted(data, **args)  # type: ignore[arg-type]
    return err.value.reason


def test_packet_rejections() -> None:
    ring = Keyring([K1])
    plain = encode_packet(RAW_UDP[:2], crc=True, compress=False, keyring=None)
    sealed = encode_packet(RAW_UDP[:2], crc=True, compress=False, keyring=ring)
    labelled = encode_packet(RAW_UDP[:1], crc=False, compress=False, keyring=None, label=b"a")
    assert _decode_reason(b"") == "empty_packet"
    assert _decode_reason(plain[:5] + b"\x00" + plain[6:]) == "crc_mismatch"
    assert _decode_reason(b"\x0c\x00\x00") == "crc_truncated"
    assert _decode_reason(plain, keyring=ring, require_encryption=True) == "unencrypted"
    assert _decode_reason(RAW_UDP[0], keyring=ring, require_encryption=True) == "unencrypted"
    assert _decode_reason(sealed) == "encrypted_but_no_keyring"
    assert _decode_reason(sealed, keyring=Keyring([K2]), require_encryption=True) == (
        "no_installed_key_decrypts"
    )
    assert _decode_reason(labelled) == "label_mismatch"
    assert _decode_reason(labelled, label=b"b") == "label_mismatch"
    assert _decode_reason(RAW_UDP[0], label=b"a") == "label_mismatch"
    assert _decode_reason(b"\xf4\x05ab") == "label_truncated"
    assert _decode_reason(b"\xf4\x00" + RAW_UDP[0]) == "label_empty"
    assert _decode_reason(encode_message(Err("x"))) == "unexpected_message_type"
    assert _decode_reason(b"\x07") == "compound_truncated"
    assert _decode_reason(b"\x07\x00") == "compound_empty"
    zipped_bad = bytes([9]) + msgpack.packb({"Algo": 1, "Buf": b""})
    assert _decode_reason(zipped_bad) == "compress_unknown_algo"
    assert _decode_reason(b"\x09\xc1") == "compress_not_msgpack"


def test_plaintext_accepted_when_encryption_not_required() -> None:
    """memberlist without GossipVerifyIncoming takes what it cannot decrypt as plaintext."""
    ring = Keyring([K1])
    plain = encode_packet(RAW_UDP[:2], crc=True, compress=True, keyring=None)
    assert decode_packet_untrusted(plain, keyring=ring, require_encryption=False) == RAW_UDP[:2]
    with pytest.raises(UsageError):
        decode_packet_untrusted(plain, keyring=None, require_encryption=True)


def test_label_is_authenticated() -> None:
    ring = Keyring([K1])
    packet = encode_packet(RAW_UDP[:1], crc=False, compress=False, keyring=ring, label=b"a")
    swapped = b"\xf4\x01b" + packet[3:]
    reason = _decode_reason(swapped, keyring=ring, require_encryption=True, label=b"b")
    assert reason == "no_installed_key_decrypts"


def test_packet_decompression_bomb() -> None:
    bomb = encode_packet(
        [encode_message(User(bytes(3_000_000)))], crc=False, compress=True, keyring=None
    )
    assert _decode_reason(bomb) == "lzw_too_large"
    got = decode_packet_untrusted(bomb, keyring=None, require_encryption=False, max_size=4_000_000)
    assert len(got[0]) == 3_000_001


# --------------------------------------------------------------------------- TCP streams


def _read_all(reader: StreamReader, data: bytes, chunk: int) -> bytes | None:
    got = None
    for i in range(0, len(data), chunk):
        result = reader.feed_untrusted(data[i : i + chunk])
        if result is not None:
            assert got is None and i + chunk >= len(data), "returned early or twice"
            got = result
    return got


@pytest.mark.parametrize("message", STREAM_MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("label", [b"", b"lbl"])
def test_stream_round_trip(message: Message, compress: bool, encrypted: bool, label: bytes) -> None:
    ring = Keyring([K2]) if encrypted else None
    raw = encode_message(message)
    wire = encode_stream(raw, compress=compress, keyring=ring, label=label)
    for chunk in (1, 7, len(wire)):
        reader = StreamReader(keyring=ring, require_encryption=encrypted, label=label)
        assert _read_all(reader, wire, chunk) == raw
        assert reader.done and reader.message == raw
        assert decode_message_untrusted(raw) == message


def test_stream_reply_has_no_label_header_but_label_aad() -> None:
    ring, raw = Keyring([K1]), encode_message(Ack(3))
    reply = encode_stream(raw, compress=True, keyring=ring, label=b"l", label_header=False)
    assert reply[0] == 10
    reader = StreamReader(keyring=ring, require_encryption=True, label=b"l", label_header=False)
    assert reader.feed_untrusted(reply) == raw
    other = StreamReader(keyring=ring, label=b"m", label_header=False)
    with pytest.raises(BadPacket) as err:
        other.feed_untrusted(reply)
    assert err.value.reason == "no_installed_key_decrypts"


def test_stream_user_message_has_header_on_the_wire() -> None:
    wire = encode_stream(encode_message(User(b"abc")), compress=False, keyring=None)
    assert wire == b"\x08\x81\xaaUserMsgLen\x03abc"


def test_stream_ignores_bytes_after_the_message() -> None:
    raw = encode_message(big_push_pull(2))
    reader = StreamReader()
    assert reader.feed_untrusted(encode_stream(raw, compress=False, keyring=None) + b"junk") == raw
    assert reader.feed_untrusted(b"more") is None


def test_stream_incomplete_returns_none() -> None:
    wire = encode_stream(encode_message(big_push_pull()), compress=False, keyring=None)
    assert StreamReader().feed_untrusted(wire[:-1]) is None


def _stream_reason(data: bytes, **kw: object) -> str:
    reader = StreamReader(**kw)  # type: ignore[arg-type]
    with pytest.raises(BadPacket) as err:
        reader.feed_untrusted(data)
    return err.value.reason


def test_stream_rejections() -> None:
    ring = Keyring([K1])
    plain = encode_stream(encode_message(Ping(1, "n")), compress=True, keyring=None)
    sealed = encode_stream(encode_message(Ping(1, "n")), compress=True, keyring=ring)
    assert _stream_reason(plain, keyring=ring, require_encryption=True) == "unencrypted"
    assert _stream_reason(sealed) == "encrypted_but_no_keyring"
    assert _stream_reason(sealed, keyring=Keyring([K2])) == "no_installed_key_decrypts"
    assert _stream_reason(encode_message(Suspect(1, "a", "b"))) == "stream_unexpected_type"
    assert _stream_reason(b"\x0a\xff\xff\xff\xff", keyring=ring) == "stream_too_large"
    assert _stream_reason(b"\x06\xc1") == "stream_not_msgpack"
    assert _stream_reason(b"\x06\x01") == "push_pull_not_a_map"
    assert _stream_reason(b"\x06\x81\xa5Nodes\xff") == "push_pull_bad_nodes"
    assert _stream_reason(b"\xf4\x01x\x00", label=b"y") == "label_mismatch"
    assert _stream_reason(plain, max_size=10) == "stream_too_large"
    inner_compress = bytes([9]) + msgpack.packb({"Algo": 0, "Buf": lzw.compress(plain)})
    assert _stream_reason(inner_compress) == "stream_unexpected_type"
    ping = encode_message(Ping(1, "n"))
    truncated = bytes([9]) + msgpack.packb({"Algo": 0, "Buf": lzw.compress(ping[:-1])})
    assert _stream_reason(truncated) == "stream_truncated"


def test_stream_size_cap_while_streaming() -> None:
    reader = StreamReader(max_size=1000)
    reader.feed_untrusted(b"\x08\x81\xaaUserMsgLen\xce\x00\x00\x01\x00")  # 256-byte payload: fine
    reader = StreamReader(max_size=1000)
    with pytest.raises(BadPacket) as err:
        reader.feed_untrusted(b"\x08\x81\xaaUserMsgLen\xce\x00\x10\x00\x00")
    assert err.value.reason == "user_bad_usermsglen"
    reader = StreamReader(max_size=1000)
    reader.feed_untrusted(b"\x08\x81\xaaUserMsgLen\xcd\x03\xe0")  # 992 + header > 1000
    with pytest.raises(BadPacket) as err:
        for _ in range(10):
            reader.feed_untrusted(bytes(100))
    assert err.value.reason == "stream_too_large"


# --------------------------------------------------------------------------- fuzz: one way out

RING = Keyring([K1])
VALID_PACKETS = [
    encode_packet(RAW_UDP[:n], crc=crc, compress=True, keyring=None)
    for n in (1, 3, 6)
    for crc in (False, True)
] + [encode_packet(RAW_UDP, crc=True, compress=True, keyring=RING)]
VALID_STREAMS = [
    encode_stream(encode_message(m), compress=c, keyring=None)
    for m in STREAM_MESSAGES
    for c in (False, True)
]


def _packet_only_bad_packet(data: bytes) -> None:
    for ring, required in ((None, False), (RING, True), (RING, False)):
        try:
            for message in decode_packet_untrusted(data, keyring=ring, require_encryption=required):
                with contextlib.suppress(BadPacket):
                    decode_message_untrusted(message)
        except BadPacket:
            pass


def _stream_only_bad_packet(data: bytes, chunk: int) -> None:
    reader = StreamReader(keyring=RING, max_size=100_000)
    try:
        for i in range(0, len(data), chunk):
            message = reader.feed_untrusted(data[i : i + chunk])
            if message is not None:
                decode_message_untrusted(message)
    except BadPacket:
        pass


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        bit = position % (len(out) * 8)
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_fuzz_random_packets(data: bytes) -> None:
    _packet_only_bad_packet(data)
    _stream_only_bad_packet(data, 5)
    with contextlib.suppress(BadPacket):
        decode_message_untrusted(data)


@settings(max_examples=400)
@given(st.sampled_from(VALID_PACKETS), st.lists(st.integers(0, 1 << 20), min_size=1, max_size=4))
def test_fuzz_bit_flipped_packets(packet: bytes, flips: list[int]) -> None:
    _packet_only_bad_packet(_flip(packet, flips))


@settings(max_examples=400)
@given(
    st.sampled_from(VALID_STREAMS),
    st.lists(st.integers(0, 1 << 20), min_size=1, max_size=4),
    st.integers(1, 64),
)
def test_fuzz_bit_flipped_streams(stream: bytes, flips: list[int], chunk: int) -> None:
    _stream_only_bad_packet(_flip(stream, flips), chunk)


@settings(max_examples=300)
@given(st.sampled_from([encode_message(m) for m in UDP_MESSAGES + STREAM_MESSAGES]), st.data())
def test_fuzz_messages_truncated_or_flipped(message: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(message)))
    flips = draw.draw(st.lists(st.integers(0, 1 << 20), max_size=3))
    for data in (message[:cut], _flip(message, flips) if flips else message):
        with contextlib.suppress(BadPacket):
            decode_message_untrusted(data)
