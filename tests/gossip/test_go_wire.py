"""Byte-level cross checks against real Go: compress/lzw, go-msgpack, memberlist's framing.

The Go side is ``gopeer`` (tests/gossip/gopeer/main.go), built once per session against Debian's
memberlist v0.2.2 sources; these tests skip when Go or those sources are missing.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gossip.gopeer import GoNode, GoWire, GoWireError, b64, build_gopeer_for_session
from tests.gossip.test_lzw import _frozen_table_encoder
from vxnet.errors import BadPacket
from vxnet.gossip import lzw
from vxnet.gossip.messages import (
    DEFAULT_VSN,
    Ack,
    Alive,
    Dead,
    Err,
    IndirectPing,
    Message,
    Nack,
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
    Keyring,
    StreamReader,
    decode_packet_untrusted,
    decrypt_payload_untrusted,
    encode_packet,
    encode_stream,
    encrypt_payload,
)

FIXTURE_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="session")
def gopeer_binary(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gopeer_for_session(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="module")
def go(gopeer_binary: Path) -> Iterator[GoWire]:
    with GoWire(gopeer_binary) as wire:
        yield wire


# ------------------------------------------------------------------------------ LZW


def mixed_data(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:
            out += rng.randbytes(rng.randrange(1, 300))
        elif kind == 1:
            out += bytes([rng.randrange(256)]) * rng.randrange(1, 2000)
        else:
            out += bytes(rng.choice(b"node-1.alive") for _ in range(rng.randrange(1, 500)))
    return bytes(out[:n])


@FIXTURE_SETTINGS
@given(st.binary(max_size=4000) | st.lists(st.sampled_from([b"a", b"ab", b"\x00"])).map(b"".join))
def test_lzw_matches_go(go: GoWire, data: bytes) -> None:
    ours = lzw.compress(data)
    assert ours == go.lzw_compress(data)
    assert go.lzw_decompress(ours) == data


@pytest.mark.parametrize("seed", range(4))
def test_lzw_matches_go_on_large_inputs(go: GoWire, seed: int) -> None:
    data = mixed_data(300_000, seed)
    ours = lzw.compress(data)
    assert ours == go.lzw_compress(data)
    assert lzw.decompress_untrusted(ours) == data


def test_go_reads_a_frozen_dictionary_as_we_do(go: GoWire) -> None:
    data = mixed_data(60_000, 9)
    packed = _frozen_table_encoder(data)
    assert go.lzw_decompress(packed) == lzw.decompress_untrusted(packed) == data


@FIXTURE_SETTINGS
@given(
    st.binary(min_size=1, max_size=600),
    st.lists(st.integers(0, 1 << 16), min_size=1, max_size=3),
    st.integers(0, 8),
)
def test_lzw_corrupt_input_same_verdict_as_go(
    go: GoWire, data: bytes, flips: list[int], cut: int
) -> None:
    """Bit-flipped or cut streams: Go and we agree on the output, or both refuse."""
    packed = bytearray(lzw.compress(data))
    for flip in flips:
        bit = flip % (len(packed) * 8)
        packed[bit // 8] ^= 1 << (bit % 8)
    corrupt = bytes(packed[: len(packed) - cut])
    try:
        go_out: bytes | None = go.lzw_decompress(corrupt)
    except GoWireError:
        go_out = None
    try:
        ours: bytes | None = lzw.decompress_untrusted(corrupt)
    except BadPacket:
        ours = None
    assert ours == go_out


# ------------------------------------------------------------------------------ msgpack messages


def _node_state(n: PushNodeState) -> dict[str, Any]:
    return {
        "Name": n.name,
        "Addr": b64(n.addr),
        "Port": n.port,
        "Meta": b64(n.meta),
        "Incarnation": n.incarnation,
        "State": int(n.state),
        "Vsn": b64(n.vsn),
    }


def go_fields(msg: Message) -> tuple[str, dict[str, Any]]:
    """The gopeer ``encode`` type and fields (Go's struct field names) of one of our messages."""
    source = {}
    if isinstance(msg, Ping | IndirectPing):
        source = {
            "SourceAddr": b64(msg.source_addr),
            "SourcePort": msg.source_port,
            "SourceNode": msg.source_node,
        }
    match msg:
        case Ping():
            return "ping", {"SeqNo": msg.seq_no, "Node": msg.node, **source}
        case IndirectPing():
            fields = {"SeqNo": msg.seq_no, "Target": b64(msg.target), "Port": msg.port}
            return "indirect_ping", {**fields, "Node": msg.node, "Nack": msg.nack, **source}
        case Ack():
            return "ack", {"SeqNo": msg.seq_no, "Payload": b64(msg.payload)}
        case Nack():
            return "nack", {"SeqNo": msg.seq_no}
        case Err():
            return "err", {"Error": msg.error}
        case Suspect() | Dead():
            kind = "suspect" if isinstance(msg, Suspect) else "dead"
            return kind, {"Incarnation": msg.incarnation, "Node": msg.node, "From": msg.from_}
        case Alive():
            return "alive", {
                "Incarnation": msg.incarnation,
                "Node": msg.node,
                "Addr": b64(msg.addr),
                "Port": msg.port,
                "Meta": b64(msg.meta),
                "Vsn": b64(msg.vsn),
            }
        case PushPull():
            nodes = [_node_state(n) for n in msg.nodes]
            return "push_pull", {"Join": msg.join, "Nodes": nodes, "UserState": b64(msg.user_state)}
        case User():
            return "user", {"Payload": b64(msg.payload)}
    raise TypeError(msg)


def _blank(value: Any) -> Any:
    """Go decodes an empty raw string into a nil or an empty slice alike: compare them as one."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return None if value == "" else value


u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
names = st.text(max_size=70)  # fixstr and str16 (go-msgpack never writes str8)
blobs = st.binary(max_size=300)
addrs = st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16)
vsns = st.just(DEFAULT_VSN) | st.binary(min_size=6, max_size=6)
node_states = st.builds(
    PushNodeState, names, addrs, u16, st.none() | blobs, u32, st.sampled_from(NodeState), vsns
)
messages = st.one_of(
    st.builds(Ping, u32, names, st.just(b"") | addrs, u16, names),
    st.builds(
        IndirectPing, u32, addrs, u16, names, st.booleans(), st.just(b"") | addrs, u16, names
    ),
    st.builds(Ack, u32, st.none() | blobs),
    st.builds(Nack, u32),
    st.builds(Err, names),
    st.builds(Suspect, u32, names, names),
    st.builds(Dead, u32, names, names),
    st.builds(Alive, u32, names, addrs, u16, st.none() | blobs, vsns),
    st.builds(PushPull, st.booleans(), st.lists(node_states, max_size=4).map(tuple), blobs),
    st.builds(User, blobs),
)

EXAMPLES: list[Message] = [
    Ping(0, ""),
    Ping(2**32 - 1, "n" * 31, bytes(16), 65535, "x" * 32),
    IndirectPing(7, bytes([10, 0, 0, 2]), 7946, "node-2", True, bytes([10, 0, 0, 1]), 7946, "me"),
    IndirectPing(8, bytes(16), 0, "", False),
    Ack(128, None),
    Ack(255, b""),
    Ack(256, bytes(70_000)),  # str32
    Nack(65536),
    Err("remote error: " + "e" * 300),
    Suspect(1, "node-1", "node-2"),
    Dead(2**31, "node-1", "node-1"),
    Alive(1, "node-1", bytes([10, 0, 0, 1]), 7946, None),
    Alive(1, "node-1", bytes([10, 0, 0, 1]), 7946, b""),
    Alive(1, "node-ü", bytes(16), 7946, b"m" * 512, bytes([1, 5, 2, 0, 0, 0])),
    PushPull(False, ()),
    PushPull(
        True,
        tuple(PushNodeState(f"n{i}", bytes(4), i, None, i, NodeState(i % 4)) for i in range(20)),
        b"s" * 1000,
    ),
    User(b"\x01payload"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_examples_match_go(go: GoWire, msg: Message) -> None:
    _check_message(go, msg)


@FIXTURE_SETTINGS
@given(messages)
def test_messages_match_go(go: GoWire, msg: Message) -> None:
    _check_message(go, msg)


def _check_message(go: GoWire, msg: Message) -> None:
    kind, fields = go_fields(msg)
    ours = encode_message(msg)
    assert ours.hex() == go.encode(kind, fields).hex()
    msg_type, decoded = go.decode(ours)
    assert msg_type == ours[0]
    assert _blank(decoded) == _blank(fields)
    assert decode_message_untrusted(ours) == msg


# ------------------------------------------------------------------------------ encryption


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1400])
def test_encryption_both_ways(go: GoWire, version: int, key_size: int, size: int) -> None:
    key, other = bytes(range(key_size)), bytes(range(1, 17))
    plain = random.Random(size).randbytes(size)
    for aad in (b"", b"\x0a\x00\x00\x05\xdc"):
        ours = encrypt_payload(Keyring([key]), plain, aad, version=version)
        assert go.decrypt([other, key], ours, aad) == plain
        theirs = go.encrypt(key, version, plain, aad)
        assert len(theirs) == len(ours)
        assert decrypt_payload_untrusted(Keyring([other, key]), theirs, aad) == plain
    with pytest.raises(GoWireError, match="No installed keys"):
        go.decrypt([other], ours, aad)


# ------------------------------------------------------------------------------ UDP packets

UDP = [
    encode_message(m)
    for m in (
        Ping(1, "node-1", bytes([10, 0, 0, 1]), 7946, "node-0"),
        Alive(3, "node-3", bytes([10, 0, 0, 3]), 7946, None),
        Suspect(2, "node-2", "node-1"),
        Dead(4, "node-4", "node-4"),
        User(b"\x01" + b"networkdb table event " * 20),
        Ack(1),
        Nack(2),
    )
]
KEY = bytes(range(16))


@pytest.mark.parametrize("count", [1, 2, 7])
@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_plain_packets_byte_identical(go: GoWire, count: int, crc: bool, compress: bool) -> None:
    msgs = UDP[:count]
    ours = encode_packet(msgs, crc=crc, compress=compress, keyring=None)
    assert ours == go.packet(msgs, crc=crc, compress=compress)
    assert go.unpacket(ours) == (msgs, 0)


@pytest.mark.parametrize("count", [1, 7])
@pytest.mark.parametrize("version", [0, 1])
def test_encrypted_packets_both_ways(go: GoWire, count: int, version: int) -> None:
    msgs, ring = UDP[:count], Keyring([KEY])
    theirs = go.packet(msgs, crc=True, compress=True, key=KEY, vsn=version)
    assert decode_packet_untrusted(theirs, keyring=ring, require_encryption=True) == msgs
    ours = encode_packet(msgs, crc=True, compress=True, keyring=ring, encryption_version=version)
    assert go.unpacket(ours, [KEY]) == (msgs, 0)
    assert decrypt_payload_untrusted(ring, ours, b"") == decrypt_payload_untrusted(
        ring, theirs, b""
    )
    with pytest.raises(GoWireError, match=r"Unsupported encryption version|No installed keys"):
        go.unpacket(encode_packet(msgs, crc=True, compress=True, keyring=None), [KEY], verify=True)


def test_truncated_compound_same_as_go(go: GoWire) -> None:
    packet = encode_packet(UDP[:4], crc=False, compress=False, keyring=None)[:-3]
    msgs, truncated = go.unpacket(packet)
    assert truncated == 1
    assert decode_packet_untrusted(packet, keyring=None, require_encryption=False) == msgs


# ------------------------------------------------------------------------------ TCP streams

STREAMS: list[Message] = [
    Ping(5, "node-1"),
    Ack(5, None),
    Err("boom"),
    PushPull(
        True,
        tuple(
            PushNodeState(f"node-{i}", bytes([10, 0, 0, i]), 7946, None, i, NodeState.ALIVE)
            for i in range(30)
        ),
        b"user state " * 100,
    ),
    User(b"\x02reliable networkdb message" * 10),
]


def _go_stream_form(go: GoWire, msg: Message) -> bytes:
    """What memberlist hands rawSendMsgStream (user messages carry a userMsgHeader)."""
    if isinstance(msg, User):
        return go.encode("user_stream", {"Payload": b64(msg.payload)})
    return encode_message(msg)


@pytest.mark.parametrize("msg", STREAMS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encrypted", [False, True])
def test_streams_both_ways(go: GoWire, msg: Message, compress: bool, encrypted: bool) -> None:
    raw, form = encode_message(msg), _go_stream_form(go, msg)
    ring, key, keys = (Keyring([KEY]), KEY, [KEY]) if encrypted else (None, None, [])
    ours = encode_stream(raw, compress=compress, keyring=ring)
    theirs = go.stream(form, compress=compress, key=key)
    if not encrypted:
        assert ours == theirs
    assert go.unstream(ours, keys) == (form[0], form[1:])
    reader = StreamReader(keyring=ring, require_encryption=encrypted)
    assert reader.feed_untrusted(theirs) == raw


# ------------------------------------------------------------------------------ node mode


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (memberlist binds both)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@pytest.mark.parametrize("mode", ["encrypted", "label"])
def test_gopeer_nodes_join_message_and_leave(gopeer_binary: Path, mode: str) -> None:
    opts: dict[str, Any] = {"keys": [KEY]} if mode == "encrypted" else {"label": "lab"}
    pa, pb = _free_port(), _free_port()
    with GoNode(gopeer_binary, "a", "127.0.0.1", pa, **opts) as a:
        assert a.wait_for(lambda e: e["event"] == "ready")["port"] == pa
        with GoNode(gopeer_binary, "b", "127.0.0.1", pb, join=[f"127.0.0.1:{pa}"], **opts) as b:
            assert b.wait_for(lambda e: e["event"] == "ready")["joined"] == 1
            a.wait_for(lambda e: e["event"] == "join" and e["node"] == "b")
            a.send("b", b"\x01hello", reliable=False)
            a.send("b", b"\x02world", reliable=True)
            got = {b.wait_for(lambda e: e["event"] == "msg")["data"] for _ in range(2)}
            assert got == {b"\x01hello".hex(), b"\x02world".hex()}
            assert b.stop() == 0
        left = a.wait_for(lambda e: e["event"] == "leave" and e["node"] == "b")
        assert left["state"] == "left"
