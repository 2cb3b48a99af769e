"""Reading the event log by type through the type index, every store's: the plan of the
reads (``storage/sqlite/event_reads.py`` says why and how) and the statements that read
the ranges. Each store gives its few spellings as an :class:`EventReadSql`: how a type is
matched against the pattern (SQLite's ``GLOB``; a regular expression on PostgreSQL),
whether subqueries are named, and its loose index scan of the types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..messages.storage import ReadEvents
from .port import Driver, Params, Row, Statement
from .rows import EVENT_COLUMNS

__all__ = [
    "MAX_TYPES",
    "EventReadSql",
    "events_sql",
    "literal_prefix",
    "merged_sql",
    "read_event_rows",
    "upper_bound",
]

#: Most distinct types a pattern is resolved into through the type index.
MAX_TYPES = 64
_GLOB_SPECIAL = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class EventReadSql:
    """What a store spells its own way in the event reads."""

    #: The WHERE term keeping the events whose type matches the bound match value.
    type_match: str
    #: Whether each subquery in FROM is given a name (PostgreSQL requires one).
    name_subqueries: bool
    #: The loose index scan of the types from ``prefix`` up to ``upper`` (None: no upper
    #: bound) that the match value matches, at most ``limit`` rows of (type, matches,
    #: the log's last seq).
    walk: Callable[[str, str | None, object, int], Statement]


def literal_prefix(pattern: str) -> str:
    """What every type the glob ``pattern`` matches starts with."""
    for i, char in enumerate(pattern):
        if char in _GLOB_SPECIAL:
            return pattern[:i]
    return pattern


def upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: none is:
    the prefix is empty or ends in the last code point). UTF-8 keeps code point order,
    so SQLite's BINARY collation agrees, and so does the C collation of PostgreSQL's
    ``events.type`` (schema)."""
    if not prefix or ord(prefix[-1]) == 0x10FFFF:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def events_sql(spelling: EventReadSql, read: ReadEvents, match: object | None) -> Statement:
    """One statement for ``read``, in seq order: its id filters use their indexes, its
    pattern (``match``, None: every type) is matched on each event read."""
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
    if match is not None:
        where.append(spelling.type_match)
        params.append(match)
    params.append(read.limit)
    select = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
    if read.newest:
        newest = " AS newest" if spelling.name_subqueries else ""
        return (
            f"SELECT * FROM ({select} ORDER BY seq DESC LIMIT ?){newest} ORDER BY seq",
            tuple(params),
        )
    return f"{select} ORDER BY seq LIMIT ?", tuple(params)


def merged_sql(
    spelling: EventReadSql, read: ReadEvents, types: list[str], last_seq: int
) -> tuple[str, Params]:
    """Each type's range of the type index, at most ``limit`` each, merged by seq."""
    order = "DESC" if read.newest else ""
    parts: list[str] = []
    params: list[object] = []
    for n, type_ in enumerate(types):
        name = f" AS t{n}" if spelling.name_subqueries else ""
        parts.append(
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events"
            f" WHERE type = ? AND seq > ? AND seq <= ? ORDER BY seq {order} LIMIT ?){name}"
        )
        params += [type_, read.after, last_seq, read.limit]
    union = " UNION ALL ".join(parts)
    params.append(read.limit)
    if read.newest:
        newest = " AS newest" if spelling.name_subqueries else ""
        sql = f"SELECT * FROM ({union} ORDER BY seq DESC LIMIT ?){newest} ORDER BY seq"
    else:
        sql = f"{union} ORDER BY seq LIMIT ?"
    return sql, tuple(params)


async def read_event_rows(
    spelling: EventReadSql, db: Driver, read: ReadEvents, match: object | None
) -> list[Row]:
    """The rows of ``read``: by the id's index, or by the type index one matching type at
    a time. ``match`` is the store's form of the pattern (None: every type)."""
    if match is None or any(
        value is not None for value in (read.task_id, read.plan_id, read.correlation_id)
    ):
        return await db.fetchall(*events_sql(spelling, read, match))
    prefix = literal_prefix(read.pattern)
    rows = await db.fetchall(*spelling.walk(prefix, upper_bound(prefix), match, MAX_TYPES + 1))
    if len(rows) > MAX_TYPES:
        return await db.fetchall(*events_sql(spelling, read, match))  # too many to resolve
    types = [str(type_) for type_, matches, _ in rows if matches]
    if not types:
        return []  # no event in the log has a type the pattern matches
    last_seq = rows[0][2]
    assert isinstance(last_seq, int)
    return await db.fetchall(*merged_sql(spelling, read, types, last_seq))
