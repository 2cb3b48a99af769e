"""Checking an execution plan's dependency graph before anything is written.

A plan is a list of subtasks, each with an id and the ids it depends on. It is valid when
it is not empty, its ids are unique, every dependency names a subtask of the plan, and
the dependencies have no cycle. :func:`check_plan_graph` returns the subtasks in an order
that respects every dependency (each after all it depends on), or raises
:class:`InvalidInputError` naming the offending field: the duplicate id, the unknown
dependency, or the subtasks on a cycle in order. Everything is iterative, so a chain of
100 000 subtasks is as fine as a wide plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ...errors import InvalidInputError

__all__ = ["check_plan_graph"]


def check_plan_graph(ids: Sequence[str], dependencies: Sequence[Sequence[str]]) -> list[int]:
    """Validate the graph of subtask ``ids[i]`` depending on ``dependencies[i]``; return
    the subtask indexes in dependency order (ties kept in the given order)."""
    if not ids:
        raise InvalidInputError("subtasks", "a plan needs at least one subtask")
    index: dict[str, int] = {}
    for i, subtask_id in enumerate(ids):
        first = index.setdefault(subtask_id, i)
        if first != i:
            raise InvalidInputError(
                f"subtasks[{i}].id", f"{subtask_id!r} is already the id of subtasks[{first}]"
            )
    waiting_on = [0] * len(ids)  # unfinished dependencies of each subtask
    dependents: list[list[int]] = [[] for _ in ids]
    for i, needs in enumerate(dependencies):
        seen: set[int] = set()
        for k, need in enumerate(needs):
            j = index.get(need)
            if j is None:
                raise InvalidInputError(
                    f"subtasks[{i}].dependencies[{k}]",
                    f"{need!r} is not the id of a subtask of this plan",
                )
            if j in seen:
                continue  # a repeated dependency is the same dependency
            seen.add(j)
            waiting_on[i] += 1
            dependents[j].append(i)
    # Kahn's algorithm: what is left when no subtask is free is on or behind a cycle.
    ready = deque(i for i, count in enumerate(waiting_on) if count == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for dependent in dependents[i]:
            waiting_on[dependent] -= 1
            if waiting_on[dependent] == 0:
                ready.append(dependent)
    if len(order) < len(ids):
        cycle = _find_cycle(ids, dependencies, index, waiting_on)
        raise InvalidInputError(
            "subtasks", "dependency cycle: " + " -> ".join(repr(ids[i]) for i in cycle)
        )
    return order


def _find_cycle(
    ids: Sequence[str],
    dependencies: Sequence[Sequence[str]],
    index: dict[str, int],
    waiting_on: list[int],
) -> list[int]:
    """A cycle among the subtasks Kahn's algorithm could not free, first one repeated
    at the end (``a -> b -> a``). Each of them still depends on one of them, so walking
    such dependencies from any of them must come back to a subtask already walked."""
    stuck = {i for i, count in enumerate(waiting_on) if count > 0}
    start = min(stuck)
    path: list[int] = []
    position: dict[int, int] = {}
    i = start
    while i not in position:
        position[i] = len(path)
        path.append(i)
        i = next(index[need] for need in dependencies[i] if index[need] in stuck)
    # ``path`` follows "depends on"; name the cycle in the order work would flow.
    cycle = path[position[i] :]
    cycle.reverse()
    first = cycle.index(min(cycle))  # start at its earliest subtask: the same every time
    cycle = cycle[first:] + cycle[:first]
    return [*cycle, cycle[0]]
