"""How every listing pages: a ``limit`` and an ``after`` cursor.

A listing call returns at most ``limit`` items (:data:`DEFAULT_LIMIT` when not given, never
more than :data:`MAX_LIMIT`), in an order fixed by keys that never change once an item
exists; ``after`` is the cursor: the last item of the previous page (its id, or for the
event log its ``seq``), and the next page starts right after it in that order. Paging on
until a page comes back shorter than ``limit`` reads every item that was in the listing
for the whole time exactly once, with no gap and no duplicate, however many writes go on
meanwhile: an item that enters or leaves it meanwhile is read at most once.

The orders: tasks by priority (highest first), then creation time, then id; plans newest
first (generation time, then id); planning requests by priority, then creation time, then
id; events by ``seq``. A cursor that names no item (deleted since) is an
:class:`~hive_orchestration.errors.InvalidInputError` naming ``after``.
"""

from __future__ import annotations

from ._validate import MAX_READ, check_int, check_optional_text

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "check_after", "check_limit"]

#: What a listing returns when no ``limit`` is given (a seeds' call without one).
DEFAULT_LIMIT = 1000
#: The largest ``limit`` a listing takes: a page is one read, converted on the event loop.
MAX_LIMIT = MAX_READ


def check_limit(limit: object, default: int = DEFAULT_LIMIT) -> int:
    """``limit`` checked: an int from 1 to :data:`MAX_LIMIT` (``None``: ``default``)."""
    if limit is None:
        return default
    return check_int(limit, "limit", minimum=1, maximum=MAX_LIMIT)


def check_after(after: object) -> str | None:
    """A cursor: the id of the last item of the previous page, or ``None`` for the first."""
    return check_optional_text(after, "after")
