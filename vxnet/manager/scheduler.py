"""Where a service's tasks run: swarmkit's orchestrators and spread scheduler, sans-IO.

The manager reads nodes and tasks from the store, asks :func:`plan_replicated` or
:func:`plan_global` what to change, and records the :class:`Plan`: tasks to start (slot, node) and
tasks to stop.  Nothing here touches the store, a clock or randomness, so the same inputs always
give the same plan.

What a node's state means for tasks (``docker node update --availability``):

=========================  ==================  ====================
node                       existing tasks      new tasks
=========================  ==================  ====================
ready, ``active``          keep                yes
ready, ``pause``           keep                no
ready, ``drain``           stop, reschedule    no
not ready (down)           stop, reschedule    no
=========================  ==================  ====================

Replicated services own slots ``1..replicas``; a slot whose task must stop is placed again on the
eligible node with the fewest tasks of this service, then the fewest tasks overall, then the lowest
node id (swarmkit's spread).  Scaling down stops the highest slots.  Existing tasks are never moved
to rebalance, as in swarm.  Global services have one task per eligible node, slot 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vxnet.errors import UsageError

ACTIVE = "active"
PAUSE = "pause"
DRAIN = "drain"
AVAILABILITIES = frozenset({ACTIVE, PAUSE, DRAIN})

RUNNING = "running"
SHUTDOWN = "shutdown"
DESIRED_STATES = frozenset({RUNNING, SHUTDOWN})

#: The slot of every task of a global service: those tasks are bound to a node instead.
GLOBAL_SLOT = 0


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the scheduler needs to know about a node."""

    node_id: str
    hostname: str
    ready: bool
    availability: str

    def __post_init__(self) -> None:
        if self.availability not in AVAILABILITIES:
            raise UsageError(
                f"node {self.hostname} has availability {self.availability!r}: "
                f"use one of {', '.join(sorted(AVAILABILITIES))}"
            )

    @property
    def accepts_tasks(self) -> bool:
        """May new tasks be placed here?"""
        return self.ready and self.availability == ACTIVE

    @property
    def keeps_tasks(self) -> bool:
        """May the tasks already here go on running?"""
        return self.ready and self.availability != DRAIN


@dataclass(frozen=True, slots=True)
class TaskView:
    """What the scheduler needs to know about a task."""

    task_id: str
    service_id: str
    slot: int
    node_id: str
    desired: str

    def __post_init__(self) -> None:
        if self.desired not in DESIRED_STATES:
            raise UsageError(
                f"task {self.task_id} has desired state {self.desired!r}: "
                f"use one of {', '.join(sorted(DESIRED_STATES))}"
            )


@dataclass(frozen=True, slots=True)
class Plan:
    """Changes that bring a service to its desired state.

    ``start`` holds (slot, node id) pairs for new tasks, ``stop`` the ids of tasks whose desired
    state becomes shutdown, and ``pending`` the slots no node can take now.
    """

    start: tuple[tuple[int, str], ...] = ()
    stop: tuple[str, ...] = ()
    pending: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.start or self.stop or self.pending)


def plan_replicated(
    service_id: str, replicas: int, nodes: Iterable[NodeView], tasks: Iterable[TaskView]
) -> Plan:
    """The plan that gives ``service_id`` exactly one running task in each slot 1..``replicas``."""
    if replicas < 0:
        raise UsageError(f"replicas must be 0 or more, not {replicas}")
    by_id = _index(nodes)
    live = [t for t in tasks if t.desired == RUNNING]
    keep, stop = _keep_replicated(service_id, replicas, by_id, live)
    missing = [slot for slot in range(1, replicas + 1) if slot not in keep]
    mine = Counter(t.node_id for t in keep.values())
    stopped = set(stop)
    total = Counter(t.node_id for t in live if t.task_id not in stopped)
    start, pending = _spread(missing, _accepting(by_id), mine, total)
    return Plan(start=start, stop=tuple(sorted(stop)), pending=pending)


def plan_global(service_id: str, nodes: Iterable[NodeView], tasks: Iterable[TaskView]) -> Plan:
    """The plan that gives ``service_id`` one running task on every eligible node."""
    by_id = _index(nodes)
    mine = [t for t in tasks if t.desired == RUNNING and t.service_id == service_id]
    covered: set[str] = set()
    stop: list[str] = []
    for task in sorted(mine, key=lambda t: (t.node_id, t.task_id)):
        node = by_id.get(task.node_id)
        if task.slot == GLOBAL_SLOT and _can_keep(node) and task.node_id not in covered:
            covered.add(task.node_id)
        else:
            stop.append(task.task_id)
    start = tuple((GLOBAL_SLOT, n) for n in _accepting(by_id) if n not in covered)
    return Plan(start=start, stop=tuple(sorted(stop)))


def _index(nodes: Iterable[NodeView]) -> dict[str, NodeView]:
    by_id: dict[str, NodeView] = {}
    for node in nodes:
        if node.node_id in by_id:
            raise UsageError(f"node id {node.node_id} appears twice")
        by_id[node.node_id] = node
    return by_id


def _can_keep(node: NodeView | None) -> bool:
    return node is not None and node.keeps_tasks


def _accepting(by_id: Mapping[str, NodeView]) -> list[str]:
    return sorted(node_id for node_id, node in by_id.items() if node.accepts_tasks)


def _keep_replicated(
    service_id: str, replicas: int, by_id: Mapping[str, NodeView], live: Iterable[TaskView]
) -> tuple[dict[int, TaskView], list[str]]:
    """Split the service's running tasks into those kept (by slot) and those to stop."""
    keep: dict[int, TaskView] = {}
    stop: list[str] = []
    mine = (t for t in live if t.service_id == service_id)
    for task in sorted(mine, key=lambda t: (t.slot, t.task_id)):
        wanted = 1 <= task.slot <= replicas and task.slot not in keep
        if wanted and _can_keep(by_id.get(task.node_id)):
            keep[task.slot] = task
        else:
            stop.append(task.task_id)
    return keep, stop


def _spread(
    slots: Iterable[int], candidates: list[str], mine: Counter[str], total: Counter[str]
) -> tuple[tuple[tuple[int, str], ...], tuple[int, ...]]:
    """Place each slot on the candidate with the fewest of this service's tasks, then of all."""
    if not candidates:
        return (), tuple(slots)
    start: list[tuple[int, str]] = []
    for slot in slots:
        node_id = min(candidates, key=lambda n: (mine[n], total[n], n))
        start.append((slot, node_id))
        mine[node_id] += 1
        total[node_id] += 1
    return tuple(start), ()
