"""hashicorp/memberlist's messages, byte-compatible: one type byte, then a msgpack map.

go-msgpack (memberlist's ``MsgpackHandle{}``) writes a struct as a map keyed by the Go field
names in sorted order, and writes strings and ``[]byte`` alike in the old *raw* family (fixstr,
str16, str32; never str8 or bin).  msgpack-python does the same with ``use_bin_type=False``;
decoding uses ``raw=True`` because ``Addr`` and ``Vsn`` are not UTF-8.  Decoders accept str8
and bin too, as Go does.

Each record below is one struct of memberlist's ``net.go``; ``encode_message`` and
``decode_message_untrusted`` are the pair.  Packet-level framing (compound, compression, CRC,
encryption, labels) lives in :mod:`vxnet.gossip.packet`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from vxnet.errors import BadPacket


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK = 11
    HAS_CRC = 12
    ERR = 13
    HAS_LABEL = 244


class NodeState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


#: [pmin, pmax, pcur, dmin, dmax, dcur]: what Docker's memberlist advertises.
DEFAULT_VSN = bytes([1, 5, 2, 0, 0, 0])
META_MAX = 512


@dataclass(frozen=True, slots=True)
class Ping:
    seq_no: int
    node: str  # the intended target's name ("" for any)
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq_no: int
    target: bytes  # the target's IP, 4 or 16 bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    seq_no: int
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    seq_no: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    from_: str


@dataclass(frozen=True, slots=True)
class Dead:
    incarnation: int
    node: str
    from_: str  # == node for a node that leaves


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes | None = None
    vsn: bytes = DEFAULT_VSN


@dataclass(frozen=True, slots=True)
class PushNodeState:
    name: str
    addr: bytes
    port: int
    meta: bytes | None
    incarnation: int
    state: NodeState
    vsn: bytes = DEFAULT_VSN


@dataclass(frozen=True, slots=True)
class PushPull:
    """``[6][pushPullHeader][Nodes x pushNodeState][UserStateLen bytes]`` (TCP only)."""

    join: bool
    nodes: tuple[PushNodeState, ...]
    user_state: bytes = b""


@dataclass(frozen=True, slots=True)
class User:
    """An application message (networkdb's), ``[8][payload]`` on UDP."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Err:
    error: str


Message = Ping | IndirectPing | Ack | Nack | Suspect | Dead | Alive | PushPull | User | Err


# ---------------------------------------------------------------------------- encoding


def _pack(fields: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(dict(sorted(fields.items())), use_bin_type=False)
    return body


def _omitempty(fields: dict[str, Any], **optional: Any) -> dict[str, Any]:
    fields.update({k: v for k, v in optional.items() if v})
    return fields


def _node_state(n: PushNodeState) -> dict[str, Any]:
    return {
        "Addr": n.addr,
        "Incarnation": n.incarnation,
        "Meta": n.meta,
        "Name": n.name,
        "Port": n.port,
        "State": int(n.state),
        "Vsn": n.vsn,
    }


def encode_body(msg: Message) -> bytes:
    """The msgpack body of ``msg`` (without its type byte)."""
    if isinstance(msg, Ping):
        return _pack(
            _omitempty(
                {"SeqNo": msg.seq_no, "Node": msg.node},
                SourceAddr=msg.source_addr,
                SourcePort=msg.source_port,
                SourceNode=msg.source_node,
            )
        )
    if isinstance(msg, IndirectPing):
        return _pack(
            _omitempty(
                {
                    "SeqNo": msg.seq_no,
                    "Target": msg.target,
                    "Port": msg.port,
                    "Node": msg.node,
                    "Nack": msg.nack,
                },
                SourceAddr=msg.source_addr,
                SourcePort=msg.source_port,
                SourceNode=msg.source_node,
            )
        )
    if isinstance(msg, Ack):
        return _pack({"SeqNo": msg.seq_no, "Payload": msg.payload})
    if isinstance(msg, Nack):
        return _pack({"SeqNo": msg.seq_no})
    if isinstance(msg, Suspect | Dead):
        return _pack({"Incarnation": msg.incarnation, "Node": msg.node, "From": msg.from_})
    if isinstance(msg, Alive):
        return _pack(
            {
                "Incarnation": msg.incarnation,
                "Node": msg.node,
                "Addr": msg.addr,
                "Port": msg.port,
                "Meta": msg.meta,
                "Vsn": msg.vsn,
            }
        )
    if isinstance(msg, PushPull):
        head = _pack(
            {"Nodes": len(msg.nodes), "UserStateLen": len(msg.user_state), "Join": msg.join}
        )
        return head + b"".join(_pack(_node_state(n)) for n in msg.nodes) + msg.user_state
    if isinstance(msg, User):
        return msg.payload
    if isinstance(msg, Err):
        return _pack({"Error": msg.error})
    raise TypeError(f"not a memberlist message: {msg!r}")


_TYPE = {
    Ping: MessageType.PING,
    IndirectPing: MessageType.INDIRECT_PING,
    Ack: MessageType.ACK,
    Nack: MessageType.NACK,
    Suspect: MessageType.SUSPECT,
    Dead: MessageType.DEAD,
    Alive: MessageType.ALIVE,
    PushPull: MessageType.PUSH_PULL,
    User: MessageType.USER,
    Err: MessageType.ERR,
}


def message_type(msg: Message) -> MessageType:
    return _TYPE[type(msg)]


def encode_message(msg: Message) -> bytes:
    """``[type byte][body]``: one message as it goes into a packet or a compound."""
    return bytes([_TYPE[type(msg)]]) + encode_body(msg)


# ---------------------------------------------------------------------------- decoding


class _Fields:
    """Typed access to a decoded msgpack map; anything unexpected is the peer's fault."""

    def __init__(self, kind: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise BadPacket(f"{kind}_not_a_map")
        self.kind = kind
        self.data = {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v
            for k, v in data.items()
        }

    def int(self, key: str, bits: int = 32, default: int | None = 0) -> int:
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >> bits:
            raise BadPacket(f"{self.kind}_bad_{key.lower()}")
        return value

    def raw(self, key: str) -> bytes | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bytes):
            return value
        if isinstance(value, str):  # a peer that packed with the new spec's str
            return value.encode()
        raise BadPacket(f"{self.kind}_bad_{key.lower()}")

    def bytes(self, key: str) -> bytes:
        return self.raw(key) or b""

    def text(self, key: str) -> str:
        try:
            return self.bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise BadPacket(f"{self.kind}_bad_{key.lower()}") from None

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise BadPacket(f"{self.kind}_bad_{key.lower()}")
        return value


def _unpacker(data: bytes) -> msgpack.Unpacker:
    u = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=len(data) + 1)
    u.feed(data)
    return u


def _next(u: msgpack.Unpacker, kind: str) -> Any:
    try:
        return u.unpack()
    except msgpack.OutOfData:
        raise BadPacket(f"{kind}_truncated") from None
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError):
        raise BadPacket(f"{kind}_not_msgpack") from None


def _one(body: bytes, kind: str) -> _Fields:
    return _Fields(kind, _next(_unpacker(body), kind))


def decode_body_untrusted(kind: MessageType, body: bytes) -> Message:
    """The message of type ``kind`` whose msgpack body is ``body``."""
    if kind == MessageType.USER:
        return User(bytes(body))
    if kind == MessageType.PUSH_PULL:
        return _push_pull(body)
    name = kind.name.lower()
    f = _one(body, name)
    if kind == MessageType.PING:
        return Ping(
            f.int("SeqNo"),
            f.text("Node"),
            f.bytes("SourceAddr"),
            f.int("SourcePort", 16),
            f.text("SourceNode"),
        )
    if kind == MessageType.INDIRECT_PING:
        return IndirectPing(
            f.int("SeqNo"),
            f.bytes("Target"),
            f.int("Port", 16),
            f.text("Node"),
            f.flag("Nack"),
            f.bytes("SourceAddr"),
            f.int("SourcePort", 16),
            f.text("SourceNode"),
        )
    if kind == MessageType.ACK:
        return Ack(f.int("SeqNo"), f.raw("Payload"))
    if kind == MessageType.NACK:
        return Nack(f.int("SeqNo"))
    if kind in (MessageType.SUSPECT, MessageType.DEAD):
        cls = Suspect if kind == MessageType.SUSPECT else Dead
        return cls(f.int("Incarnation"), f.text("Node"), f.text("From"))
    if kind == MessageType.ALIVE:
        return Alive(
            f.int("Incarnation"),
            f.text("Node"),
            f.bytes("Addr"),
            f.int("Port", 16),
            f.raw("Meta"),
            f.bytes("Vsn"),
        )
    if kind == MessageType.ERR:
        return Err(f.text("Error"))
    raise BadPacket("unknown_message_type", str(int(kind)))


def _push_pull(body: bytes) -> PushPull:
    u = _unpacker(body)
    head = _Fields("push_pull", _next(u, "push_pull"))
    count = head.int("Nodes", 31)
    user_len = head.int("UserStateLen", 31)
    if count > 10_000:
        raise BadPacket("push_pull_too_many_nodes")
    nodes = []
    for _ in range(count):
        f = _Fields("push_node", _next(u, "push_pull"))
        state = f.int("State", 8)
        if state > NodeState.LEFT:
            raise BadPacket("push_node_bad_state")
        nodes.append(
            PushNodeState(
                f.text("Name"),
                f.bytes("Addr"),
                f.int("Port", 16),
                f.raw("Meta"),
                f.int("Incarnation"),
                NodeState(state),
                f.bytes("Vsn"),
            )
        )
    rest = body[u.tell() :]
    if len(rest) < user_len:
        raise BadPacket("push_pull_user_state_truncated")
    return PushPull(head.flag("Join"), tuple(nodes), bytes(rest[:user_len]))


def decode_message_untrusted(data: bytes) -> Message:
    """``[type][body]`` -> one message (compound/compress/crc/encrypt are the packet layer's)."""
    if not data:
        raise BadPacket("empty_message")
    try:
        kind = MessageType(data[0])
    except ValueError:
        raise BadPacket("unknown_message_type", str(data[0])) from None
    return decode_body_untrusted(kind, bytes(data[1:]))
