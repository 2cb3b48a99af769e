"""Reading the event log by type through the type index, never by scanning the log.

A read by task, plan or correlation id is a range scan of that field's partial index from
``after`` (each index's rowid order is seq order). A read by type pattern had no index: a
pattern that matched nothing read all four million events of a million tasks (1.3 s).
``idx_events_type`` (schema version 8) orders the log by type, then seq, so that:

1. The distinct types the pattern can match are found first, in the index, by a loose
   index scan (one ``min(type)`` step per distinct type, each O(log n)), restricted to
   the pattern's literal prefix (``task.*``: the types from ``task.`` up to ``task/``)
   and filtered with the pattern's own ``GLOB``. None: the answer is empty, at once.
2. Each type found is then read as a range of the index (``type = ? AND seq > ?``, in
   seq order, at most ``limit``), and the ranges are merged by seq: O(types x limit),
   however long the log and however dense or sparse the matches.

Both steps are one snapshot's: step 1 also reads the log's last seq, and step 2 reads no
further, so a type first written between the two statements cannot leave a hole in a
page that a cursor would then skip (its events come in the next page).

A log with more distinct types in the prefix's range than :data:`MAX_TYPES` (an app that
mints a type per object) falls back to one statement with the ``GLOB`` over the log in seq
order, as before; and a read that also names a task, plan or correlation id uses that
id's index, which is narrower than any type.
"""

from __future__ import annotations

from ...messages.storage import ReadEvents
from .. import event_reads
from ..event_reads import MAX_TYPES
from ..port import Driver, Params, Row, Statement
from ..rows import EVENT_COLUMNS

__all__ = ["EVENT_COLUMNS", "MAX_TYPES", "events_sql", "read_event_rows"]

# The loose index scan: the first type of the range, then each next one, O(log n) each;
# the outer query keeps those the pattern matches, with the log's last seq. The bounds
# must be plain range terms (an upper bound in an OR is a filter, not a range: each step
# past the last type would then read the index to its end).
_WALK = """
WITH RECURSIVE found(type) AS (
    SELECT (SELECT min(type) FROM events WHERE type >= ?1{upper})
    UNION ALL
    SELECT (SELECT min(type) FROM events WHERE type > found.type{upper})
    FROM found WHERE found.type IS NOT NULL
    LIMIT ?3
)
SELECT type, type GLOB ?4, (SELECT coalesce(max(seq), 0) FROM events) FROM found
WHERE type IS NOT NULL
"""
#: The walk of a range with an upper bound (``?2``), and of one without (an empty prefix).
_TYPES_SQL = _WALK.format(upper=" AND type < ?2")
_ALL_TYPES_SQL = _WALK.format(upper="")


def _walk(prefix: str, upper: str | None, pattern: object, limit: int) -> Statement:
    # ?2 is bound even where the walk has no upper bound: numbered parameters may skip.
    return (_ALL_TYPES_SQL if upper is None else _TYPES_SQL), (prefix, upper, limit, pattern)


#: The unary + keeps the planner off the type index, which SQLite would otherwise use for
#: a GLOB's prefix: a range of a dense type, then a sort of all of it. An id's index is
#: narrower; with none, the log is read in seq order up to limit.
EVENT_READ_SQL = event_reads.EventReadSql(
    type_match="+type GLOB ?", name_subqueries=False, walk=_walk
)


def _match(read: ReadEvents) -> str | None:
    return None if read.pattern == "*" else read.pattern


def events_sql(read: ReadEvents) -> tuple[str, Params]:
    """One statement for ``read``, in seq order, the pattern a ``GLOB`` on each event."""
    return event_reads.events_sql(EVENT_READ_SQL, read, _match(read))


def _merged_sql(read: ReadEvents, types: list[str], last_seq: int) -> tuple[str, Params]:
    return event_reads.merged_sql(EVENT_READ_SQL, read, types, last_seq)


async def read_event_rows(db: Driver, read: ReadEvents) -> list[Row]:
    """The rows of ``read`` (see the module's docstring for how)."""
    return await event_reads.read_event_rows(EVENT_READ_SQL, db, read, _match(read))
