"""Replicated and global placement: swarm's spread, rescheduling, scaling, and their invariants."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vxnet.errors import UsageError
from vxnet.manager.scheduler import (
    ACTIVE,
    DRAIN,
    GLOBAL_SLOT,
    PAUSE,
    RUNNING,
    SHUTDOWN,
    NodeView,
    Plan,
    TaskView,
    plan_global,
    plan_replicated,
)


def node(node_id: str, ready: bool = True, availability: str = ACTIVE) -> NodeView:
    return NodeView(node_id, f"host-{node_id}", ready, availability)


def task(
    task_id: str, slot: int, node_id: str, service_id: str = "web", desired: str = RUNNING
) -> TaskView:
    return TaskView(task_id, service_id, slot, node_id, desired)


_ids = itertools.count()


def apply(service_id: str, plan: Plan, tasks: Iterable[TaskView]) -> list[TaskView]:
    """The running tasks after the manager records ``plan``."""
    stopped = set(plan.stop)
    after = [t for t in tasks if t.desired == RUNNING and t.task_id not in stopped]
    after += [task(f"new{next(_ids)}", s, n, service_id) for s, n in plan.start]
    return after


# -- records ----------------------------------------------------------------------------------


def test_records_validate_their_states() -> None:
    with pytest.raises(UsageError, match="availability 'paused'"):
        node("a", availability="paused")
    with pytest.raises(UsageError, match="desired state 'ready'"):
        task("t", 1, "a", desired="ready")


def test_plan_empty() -> None:
    assert Plan().empty
    assert not Plan(pending=(1,)).empty


# -- replicated -------------------------------------------------------------------------------


def test_new_service_spreads_over_nodes_in_id_order() -> None:
    plan = plan_replicated("web", 5, [node("c"), node("a"), node("b")], [])
    assert plan == Plan(start=((1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")))


def test_spread_prefers_nodes_with_fewer_tasks_overall() -> None:
    busy = [task("o1", 1, "a", "db"), task("o2", 2, "a", "db"), task("o3", 3, "b", "db")]
    plan = plan_replicated("web", 3, [node("a"), node("b"), node("c")], busy)
    assert plan.start == ((1, "c"), (2, "b"), (3, "a"))


def test_spread_counts_this_service_first() -> None:
    tasks = [task("w1", 1, "a"), task("o1", 1, "b", "db"), task("o2", 2, "b", "db")]
    plan = plan_replicated("web", 2, [node("a"), node("b")], tasks)
    assert plan.start == ((2, "b"),)


def test_steady_state_plans_nothing() -> None:
    tasks = [task("t1", 1, "a"), task("t2", 2, "b")]
    assert plan_replicated("web", 2, [node("a"), node("b")], tasks).empty


def test_scale_down_stops_the_highest_slots() -> None:
    tasks = [task(f"t{i}", i, "ab"[i % 2]) for i in range(1, 6)]
    plan = plan_replicated("web", 2, [node("a"), node("b")], tasks)
    assert plan == Plan(stop=("t3", "t4", "t5"))


def test_scale_to_zero() -> None:
    plan = plan_replicated("web", 0, [node("a")], [task("t1", 1, "a")])
    assert plan == Plan(stop=("t1",))


def test_down_node_tasks_are_rescheduled() -> None:
    tasks = [task("t1", 1, "a"), task("t2", 2, "b"), task("t3", 3, "c")]
    plan = plan_replicated("web", 3, [node("a"), node("b", ready=False), node("c")], tasks)
    assert plan == Plan(start=((2, "a"),), stop=("t2",))


def test_drained_node_tasks_are_rescheduled_but_paused_ones_stay() -> None:
    tasks = [task("t1", 1, "a"), task("t2", 2, "b"), task("t3", 3, "c")]
    nodes = [node("a", availability=DRAIN), node("b", availability=PAUSE), node("c")]
    plan = plan_replicated("web", 3, nodes, tasks)
    assert plan == Plan(start=((1, "c"),), stop=("t1",))


def test_paused_nodes_get_no_new_tasks() -> None:
    plan = plan_replicated("web", 2, [node("a", availability=PAUSE), node("b")], [])
    assert plan.start == ((1, "b"), (2, "b"))


def test_tasks_on_unknown_nodes_are_rescheduled() -> None:
    plan = plan_replicated("web", 1, [node("a")], [task("t1", 1, "gone")])
    assert plan == Plan(start=((1, "a"),), stop=("t1",))


def test_no_eligible_node_leaves_slots_pending() -> None:
    nodes = [node("a", ready=False), node("b", availability=DRAIN), node("c", availability=PAUSE)]
    plan = plan_replicated("web", 3, nodes, [task("t1", 1, "a")])
    assert plan == Plan(stop=("t1",), pending=(1, 2, 3))
    assert plan_replicated("web", 2, [], []) == Plan(pending=(1, 2))


def test_duplicate_slots_and_global_leftovers_are_stopped() -> None:
    tasks = [task("t2", 1, "a"), task("t1", 1, "b"), task("g", GLOBAL_SLOT, "a")]
    plan = plan_replicated("web", 1, [node("a"), node("b")], tasks)
    assert plan == Plan(stop=("g", "t2"))


def test_shutdown_tasks_and_other_services_are_left_alone() -> None:
    tasks = [task("old", 1, "a", desired=SHUTDOWN), task("db1", 1, "a", "db")]
    plan = plan_replicated("web", 1, [node("a")], tasks)
    assert plan == Plan(start=((1, "a"),))


def test_negative_replicas_refused() -> None:
    with pytest.raises(UsageError, match="replicas"):
        plan_replicated("web", -1, [node("a")], [])


def test_duplicate_node_ids_refused() -> None:
    with pytest.raises(UsageError, match="twice"):
        plan_replicated("web", 1, [node("a"), node("a")], [])


# -- global -----------------------------------------------------------------------------------


def test_global_one_task_per_active_node() -> None:
    nodes = [node("b"), node("a"), node("c", ready=False), node("d", availability=DRAIN)]
    plan = plan_global("agent", nodes, [])
    assert plan == Plan(start=((GLOBAL_SLOT, "a"), (GLOBAL_SLOT, "b")))


def test_global_stops_tasks_on_ineligible_nodes_and_extras() -> None:
    nodes = [node("a"), node("b", availability=DRAIN), node("c", availability=PAUSE)]
    tasks = [
        task("t1", 0, "a", "agent"),
        task("t0", 0, "a", "agent"),
        task("t2", 0, "b", "agent"),
        task("t3", 0, "c", "agent"),
        task("t4", 0, "gone", "agent"),
        task("t5", 3, "c", "agent"),
    ]
    plan = plan_global("agent", nodes, tasks)
    assert plan == Plan(stop=("t1", "t2", "t4", "t5"))


def test_global_new_node_gets_a_task() -> None:
    tasks = [task("t1", 0, "a", "agent")]
    plan = plan_global("agent", [node("a"), node("b")], tasks)
    assert plan == Plan(start=((GLOBAL_SLOT, "b"),))


# -- properties -------------------------------------------------------------------------------

node_ids = [f"n{i}" for i in range(6)]

nodes_strategy = st.lists(
    st.builds(
        NodeView,
        node_id=st.sampled_from(node_ids),
        hostname=st.just("h"),
        ready=st.booleans(),
        availability=st.sampled_from([ACTIVE, ACTIVE, PAUSE, DRAIN]),
    ),
    max_size=6,
    unique_by=lambda n: n.node_id,
)


@st.composite
def tasks_strategy(draw: st.DrawFn, service_id: str) -> list[TaskView]:
    raw = draw(
        st.lists(
            st.tuples(
                st.sampled_from([service_id, service_id, "other"]),
                st.integers(0, 8),
                st.sampled_from([*node_ids, "gone"]),
                st.sampled_from([RUNNING, RUNNING, SHUTDOWN]),
            ),
            max_size=20,
        )
    )
    return [TaskView(f"t{i:02}", s, slot, n, d) for i, (s, slot, n, d) in enumerate(raw)]


def _by_id(nodes: Sequence[NodeView]) -> dict[str, NodeView]:
    return {n.node_id: n for n in nodes}


@settings(max_examples=300, deadline=None)
@given(
    nodes=nodes_strategy, tasks=tasks_strategy("web"), replicas=st.integers(0, 10), data=st.data()
)
def test_replicated_plan_reaches_one_task_per_slot(
    nodes: list[NodeView], tasks: list[TaskView], replicas: int, data: st.DataObject
) -> None:
    plan = plan_replicated("web", replicas, nodes, tasks)
    by_id = _by_id(nodes)
    running = {t.task_id for t in tasks if t.desired == RUNNING}
    assert set(plan.stop) <= running
    assert not any(t.service_id != "web" for t in tasks if t.task_id in plan.stop)
    after = [t for t in apply("web", plan, tasks) if t.service_id == "web"]
    if any(n.accepts_tasks for n in nodes):
        assert plan.pending == ()
        assert sorted(t.slot for t in after) == list(range(1, replicas + 1))
        assert all(by_id[t.node_id].keeps_tasks for t in after)
        assert all(by_id[n].accepts_tasks for _, n in plan.start)
    else:
        assert plan.start == ()
        kept = {t.slot for t in after}
        assert sorted(kept | set(plan.pending)) == list(range(1, replicas + 1))
    assert plan == plan_replicated("web", replicas, list(reversed(nodes)), list(reversed(tasks)))
    if not plan.pending:
        assert plan_replicated("web", replicas, nodes, apply("web", plan, tasks)).empty


def _spread_of(service_id: str, nodes: Sequence[NodeView], tasks: Iterable[TaskView]) -> int:
    load = Counter(t.node_id for t in tasks if t.service_id == service_id)
    counts = [load[n.node_id] for n in nodes]
    return max(counts) - min(counts)


@settings(max_examples=200, deadline=None)
@given(node_count=st.integers(1, 7), steps=st.lists(st.integers(0, 25), min_size=1, max_size=5))
def test_spread_stays_within_one_while_scaling(node_count: int, steps: list[int]) -> None:
    nodes = [node(f"n{i}") for i in range(node_count)]
    tasks: list[TaskView] = []
    for replicas in steps:
        tasks = apply("web", plan_replicated("web", replicas, nodes, tasks), tasks)
        assert _spread_of("web", nodes, tasks) <= 1


@settings(max_examples=200, deadline=None)
@given(
    node_count=st.integers(1, 7),
    others=st.lists(st.integers(0, 6), max_size=30),
    replicas=st.integers(0, 30),
)
def test_spread_ignores_other_services_load_for_balance(
    node_count: int, others: list[int], replicas: int
) -> None:
    nodes = [node(f"n{i}") for i in range(node_count)]
    busy = [task(f"o{i}", i + 1, f"n{n % node_count}", "db") for i, n in enumerate(others)]
    tasks = apply("web", plan_replicated("web", replicas, nodes, busy), busy)
    assert _spread_of("web", nodes, tasks) <= 1


@settings(max_examples=300, deadline=None)
@given(nodes=nodes_strategy, tasks=tasks_strategy("agent"))
def test_global_covers_every_eligible_node_once(
    nodes: list[NodeView], tasks: list[TaskView]
) -> None:
    plan = plan_global("agent", nodes, tasks)
    assert plan.pending == ()
    after = [t for t in apply("agent", plan, tasks) if t.service_id == "agent"]
    where = Counter(t.node_id for t in after)
    by_id = _by_id(nodes)
    assert all(count == 1 for count in where.values())
    assert all(t.slot == GLOBAL_SLOT for t in after)
    assert all(by_id[n].keeps_tasks for n in where)
    assert {n.node_id for n in nodes if n.accepts_tasks} <= set(where)
    assert plan_global("agent", nodes, apply("agent", plan, tasks)).empty
