"""Private files are 0600 from their first byte and replaced atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vxnet.files import write_private


def test_write_private_creates_0600_and_replaces(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        target = tmp_path / "node.key"
        stale = tmp_path / "node.key.tmp"
        stale.write_text("stale")
        stale.chmod(0o666)
        write_private(target, b"secret")
        assert target.read_bytes() == b"secret"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert not stale.exists()
        write_private(target, "second")
        assert target.read_text() == "second"
    finally:
        os.umask(old_umask)
