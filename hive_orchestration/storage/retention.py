"""The storage side of retention (docs/RETENTION.md) that every store shares: the
statements that delete a purged task's events and trim the log, and how far it was
trimmed. What a purge may take and where a trim ends are read by each store's own SQL
(``storage/sqlite/retention.py``).
"""

from __future__ import annotations

from typing import cast

from ..messages.tasks import TERMINAL
from .port import Driver, Statement

__all__ = ["TERMINAL_SQL", "delete_events_statements", "trim_statements", "trimmed_through"]

#: The terminal statuses, written exactly as in the partial index idx_tasks_finished
#: (schema version 10): the planner uses a partial index only for a query that repeats
#: its WHERE term.
TERMINAL_SQL = "status IN ('completed', 'failed', 'cancelled', 'timed_out')"
assert {s.value for s in TERMINAL} == {"completed", "failed", "cancelled", "timed_out"}

_STATE_SQL = "SELECT trimmed_through FROM event_log WHERE id = 1"
_TRIM_SQL = "DELETE FROM events WHERE seq <= ?"
# The mark only moves forward (a CASE, not SQLite's two-argument max(), so that the
# statement is the same on every store).
_REMEMBER_SQL = (
    "INSERT INTO event_log (id, trimmed_through) VALUES (1, ?)"
    " ON CONFLICT (id) DO UPDATE SET trimmed_through = CASE"
    " WHEN excluded.trimmed_through > event_log.trimmed_through"
    " THEN excluded.trimmed_through ELSE event_log.trimmed_through END"
)
_DELETE_EVENTS_SQL = "DELETE FROM events WHERE task_id = ?"


async def trimmed_through(db: Driver) -> int:
    """How far the log was trimmed (0: never)."""
    rows = await db.fetchall(_STATE_SQL)
    return cast(int, rows[0][0]) if rows else 0


def trim_statements(through: int) -> list[Statement]:
    return [(_TRIM_SQL, (through,)), (_REMEMBER_SQL, (through,))]


def delete_events_statements(task_ids: tuple[str, ...]) -> list[Statement]:
    return [(_DELETE_EVENTS_SQL, (task_id,)) for task_id in task_ids]
