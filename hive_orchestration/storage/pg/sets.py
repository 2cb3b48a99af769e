"""A run of one row statement as one set-based statement: the write path's hot rows.

A batch's rows of one kind (the tasks it creates, the claims' and completions' fenced
task writes, their runs) come to the driver as a run of one statement with many
parameter rows (:func:`~..port.coalesce`). Sent as psycopg's ``executemany`` in a
pipeline, each row is its own Bind and Execute: psycopg dumps it, then flushes it to the
socket (a ``poll`` and a ``send`` a row), and the server plans, runs and checks each as a
statement of its own. Here the whole run is one statement instead, its rows one JSON
array (encoded by msgspec in C) that the server unpacks (``jsonb_array_elements``):
measured on a batch of 24 fenced task writes, 25 us of the node's CPU a row against 8-12,
and 46 us of the server's against 33-37.

The set-based twin does exactly what the run did:

- **The same rows, in the same order.** An INSERT takes the rows in the array's order
  (``WITH ORDINALITY``). A run whose rows name one id twice (a row written twice in a
  write applied in order) is never made one statement (an UPDATE would apply one of the
  two, an upsert fail): it stays an ``executemany``.
- **Each UPDATE changes its one row** (as :func:`.driver._checked` makes each row
  statement): the statement fails in the server, with the same ``hive:missing-row:``
  text, unless it changed exactly as many rows as it was given, which aborts the
  transaction, so the COMMIT behind it does nothing.
- **Fences lock in task id order.** A fenced task write (``version = ?``) takes the row
  locks of its tasks in id order first (``ORDER BY id FOR NO KEY UPDATE``: the lock an
  UPDATE of them takes, no stronger, so a key check of a row that references one still
  passes), as the run's rows, sorted by id (``storage/grouping.py``), did one by one:
  two nodes' writes of the same tasks wait for each other and never deadlock, whatever
  join the planner picks for the UPDATE. A row that another transaction changed while
  this one waited is then read as it is now: its version moved, it is not updated, and
  the count fails the write.

Only runs of two rows or more are rewritten (one row is cheaper as it is), and only
while their JSON is at most :data:`MAX_JSON` long: a ``jsonb`` value holds at most
256 MiB, which a run of large rows passes (``create_tasks`` of 1 000 tasks with payloads
of 1 MiB, the default bound, is a run of 1 GB), and a run of large rows gains nothing
from being one statement; it stays an ``executemany``, one row at a time, as it was.
Bytes travel as base64 text (msgspec's encoding of bytes), decoded by the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import LiteralString

import msgspec

from ..port import Params
from ..rows import (
    FENCE_TASK,
    RUN_COLUMNS,
    RUN_STATE_COLUMNS,
    SET_RUN_STATE,
    SET_TASK_STATE_FENCED,
    TASK_COLUMNS,
    TASK_STATE_COLUMNS,
    upsert,
)

__all__ = ["JOINS_BY_INDEX", "MAX_JSON", "SetForm", "set_statement"]

_encode = msgspec.json.Encoder().encode

#: Sent once in a transaction, before its first set-based UPDATE: joins by nested loops
#: only, to the transaction's end. The rows come from a function the planner takes for
#: 100 rows whatever their number, so against a table it believes small (one just
#: created, or whose statistics lag behind a burst of inserts) it picks a hash join over
#: a sequential scan of the whole table, and psycopg's prepared statement keeps that plan
#: as the table grows: 4.8 ms a batch against 0.5 (measured). By nested loops, each row
#: is one lookup of the primary key, at any size. Every other statement of a write is of
#: one table, by its key: nothing else of the transaction has a join to plan.
JOINS_BY_INDEX = (
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)

#: The longest JSON (characters) a run is sent as one statement with. ``jsonb`` refuses a
#: value over 256 MiB (its binary form: a 4-byte entry per value, numbers as numeric, so
#: up to some three times the text of small values); a run past this is a run of large
#: rows, whose per-row costs the set-based statement saves are small beside their size.
MAX_JSON = 8 * 1024 * 1024

#: The SQL type of each column these statements write that is not text.
_TYPES = {
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "due_date": "timestamptz",
    "available_at": "timestamptz",
    "run_at": "timestamptz",
    "expires_at": "timestamptz",
    "started_at": "timestamptz",
    "completed_at": "timestamptz",
    "lease_expires_at": "timestamptz",
    "priority": "bigint",
    "max_retries": "bigint",
    "attempts": "bigint",
    "concurrency_limit": "bigint",
    "run_number": "bigint",
    "version": "bigint",
    "timeout": "float8",
    "lease_seconds": "float8",
}
#: Columns of bytes: base64 text in the JSON.
_BINARY = frozenset({"lease_hash"})


def _names(columns: str) -> list[str]:
    return [name.strip() for name in columns.split(",")]


def _rows(names: Sequence[str]) -> str:
    """The run's rows as a relation ``v`` of ``names`` (typed), in the array's order."""
    values = []
    for i, name in enumerate(names):
        if name in _BINARY:
            values.append(f"decode(e.j->>{i}, 'base64') AS {name}")
        else:
            values.append(f"(e.j->>{i})::{_TYPES.get(name, 'text')} AS {name}")
    return (
        f"SELECT {', '.join(values)} FROM jsonb_array_elements(?::jsonb)"
        " WITH ORDINALITY AS e(j, n) ORDER BY e.n"
    )


def _checked(table: str, update: str) -> str:
    """``update`` (``... RETURNING 1``) failing unless it changed as many rows as given."""
    return (
        f", u AS ({update} RETURNING 1)"
        f" SELECT ('hive:missing-row:{table}:' || count(*))::int FROM u HAVING count(*) <> ?"
    )


def _upsert(table: str, columns: str) -> str:
    names = _names(columns)
    updates = ", ".join(f"{name} = excluded.{name}" for name in names if name != "id")
    return (
        f"INSERT INTO {table} ({', '.join(names)}) {_rows(names)}"
        f" ON CONFLICT (id) DO UPDATE SET {updates}"
    )


def _fenced_update(columns: Sequence[str]) -> str:
    """Each task's ``columns`` and its version moved on, where its version is the one
    given; the rows locked in id order first."""
    names = [*columns, "id", "version"]
    sets = "".join(f"{name} = v.{name}, " for name in columns)
    return (
        f"WITH v AS MATERIALIZED ({_rows(names)}),"
        " l AS (SELECT t.id FROM tasks t WHERE t.id IN (SELECT id FROM v)"
        " ORDER BY t.id FOR NO KEY UPDATE)"
        + _checked(
            "tasks",
            f"UPDATE tasks t SET {sets}version = t.version + 1 FROM v WHERE t.id = v.id"
            " AND t.version = v.version AND t.id IN (SELECT id FROM l)",
        )
    )


def _update(table: str, columns: str) -> str:
    names = [*_names(columns), "id"]
    sets = ", ".join(f"{name} = v.{name}" for name in names[:-1])
    return f"WITH v AS MATERIALIZED ({_rows(names)})" + _checked(
        table, f"UPDATE {table} t SET {sets} FROM v WHERE t.id = v.id"
    )


@dataclass(frozen=True, slots=True)
class SetForm:
    """The set-based twin of one row statement: ``sql`` takes the rows as one JSON
    array, then (UPDATEs) their count; ``key`` is the index of a row's id."""

    sql: LiteralString
    key: int
    checked: bool


# The program's own SQL, only assembled: as literal as the texts it came from (mypy reads
# LiteralString as str; psycopg's annotations ask for it).
_FORMS: dict[str, SetForm] = {
    upsert("tasks", TASK_COLUMNS): SetForm(_upsert("tasks", TASK_COLUMNS), 0, False),
    upsert("runs", f"{RUN_COLUMNS}, lease_hash"): SetForm(
        _upsert("runs", f"{RUN_COLUMNS}, lease_hash"), 0, False
    ),
    SET_TASK_STATE_FENCED: SetForm(
        _fenced_update(_names(TASK_STATE_COLUMNS)), len(_names(TASK_STATE_COLUMNS)), True
    ),
    FENCE_TASK: SetForm(_fenced_update([]), 0, True),
    SET_RUN_STATE: SetForm(
        _update("runs", RUN_STATE_COLUMNS), len(_names(RUN_STATE_COLUMNS)), True
    ),
}


def set_statement(sql: str, rows: Sequence[Params]) -> tuple[str, Params] | None:
    """The one statement (``?`` marks) that applies the run ``sql`` x ``rows``, or None
    where the run stays an ``executemany``: fewer than two rows, a statement with no set
    form, an id named twice, or rows whose JSON is longer than :data:`MAX_JSON`."""
    if len(rows) < 2:
        return None
    form = _FORMS.get(sql)
    if form is None:
        return None
    key = form.key
    if len({row[key] for row in rows}) != len(rows):
        return None
    try:
        data = _encode(rows).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        # Not a plain value, or a lone surrogate (refused as input before it gets here):
        # row by row, psycopg says what is wrong with it, as it did.
        return None
    if len(data) > MAX_JSON:
        return None  # past what one jsonb value holds, or near it: row by row
    return form.sql, ((data, len(rows)) if form.checked else (data,))
