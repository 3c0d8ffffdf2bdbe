"""Shared fixtures.  Root tests build labs with unique names and always tear them down."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import warnings
from collections.abc import Iterator

import pytest

from vxnet.lab import Lab, builder

# When a hypothesis test fails, its pytest plugin imports libcst to write a patch file, and libcst
# trips a DeprecationWarning inside mypy_extensions.  With warnings as errors, the real failure
# report would turn into an INTERNALERROR.  Import it once here with only that warning silenced.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.filterwarnings("ignore", "mypy_extensions.TypedDict is deprecated", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401


def _scapy_never_resolves() -> None:
    """Scapy fills an ``Ether()`` without ``dst`` by resolving the IP destination: it sends an
    ARP request out of the machine's default interface (in promiscuous mode).  Tests never
    touch the machine's own interfaces, so resolution is off: such frames get the broadcast
    address, with no packet sent."""
    try:
        import scapy.layers.l2  # noqa: F401  (creates conf.neighbor)
        from scapy.config import conf
    except ImportError:  # scapy is the optional `trace` extra
        return
    conf.neighbor.resolve = lambda l2, l3: None


_scapy_never_resolves()


def _can_build_labs() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, /dev/net/tun)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _can_build_labs()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def unique_lab_name(prefix: str = "t") -> str:
    return prefix + secrets.token_hex(3)


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (`.ci/install` installs them)")


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    """A 3-host lab shared by a module's tests; removed even when a test fails."""
    name = unique_lab_name()
    lab = Lab(hosts=3, name=name)
    try:
        yield lab
    finally:
        lab.down()
        assert not builder.run_dir(name).exists()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}
