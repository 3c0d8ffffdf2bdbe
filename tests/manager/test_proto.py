"""The 2377 frame codec: round trips, and only BadPacket for anything a peer can send."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import BadPacket, UsageError
from vxnet.manager.proto import MAX_FRAME, FrameDecoder, encode_frame, field_untrusted

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=30)
    | st.binary(max_size=64),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
messages = st.builds(
    lambda t, rest: {**rest, "type": t},
    st.text(min_size=1, max_size=12),
    st.dictionaries(st.text(max_size=8), values, max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 50))
def test_frames_round_trip_in_any_chunking(msgs: list[dict[str, Any]], chunk: int) -> None:
    wire = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(0, len(wire), chunk):
        out += dec.feed_untrusted(wire[i : i + chunk])
    assert out == msgs and dec.pending == 0


def test_bytes_stay_bytes_and_text_stays_text() -> None:
    (msg,) = FrameDecoder().feed_untrusted(encode_frame({"type": "ca", "ca": b"PEM", "s": "x"}))
    assert msg == {"type": "ca", "ca": b"PEM", "s": "x"}


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (struct.pack("!I", MAX_FRAME + 1), "frame_too_large"),
        (struct.pack("!I", 3) + b"\xc1\xc1\xc1", "frame_not_msgpack"),
        (struct.pack("!I", 1) + b"\x01", "frame_not_a_map"),
        (struct.pack("!I", 1) + msgpack.packb({}), "frame_without_type"),
        (struct.pack("!I", 3) + msgpack.packb({1: 2}), "frame_not_msgpack"),  # int keys refused
    ],
)
def test_garbage_is_a_bad_packet_with_a_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as exc:
        FrameDecoder().feed_untrusted(wire)
    assert exc.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_else(data: bytes) -> None:
    try:
        FrameDecoder().feed_untrusted(data)
    except BadPacket as exc:
        assert exc.reason


def test_fields_are_type_checked() -> None:
    msg = {"type": "join", "token": 5, "csr": b"x"}
    with pytest.raises(BadPacket, match="token must be str"):
        field_untrusted(msg, "token", str)
    with pytest.raises(BadPacket, match="missing_field"):
        field_untrusted(msg, "hostname", str)
    assert field_untrusted(msg, "hostname", str, "") == ""
    with pytest.raises(UsageError):
        encode_frame({"no": "type"})
