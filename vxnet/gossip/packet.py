"""memberlist's framing around messages: compound, compression, CRC, encryption, labels (sans-IO).

Messages here are ``[type][body]`` bytes (:func:`vxnet.gossip.messages.encode_message`).

UDP (one datagram), sender side, in this order (memberlist ``net.go``):

1. one message, or a compound ``[7][n][n x u16 BE length][messages]`` (n <= 255);
2. with compression on, ``[9][compress{Algo: 0, Buf: lzw(...)}]`` when that is shorter;
3. with ``crc``, ``[12][CRC-32/IEEE BE of the rest]`` (memberlist does it for peers with pmax >= 5);
4. with a keyring, ``[vsn][nonce 12][AES-GCM ciphertext + tag 16]``, additional data = label;
5. with a label, ``[244][len u8][label]`` in front.

TCP (one message per direction and connection): the optional label header, then either
``[10][u32 BE len][vsn][nonce][ciphertext + tag]`` (additional data ``[10][len]`` + label) or the
plaintext, which is ``[9][compress{...}]`` whenever compression is on, or the bare message.  A
plaintext stream has no length prefix: :class:`StreamReader` finds where a message ends by
parsing its msgpack objects as they arrive (push/pull: header, node states, then
``UserStateLen`` raw bytes).  A user message travels on a stream as ``[8][userMsgHeader][payload]``;
:func:`encode_stream` and :class:`StreamReader` add and strip that header so that callers see the
same ``[8][payload]`` as on UDP.

Decoding follows memberlist's receiver.  Within a compound, parts are independent: memberlist
drops truncated parts (counting them) and handles the complete ones, and so does
:func:`decode_packet_detailed_untrusted`, which returns the usable messages together with the
reasons of what it dropped.  :func:`decode_packet_untrusted` returns the usable messages and raises
:class:`~vxnet.errors.BadPacket` only when nothing in the packet is usable.

An encrypted datagram starts with its version byte, 0 or 1, which are also the types of ping and
indirect ping.  Without a keyring, a datagram that starts with 0 or 1, is long enough to be
encrypted and whose rest is not exactly one msgpack map is reported as
``encrypted_but_no_keyring``.  With a keyring but ``require_encryption=False`` (memberlist
without GossipVerifyIncoming), what does not decrypt is taken as plaintext.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from vxnet.errors import BadPacket, UsageError
from vxnet.gossip import lzw
from vxnet.gossip.keyring import (
    Keyring,
    decrypt_payload_untrusted,
    encrypt_payload,
    encrypted_length,
)
from vxnet.gossip.messages import MessageType

__all__ = [
    "COMPOUND_MAX_PARTS",
    "PACKET_MAX_DECOMPRESSED",
    "STREAM_MAX_SIZE",
    "DecodedPacket",
    "Keyring",
    "StreamReader",
    "decode_packet_detailed_untrusted",
    "decode_packet_untrusted",
    "decrypt_payload_untrusted",
    "encode_packet",
    "encode_packets",
    "encode_stream",
    "encrypt_payload",
    "encrypted_length",
]

LABEL_MAX = 255
COMPOUND_MAX_PARTS = 255
COMPOUND_PART_MAX = 0xFFFF
#: Cap on what one UDP packet may decompress to (a receive buffer is 64 KiB).
PACKET_MAX_DECOMPRESSED = 1 << 20
#: memberlist's maxPushStateBytes: the cap on one stream message, compressed or not.
STREAM_MAX_SIZE = 20 * 1024 * 1024
#: Compound/compress nesting a packet may use (memberlist's own senders use 2).
MAX_NESTING = 8

_T = MessageType
#: What memberlist's handleCommand accepts from a packet, after compound/compress are undone.
_UDP_TYPES = frozenset(
    {_T.PING, _T.INDIRECT_PING, _T.ACK, _T.SUSPECT, _T.ALIVE, _T.DEAD, _T.USER, _T.NACK}
)
#: What a stream may carry: requests (ping, push/pull, user) and replies (ack, push/pull, err).
_STREAM_TYPES = frozenset({_T.PING, _T.ACK, _T.PUSH_PULL, _T.USER, _T.ERR})


# ------------------------------------------------------------------------------- small codecs


def _label_header(label: bytes) -> bytes:
    if len(label) > LABEL_MAX:
        raise UsageError(f"a label is at most {LABEL_MAX} bytes")
    return bytes([_T.HAS_LABEL, len(label)]) + label if label else b""


def _compress_message(data: bytes) -> bytes:
    body: bytes = msgpack.packb({"Algo": 0, "Buf": lzw.compress(data)}, use_bin_type=False)
    return bytes([_T.COMPRESS]) + body


def _unpack_error(kind: str) -> BadPacket:
    return BadPacket(f"{kind}_not_msgpack")


def _map_untrusted(obj: Any, kind: str) -> dict[str, Any]:
    """A decoded msgpack map with str keys (go-msgpack writes them raw)."""
    if not isinstance(obj, dict):
        raise BadPacket(f"{kind}_not_a_map")
    return {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v
        for k, v in obj.items()
    }


def _int_field(fields: dict[str, Any], key: str, kind: str, limit: int) -> int:
    value = fields.get(key, 0)  # a missing field is Go's zero value
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise BadPacket(f"{kind}_bad_{key.lower()}")
    return value


def _decompress_body_untrusted(fields: dict[str, Any], max_size: int) -> bytes:
    """``compress{Algo, Buf}`` -> the decompressed payload."""
    if _int_field(fields, "Algo", "compress", 255) != 0:
        raise BadPacket("compress_unknown_algo")
    buf = fields.get("Buf", b"")
    if isinstance(buf, str):
        buf = buf.encode()
    if not isinstance(buf, bytes):
        raise BadPacket("compress_bad_buf")
    return lzw.decompress_untrusted(buf, max_size)


def _unpack_one_untrusted(data: bytes, kind: str) -> Any:
    u = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    u.feed(data)
    try:
        return u.unpack()
    except msgpack.OutOfData:
        raise BadPacket(f"{kind}_truncated") from None
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise _unpack_error(kind) from None


def _is_one_map(data: bytes) -> bool:
    """Whether ``data`` is exactly one msgpack map: what a plaintext ping/indirect ping body is."""
    u = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    u.feed(data)
    try:
        return isinstance(u.unpack(), dict) and u.tell() == len(data)
    except (msgpack.OutOfData, ValueError, msgpack.UnpackException, TypeError, RecursionError):
        return False


# ------------------------------------------------------------------------------- UDP: encode


def encode_packet(
    messages: Sequence[bytes],
    *,
    crc: bool,
    compress: bool,
    keyring: Keyring | None,
    label: bytes = b"",
    encryption_version: int = 1,
    rng_nonce: bytes | None = None,
) -> bytes:
    """One datagram carrying 1..255 messages (a compound when there are several)."""
    if not messages:
        raise UsageError("a packet carries at least one message")
    if len(messages) > COMPOUND_MAX_PARTS:
        raise UsageError(f"a compound holds at most {COMPOUND_MAX_PARTS}: use encode_packets()")
    if any(not m for m in messages):
        raise UsageError("a message is at least its type byte")
    buf = bytes(messages[0]) if len(messages) == 1 else _compound(messages)
    if compress:
        packed = _compress_message(buf)
        buf = packed if len(packed) < len(buf) else buf
    if crc:
        buf = bytes([_T.HAS_CRC]) + zlib.crc32(buf).to_bytes(4, "big") + buf
    if keyring is not None:
        buf = encrypt_payload(keyring, buf, label, rng_nonce, encryption_version)
    return _label_header(label) + buf


def encode_packets(
    messages: Sequence[bytes],
    *,
    crc: bool,
    compress: bool,
    keyring: Keyring | None,
    label: bytes = b"",
    encryption_version: int = 1,
) -> list[bytes]:
    """As many datagrams as the 255-part compound limit needs (none for no messages)."""
    return [
        encode_packet(
            messages[i : i + COMPOUND_MAX_PARTS],
            crc=crc,
            compress=compress,
            keyring=keyring,
            label=label,
            encryption_version=encryption_version,
        )
        for i in range(0, len(messages), COMPOUND_MAX_PARTS)
    ]


def _compound(messages: Sequence[bytes]) -> bytes:
    if any(len(m) > COMPOUND_PART_MAX for m in messages):
        raise UsageError("a compound part is at most 65535 bytes: send it on its own")
    head = bytes([_T.COMPOUND, len(messages)])
    lengths = b"".join(len(m).to_bytes(2, "big") for m in messages)
    return head + lengths + b"".join(messages)


# ------------------------------------------------------------------------------- UDP: decode


@dataclass(frozen=True, slots=True)
class DecodedPacket:
    """The usable messages of a datagram, and why any part of it was dropped."""

    messages: tuple[bytes, ...]
    dropped: tuple[str, ...] = ()


def decode_packet_untrusted(
    data: bytes,
    *,
    keyring: Keyring | None,
    require_encryption: bool,
    label: bytes = b"",
    max_size: int = PACKET_MAX_DECOMPRESSED,
) -> list[bytes]:
    """The ``[type][body]`` messages of a datagram; BadPacket only if none is usable."""
    decoded = decode_packet_detailed_untrusted(
        data, keyring=keyring, require_encryption=require_encryption, label=label, max_size=max_size
    )
    if not decoded.messages:
        raise BadPacket(decoded.dropped[0] if decoded.dropped else "empty_packet")
    return list(decoded.messages)


def decode_packet_detailed_untrusted(
    data: bytes,
    *,
    keyring: Keyring | None,
    require_encryption: bool,
    label: bytes = b"",
    max_size: int = PACKET_MAX_DECOMPRESSED,
) -> DecodedPacket:
    """Undo label, encryption, CRC, compression and compounds, as memberlist's receiver does.

    Errors in the packet's outer layers raise; a bad or truncated compound part is dropped and
    its reason recorded in ``dropped`` (memberlist logs and skips it too).
    """
    if require_encryption and (keyring is None or keyring.primary is None):
        raise UsageError("require_encryption needs a keyring with a key")
    buf = _strip_label_untrusted(bytes(data), label)
    buf = _unwrap_encryption_untrusted(buf, keyring, require_encryption, label)
    buf = _strip_crc_untrusted(buf)
    walker = _Walker(max_size)
    walker.walk(buf, 0)
    return DecodedPacket(tuple(walker.messages), tuple(walker.dropped))


def _strip_label_untrusted(buf: bytes, label: bytes) -> bytes:
    if not buf:
        raise BadPacket("empty_packet")
    got = b""
    if buf[0] == _T.HAS_LABEL:
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            raise BadPacket("label_truncated")
        if buf[1] == 0:
            raise BadPacket("label_empty")
        got, buf = buf[2 : 2 + buf[1]], buf[2 + buf[1] :]
    if got != label:
        raise BadPacket("label_mismatch", f"{got!r} is not {label!r}")
    return buf


def _looks_encrypted(buf: bytes) -> bool:
    """An encrypted packet starts with its version (0 or 1), as a ping or indirect ping does."""
    return (
        bool(buf)
        and buf[0] <= 1
        and len(buf) >= encrypted_length(buf[0], 0)
        and not _is_one_map(buf[1:])
    )


def _unwrap_encryption_untrusted(
    buf: bytes, keyring: Keyring | None, require: bool, label: bytes
) -> bytes:
    if keyring is None or keyring.primary is None:
        if _looks_encrypted(buf):
            raise BadPacket("encrypted_but_no_keyring")
        return buf
    try:
        return decrypt_payload_untrusted(keyring, buf, label)
    except BadPacket as exc:
        if not require:  # memberlist without GossipVerifyIncoming: take it as plaintext
            return buf
        if not buf or buf[0] > 1 or _is_one_map(buf[1:]):
            raise BadPacket("unencrypted") from None
        raise exc from None


def _strip_crc_untrusted(buf: bytes) -> bytes:
    if buf and buf[0] == _T.HAS_CRC:
        if len(buf) < 5:
            raise BadPacket("crc_truncated")
        if zlib.crc32(buf[5:]) != int.from_bytes(buf[1:5], "big"):
            raise BadPacket("crc_mismatch")
        buf = buf[5:]
    if not buf:
        raise BadPacket("empty_packet")
    return buf


class _Walker:
    """memberlist's handleCommand recursion, collecting leaf messages instead of handling them."""

    __slots__ = ("budget", "dropped", "messages")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.messages: list[bytes] = []
        self.dropped: list[str] = []

    def walk(self, buf: bytes, depth: int) -> None:
        if not buf:
            raise BadPacket("empty_message")
        if depth > MAX_NESTING:
            raise BadPacket("packet_nesting_too_deep")
        kind = buf[0]
        if kind == _T.COMPOUND:
            self._compound(buf[1:], depth)
        elif kind == _T.COMPRESS:
            fields = _map_untrusted(_unpack_one_untrusted(buf[1:], "compress"), "compress")
            inner = _decompress_body_untrusted(fields, self.budget)
            self.budget -= len(inner)
            self.walk(inner, depth + 1)
        elif kind in _UDP_TYPES:
            self.messages.append(buf)
        else:
            raise BadPacket("unexpected_message_type", str(kind))

    def _compound(self, buf: bytes, depth: int) -> None:
        if not buf:
            raise BadPacket("compound_truncated", "no part count")
        count = buf[0]
        if len(buf) < 1 + 2 * count:
            raise BadPacket("compound_truncated", "length table")
        offset = 1 + 2 * count
        for i in range(count):
            size = int.from_bytes(buf[1 + 2 * i : 3 + 2 * i], "big")
            if offset + size > len(buf):  # memberlist counts the rest as truncated
                self.dropped.extend(["compound_part_truncated"] * (count - i))
                return
            part, offset = buf[offset : offset + size], offset + size
            try:
                self.walk(part, depth + 1)
            except BadPacket as exc:
                self.dropped.append(exc.reason)
        if count == 0:
            self.dropped.append("compound_empty")


# ------------------------------------------------------------------------------- TCP streams


def encode_stream(
    message: bytes,
    *,
    compress: bool,
    keyring: Keyring | None,
    label: bytes = b"",
    label_header: bool = True,
    encryption_version: int = 1,
    rng_nonce: bytes | None = None,
) -> bytes:
    """The bytes to write on a stream for one message (``rawSendMsgStream``).

    memberlist writes the label header only at the start of a connection it dials; a reply
    (``label_header=False``) carries none but is still authenticated with the label.
    """
    if not message:
        raise UsageError("a message is at least its type byte")
    body = bytes(message)
    if body[0] == _T.USER:
        header: bytes = msgpack.packb({"UserMsgLen": len(body) - 1}, use_bin_type=False)
        body = body[:1] + header + body[1:]
    if compress:
        body = _compress_message(body)
    if keyring is not None:
        size = encrypted_length(encryption_version, len(body))
        head = bytes([_T.ENCRYPT]) + size.to_bytes(4, "big")
        body = head + encrypt_payload(keyring, body, head + label, rng_nonce, encryption_version)
    return _label_header(label) + body if label_header else body


class StreamReader:
    """Incremental reader of the one message a memberlist stream carries.

    Feed it bytes as they arrive; :meth:`feed_untrusted` returns ``[type][body]`` once the whole
    message is there (user messages as ``[8][payload]``) and ``None`` before.  Bytes after the
    message are ignored, as memberlist does.  Anything malformed raises :class:`BadPacket`.
    ``label_header=False`` reads a reply on a connection we dialed: no label header, but the
    label still authenticates an encrypted reply.
    """

    __slots__ = (
        "_buf",
        "_keyring",
        "_label",
        "_label_done",
        "_max",
        "_parser",
        "_require",
        "message",
    )

    def __init__(
        self,
        *,
        keyring: Keyring | None = None,
        require_encryption: bool = False,
        label: bytes = b"",
        label_header: bool = True,
        max_size: int = STREAM_MAX_SIZE,
    ) -> None:
        if require_encryption and (keyring is None or keyring.primary is None):
            raise UsageError("require_encryption needs a keyring with a key")
        self._keyring = keyring if keyring is not None and keyring.primary is not None else None
        self._require = require_encryption
        self._label = bytes(label)
        self._max = max_size
        self._buf = bytearray()
        self._label_done = not label_header
        self._parser: _MessageParser | None = None
        self.message: bytes | None = None

    @property
    def done(self) -> bool:
        return self.message is not None

    def feed_untrusted(self, data: bytes) -> bytes | None:
        if self.message is not None:
            return None
        if self._parser is not None:
            self.message = self._parser.feed(data)
            return self.message
        self._buf += data
        if len(self._buf) > self._max + 5 + 2 + LABEL_MAX:
            raise BadPacket("stream_too_large")
        self.message = self._advance()
        return self.message

    def _advance(self) -> bytes | None:
        if not self._label_done and not self._take_label():
            return None
        if not self._buf:
            return None
        if self._buf[0] == _T.ENCRYPT:
            return self._take_encrypted()
        if self._require:
            raise BadPacket("unencrypted")
        self._parser = _MessageParser(self._buf[0], self._max, allow_compress=True)
        rest, self._buf = bytes(self._buf[1:]), bytearray()
        return self._parser.feed(rest)

    def _take_label(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        got = b""
        if buf[0] == _T.HAS_LABEL:
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return False
            if buf[1] == 0:
                raise BadPacket("label_empty")
            got = bytes(buf[2 : 2 + buf[1]])
            del buf[: 2 + len(got)]
        if got != self._label:
            raise BadPacket("label_mismatch", f"{got!r} is not {self._label!r}")
        self._label_done = True
        return True

    def _take_encrypted(self) -> bytes | None:
        if self._keyring is None:
            raise BadPacket("encrypted_but_no_keyring")
        if len(self._buf) < 5:
            return None
        size = int.from_bytes(self._buf[1:5], "big")
        if size > self._max:
            raise BadPacket("stream_too_large")
        if len(self._buf) < 5 + size:
            return None
        head, sealed = bytes(self._buf[:5]), bytes(self._buf[5 : 5 + size])
        plain = decrypt_payload_untrusted(self._keyring, sealed, head + self._label)
        return _parse_complete_untrusted(plain, self._max, allow_compress=True)


def _parse_complete_untrusted(data: bytes, max_size: int, *, allow_compress: bool) -> bytes:
    if not data:
        raise BadPacket("stream_empty")
    message = _MessageParser(data[0], max_size, allow_compress=allow_compress).feed(data[1:])
    if message is None:
        raise BadPacket("stream_truncated")
    return message


_MISSING = object()


class _MessageParser:
    """Finds the end of one plaintext stream message: its msgpack objects, then a raw tail."""

    __slots__ = (
        "_body",
        "_kind",
        "_max",
        "_nodes_left",
        "_tail_end",
        "_tail_start",
        "_unpacker",
        "_user_state_len",
    )

    def __init__(self, kind: int, max_size: int, *, allow_compress: bool) -> None:
        if kind not in _STREAM_TYPES and not (allow_compress and kind == _T.COMPRESS):
            raise BadPacket("stream_unexpected_type", str(kind))
        self._kind = kind
        self._max = max_size
        self._body = bytearray()
        self._unpacker = msgpack.Unpacker(
            raw=True, strict_map_key=False, max_buffer_size=max_size + 1
        )
        self._nodes_left = -1  # push/pull: node states still to read after the header
        self._user_state_len = 0  # push/pull: raw bytes after the last node state
        self._tail_start = 0  # where the raw tail (user state, user payload) starts
        self._tail_end: int | None = None  # where the message ends, once known

    def feed(self, data: bytes) -> bytes | None:
        if len(self._body) + len(data) > self._max:
            raise BadPacket("stream_too_large")
        self._body += data
        if self._tail_end is None:
            self._unpacker.feed(data)
        while self._tail_end is None:
            obj = self._next_object()
            if obj is _MISSING:
                return None
            result = self._on_object(obj)
            if result is not None:
                return result
        if len(self._body) < self._tail_end:
            return None
        if self._kind == _T.USER:  # [8][userMsgHeader][payload] -> [8][payload]
            return bytes([_T.USER]) + bytes(self._body[self._tail_start : self._tail_end])
        return bytes([self._kind]) + bytes(self._body[: self._tail_end])

    def _next_object(self) -> Any:
        try:
            return self._unpacker.unpack()
        except msgpack.OutOfData:
            return _MISSING
        except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
            raise BadPacket("stream_not_msgpack") from None

    def _on_object(self, obj: Any) -> bytes | None:
        """Account for one msgpack object; a compressed message resolves here."""
        kind, name = self._kind, _T(self._kind).name.lower()
        fields = _map_untrusted(obj, name)
        end = self._unpacker.tell()
        if kind == _T.COMPRESS:
            inner = _decompress_body_untrusted(fields, self._max)
            return _parse_complete_untrusted(inner, self._max, allow_compress=False)
        if kind == _T.PUSH_PULL and self._nodes_left < 0:
            self._nodes_left = _int_field(fields, "Nodes", name, self._max)
            self._user_state_len = _int_field(fields, "UserStateLen", name, self._max)
        elif kind == _T.PUSH_PULL:
            self._nodes_left -= 1
        elif kind == _T.USER:
            self._tail_start = end
            self._tail_end = end + _int_field(fields, "UserMsgLen", name, self._max)
            return None
        else:
            self._tail_end = end
            return None
        if self._nodes_left == 0:  # push/pull: the user state follows the last node state
            self._tail_end = end + self._user_state_len
        return None
