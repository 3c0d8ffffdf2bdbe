"""The suspicion timer of Lifeguard (memberlist ``suspicion.go``), without a clock.

A suspected node is declared dead when its timer expires.  The timer starts at ``max`` and
shrinks towards ``min`` as *independent* confirmations arrive (suspect messages from other
nodes), following ``max - log(n + 1) / log(k + 1) * (max - min)``: with ``k`` confirmations
it reaches ``min``.  A timer that expects no confirmations (``k < 1``) simply runs for ``min``.
"""

from __future__ import annotations

import math


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """``suspicionTimeout``: ``mult * max(1, log10(n)) * interval``, with Go's millisecond cut."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    # Go: Duration(mult) * Duration(nodeScale*1000) * interval / 1000 (integer truncation).
    return suspicion_mult * math.trunc(node_scale * 1000) * interval / 1000


def remaining_suspicion_time(n: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """``remainingSuspicionTime``: time left after ``n`` of ``k`` confirmations (may be < 0)."""
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = hi - frac * (hi - lo)
    timeout = math.floor(1000.0 * raw) / 1000.0  # Go truncates to whole milliseconds
    return max(timeout, lo) - elapsed


class Suspicion:
    """One suspected node's timer: ``deadline`` moves earlier with each new confirmation."""

    __slots__ = ("confirmations", "deadline", "k", "max_timeout", "min_timeout", "n", "start")

    def __init__(
        self, from_: str, k: int, min_timeout: float, max_timeout: float, now: float
    ) -> None:
        self.k = k
        self.n = 0
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.confirmations = {from_}
        self.start = now
        self.deadline = now + (max_timeout if k >= 1 else min_timeout)

    def confirm(self, from_: str, now: float) -> bool:
        """Count a confirmation from ``from_``; ``True`` if it was new (then re-gossip it)."""
        if self.n >= self.k or from_ in self.confirmations:
            return False
        self.confirmations.add(from_)
        self.n += 1
        remaining = remaining_suspicion_time(
            self.n, self.k, now - self.start, self.min_timeout, self.max_timeout
        )
        self.deadline = now + max(remaining, 0.0)
        return True

    def expired(self, now: float) -> bool:
        return now >= self.deadline
