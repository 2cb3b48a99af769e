"""The read behind ``get_dependency_results``: a subtask's dependencies, how each ended
and its task's result, by subtask id, a bounded page at a time.

Bounded both ways: at most ``limit`` dependencies a page (a subtask may have thousands),
and a page stops before the results it holds pass ``max_bytes`` (each result may be as
large as ``max_payload_bytes``), though it always holds one. The sizes are read first
(``length`` of the stored JSON), so a result left for the next page is not even loaded.
"""

from __future__ import annotations

from typing import cast

import msgspec

from ..errors import InvalidInputError, NotFoundError
from ..messages.plan_data import DependencyResult, DependencyResults, LoadDependencyResults
from ..messages.plans import SubtaskStatus
from .port import Driver
from .rows import parse_json

__all__ = ["load_dependency_results"]


def _marks(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join("?" * len(values))


async def load_dependency_results(db: Driver, ask: LoadDependencyResults) -> DependencyResults:
    rows = await db.fetchall("SELECT plan_id, subtask_id FROM tasks WHERE id = ?", (ask.task_id,))
    if not rows:
        raise NotFoundError("task", ask.task_id)
    plan_id, subtask_id = (cast("str | None", value) for value in rows[0])
    if plan_id is None or subtask_id is None:
        raise InvalidInputError(
            "task_id", f"task {ask.task_id!r} is not a subtask of a plan: it has no dependencies"
        )
    rows = await db.fetchall(
        "SELECT dependencies FROM plan_execution WHERE plan_id = ? AND subtask_id = ?",
        (plan_id, subtask_id),
    )
    needs: list[str] = msgspec.json.decode(str(rows[0][0] or "[]")) if rows else []
    names = sorted(set(needs))
    if ask.subtask_ids is not None:
        known = set(names)
        for i, name in enumerate(ask.subtask_ids):
            if name not in known:
                shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
                raise InvalidInputError(
                    f"subtask_ids[{i}]",
                    f"{name!r} is not a dependency of subtask {subtask_id!r}"
                    f" (its dependencies: {shown or 'none'})",
                )
        names = sorted(set(ask.subtask_ids))
    if ask.after is not None:
        names = [name for name in names if name > ask.after]
    window = names[: ask.limit]
    more = len(names) > len(window)
    found: dict[str, tuple[object, ...]] = {}
    if window:
        rows = await db.fetchall(
            "SELECT pe.subtask_id, pe.status, pe.task_id, COALESCE(pe.error, t.error),"
            " length(CAST(t.result AS BLOB))"
            " FROM plan_execution pe LEFT JOIN tasks t ON t.id = pe.task_id"
            f" WHERE pe.plan_id = ? AND pe.subtask_id IN ({_marks(window)})",
            (plan_id, *window),
        )
        found = {str(row[0]): tuple(row) for row in rows}
    taken: list[tuple[object, ...]] = []
    used = 0
    for name in window:
        row = found.get(name)
        if row is None:  # pragma: no cover - every subtask of a plan has its row
            continue
        size = int(cast(int, row[4] or 0)) + len(str(row[3] or ""))
        if taken and used + size > ask.max_bytes:
            more = True
            break
        taken.append(row)
        used += size
    results: dict[str, object] = {}
    with_result = tuple(str(row[2]) for row in taken if row[2] is not None and row[4])
    if with_result:
        rows = await db.fetchall(
            f"SELECT id, result FROM tasks WHERE id IN ({_marks(with_result)})", with_result
        )
        results = {str(task_id): result for task_id, result in rows}
    dependencies = tuple(
        DependencyResult(
            subtask_id=str(row[0]),
            status=SubtaskStatus(str(row[1])),
            task_id=cast("str | None", row[2]),
            result=parse_json(results.get(str(row[2]))),
            error=cast("str | None", row[3]),
        )
        for row in taken
    )
    return DependencyResults(
        plan_id=plan_id,
        subtask_id=subtask_id,
        dependencies=dependencies,
        next_after=dependencies[-1].subtask_id if more and dependencies else None,
    )
