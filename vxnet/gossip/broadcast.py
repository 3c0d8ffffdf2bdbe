"""memberlist's ``TransmitLimitedQueue`` (``queue.go``): what gossip piggybacks, and how often.

Each queued broadcast is sent at most ``retransmit_mult * ceil(log10(n + 1))`` times.  Packing
prefers the fewest transmits first, then the largest message that still fits, then the newest.
A broadcast with a ``name`` replaces any queued one with the same name: memberlist names its own
alive/suspect/dead messages after the node they are about, so only the latest news about a node
is gossiped.  Broadcasts without a name are never invalidated.

Ids only grow here: memberlist restarts them at 0 when the queue empties, which can give two
entries the same btree key (one then silently replaces the other); ordering is otherwise the same.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

_BIG = 1 << 63


@functools.lru_cache(maxsize=256)
def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """``retransmitLimit``: ``mult * ceil(log10(n + 1))``."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


@dataclass(slots=True)
class _Entry:
    transmits: int
    message: bytes
    id: int
    name: str | None
    token: object | None = field(default=None)

    def key(self) -> tuple[int, int]:
        # Within a transmit tier: larger messages first, then newer (higher id) first.
        return (-len(self.message), -self.id)


@dataclass(slots=True)
class _Tier:
    """The entries with one transmit count, sorted by ``_Entry.key()``; ``keys`` in parallel,
    so that lookups bisect plain tuples in C instead of calling a key function."""

    keys: list[tuple[int, int]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


class TransmitLimitedQueue:
    """Broadcasts waiting to be piggybacked, ordered as memberlist's btree orders them."""

    def __init__(self, retransmit_mult: int, num_nodes: Callable[[], int]) -> None:
        self.retransmit_mult = retransmit_mult
        self._num_nodes = num_nodes
        self._tiers: dict[int, _Tier] = {}  # transmits -> entries sorted by key()
        self._named: dict[str, _Entry] = {}
        self._id = 0
        self._len = 0
        self._bytes = 0  # of every queued message
        self._finished: list[object] = []

    def __len__(self) -> int:
        return self._len

    def queue(
        self,
        message: bytes,
        name: str | None = None,
        token: object | None = None,
        transmits: int = 0,
    ) -> None:
        """``QueueBroadcast``; ``token`` is reported by :meth:`take_finished` when it is done."""
        self._id += 1
        entry = _Entry(transmits, message, self._id, name, token)
        if name is not None and name in self._named:
            old = self._named[name]
            self._delete(old)
            self._finish(old)
        self._add(entry)

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        """``GetBroadcasts``: messages that fit in ``limit`` bytes, ``overhead`` each."""
        if not self._len:
            return []
        transmit_limit = retransmit_limit(self.retransmit_mult, self._num_nodes())
        if self._bytes + overhead * self._len <= limit:
            return self._take_all(transmit_limit)
        tiers = self._tiers
        used = 0
        out: list[bytes] = []
        reinsert: list[_Entry] = []
        transmits, top = min(tiers), max(tiers)
        while transmits <= top:
            free = limit - used - overhead
            if free <= 0:
                break
            tier = tiers.get(transmits)
            if tier is None:
                transmits += 1
                continue
            i = bisect.bisect_left(tier.keys, (-free, -_BIG))
            if i == len(tier.keys):
                transmits += 1
                continue
            entry = tier.entries[i]
            del tier.keys[i]
            del tier.entries[i]
            if not tier.keys:
                del tiers[transmits]
            self._unname(entry)
            used += overhead + len(entry.message)
            out.append(entry.message)
            if entry.transmits + 1 >= transmit_limit:
                self._finish(entry)
            else:
                entry.transmits += 1
                reinsert.append(entry)
        for entry in reinsert:
            self._add(entry)
        return out

    def take_finished(self) -> list[object]:
        """Tokens of broadcasts that were sent their last time or were invalidated."""
        done, self._finished = self._finished, []
        return done

    def transmits(self) -> list[tuple[int, bytes]]:
        """``(transmits, message)`` in queue order (for tests and debugging)."""
        return [
            (e.transmits, e.message) for t in sorted(self._tiers) for e in self._tiers[t].entries
        ]

    def reset(self) -> None:
        for tier in self._tiers.values():
            for entry in tier.entries:
                self._finish(entry)
        self._tiers.clear()
        self._named.clear()
        self._len = 0
        self._bytes = 0

    def prune(self, max_retain: int) -> None:
        """Drop the most-transmitted broadcasts until at most ``max_retain`` remain."""
        while self._len > max_retain:
            entry = self._tiers[max(self._tiers)].entries[-1]
            self._delete(entry)
            self._finish(entry)

    # ------------------------------------------------------------------ internals

    def _take_all(self, transmit_limit: int) -> list[bytes]:
        """``get_broadcasts`` when everything fits (the usual case): the same messages in
        the same order, but every tier moves up by one transmit as a whole."""
        out: list[bytes] = []
        shifted: dict[int, _Tier] = {}
        for transmits in sorted(self._tiers):
            tier = self._tiers[transmits]
            out.extend([e.message for e in tier.entries])
            if transmits + 1 >= transmit_limit:
                for entry in tier.entries:
                    self._unname(entry)
                    self._finish(entry)
            else:
                for entry in tier.entries:
                    entry.transmits = transmits + 1
                shifted[transmits + 1] = tier
        self._tiers = shifted
        return out

    def _add(self, entry: _Entry) -> None:
        tier = self._tiers.get(entry.transmits)
        if tier is None:
            tier = self._tiers[entry.transmits] = _Tier()
        key = entry.key()
        i = bisect.bisect_left(tier.keys, key)
        tier.keys.insert(i, key)
        tier.entries.insert(i, entry)
        if entry.name is not None:
            self._named[entry.name] = entry
        self._len += 1
        self._bytes += len(entry.message)

    def _delete(self, entry: _Entry) -> None:
        tier = self._tiers[entry.transmits]
        i = bisect.bisect_left(tier.keys, entry.key())  # keys are unique: ids are
        del tier.keys[i]
        del tier.entries[i]
        if not tier.keys:
            del self._tiers[entry.transmits]
        self._unname(entry)

    def _unname(self, entry: _Entry) -> None:
        """Bookkeeping of an entry that left its tier (``_len`` and the name index)."""
        if entry.name is not None and self._named.get(entry.name) is entry:
            del self._named[entry.name]
        self._len -= 1
        self._bytes -= len(entry.message)

    def _finish(self, entry: _Entry) -> None:
        if entry.token is not None:
            self._finished.append(entry.token)
