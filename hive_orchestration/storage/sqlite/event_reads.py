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
from ..port import Driver, Params, Row
from ..rows import EVENT_COLUMNS

__all__ = ["EVENT_COLUMNS", "MAX_TYPES", "events_sql", "literal_prefix", "read_event_rows"]

#: Most distinct types a pattern is resolved into through the type index.
MAX_TYPES = 64
_GLOB_SPECIAL = frozenset("*?[")
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


def literal_prefix(pattern: str) -> str:
    """What every type the glob ``pattern`` matches starts with."""
    for i, char in enumerate(pattern):
        if char in _GLOB_SPECIAL:
            return pattern[:i]
    return pattern


def _upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: none is:
    the prefix is empty or ends in the last code point). UTF-8 keeps code point order,
    so SQLite's BINARY collation agrees."""
    if not prefix or ord(prefix[-1]) == 0x10FFFF:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def events_sql(read: ReadEvents) -> tuple[str, Params]:
    """One statement for ``read``, in seq order: its id filters use their indexes, its
    pattern is a ``GLOB`` on each event read."""
    where = ["seq > ?"]
    params: list[object] = [read.after]
    for column, value in (
        ("task_id", read.task_id),
        ("plan_id", read.plan_id),
        ("correlation_id", read.correlation_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if read.pattern != "*":
        # The unary + keeps the planner off the type index, which SQLite would otherwise
        # use for a GLOB's prefix: a range of a dense type, then a sort of all of it. An
        # id's index is narrower; with none, the log is read in seq order up to limit.
        where.append("+type GLOB ?")
        params.append(read.pattern)
    params.append(read.limit)
    select = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
    if read.newest:
        return f"SELECT * FROM ({select} ORDER BY seq DESC LIMIT ?) ORDER BY seq", tuple(params)
    return f"{select} ORDER BY seq LIMIT ?", tuple(params)


def _merged_sql(read: ReadEvents, types: list[str], last_seq: int) -> tuple[str, Params]:
    """Each type's range of the type index, at most ``limit`` each, merged by seq."""
    order = "DESC" if read.newest else ""
    parts: list[str] = []
    params: list[object] = []
    for type_ in types:
        parts.append(
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events"
            f" WHERE type = ? AND seq > ? AND seq <= ? ORDER BY seq {order} LIMIT ?)"
        )
        params += [type_, read.after, last_seq, read.limit]
    union = " UNION ALL ".join(parts)
    params.append(read.limit)
    if read.newest:
        sql = f"SELECT * FROM ({union} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    else:
        sql = f"{union} ORDER BY seq LIMIT ?"
    return sql, tuple(params)


async def read_event_rows(db: Driver, read: ReadEvents) -> list[Row]:
    """The rows of ``read`` (see the module's docstring for how)."""
    if read.pattern == "*" or any(
        value is not None for value in (read.task_id, read.plan_id, read.correlation_id)
    ):
        return await db.fetchall(*events_sql(read))
    prefix = literal_prefix(read.pattern)
    upper = _upper_bound(prefix)
    walk = _ALL_TYPES_SQL if upper is None else _TYPES_SQL
    # ?2 is bound even where the walk has no upper bound: numbered parameters may skip.
    rows = await db.fetchall(walk, (prefix, upper, MAX_TYPES + 1, read.pattern))
    if len(rows) > MAX_TYPES:
        return await db.fetchall(*events_sql(read))  # more types than it pays to resolve
    types = [str(type_) for type_, matches, _ in rows if matches]
    if not types:
        return []  # no event in the log has a type the pattern matches
    last_seq = rows[0][2]
    assert isinstance(last_seq, int)
    return await db.fetchall(*_merged_sql(read, types, last_seq))
