"""The network key manager: swarmkit's ``keymanager`` and libnetwork's use of its keys, sans-IO.

The manager keeps a ring of :data:`KEYRING_SIZE` AES-128-GCM keys for each subsystem
(:data:`GOSSIP` encrypts networkdb gossip, :data:`IPSEC` the encrypted overlays' ESP).  Every key
carries a Lamport time that starts at a random value (swarmkit's ``genSkew``: 0..65535) and grows
by one per key allocated, across both subsystems; the time is the key's *tag*.

Every rotation interval (12 h by default) each ring drops its oldest key and gains a new one.
Nodes sort a ring by tag and make the **middle** key primary (libnetwork sends with ``keys[1]``),
so a new key is installed for receive one full interval before anybody sends with it.

Time is an argument: :meth:`KeyManager.next_deadline` says when to call
:meth:`KeyManager.handle_timer`; tests drive days of rotations in milliseconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from vxnet.errors import UsageError

GOSSIP = "networking:gossip"
IPSEC = "networking:ipsec"
SUBSYSTEMS = (GOSSIP, IPSEC)
KEYRING_SIZE = 3
DEFAULT_ROTATION = 12 * 3600.0
MIN_ROTATION = 1.0
ALGORITHM = "aes-128-gcm"
KEY_BYTES = 16
LAMPORT_SKEW = 1 << 16
_UINT64 = (1 << 64) - 1
_FORMAT = 1
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """One network key.  The key bytes stay out of ``repr`` so logs do not leak them."""

    subsystem: str
    algorithm: str
    key: bytes = field(repr=False)
    lamport_time: int

    def __post_init__(self) -> None:
        if self.subsystem not in SUBSYSTEMS:
            raise UsageError(f"unknown key subsystem {self.subsystem!r}; use one of {SUBSYSTEMS}")
        if self.algorithm != ALGORITHM:
            raise UsageError(f"unsupported key algorithm {self.algorithm!r}; use {ALGORITHM!r}")
        if len(self.key) != KEY_BYTES:
            raise UsageError(f"a network key is {KEY_BYTES} bytes, got {len(self.key)}")
        if not 0 <= self.lamport_time <= _UINT64:
            raise UsageError(f"lamport time {self.lamport_time} is not a uint64")

    @property
    def tag(self) -> int:
        """The key's tag: its Lamport time (libnetwork mixes it into the ESP SPI)."""
        return self.lamport_time

    def to_json(self) -> dict[str, object]:
        return {
            "subsystem": self.subsystem,
            "algorithm": self.algorithm,
            "key": self.key.hex(),
            "lamport_time": self.lamport_time,
        }

    @classmethod
    def from_json(cls, data: object) -> EncryptionKey:
        """The inverse of :meth:`to_json`; :class:`UsageError` for anything malformed."""
        obj = _mapping(data, "key")
        key_hex = _field(obj, "key", str)
        try:
            key = bytes.fromhex(key_hex)
        except ValueError:
            raise UsageError("malformed key state: 'key' is not hex") from None
        return cls(
            _field(obj, "subsystem", str),
            _field(obj, "algorithm", str),
            key,
            _field(obj, "lamport_time", int),
        )


class KeyManager:
    """Allocates and rotates the network keys of one swarm.

    ``rng`` supplies key bytes and the Lamport start: pass ``random.SystemRandom()`` outside tests.
    ``keys`` restores a keyring (exactly :data:`KEYRING_SIZE` per subsystem); without it a fresh
    ring is made.  ``last_rotation`` defaults to ``now``.
    """

    def __init__(
        self,
        rng: random.Random,
        now: float,
        interval: float = DEFAULT_ROTATION,
        keys: Sequence[EncryptionKey] = (),
        last_rotation: float | None = None,
        *,
        lamport_clock: int | None = None,
    ) -> None:
        _check_interval(interval)
        self._rng = rng
        self._interval = interval
        self._last_rotation = now if last_rotation is None else last_rotation
        self._deadline = self._last_rotation + interval
        if keys:
            self._rings = _rings_from(keys)
            newest = max(k.lamport_time for k in keys)
            self._clock = newest if lamport_clock is None else lamport_clock
            if self._clock < newest:
                raise UsageError(f"lamport clock {self._clock} is behind key tag {newest}")
        else:
            self._clock = rng.randrange(LAMPORT_SKEW)
            self._rings = {s: [self._allocate(s) for _ in range(KEYRING_SIZE)] for s in SUBSYSTEMS}

    @property
    def keys(self) -> tuple[EncryptionKey, ...]:
        """Every key, sorted by subsystem and then by tag."""
        return tuple(k for s in sorted(self._rings) for k in self.keys_for(s))

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def last_rotation(self) -> float:
        return self._last_rotation

    @property
    def lamport_clock(self) -> int:
        """The Lamport time of the newest key allocated."""
        return self._clock

    def keys_for(self, subsystem: str) -> tuple[EncryptionKey, ...]:
        """The ring of ``subsystem``, oldest tag first."""
        if subsystem not in self._rings:
            raise UsageError(f"unknown key subsystem {subsystem!r}; use one of {SUBSYSTEMS}")
        return tuple(sorted(self._rings[subsystem], key=lambda k: k.lamport_time))

    def primary(self, subsystem: str) -> EncryptionKey:
        """The key nodes send with: the middle one by tag (libnetwork's ``keys[1]``)."""
        return self.keys_for(subsystem)[1]

    def next_deadline(self) -> float:
        """When :meth:`handle_timer` should next be called."""
        return self._deadline

    def handle_timer(self, now: float) -> bool:
        """Rotate if the deadline has passed; return whether the keys changed.

        After downtime that missed several intervals the ring rotates once, and the next rotation
        is scheduled one interval from ``now``.
        """
        if now < self._deadline:
            return False
        self.rotate(now)
        return True

    def rotate(self, now: float) -> None:
        """Rotate every ring now: drop its oldest key, append a new one."""
        for subsystem in sorted(self._rings):
            ring = sorted(self._rings[subsystem], key=lambda k: k.lamport_time)
            if len(ring) >= KEYRING_SIZE:
                ring = ring[len(ring) - KEYRING_SIZE + 1 :]
            self._rings[subsystem] = [*ring, self._allocate(subsystem)]
        self._last_rotation = now
        self._deadline = now + self._interval

    def set_interval(self, interval: float, now: float) -> None:
        """Change the rotation interval; the next rotation is one new interval after the last.

        If that moment has already passed, the deadline becomes ``now``.
        """
        _check_interval(interval)
        self._interval = interval
        self._deadline = max(self._last_rotation + interval, now)

    def to_json(self) -> dict[str, object]:
        """Everything needed to resume: keys, Lamport clock, interval and last rotation time."""
        return {
            "format": _FORMAT,
            "interval": self._interval,
            "last_rotation": self._last_rotation,
            "lamport_clock": self._clock,
            "keys": [k.to_json() for k in self.keys],
        }

    @classmethod
    def from_json(cls, rng: random.Random, data: object) -> KeyManager:
        """The inverse of :meth:`to_json`; :class:`UsageError` for anything malformed."""
        obj = _mapping(data, "key manager")
        if obj.get("format") != _FORMAT:
            raise UsageError(f"malformed key manager state: format must be {_FORMAT}")
        keys_data = _field(obj, "keys", list)
        last_rotation = _number(obj, "last_rotation")
        return cls(
            rng,
            last_rotation,
            _number(obj, "interval"),
            [EncryptionKey.from_json(k) for k in keys_data],
            last_rotation,
            lamport_clock=_field(obj, "lamport_clock", int),
        )

    def _allocate(self, subsystem: str) -> EncryptionKey:
        self._clock += 1
        return EncryptionKey(subsystem, ALGORITHM, self._rng.randbytes(KEY_BYTES), self._clock)


def _rings_from(keys: Sequence[EncryptionKey]) -> dict[str, list[EncryptionKey]]:
    rings: dict[str, list[EncryptionKey]] = {s: [] for s in SUBSYSTEMS}
    for key in keys:
        rings[key.subsystem].append(key)
    for subsystem, ring in rings.items():
        if len(ring) != KEYRING_SIZE:
            raise UsageError(
                f"subsystem {subsystem} needs {KEYRING_SIZE} keys to restore, got {len(ring)}"
            )
        if len({k.lamport_time for k in ring}) != len(ring):
            raise UsageError(f"subsystem {subsystem} has two keys with the same tag")
    return rings


def _check_interval(interval: float) -> None:
    if not (math.isfinite(interval) and interval >= MIN_ROTATION):
        raise UsageError(
            f"key rotation interval must be at least {MIN_ROTATION} s, got {interval!r}"
        )


def _mapping(data: object, what: str) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise UsageError(f"malformed {what} state: expected an object")
    return data


def _field(obj: Mapping[str, object], name: str, kind: type[_T]) -> _T:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"malformed key state: {name!r} must be a {kind.__name__}")
    return value


def _number(obj: Mapping[str, object], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"malformed key state: {name!r} must be a finite number")
    return float(value)
