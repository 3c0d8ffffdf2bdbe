"""The manager's timers under trio's MockClock: key rotation and heartbeat expiry, virtually."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from vxnet.manager import pki
from vxnet.manager import services as svcs
from vxnet.manager.cluster import HEARTBEAT_GRACE, HEARTBEAT_PERIOD, Cluster
from vxnet.manager.keys import KEYRING_SIZE, SUBSYSTEMS
from vxnet.manager.server import Manager
from vxnet.manager.store import Store

# A whole second, so BASE plus multiples of the half-second timer step stay exact floats.  Near
# the real time because the manager's TLS certificate is issued at BASE.
BASE = float(int(time.time()))
ROTATION = 60.0
HOURS = 12


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "m.db") as s:
        yield s


def new_cluster(store: Store, rotation: float = ROTATION) -> Cluster:
    return Cluster.initialize(
        store,
        random.Random(3),
        BASE,
        hostname="mgr",
        advertise_addr="127.0.0.1",
        data_path_addr="127.0.0.1",
        rotation_interval=rotation,
    )


def virtual_clock() -> Callable[[], float]:
    return lambda: BASE + trio.current_time()


def new_manager(cluster: Cluster) -> Manager:
    """As ``swarm init`` does it: a new node key, a manager certificate from the cluster."""
    key = pki.new_node_key()
    issued = cluster.issue("manager", pki.make_csr(key), "mgr", "127.0.0.1", "127.0.0.1", BASE)
    return Manager(cluster, issued.cert_pem, key, clock=virtual_clock())


def ring_tags(cluster: Cluster) -> dict[str, list[int]]:
    return {s: [k.tag for k in cluster.keys.keys_for(s)] for s in SUBSYSTEMS}


def test_twelve_hours_of_key_rotation(store: Store, tmp_path: Path) -> None:
    cluster = new_cluster(store)
    manager = new_manager(cluster)
    start_clock = cluster.keys.lamport_clock
    start_rings = ring_tags(cluster)
    checks = 0

    async def main() -> None:
        nonlocal checks
        sessions = manager.sessions
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager._timers)
            # Look half-way between rotations (which fall on multiples of ROTATION).
            await trio.sleep(ROTATION / 2)
            previous = ring_tags(cluster)
            for k in range(1, int(HOURS * 3600 / ROTATION) + 1):
                await trio.sleep(ROTATION)
                rings = ring_tags(cluster)
                # k rotations so far, each allocating one key per subsystem on one Lamport clock.
                assert cluster.keys.lamport_clock == start_clock + k * len(SUBSYSTEMS)
                for subsystem, ring in rings.items():
                    assert len(ring) == KEYRING_SIZE
                    assert ring[:2] == previous[subsystem][1:]  # oldest dropped, one appended
                    assert ring[2] > ring[1]
                previous = rings
                checks += 1
            assert manager.sessions is sessions
            assert sessions == {}
            nursery.cancel_scope.cancel()

    started = time.perf_counter()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    elapsed = time.perf_counter() - started
    rotations = int(HOURS * 3600 / ROTATION)
    assert checks == rotations == 720
    end_rings = ring_tags(cluster)
    end_clock = cluster.keys.lamport_clock
    assert end_clock == start_clock + rotations * len(SUBSYSTEMS)
    for subsystem in SUBSYSTEMS:
        # Each rotation gives every ring one key; both rings share one Lamport clock, so each
        # subsystem's newest tag advanced by 2 per rotation (~1440 tags for 720 rotations).
        assert end_rings[subsystem][2] - start_rings[subsystem][2] in (
            rotations * len(SUBSYSTEMS),
            rotations * len(SUBSYSTEMS) + KEYRING_SIZE - 1,
        )
        assert len(cluster.keys.keys_for(subsystem)) == KEYRING_SIZE
        oldest, middle, newest = end_rings[subsystem]
        assert (middle - oldest, newest - middle) == (2, 2)
    assert sorted(ring[2] for ring in end_rings.values()) == [end_clock - 1, end_clock]
    assert cluster.keys.last_rotation == BASE + HOURS * 3600
    assert cluster.keys.next_deadline() == BASE + HOURS * 3600 + ROTATION
    # Every rotation was saved: a manager restarted from the file resumes from the same keys.
    with Store.open(tmp_path / "m.db") as again:
        reopened = Cluster(again, random.Random(99))
        assert reopened.keys_json() == cluster.keys_json()
        assert reopened.keys.next_deadline() == cluster.keys.next_deadline()
    print(f"{HOURS} h of virtual time, {rotations} rotations: {elapsed:.2f} s real")
    assert elapsed < 20, f"{HOURS} h of virtual time took {elapsed:.1f} s"


def test_default_interval_rotates_once_in_twelve_hours(store: Store) -> None:
    cluster = new_cluster(store, rotation=12 * 3600.0)
    manager = new_manager(cluster)
    start_clock = cluster.keys.lamport_clock

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager._timers)
            await trio.sleep(12 * 3600 - 1)
            assert cluster.keys.lamport_clock == start_clock
            await trio.sleep(1.25)
            assert cluster.keys.lamport_clock == start_clock + len(SUBSYSTEMS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_silent_node_goes_down_after_three_seconds(store: Store) -> None:
    cluster = new_cluster(store, rotation=12 * 3600.0)
    manager = new_manager(cluster)
    csr = pki.make_csr(pki.new_node_key())
    tags = ring_tags(cluster)
    seen: dict[str, float] = {}

    async def main() -> None:
        now = manager.clock()
        silent = cluster.issue("worker", csr, "silent", "10.1.0.1", "10.1.0.1", now).node_id
        alive = cluster.issue("worker", csr, "alive", "10.1.0.2", "10.1.0.2", now).node_id
        cluster.hello(silent, now, {})
        cluster.hello(alive, now, {})
        svcs.create_service(cluster, now, name="web", image="whoami", replicas=2)
        assert {t["node_id"] for t in cluster.store.list("task")} == {silent, alive}
        sessions = manager.sessions
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager._timers)
            # Poll between the timer's half-second ticks; the live node beats every second.
            await trio.sleep(0.25)
            while trio.current_time() < 10:
                if trio.current_time() % HEARTBEAT_PERIOD < 0.5:
                    assert cluster.heartbeat(alive, manager.clock()) is False
                status = cluster.node(silent)["status"]
                if status == "down" and "down" not in seen:
                    seen["down"] = trio.current_time()
                    seen["tasks_moved"] = float(
                        {t["node_id"] for t in cluster.store.list("task")} == {alive}
                    )
                await trio.sleep(0.5)
            assert cluster.node(alive)["status"] == "ready"
            assert manager.sessions is sessions
            assert sessions == {}
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    limit = HEARTBEAT_PERIOD * HEARTBEAT_GRACE
    # Marked down at the first timer tick strictly after 3 s (3.5 s), seen at the next poll.
    assert limit < seen["down"] <= limit + HEARTBEAT_PERIOD / 2 + 0.25
    assert seen["tasks_moved"] == 1.0  # the timer reconciled: both tasks run on the live node
    web = svcs.tasks_of(cluster, svcs.find_service(cluster, "web")["id"])
    assert sorted(t["slot"] for t in web) == [1, 2]
    assert ring_tags(cluster) == tags  # no rotation due in 10 s
