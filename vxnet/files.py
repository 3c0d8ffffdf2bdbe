"""Private files: state, keys and certificates, written atomically and never readable by others."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """Replace ``path`` atomically with ``data``; the file is mode 0600 from its first byte."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when a stale .tmp existed with other bits
        os.write(fd, raw)
    finally:
        os.close(fd)
    tmp.replace(path)
