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
import math
from collections.abc import Callable
from dataclasses import dataclass, field

_BIG = 1 << 63


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


class TransmitLimitedQueue:
    """Broadcasts waiting to be piggybacked, ordered as memberlist's btree orders them."""

    def __init__(self, retransmit_mult: int, num_nodes: Callable[[], int]) -> None:
        self.retransmit_mult = retransmit_mult
        self._num_nodes = num_nodes
        self._tiers: dict[int, list[_Entry]] = {}  # transmits -> entries sorted by key()
        self._named: dict[str, _Entry] = {}
        self._id = 0
        self._len = 0
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
        used = 0
        out: list[bytes] = []
        reinsert: list[_Entry] = []
        transmits, top = min(self._tiers), max(self._tiers)
        while transmits <= top:
            free = limit - used - overhead
            if free <= 0:
                break
            entry = self._largest_fitting(transmits, free)
            if entry is None:
                transmits += 1
                continue
            used += overhead + len(entry.message)
            out.append(entry.message)
            self._delete(entry)
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
        return [(e.transmits, e.message) for t in sorted(self._tiers) for e in self._tiers[t]]

    def reset(self) -> None:
        for tier in self._tiers.values():
            for entry in tier:
                self._finish(entry)
        self._tiers.clear()
        self._named.clear()
        self._len = 0

    def prune(self, max_retain: int) -> None:
        """Drop the most-transmitted broadcasts until at most ``max_retain`` remain."""
        while self._len > max_retain:
            tier = self._tiers[max(self._tiers)]
            entry = tier[-1]
            self._delete(entry)
            self._finish(entry)

    # ------------------------------------------------------------------ internals

    def _largest_fitting(self, transmits: int, free: int) -> _Entry | None:
        tier = self._tiers.get(transmits)
        if not tier:
            return None
        i = bisect.bisect_left(tier, (-free, -_BIG), key=_Entry.key)
        return tier[i] if i < len(tier) else None

    def _add(self, entry: _Entry) -> None:
        tier = self._tiers.setdefault(entry.transmits, [])
        bisect.insort(tier, entry, key=_Entry.key)
        if entry.name is not None:
            self._named[entry.name] = entry
        self._len += 1

    def _delete(self, entry: _Entry) -> None:
        tier = self._tiers[entry.transmits]
        i = bisect.bisect_left(tier, entry.key(), key=_Entry.key)
        while tier[i] is not entry:
            i += 1
        del tier[i]
        if not tier:
            del self._tiers[entry.transmits]
        if entry.name is not None and self._named.get(entry.name) is entry:
            del self._named[entry.name]
        self._len -= 1

    def _finish(self, entry: _Entry) -> None:
        if entry.token is not None:
            self._finished.append(entry.token)
