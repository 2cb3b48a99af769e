"""The storage side of retention (docs/RETENTION.md) on PostgreSQL: its spellings of the
retention reads, which are every store's (``storage/retention.py``): no ``INDEXED BY``
(the partial index idx_tasks_finished is chosen by its repeated WHERE term), and
``octet_length`` for SQLite's ``length(CAST(x AS BLOB))``.
"""

from __future__ import annotations

from ..retention import RetentionSql

__all__ = ["RETENTION_SQL"]

RETENTION_SQL = RetentionSql(
    finished_tasks="tasks",
    # idx_tasks_finished's condition on PostgreSQL (its schema version 13).
    terminal="status IN ('completed', 'failed', 'cancelled', 'timed_out')",
    # As on SQLite: the same figure for the same log, whichever store holds it.
    event_size=(
        "octet_length(data) + octet_length(type) + octet_length(source)"
        " + coalesce(length(correlation_id), 0) + coalesce(length(task_id), 0)"
        " + coalesce(length(plan_id), 0) + coalesce(length(worker_id), 0) + 16"
    ),
)
