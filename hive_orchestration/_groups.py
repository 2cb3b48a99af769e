"""The leaves of an exception group: anyio wraps every failure of a task group in one."""

from __future__ import annotations

__all__ = ["leaves"]


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
