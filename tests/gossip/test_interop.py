"""Mixed clusters: real Go memberlist nodes (gopeer) and vxnet nodes (``vxnet.gossip.node``).

Every node is a process bound to its own loopback address (127.0.0.11 and up; no root needed),
with memberlist's DefaultLANConfig on both sides.  Each case runs without and with a shared
16-byte key.  The Go side is built once per session against Debian's memberlist v0.2.2 sources;
these tests skip when Go or those sources are missing.  Every spawned process is killed by the
``cluster`` fixture, whatever happens.
"""

from __future__ import annotations

import queue
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.gossip.gopeer import GoNode, VxNode, build_gopeer_for_session, kill, running

KEY_A = bytes.fromhex("5a3b1c9d2e8f4a6b7c0d1e2f3a4b5c6d")
KEY_B = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
#: Typical detection: memberlist's suspicion timeout for a few nodes is 4 x max(1, log10 n) x
#: probe interval = 4 s once two other nodes confirm, plus the probe that raised the suspicion.
#: The median survivor must declare a crashed node dead within this (generous) bound ...
DETECTION_BOUND = 15.0
#: ... and every survivor within memberlist's worst case: with no confirmations the timeout is
#: SuspicionMaxTimeoutMult (6) x 4 s, plus a round of probes.  A survivor that misses the Dead
#: gossip (memberlist's gossip is probabilistic) falls back on its own suspicion timer.
DETECTION_WORST = 6 * 4.0 + 6.0
CONVERGE = 5.0
Event = dict[str, Any]
Kind = Literal["go", "vx"]


@pytest.fixture(scope="session")
def gopeer_binary(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gopeer_for_session(pytestconfig, tmp_path_factory)


def _free_port(ip: str) -> int:
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((ip, 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind((ip, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class Cluster:
    """Spawns Go and vxnet nodes on 127.0.0.11, .12, ...; remembers them all to kill them."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.nodes: list[GoNode] = []
        self.addrs: dict[str, str] = {}
        self._next_ip = 11

    def spawn(
        self,
        kind: Kind,
        name: str,
        *,
        keys: Sequence[bytes] = (),
        join: Sequence[GoNode] = (),
        ready: bool = True,
    ) -> GoNode:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        port = _free_port(ip)
        seeds = [self.addrs[n.name] for n in join]
        node: GoNode
        if kind == "go":
            node = GoNode(
                self.binary, name, ip, port, keys=keys, join=seeds, extra=["--log-events"]
            )
        else:
            node = VxNode(name, ip, port, keys=keys, join=seeds)
        self.nodes.append(node)
        self.addrs[name] = f"{ip}:{port}"
        if ready:
            event = node.wait_for(lambda e: e["event"] == "ready", timeout=15)
            assert event["joined"] == len(seeds), event
        return node

    def mixed(self, keys: Sequence[bytes], *, go_first: bool = True) -> list[GoNode]:
        """2 Go + 2 vxnet nodes, each joining through a node of the other kind."""
        kinds: list[Kind] = ["go", "vx", "go", "vx"] if go_first else ["vx", "go", "vx", "go"]
        counts = {"go": 0, "vx": 0}
        nodes: list[GoNode] = []
        for kind in kinds:
            counts[kind] += 1
            seed = nodes[-1:]
            nodes.append(self.spawn(kind, f"{kind}{counts[kind]}", keys=keys, join=seed))
        converge(nodes, {n.name for n in nodes})
        return nodes

    def close(self) -> None:
        for node in self.nodes:
            kill(node)
            node.stop()


@pytest.fixture
def cluster(gopeer_binary: Path) -> Iterator[Cluster]:
    c = Cluster(gopeer_binary)
    try:
        yield c
    finally:
        c.close()


KEYED = pytest.mark.parametrize("keys", [(), (KEY_A,)], ids=["plain", "keyed"])


# ------------------------------------------------------------------------------ helpers


def alive(event: Event) -> set[str]:
    return {m["node"] for m in event["members"] or () if m["state"] == "alive"}


def listed(event: Event) -> set[str]:
    return {m["node"] for m in event["members"] or ()}


def is_members(event: Event) -> bool:
    return bool(event["event"] == "members")


def converge(nodes: Sequence[GoNode], names: set[str], timeout: float = CONVERGE) -> None:
    """Every node prints a member list of exactly ``names``, all alive, within ``timeout``."""
    deadline = time.monotonic() + timeout
    pending = {n.name: n for n in nodes}
    last: dict[str, list[tuple[str, str]]] = {}
    while pending:
        for name, node in list(pending.items()):
            while True:
                try:
                    event = node.events.get_nowait()
                except queue.Empty:
                    break
                if not is_members(event):
                    continue
                last[name] = sorted((m["node"], m["state"]) for m in event["members"] or ())
                if alive(event) == listed(event) == names:
                    del pending[name]
                    break
        if pending and time.monotonic() > deadline:
            report = {name: last.get(name) for name in pending}
            raise AssertionError(f"not converged on {sorted(names)} in {timeout} s: {report}")
        time.sleep(0.02)


def watch_leaves(
    observers: Sequence[GoNode], gone: Sequence[str], since: float, timeout: float
) -> dict[tuple[str, str], tuple[float, Event]]:
    """(observer, gone node) -> the first ``leave`` event about it and when it came (seconds
    after ``since``).  Polls every queue together, so the times are not serialised."""
    found: dict[tuple[str, str], tuple[float, Event]] = {}
    wanted = {(o.name, g) for o in observers for g in gone}
    while wanted - found.keys():
        for node in observers:
            while True:
                try:
                    event = node.events.get_nowait()
                except queue.Empty:
                    break
                key = (node.name, event.get("node", ""))
                if event["event"] == "leave" and key in wanted and key not in found:
                    found[key] = (time.monotonic() - since, event)
        if time.monotonic() - since > timeout:
            raise AssertionError(f"no leave event within {timeout} s: {wanted - found.keys()}")
        time.sleep(0.02)
    return found


def drain(nodes: Sequence[GoNode], seconds: float) -> dict[str, list[Event]]:
    """Every event the nodes print during ``seconds``."""
    got: dict[str, list[Event]] = {n.name: [] for n in nodes}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for node in nodes:
            while True:
                try:
                    got[node.name].append(node.events.get_nowait())
                except queue.Empty:
                    break
        time.sleep(0.02)
    return got


def suspicion_evidence(name: str, events: list[Event]) -> list[str]:
    """Anything in a node's output saying someone was suspected, refuted or undecryptable."""
    out: list[str] = []
    for e in events:
        if e["event"] == "log" and any(w in e["line"] for w in ("Suspect", "Refuting", "failed")):
            out.append(f"{name}: {e['line']}")
        if not is_members(e):
            continue
        if any(m["state"] != "alive" for m in e["members"] or ()):
            out.append(f"{name}: {e['members']}")
        counters = e.get("memberlist", {})
        bad = {k: counters.get(k, 0) for k in ("suspicions_raised", "suspects", "refutations")}
        bad.update({k: v for k, v in e.get("service", {}).items() if k.startswith("drop_")})
        if any(bad.values()):
            out.append(f"{name}: {bad}")
    return out


# ------------------------------------------------------------------------------ join


@KEYED
@pytest.mark.parametrize("go_first", [True, False], ids=["go-seed", "vx-seed"])
def test_mixed_cluster_converges(cluster: Cluster, keys: tuple[bytes, ...], go_first: bool) -> None:
    nodes = cluster.mixed(keys, go_first=go_first)  # asserts convergence within CONVERGE
    # ... and stays converged: a second round of member lists still shows all four alive.
    converge(nodes, {n.name for n in nodes}, timeout=3)


# ------------------------------------------------------------------------------ failure


@KEYED
def test_crash_is_detected_both_ways(
    cluster: Cluster, keys: tuple[bytes, ...], record_property: Callable[[str, object], None]
) -> None:
    """In a 3 + 3 cluster, SIGKILL a vxnet node, then a Go node: the survivors (two of each
    kind) declare each dead -- not left -- within the suspicion bound.  One at a time: with
    two dead at once, indirect probes through the other dead node raise Lifeguard's awareness
    and slow every probe, which is memberlist's behaviour but not what is measured here.
    Each node joins through all the earlier ones: with six nodes, gossip reaches three of five
    peers a round, and a node that misses a newcomer's alive (Go does too, in a Go-only
    cluster) only learns it at the next push/pull, up to 30 s later."""
    nodes: list[GoNode] = []
    kinds: list[Kind] = ["go", "vx", "vx", "go", "go", "vx"]
    for i, kind in enumerate(kinds):
        nodes.append(cluster.spawn(kind, f"{kind}{i}", keys=keys, join=nodes))
    converge(nodes, {n.name for n in nodes})
    survivors = nodes[:4]
    times: dict[str, float] = {}
    for victim in (nodes[5], nodes[4]):  # vx5, then go4
        t0 = time.monotonic()
        kill(victim)
        seen = watch_leaves(survivors, [victim.name], t0, DETECTION_WORST)
        for (observer, _), (after, event) in sorted(seen.items()):
            assert event["state"] == "dead", event
            times[f"{observer} sees {victim.name} dead"] = round(after, 2)
        median = statistics.median(after for after, _ in seen.values())
        assert median <= DETECTION_BOUND, (victim.name, times)
    record_property("detection_seconds", times)
    print(f"\ndetection times ({'keyed' if keys else 'plain'}): {times}")
    converge(survivors, {n.name for n in survivors}, timeout=3)


# ------------------------------------------------------------------------------ leave


@KEYED
def test_graceful_leave_is_left_not_dead(cluster: Cluster, keys: tuple[bytes, ...]) -> None:
    go1, vx1, go2, vx2 = cluster.mixed(keys)
    t0 = time.monotonic()
    assert vx2.stop() == 0
    seen = watch_leaves([go1, go2, vx1], ["vx2"], t0, 5)
    assert {e["state"] for _, e in seen.values()} == {"left"}, seen
    t0 = time.monotonic()
    assert go2.stop() == 0
    seen = watch_leaves([go1, vx1], ["go2"], t0, 5)
    assert {e["state"] for _, e in seen.values()} == {"left"}, seen
    converge([go1, vx1], {"go1", "vx1"}, timeout=3)


# ------------------------------------------------------------------------------ keys


@KEYED
def test_wrong_key_never_joins(cluster: Cluster, keys: tuple[bytes, ...]) -> None:
    """Intruders whose keys do not match (another key, no key, or a key for a plain cluster)
    find no one and are found by no one; the cluster stays as it was."""
    members = cluster.mixed(keys)
    wrong: list[tuple[Kind, tuple[bytes, ...]]] = (
        [("vx", (KEY_B,)), ("go", (KEY_B,)), ("vx", ()), ("go", ())]
        if keys
        else [("vx", (KEY_A,)), ("go", (KEY_A,))]
    )
    intruders = []
    for i, (kind, their_keys) in enumerate(wrong):
        seed = members[i % len(members)]
        node = cluster.spawn(kind, f"bad-{kind}{i}", keys=their_keys, join=[seed], ready=False)
        intruders.append(node)
    for node in intruders:
        assert node.wait_for(lambda e: e["event"] == "ready", timeout=15)["joined"] == 0
    seen = drain([*members, *intruders], 5.0)
    names = {n.name for n in members}
    bad = {n.name for n in intruders}
    for member in members:
        events = seen[member.name]
        assert not [e for e in events if e.get("node") in bad], member.name
        lists = [e for e in events if is_members(e)]
        assert lists, member.name
        assert all(listed(e) == alive(e) == names for e in lists), (member.name, lists)
    for node in intruders:
        lists = [e for e in seen[node.name] if is_members(e)]
        assert lists and all(listed(e) == {node.name} for e in lists), (node.name, lists)
    # The vxnet members that were seeds refused the intruders' streams, and counted it.
    seeds = {members[i % len(members)].name for i in range(len(wrong))}
    for member in members:
        last = [e for e in seen[member.name] if is_members(e)][-1]
        if "service" in last and member.name in seeds:
            assert any(k.startswith("drop_tcp_") for k in last["service"]), last["service"]


def test_key_rotation_across_the_mix(cluster: Cluster) -> None:
    """Docker's order: install B everywhere, make B primary everywhere, remove A everywhere.
    Nobody is ever suspected, nothing fails to decrypt, and B alone is then enough to join."""
    nodes = cluster.mixed((KEY_A,))
    names = {n.name for n in nodes}
    outputs: dict[str, list[Event]] = {n.name: [] for n in nodes}
    for op, key in (("install_key", KEY_B), ("use_key", KEY_B), ("remove_key", KEY_A)):
        for node in nodes:
            node.command(op, key=key.hex())
        for name, events in drain(nodes, 2.5).items():  # every line, the acks included
            acks = [e for e in events if e["event"] in ("keys", "error")]
            assert [e["event"] for e in acks] == ["keys"], (name, op, acks)
            outputs[name] += events
    for node in nodes:
        assert [e["keys"] for e in outputs[node.name] if e["event"] == "keys"][-1] == [KEY_B.hex()]
    evidence = [line for n in nodes for line in suspicion_evidence(n.name, outputs[n.name])]
    assert not evidence, evidence
    late = cluster.spawn("vx", "vx-late", keys=(KEY_B,), join=nodes)  # each one accepts B
    converge([*nodes, late], {*names, "vx-late"})


def test_rotation_check_notices_a_node_without_the_new_key(cluster: Cluster) -> None:
    """A control for the test above: when two nodes switch to B that the other two never got,
    the evidence it looks for shows up on both kinds of node."""
    nodes = cluster.mixed((KEY_A,))
    for node in nodes[:2]:
        node.command("install_key", key=KEY_B.hex())
        node.command("use_key", key=KEY_B.hex())
    seen = drain(nodes, 3.0)
    for node in nodes[2:]:
        assert suspicion_evidence(node.name, seen[node.name]), node.name


# ------------------------------------------------------------------------------ user messages


@KEYED
def test_user_messages_both_ways(cluster: Cluster, keys: tuple[bytes, ...]) -> None:
    go = cluster.spawn("go", "go1", keys=keys)
    vx = cluster.spawn("vx", "vx1", keys=keys, join=[go])
    converge([go, vx], {"go1", "vx1"})
    for sender, receiver in ((go, vx), (vx, go)):
        sender.send(receiver.name, b"\x01best-effort", reliable=False)
        sender.send(receiver.name, b"\x02reliable", reliable=True)
        got = {receiver.wait_for(lambda e: e["event"] == "msg")["data"] for _ in range(2)}
        assert got == {b"\x01best-effort".hex(), b"\x02reliable".hex()}, sender.name
    assert running(go) and running(vx)
