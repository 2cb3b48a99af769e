"""Exception groups: anyio wraps every failure of a task group in one, and the runtime's
entry points give the caller the cause instead."""

from __future__ import annotations

from typing import NoReturn

import anyio

from .errors import RuntimeFailedError, RuntimeStoppedError

__all__ = ["leaves", "raise_cause"]


def leaves(error: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``error`` (``[error]`` if it is not a group)."""
    found: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            found.append(exc)
    return found


def raise_cause(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise what failed a block that ran in task groups (the app's error, as it raised it)."""
    cause = _unwrap(group)
    if isinstance(cause, KeyboardInterrupt | SystemExit) and _loop_shutting_down():
        # asyncio already raised this one out of its loop, from the task it ended, and is
        # now cancelling every task to close the loop. Raised bare again, it would abort
        # that shutdown too, before anyio's worker threads are told to stop, and the process
        # would never exit. In its group it ends this task like any failure; the loop's
        # owner raises the original.
        raise group
    raise cause from cause.__cause__


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """anyio wraps every failure of a task group in a group; give the caller the cause."""
    found = leaves(group)
    for leaf in found:
        if isinstance(leaf, RuntimeFailedError):
            return leaf
    cancelled = anyio.get_cancelled_exc_class()
    real = [leaf for leaf in found if not isinstance(leaf, cancelled)]
    # A RuntimeStoppedError in the app's block is a consequence of the real failure.
    causes = [leaf for leaf in real if not isinstance(leaf, RuntimeStoppedError)] or real
    return causes[0] if len(causes) == 1 else group


def _loop_shutting_down() -> bool:
    """Whether asyncio is cancelling this task to close its loop (asyncio.run's shutdown
    after a KeyboardInterrupt or SystemExit ended another task).

    That cancellation is asyncio's own ``Task.cancel()``: anyio takes back every
    cancellation it makes as its scope exits, so a request still counted by
    ``Task.cancelling()`` out here is not anyio's. Trio has no such shutdown.
    """
    import asyncio  # noqa: TID251 - only asyncio's tasks count cancellation requests

    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread: trio
        return False
    return task is not None and task.cancelling() > 0
