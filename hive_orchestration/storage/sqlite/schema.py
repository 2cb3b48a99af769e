"""The database schema, as an ordered list of migrations keyed on ``PRAGMA user_version``.

Migration ``n`` (1-based) takes a database from version ``n - 1`` to ``n``. They are only
ever appended: a released migration is never edited. Every pending migration is applied in
one transaction at open, together with the new ``user_version``, so a crash mid-migration
leaves the old version intact.

Version 1 holds the seeds' six tables and nine indexes, plus the append-only event log.
Where the seeds name a table without its columns (runs, planning_queue, plan_execution),
the columns are this package's choice, documented on each table.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1: tuple[str, ...] = (
    # Columns as in the phase report. Timestamps are ISO-8601 UTC text.
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        description TEXT,
        task_type TEXT NOT NULL,
        priority INTEGER DEFAULT 1,
        status TEXT NOT NULL DEFAULT 'queued',
        current_phase TEXT NOT NULL DEFAULT 'start',
        workflow TEXT,
        payload TEXT,
        created_at TIMESTAMP,
        updated_at TIMESTAMP,
        assigned_worker TEXT,
        due_date TIMESTAMP,
        max_retries INTEGER DEFAULT 3,
        tags TEXT
    )
    """,
    # One execution attempt of a task by a worker; deleted with its task.
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        worker_id TEXT,
        run_number INTEGER NOT NULL DEFAULT 1,
        status TEXT NOT NULL DEFAULT 'pending',
        phase TEXT,
        result_data TEXT,
        error_message TEXT,
        output_log TEXT,
        started_at TIMESTAMP,
        completed_at TIMESTAMP
    )
    """,
    """
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active',
        last_heartbeat TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        capabilities TEXT,
        current_task_id TEXT,
        metadata TEXT,
        registered_at TIMESTAMP,
        FOREIGN KEY (current_task_id) REFERENCES tasks (id) ON DELETE SET NULL
    )
    """,
    # A request for a plan ("Deploy to production") waiting for a planner agent.
    """
    CREATE TABLE planning_queue (
        id TEXT PRIMARY KEY,
        task_description TEXT NOT NULL,
        priority INTEGER DEFAULT 50,
        requestor TEXT,
        context_data TEXT,
        complexity_estimate TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        assigned_agent TEXT,
        assigned_at TIMESTAMP,
        completed_at TIMESTAMP,
        created_at TIMESTAMP
    )
    """,
    """
    CREATE TABLE execution_plans (
        id TEXT PRIMARY KEY,
        planning_task_id TEXT NOT NULL,
        plan_data TEXT NOT NULL,
        estimated_duration INTEGER,
        estimated_complexity TEXT,
        generated_workflow TEXT,
        subtask_count INTEGER DEFAULT 0,
        dependency_count INTEGER DEFAULT 0,
        generated_at TIMESTAMP,
        status TEXT DEFAULT 'draft',
        FOREIGN KEY (planning_task_id) REFERENCES planning_queue (id)
    )
    """,
    # One row per subtask of a plan: which task it became and where it stands.
    """
    CREATE TABLE plan_execution (
        id TEXT PRIMARY KEY,
        plan_id TEXT NOT NULL REFERENCES execution_plans (id) ON DELETE CASCADE,
        subtask_id TEXT NOT NULL,
        task_id TEXT REFERENCES tasks (id) ON DELETE SET NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        started_at TIMESTAMP,
        completed_at TIMESTAMP,
        UNIQUE (plan_id, subtask_id)
    )
    """,
    # Append-only. seq is assigned by the storage actor, the only writer, in commit order.
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        timestamp REAL NOT NULL,
        source TEXT NOT NULL,
        correlation_id TEXT,
        task_id TEXT,
        plan_id TEXT,
        worker_id TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    )
    """,
    # The nine indexes of the phase report.
    "CREATE INDEX idx_tasks_status ON tasks (status)",
    "CREATE INDEX idx_tasks_priority ON tasks (priority DESC, created_at)",
    "CREATE INDEX idx_runs_task_id ON runs (task_id)",
    "CREATE INDEX idx_runs_worker_id ON runs (worker_id)",
    "CREATE INDEX idx_workers_status ON workers (status)",
    "CREATE INDEX idx_workers_role ON workers (role)",
    "CREATE INDEX idx_planning_queue_status ON planning_queue (status)",
    "CREATE INDEX idx_execution_plans_status ON execution_plans (status)",
    "CREATE INDEX idx_plan_execution_plan_id ON plan_execution (plan_id)",
    # The event log is read by task ("task ID" with its events) and by correlation.
    "CREATE INDEX idx_events_task_id ON events (task_id) WHERE task_id IS NOT NULL",
    "CREATE INDEX idx_events_correlation_id ON events (correlation_id)"
    " WHERE correlation_id IS NOT NULL",
)

# Version 2: what the TaskManager needs beyond the seeds' columns. attempts counts
# executions that ended without success; the idempotency key is unique when present.
_V2: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN result TEXT",
    "ALTER TABLE tasks ADD COLUMN error TEXT",
    "ALTER TABLE tasks ADD COLUMN idempotency_key TEXT",
    "ALTER TABLE tasks ADD COLUMN correlation_id TEXT",
    "ALTER TABLE tasks ADD COLUMN source_agent TEXT",
    "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
)

# Version 3: claims. A task's run timeout, retry backoff (not handed out before
# available_at) and concurrency group; a claimed run's lease and last progress.
_V3: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN timeout REAL",
    "ALTER TABLE tasks ADD COLUMN available_at TIMESTAMP",
    "ALTER TABLE tasks ADD COLUMN concurrency_key TEXT",
    "ALTER TABLE tasks ADD COLUMN concurrency_limit INTEGER",
    "ALTER TABLE runs ADD COLUMN lease_seconds REAL",
    "ALTER TABLE runs ADD COLUMN lease_expires_at TIMESTAMP",
    "ALTER TABLE runs ADD COLUMN progress TEXT",
)

# Version 4: workers and routing. A worker's incarnation (new at each registration); the
# capabilities a task requires of the worker that takes it.
_V4: tuple[str, ...] = (
    "ALTER TABLE workers ADD COLUMN incarnation TEXT",
    "ALTER TABLE tasks ADD COLUMN requires TEXT",
)

# Version 5: execution plans. A task knows the plan and subtask it was created for (at
# most one task per subtask, enforced here); a plan its failure policy, source and times;
# a subtask row its dependencies (so readiness is one query) and why it ended.
_V5: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN plan_id TEXT",
    "ALTER TABLE tasks ADD COLUMN subtask_id TEXT",
    "CREATE UNIQUE INDEX idx_tasks_plan_subtask ON tasks (plan_id, subtask_id)"
    " WHERE plan_id IS NOT NULL",
    "ALTER TABLE execution_plans ADD COLUMN failure_policy TEXT NOT NULL DEFAULT 'fail_fast'",
    "ALTER TABLE execution_plans ADD COLUMN source_agent TEXT",
    "ALTER TABLE execution_plans ADD COLUMN started_at TIMESTAMP",
    "ALTER TABLE execution_plans ADD COLUMN completed_at TIMESTAMP",
    "ALTER TABLE execution_plans ADD COLUMN error TEXT",
    "ALTER TABLE plan_execution ADD COLUMN dependencies TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE plan_execution ADD COLUMN error TEXT",
    "ALTER TABLE planning_queue ADD COLUMN error TEXT",
)

# Version 6: the event log read by plan (``hive-orchestration events --plan ID``, a plan's
# history), as it already is by task and by correlation. Partial, like those two: most
# events name no plan, and a lookup ``plan_id = ?`` implies ``plan_id IS NOT NULL``, so the
# planner uses it; its rowid (seq) order serves ``seq > ? ORDER BY seq`` too.
_V6: tuple[str, ...] = (
    "CREATE INDEX idx_events_plan_id ON events (plan_id) WHERE plan_id IS NOT NULL",
)

# Version 7: leases that cannot be forged. The SHA-256 of the secret handed to the run's
# claimer, so that its claim stands when the TaskManager restarts; never the secret
# itself. No salt and no slow KDF: those protect guessable secrets (passwords), and this
# one is 128 random bits, each claim's own, so there is no table to precompute and no
# search to slow down. NULL for runs of earlier versions and runs no claim opened.
_V7: tuple[str, ...] = ("ALTER TABLE runs ADD COLUMN lease_hash BLOB",)

# Version 8: the event log read by type (storage/event_reads.py). Its rowid (seq) order
# within a type serves ``type = ? AND seq > ? ORDER BY seq``, and its type order finds the
# distinct types a pattern matches in O(log n) each: a pattern that matches nothing no
# longer reads the whole log.
# And the tasks of a status in a listing's order (listing.py), so that a page of a
# million completed tasks is a range of this index from its cursor, never a sort of all.
_V8: tuple[str, ...] = (
    "CREATE INDEX idx_events_type ON events (type)",
    "CREATE INDEX idx_tasks_status_order ON tasks (status, priority DESC, created_at, id)",
)

# Version 9: the ready queues read from an index. The TaskManager holds only the best
# tasks of each queue (one task type, requirement list and concurrency key) in memory and
# reads the next ones as that head drains: a range scan here, in claim order (priority
# highest first, then age, then id: ids are time-ordered, so that is creation order).
# Partial: a task leaves it when it is claimed or ends, so it stays the size of the backlog.
_V9: tuple[str, ...] = (
    "CREATE INDEX idx_tasks_ready ON tasks"
    " (task_type, requires, concurrency_key, priority DESC, created_at, id)"
    " WHERE status = 'queued'",
)

# Version 10: control by hand (docs/CONTROL.md). A task's idempotency key may be held
# only while the task is live (idempotency_scope 'active'; NULL: forever, as before), so
# the unique index covers the keys still held: a live task's, or any key held forever.
# Its WHERE names the live statuses literally, as the TaskManager's lookup does, so that
# the planner uses it for that lookup. And the task types whose tasks are not handed out
# (revoke_task_type), one row each until restored.
_V10: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN idempotency_scope TEXT",
    "DROP INDEX idx_tasks_idempotency_key",
    "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
    " WHERE idempotency_key IS NOT NULL AND (idempotency_scope IS NULL"
    " OR status IN ('queued', 'blocked', 'assigned', 'running'))",
    """
    CREATE TABLE revoked_task_types (
        task_type TEXT PRIMARY KEY,
        revoked_at TIMESTAMP NOT NULL,
        source_agent TEXT,
        reason TEXT
    )
    """,
)

# Version 11: the W3C trace context of the call that created a task (``traceparent``,
# ``tracestate``), kept with it so that the run a worker makes of it, maybe days later in
# another process, continues that trace. NULL when tracing was off at its creation.
_V11: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN traceparent TEXT",
    "ALTER TABLE tasks ADD COLUMN tracestate TEXT",
)

# Version 12: time (docs/TIMING.md). A delayed task's start time (``run_at``: not
# claimable before it; cleared when it comes due) and a queued task's expiry. A delayed
# task leaves the ready index until it is due, so that a million of them never sit in
# the heads the TaskManager holds, nor lie in the range scans of the queues that are
# ready; two more partial indexes give the TaskManager the earliest start times and
# expiries, in time order, a range at a time. idx_tasks_ready is made again with the new
# condition (the queries of storage/queues.py name it, so that the planner uses it).
_V12: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN run_at TIMESTAMP",
    "ALTER TABLE tasks ADD COLUMN expires_at TIMESTAMP",
    "DROP INDEX idx_tasks_ready",
    "CREATE INDEX idx_tasks_ready ON tasks"
    " (task_type, requires, concurrency_key, priority DESC, created_at, id)"
    " WHERE status = 'queued' AND run_at IS NULL",
    "CREATE INDEX idx_tasks_delayed ON tasks (run_at, id)"
    " WHERE status = 'queued' AND run_at IS NOT NULL",
    "CREATE INDEX idx_tasks_expiring ON tasks (expires_at, id)"
    " WHERE status = 'queued' AND expires_at IS NOT NULL",
    # The rate limits' windows, rebuilt on open from the recent claims (a claim's run has
    # a lease): a range of the last seconds, whatever the number of runs.
    "CREATE INDEX idx_runs_started ON runs (started_at) WHERE lease_seconds IS NOT NULL",
)

# Version 13: retention (docs/RETENTION.md). The event log remembers how far it was
# trimmed, so that its sequence numbers never go back (a log trimmed empty, then reopened,
# goes on after the last number it ever gave) and a replay from before that point is told
# so. And the finished tasks in the order they finished, so that a purge of those older
# than an age reads a range of this index, not the whole table (its WHERE is the very
# term the purge's query repeats, so the planner may use it). IF NOT EXISTS: a database
# whose user_version was set back by hand (tests do) migrates again without harm.
_V13: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS event_log (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " trimmed_through INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS idx_tasks_finished ON tasks (updated_at)"
    " WHERE status IN ('completed', 'failed', 'cancelled', 'timed_out')",
    # Deleting a task sets the references to it to NULL (ON DELETE SET NULL): without an
    # index on the referencing column, SQLite scans that table once per deleted task.
    "CREATE INDEX IF NOT EXISTS idx_plan_execution_task_id ON plan_execution (task_id)",
    "CREATE INDEX IF NOT EXISTS idx_workers_current_task_id ON workers (current_task_id)",
)

# Version 14: periodic schedules (actors/scheduler.py). The definition is one JSON
# document, written whole; what the schedule fired is in its own columns, moved only
# forward, in the TaskManager's write that creates the slot's task (storage/schedules.py).
# Times are fixed-width UTC text, so that comparing the text compares the instants.
_V14: tuple[str, ...] = (
    "CREATE TABLE schedules ("
    " id TEXT PRIMARY KEY,"
    " name TEXT NOT NULL UNIQUE,"
    " definition TEXT NOT NULL,"
    " paused INTEGER NOT NULL DEFAULT 0,"
    " not_before TEXT NOT NULL,"
    " last_slot TEXT,"
    " last_task_id TEXT,"
    " fired INTEGER NOT NULL DEFAULT 0,"
    " created_at TEXT NOT NULL,"
    " updated_at TEXT NOT NULL)",
)

# Version 15: several nodes on one PostgreSQL database hold claims (the node holding a
# claimed task, and the version a node's writes are fenced by: storage/pg/schema.py). A
# SQLite file has one owner, which writes neither: they stay NULL and 0 here, and are
# columns only so that both stores keep one schema.
_V15: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN node_id TEXT",
    "ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS idx_tasks_node ON tasks (node_id) WHERE node_id IS NOT NULL",
    # PostgreSQL's node of a worker (one node here: always NULL, kept for the twin schema).
    "ALTER TABLE workers ADD COLUMN node_id TEXT",
    "ALTER TABLE execution_plans ADD COLUMN node_id TEXT",
    "CREATE INDEX IF NOT EXISTS idx_tasks_held_key ON tasks (concurrency_key)"
    " WHERE status IN ('assigned', 'running') AND concurrency_key IS NOT NULL",
)

# The twin of PostgreSQL's version 16 (its counter row, which numbers the events in commit
# order for several writers): nothing here. One runtime writes a SQLite file, and its
# storage actor numbers the events in memory.
_V16: tuple[str, ...] = ()

# The twin of PostgreSQL's version 17 (the leader's epoch, for several nodes): nothing
# here. A SQLite file has one owner, which is its own leader: the duties a dead node
# leaves behind (its claims, its workers) are done by recovery on open, as they always were.
_V17: tuple[str, ...] = ()

# The twin of PostgreSQL's version 18 (a claimed run's lease deadline by the database's
# clock, which the leader of several nodes reaps by): the column, never set here. A SQLite
# file has one owner, whose own lease deadlines end its leases.
_V18: tuple[str, ...] = (
    "ALTER TABLE runs ADD COLUMN lease_deadline TIMESTAMP",
    "CREATE INDEX IF NOT EXISTS idx_runs_lease_deadline ON runs (lease_deadline)"
    " WHERE lease_deadline IS NOT NULL",
)

# Version 19: the two partial indexes whose condition listed more than two statuses with
# IN. SQLite evaluates a partial index's condition for every row written (for the old
# row and the new one of an UPDATE), and codes a constant IN list of more than two values
# as a temporary table built at each evaluation, never reused by the next row: five of
# them per task on the task path (its insert, its claim's and its end's updates), about a
# fifth of the connection thread's instructions on the batch calls (docs/performance.md,
# "The write path's own SQLite work"). The same statuses as equalities joined by OR are
# tested in place; the queries that must name an index's condition repeat it
# (TERMINAL_SQL in storage/sqlite/retention.py, FIND_KEYS_SQL in storage/sqlite/sql.py).
_V19: tuple[str, ...] = (
    "DROP INDEX IF EXISTS idx_tasks_finished",
    "CREATE INDEX idx_tasks_finished ON tasks (updated_at)"
    " WHERE (status = 'completed' OR status = 'failed' OR status = 'cancelled'"
    " OR status = 'timed_out')",
    "DROP INDEX IF EXISTS idx_tasks_idempotency_key",
    "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
    " WHERE idempotency_key IS NOT NULL AND (idempotency_scope IS NULL"
    " OR (status = 'queued' OR status = 'blocked' OR status = 'assigned'"
    " OR status = 'running'))",
)

#: MIGRATIONS[n - 1] brings a database from version n - 1 to n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _V1,
    _V2,
    _V3,
    _V4,
    _V5,
    _V6,
    _V7,
    _V8,
    _V9,
    _V10,
    _V11,
    _V12,
    _V13,
    _V14,
    _V15,
    _V16,
    _V17,
    _V18,
    _V19,
)
SCHEMA_VERSION = len(MIGRATIONS)
