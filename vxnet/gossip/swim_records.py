"""The records of the SWIM core (:mod:`vxnet.gossip.swim`): what it hands its driver, and the
bookkeeping of its probes, relays, streams and timers.

The first four are the core's outputs, public: a datagram to send, a TCP exchange to run, a
user message and a push/pull's application state to deliver.  The rest are memberlist's
goroutines turned into data (``probeNode``, an indirect ping run for another node, a stream
waited on, the ticker deadlines), so that the core stays one synchronous object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vxnet.gossip.messages import Message
from vxnet.gossip.states import ip_text

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP packet: a single message, or a compound if several; CRC-prefixed if ``crc``."""

    dest: Addr
    messages: tuple[bytes, ...]
    crc: bool


@dataclass(frozen=True, slots=True)
class StreamOp:
    """Open TCP to ``dest``, send ``message``, read one reply, report it via ``stream_result``
    (give up after ``timeout`` seconds)."""

    op_id: int
    dest: Addr
    message: Message
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class UserMessage:
    """An application message (``[8][payload]``) from UDP or TCP."""

    payload: bytes
    src: Addr


@dataclass(frozen=True, slots=True)
class RemoteState:
    """The application part of a push/pull we took part in (memberlist's MergeRemoteState)."""

    user_state: bytes
    join: bool


@dataclass(slots=True)
class Probe:
    """The probe in flight (memberlist's ``probeNode`` goroutine, as data)."""

    seq_no: int
    name: str
    incarnation: int
    dest: Addr
    pmax: int
    timeout_at: float  # the direct ping gives up: go indirect
    deadline: float  # the whole probe gives up: suspect
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    fallback_ok: bool = False


@dataclass(slots=True)
class Relay:
    """An indirect ping we run for another node."""

    seq_no: int  # the requester's sequence number
    reply_to: Addr
    nack: bool
    deadline: float


@dataclass(slots=True)
class StreamWait:
    kind: Literal["join", "push_pull", "ping"]
    join: bool = False
    seq_no: int = 0


@dataclass(slots=True)
class Timers:
    probe: float
    gossip: float
    push_pull: float
    push_pull_armed: bool = False
    probe_pending: bool = False  # a probe tick arrived while a probe was running


def reply_addr(source_addr: bytes, source_port: int, src: Addr) -> Addr:
    """Where to answer: the advertised source if the message carries one, else the sender."""
    text = ip_text(source_addr) if source_addr else None
    return (text, source_port) if text is not None and source_port else src


def next_tick(tick: float, interval: float, now: float) -> float:
    """The first tick after ``now`` (a Go ticker drops the ticks its reader missed)."""
    missed = math.floor((now - tick) / interval) + 1
    return tick + missed * interval
