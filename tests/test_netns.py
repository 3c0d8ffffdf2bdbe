"""Namespaces as vxnet makes them: IPv4 only from birth, sysctls set without forking (root)."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vxnet import netns

pytestmark = pytest.mark.root


@pytest.fixture
def ns() -> Iterator[str]:
    name = "vxtest" + secrets.token_hex(4)
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def read_sysctl(ns: str, key: str) -> str:
    argv = netns.exec_argv(ns, ["sysctl", "-n", key])
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def test_a_new_namespace_has_ipv6_off_for_links_made_later_too(ns: str) -> None:
    # a link with IPv6 on sends router solicitations and MLD reports the moment it is up:
    # noise in every capture of the lab (a trace test once caught one as "icmp")
    root_default = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text()
    netns.add_veth(ns, "va", ns, "vb")
    for key in ("all", "default", "va", "vb"):
        assert read_sysctl(ns, f"net.ipv6.conf.{key}.disable_ipv6") == "1", key
    assert Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text() == root_default


def test_sysctl_from_a_thread_does_not_fork(ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon is threaded (trio, its worker threads, the dataplane): a forked child can
    # deadlock on a lock another thread held at fork time, and the parent waits for it forever.
    # So sysctls are written by the calling thread visiting the namespace, never by a child.
    def no_fork() -> int:
        raise AssertionError("os.fork called")

    monkeypatch.setattr(os, "fork", no_fork)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            netns.sysctl(ns, "net.ipv4.ip_forward", "1")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert not t.is_alive() and errors == []
    assert read_sysctl(ns, "net.ipv4.ip_forward") == "1"
