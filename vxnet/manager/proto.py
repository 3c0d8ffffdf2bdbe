"""The manager protocol on 2377: length-prefixed msgpack frames inside TLS.

Swarmkit speaks gRPC; vxnet keeps the same conversation in a simpler frame so a reader can
follow it in a capture (``vxnet trace`` decodes it):

    frame   = length (4 bytes, big endian, <= MAX_FRAME) || msgpack map with a "type" key

Join (TLS, the client presents no certificate yet)::

    -> {"type": "ca"}                        <- {"type": "ca", "ca": PEM}
    -> {"type": "join", "token", "csr", "hostname", "advertise_addr", "data_path_addr"}
    <- {"type": "joined", "node_id", "cluster_id", "role", "cert", "ca"}  |  {"type": "error", ...}

Session (mutual TLS; the node is who its certificate says)::

    -> {"type": "hello", "hostname", "advertise_addr", "data_path_addr", "tasks": [...]}
    <- {"type": "welcome", "heartbeat_period"}
    -> {"type": "heartbeat"}                 (every heartbeat_period)
    <- {"type": "keys", "keys": [...]}       (at session start and on every change)
    <- {"type": "assignments", "networks": [...], "tasks": [...]}   (the node's desired state)
    -> {"type": "task_status", "task_id", "state", "message"}
    -> {"type": "request", "id", "op", ...}  <- {"type": "response", "id", "ok", ...}

``FrameDecoder`` is sans-IO: feed bytes, get messages.  Its ``*_untrusted`` parts raise only
:class:`~vxnet.errors.BadPacket`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from vxnet.errors import BadPacket, UsageError

MAX_FRAME = 1 << 20
_LEN = struct.Struct("!I")
MANAGER_PORT = 2377


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame for ``message`` (a map with a ``type``)."""
    if not isinstance(message.get("type"), str):
        raise UsageError("a protocol message needs a string 'type'")
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise UsageError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _LEN.pack(len(body)) + body


def decode_message_untrusted(body: bytes) -> dict[str, Any]:
    """A frame's body: a msgpack map with string keys and a string ``type``."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise BadPacket("frame_not_msgpack", type(exc).__name__) from None
    if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
        raise BadPacket("frame_not_a_map")
    if not isinstance(message.get("type"), str):
        raise BadPacket("frame_without_type")
    return message


class FrameDecoder:
    """Accumulates bytes from a stream and yields complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed_untrusted(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self._max:
                raise BadPacket("frame_too_large", f"{length} bytes > {self._max}")
            if len(self._buf) < _LEN.size + length:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + length])
            del self._buf[: _LEN.size + length]
            out.append(decode_message_untrusted(body))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def field_untrusted(message: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``message[key]`` checked to be a ``kind``; a peer that sent otherwise sent garbage."""
    value = message.get(key, default)
    if value is ...:
        raise BadPacket("missing_field", key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadPacket("bad_field", f"{key} must be {kind.__name__}")
    return value
