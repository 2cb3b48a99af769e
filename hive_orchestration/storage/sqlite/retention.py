"""The storage side of retention (docs/RETENTION.md) on SQLite: its spellings of the
retention reads, which are every store's (``storage/retention.py``).
"""

from __future__ import annotations

from ..retention import RetentionSql

__all__ = ["RETENTION_SQL"]

RETENTION_SQL = RetentionSql(
    # INDEXED BY: with the status term, the planner would rather read every finished task
    # through idx_tasks_status_order and sort them, for each chunk.
    finished_tasks="tasks INDEXED BY idx_tasks_finished",
    # What a row costs before SQLite's own overhead (a few bytes a row, and the indexes).
    event_size=(
        "length(CAST(data AS BLOB)) + length(CAST(type AS BLOB)) + length(CAST(source AS BLOB))"
        " + coalesce(length(correlation_id), 0) + coalesce(length(task_id), 0)"
        " + coalesce(length(plan_id), 0) + coalesce(length(worker_id), 0) + 16"
    ),
)
