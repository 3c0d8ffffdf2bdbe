"""The project's error types.

Two sides, as h11 does it:

* :class:`BadPacket` -- the *peer* (or the wire) sent bytes we cannot accept.  Every decoder of
  network bytes either returns a value or raises this, with a short machine-friendly ``reason``
  that the dataplane uses as a drop-counter key.
* :class:`UsageError` -- *you* (a caller, a CLI user, a lab file) asked for something invalid.
  Its message says what to do instead.

Everything the user can see derives from :class:`VxnetError`.
"""

from __future__ import annotations


class VxnetError(Exception):
    """Base class of every error vxnet raises on purpose."""


class BadPacket(VxnetError):
    """Network bytes that cannot be decoded.  ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class UsageError(VxnetError):
    """A caller asked for something invalid; the message says how to fix it."""


class NotFound(UsageError):
    """A named object (lab, host, container, network) does not exist."""


class Conflict(UsageError):
    """The request clashes with existing state (name taken, subnet overlaps, ...)."""


class LabError(VxnetError):
    """Building or tearing down a lab failed (kernel refused, a daemon did not start)."""
