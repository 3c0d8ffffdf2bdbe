"""Lifeguard's local health awareness (memberlist ``awareness.go``).

A node that misses nacks, has to refute suspicions about itself, or fails probes for lack of
helpers is probably the slow one.  Its score rises, which stretches its probe interval and its
probe deadline, so it accuses others less while it is unwell.  Successful probes bring it down.
"""

from __future__ import annotations


class Awareness:
    """A score in ``[0, max_multiplier - 1]``; timeouts are multiplied by ``score + 1``."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """``GetHealthScore``: 0 is healthy."""
        return self._score

    def apply_delta(self, delta: int) -> int:
        """``ApplyDelta``: move the score, clamped to its range; returns the new score."""
        self._score = min(max(self._score + delta, 0), self._max - 1)
        return self._score

    def scale_timeout(self, timeout: float) -> float:
        """``ScaleTimeout``: ``timeout * (score + 1)``."""
        return timeout * (self._score + 1)
