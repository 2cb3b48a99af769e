"""The rules of a plan's steps that always run (``always_run`` subtasks), apart from the
PlanExecutor that applies them (here, not under ``actors/``: actors import no module of
that package but their own).

A subtask normally waits for its dependencies to *complete*; if one does not, it never
runs (skipped under ``continue``, cancelled under ``fail_fast``). An ``always_run``
subtask waits for its dependencies to *end*, whatever their outcome, then runs: a
cleanup or report step, like a Celery chord's error callback or a Temporal workflow's
cleanup in a ``finally``. So:

- under ``continue``, skipping stops at it: it runs once everything it depends on has
  ended (skipped ones included), and what depends on it is judged by its own outcome;
- under ``fail_fast``, the first failure cancels every subtask not yet started except
  the always-run ones, and the plan stays ``executing`` (the plan is *failing*) until they
  have ended; then it ends ``failed``. Its final status is the usual rule: ``completed``
  if every subtask completed, always-run ones included, else ``failed``; a cleanup that
  completes does not make a failed plan succeed;
- ``cancel_plan`` cancels everything, always-run steps too: an explicit cancel stops the
  plan now (Temporal would run cleanup on cancellation; here, give the cleanup step a
  plan of its own, or run it after :meth:`wait_for_plan`).

Everything here is derived from durable state: the plan's failure policy and the stored
subtask statuses. A fail-fast plan that is failing when the process dies is recognised
as such on restart (one of its subtasks ended failed or cancelled while it executes), so
reconciling cancels what the failure meant to cancel and still runs the always-run steps.
"""

from __future__ import annotations

from collections.abc import Iterable

from .messages.plans import SUBTASK_FINAL, FailurePolicy, SubtaskState, SubtaskStatus

__all__ = ["blocks", "failing", "failure_reason", "first_failure"]

#: How the plan notes a subtask it cancelled itself (failing fast): not a cause.
PLAN_FAILED = "plan failed: "

_FAILURES = frozenset({SubtaskStatus.FAILED, SubtaskStatus.CANCELLED})


def blocks(dependency: SubtaskStatus, *, always_run: bool) -> bool:
    """Whether a dependency in status ``dependency`` still holds its dependent back: an
    always-run dependent waits for it to end, any other for it to complete."""
    if always_run:
        return dependency not in SUBTASK_FINAL
    return dependency is not SubtaskStatus.COMPLETED


def failing(policy: FailurePolicy, statuses: Iterable[SubtaskStatus]) -> bool:
    """Whether an executing plan has failed fast already and only waits for its
    always-run steps: under ``fail_fast``, a subtask of it failed or was cancelled."""
    return policy is FailurePolicy.FAIL_FAST and any(s in _FAILURES for s in statuses)


def failure_reason(state: SubtaskState) -> str:
    """Why a subtask that ended without completing makes its plan fail."""
    what = "was cancelled" if state.status is SubtaskStatus.CANCELLED else "failed"
    why = f"subtask {state.subtask_id!r} {what}"
    return f"{why}: {state.error}" if state.error else why


def first_failure(states: Iterable[SubtaskState]) -> tuple[str, str] | None:
    """The subtask whose failure failed a fail-fast plan, and why, read back from the
    stored rows (after a restart): the first to end failed, else the first cancelled by
    someone other than the plan itself."""
    causes = [
        state
        for state in states
        if state.status is SubtaskStatus.FAILED
        or (
            state.status is SubtaskStatus.CANCELLED
            and not (state.error or "").startswith(PLAN_FAILED)
        )
    ]
    if not causes:
        return None
    first = min(
        causes,
        key=lambda s: (
            s.status is not SubtaskStatus.FAILED,
            s.completed_at.timestamp() if s.completed_at else 0.0,
        ),
    )
    return first.subtask_id, failure_reason(first)
