"""Data between plan steps: what a subtask's handler reads of its dependencies, and the
storage read that answers it (see docs/PLAN_DATA.md)."""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from ..runtime import Request
from .events import JsonValue
from .plans import SubtaskStatus

__all__ = ["DependencyResult", "DependencyResults", "LoadDependencyResults"]

JsonObject: TypeAlias = dict[str, JsonValue]


class DependencyResult(msgspec.Struct, frozen=True, kw_only=True):
    """One dependency of a subtask as its plan recorded it: how it ended (``completed``,
    or, for a step that always runs, ``failed``, ``cancelled`` or ``skipped`` too), its
    task, its task's result (``None`` unless it completed) and why it did not complete."""

    subtask_id: str
    status: SubtaskStatus
    task_id: str | None = None
    result: JsonObject | None = None
    error: str | None = None


class DependencyResults(msgspec.Struct, frozen=True, kw_only=True):
    """A page of a subtask's dependencies, by subtask id. ``next_after`` is ``None`` on
    the last page; otherwise pass it as ``after`` to read on (a page ends at ``limit``
    dependencies, or earlier when their results reach the page's size bound)."""

    plan_id: str
    subtask_id: str
    dependencies: tuple[DependencyResult, ...] = ()
    next_after: str | None = None

    @property
    def results(self) -> dict[str, JsonObject | None]:
        """Subtask id -> its result, for the dependencies of this page."""
        return {d.subtask_id: d.result for d in self.dependencies}


class LoadDependencyResults(Request[DependencyResults], frozen=True, kw_only=True):
    """The dependencies of the subtask whose task is ``task_id``: those named (all if
    None), after ``after``, at most ``limit`` of them and about ``max_bytes`` of results
    (always at least one)."""

    task_id: str
    subtask_ids: tuple[str, ...] | None = None
    after: str | None = None
    limit: int = 100
    max_bytes: int = 8 * 1024 * 1024
