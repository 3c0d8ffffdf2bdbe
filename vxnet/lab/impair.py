"""Link impairments, netem-style, decided per frame.  Sans-IO: the RNG and the clock come in.

This kernel has no netem, so the lab brings its own.  The model is netem's, so what a learner
reads about ``tc qdisc add ... netem`` carries over:

* ``loss`` -- each frame is dropped with this probability;
* ``delay`` and ``jitter`` -- each frame leaves ``delay +- jitter`` seconds after it came (uniform);
* ``duplicate`` -- each frame is sent twice with this probability;
* ``reorder`` -- this share of frames is sent at once instead of being delayed, so it overtakes
  the delayed ones (netem's semantics: reordering needs a delay).

A frame's fate depends only on the seed and the order of frames, so a run can be repeated.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from vxnet.errors import UsageError

MAX_DELAY = 10.0  # seconds: more than this is a partition, say so with --partition


@dataclass(frozen=True, slots=True)
class Impairment:
    loss: float = 0.0  # probability, 0..1
    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, +- around delay
    duplicate: float = 0.0  # probability
    reorder: float = 0.0  # probability of skipping the delay

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name} must be 0-100%, not {value * 100:g}%")
        if not 0.0 <= self.delay <= MAX_DELAY:
            raise UsageError(f"delay must be 0-{MAX_DELAY * 1000:.0f} ms")
        if not 0.0 <= self.jitter <= self.delay:
            raise UsageError("jitter must be between 0 and the delay")
        if self.reorder and not self.delay:
            raise UsageError("--reorder needs --delay: reordered frames skip the delay (as netem)")

    @property
    def active(self) -> bool:
        return bool(self.loss or self.delay or self.duplicate)

    def describe(self) -> str:
        parts = []
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.delay:
            jitter = f" +- {self.jitter * 1000:g}" if self.jitter else ""
            parts.append(f"delay {self.delay * 1000:g}{jitter} ms")
        if self.duplicate:
            parts.append(f"duplicate {self.duplicate * 100:g}%")
        if self.reorder:
            parts.append(f"reorder {self.reorder * 100:g}%")
        return ", ".join(parts) or "none"

    def to_json(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "delay": self.delay,
            "jitter": self.jitter,
            "duplicate": self.duplicate,
            "reorder": self.reorder,
        }


@dataclass(frozen=True, slots=True)
class Rule:
    """An impairment for frames to or from ``peers`` (any frame when ``peers`` is empty)."""

    impairment: Impairment
    peers: frozenset[bytes] = frozenset()  # packed IPv4 addresses of the far end

    def matches(self, src: bytes, dst: bytes) -> bool:
        return not self.peers or src in self.peers or dst in self.peers


def ipv4_pair(frame: bytes | memoryview) -> tuple[bytes, bytes]:
    """(source, destination) of an Ethernet frame: IPv4 addresses, ARP's sender and target, or
    empty bytes for anything else (such frames only match rules without peers)."""
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        return bytes(frame[26:30]), bytes(frame[30:34])
    if len(frame) >= 42 and frame[12:14] == b"\x08\x06":
        return bytes(frame[28:32]), bytes(frame[38:42])
    return b"", b""


@dataclass
class Counters:
    frames: int = 0
    passed: int = 0  # matched no rule
    dropped: int = 0
    delayed: int = 0
    duplicated: int = 0
    reordered: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "frames": self.frames,
            "passed": self.passed,
            "dropped": self.dropped,
            "delayed": self.delayed,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
        }


@dataclass
class Impairer:
    """Decides, for each frame, when its copies leave (an empty list: dropped)."""

    rules: list[Rule]
    rng: random.Random
    counters: Counters = field(default_factory=Counters)

    def decide(self, frame: bytes | memoryview, now: float) -> list[float]:
        self.counters.frames += 1
        src, dst = ipv4_pair(frame)
        rule = next((r for r in self.rules if r.matches(src, dst)), None)
        if rule is None:
            self.counters.passed += 1
            return [now]
        imp = rule.impairment
        rng = self.rng
        if imp.loss and rng.random() < imp.loss:
            self.counters.dropped += 1
            return []
        copies = 2 if imp.duplicate and rng.random() < imp.duplicate else 1
        if copies == 2:
            self.counters.duplicated += 1
        out = []
        for _ in range(copies):
            if imp.reorder and rng.random() < imp.reorder:
                self.counters.reordered += 1
                out.append(now)
            elif imp.delay:
                self.counters.delayed += 1
                out.append(now + imp.delay + rng.uniform(-imp.jitter, imp.jitter))
            else:
                out.append(now)
        return out


def parse_percent(text: str, what: str) -> float:
    """``10%`` or ``10`` -> 0.1."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"--{what} {text!r}: a percentage such as 10%") from None
    if not 0.0 <= value <= 100.0:
        raise UsageError(f"--{what} {text!r}: 0-100%")
    return value / 100.0


def packed(addresses: list[str]) -> frozenset[bytes]:
    try:
        return frozenset(ipaddress.IPv4Address(a).packed for a in addresses)
    except ValueError as exc:
        raise UsageError(f"bad address in a fault rule: {exc}") from None
