"""The dataplane thread itself: a bug in one batch is counted and survived (root: raw socket)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from vxnet.dataplane.engine import Dataplane

pytestmark = pytest.mark.root


def test_an_unexpected_error_is_counted_and_the_thread_goes_on(monkeypatch: Any) -> None:
    dp = Dataplane("127.0.0.1", 47891)
    calls: list[bytes] = []

    def buggy(data: memoryview, src: Any) -> None:
        calls.append(bytes(data))
        if len(calls) == 1:
            raise RuntimeError("a bug")

    monkeypatch.setattr(dp.switch, "from_underlay", buggy)
    dp.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"first", ("127.0.0.1", 47891))
            deadline = time.monotonic() + 5
            while (
                not dp.switch.counters.drops.get("internal_error") and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            s.sendto(b"second", ("127.0.0.1", 47891))
            while len(calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert dp.switch.counters.drops["internal_error"] == 1
        assert calls == [b"first", b"second"]  # the thread survived the bug
        assert dp._thread is not None and dp._thread.is_alive()
    finally:
        dp.close()


def test_the_loop_ticks_the_switch_about_once_a_second(monkeypatch: Any) -> None:
    """Connection-table expiry needs a clock: the loop reads time.monotonic, the switch doesn't."""
    dp = Dataplane("127.0.0.1", 47892)
    ticks: list[float] = []
    monkeypatch.setattr(dp.switch, "tick", ticks.append)
    dp.start()
    try:
        deadline = time.monotonic() + 5
        while len(ticks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ticks) >= 2 and 0.9 <= ticks[1] - ticks[0] <= 2.5
        assert dp.lb_table() == [] and dp.conntrack() == []
    finally:
        dp.close()


@pytest.mark.parametrize("setting", ["1", "0", ""])
def test_the_thread_runs_real_time_only_when_asked(monkeypatch: Any, setting: str) -> None:
    """SCHED_FIFO like the kernel's softirqs, only when asked (VXNET_DATAPLANE_RT=1)."""
    if setting:
        monkeypatch.setenv("VXNET_DATAPLANE_RT", setting)
    else:
        monkeypatch.delenv("VXNET_DATAPLANE_RT", raising=False)  # the default: off
    dp = Dataplane("127.0.0.1", 47893)
    dp.start()
    try:
        deadline = time.monotonic() + 5
        while dp._thread is not None and dp._thread.native_id is None:
            time.sleep(0.01)
        assert dp._thread is not None and dp._thread.native_id is not None
        while time.monotonic() < deadline and dp.stats()["realtime"] != (setting == "1"):
            time.sleep(0.01)
        policy = os.sched_getscheduler(dp._thread.native_id)
        assert dp.stats()["realtime"] is (setting == "1")
        assert policy == (os.SCHED_FIFO if setting == "1" else os.SCHED_OTHER)
    finally:
        dp.close()
