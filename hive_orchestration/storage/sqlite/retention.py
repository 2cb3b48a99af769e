"""The storage side of retention (docs/RETENTION.md) on SQLite: its spellings of the
retention reads, which are every store's (``storage/retention.py``).
"""

from __future__ import annotations

from ..retention import RetentionSql

__all__ = ["RETENTION_SQL", "TERMINAL_SQL"]

#: idx_tasks_finished's condition since schema version 19: equalities joined by OR, which
#: SQLite tests in place, where an IN list of more than two values is a temporary table
#: built for each row written (storage/sqlite/schema.py).
TERMINAL_SQL = (
    "(status = 'completed' OR status = 'failed' OR status = 'cancelled' OR status = 'timed_out')"
)

RETENTION_SQL = RetentionSql(
    # INDEXED BY: with the status term, the planner would rather read every finished task
    # through idx_tasks_status_order and sort them, for each chunk.
    finished_tasks="tasks INDEXED BY idx_tasks_finished",
    terminal=TERMINAL_SQL,
    # What a row costs before SQLite's own overhead (a few bytes a row, and the indexes).
    event_size=(
        "length(CAST(data AS BLOB)) + length(CAST(type AS BLOB)) + length(CAST(source AS BLOB))"
        " + coalesce(length(correlation_id), 0) + coalesce(length(task_id), 0)"
        " + coalesce(length(plan_id), 0) + coalesce(length(worker_id), 0) + 16"
    ),
)
