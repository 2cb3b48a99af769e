"""The PostgreSQL schema: one migration per SQLite migration, and how they are applied.

One version number for both stores. ``MIGRATIONS[n - 1]`` here takes a PostgreSQL
database from version ``n - 1`` to ``n``, as the SQLite list of the same index does a
SQLite file, and a database of either store at version ``n`` has the same tables,
columns and indexes (tests/test_pg_schema.py holds both lists to the same length, and
names the version that lacks its twin). So a migration is always added to both.

How the types are spelled here (plain data, as in the SQLite list):

- ``TIMESTAMP`` is ``timestamptz``. The shared SQL binds ISO-8601 text, which PostgreSQL
  casts (psycopg sends text of no declared type); rows come back as aware ``datetime``
  in UTC (the driver sets the session's time zone), which the row decoders read as they
  read SQLite's text. Comparisons and ordering are by instant, as the fixed-width UTC text
  gave on SQLite. The schedules' times (version 14) are ``TEXT`` in SQLite too, and stay
  text here: their module compares them as text.
- ``INTEGER`` is ``bigint`` (SQLite's integers are 64-bit), ``REAL`` is ``double
  precision``, ``BLOB`` is ``bytea``.
- ``TEXT`` is ``text COLLATE "C"``: SQLite compares text by its bytes, and the ready
  queues, the keyset cursors of listings and the event reads by type order by it (an ICU
  or libc collation would put ``task_B`` before ``task_a`` and break the ranges
  ``storage/event_reads.py`` computes). "C" compares UTF-8 by bytes, which is code point
  order, as SQLite does.
- ``events.seq`` is a plain ``bigint`` key, never a serial: a serial is handed out in
  the order transactions start, not the order they commit, so a reader could pass a
  number whose transaction commits later (pg-design 4.4). The writer gives it.

Beside the versioned tables, a few of this store's own (``hive_*``: the version, the
owner) are made at every open if missing, outside the version list: they are how this
store runs, not the data.

Migrations run one version at a time, each in its own transaction with its version bump
(PostgreSQL's DDL is transactional, so a failed or interrupted step leaves the version
before it), under ``pg_advisory_xact_lock``: several runtimes starting at once on one
database migrate it once; the others wait, then find it done. A version newer than this
code knows is refused, before anything is written (:class:`NewerSchemaError`, as on SQLite).
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from ...errors import NewerSchemaError, StorageError
from .url import display_url

if TYPE_CHECKING:
    import psycopg

    from .driver import PostgresDriver

__all__ = [
    "MIGRATE_LOCK",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "check_version",
    "migrate",
    "read_version",
]

#: The advisory lock migrations take (per database: PostgreSQL scopes advisory locks to
#: the database they are taken in). "hivemigr" in ASCII.
MIGRATE_LOCK = 0x68697665_6D696772

_T = 'text COLLATE "C"'
_TS = "timestamptz"
_INT = "bigint"
_REAL = "double precision"

_V1: tuple[str, ...] = (
    f"""
    CREATE TABLE tasks (
        id {_T} PRIMARY KEY,
        title {_T} NOT NULL,
        description {_T},
        task_type {_T} NOT NULL,
        priority {_INT} DEFAULT 1,
        status {_T} NOT NULL DEFAULT 'queued',
        current_phase {_T} NOT NULL DEFAULT 'start',
        workflow {_T},
        payload {_T},
        created_at {_TS},
        updated_at {_TS},
        assigned_worker {_T},
        due_date {_TS},
        max_retries {_INT} DEFAULT 3,
        tags {_T}
    )
    """,
    f"""
    CREATE TABLE runs (
        id {_T} PRIMARY KEY,
        task_id {_T} NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        worker_id {_T},
        run_number {_INT} NOT NULL DEFAULT 1,
        status {_T} NOT NULL DEFAULT 'pending',
        phase {_T},
        result_data {_T},
        error_message {_T},
        output_log {_T},
        started_at {_TS},
        completed_at {_TS}
    )
    """,
    f"""
    CREATE TABLE workers (
        id {_T} PRIMARY KEY,
        role {_T} NOT NULL,
        status {_T} NOT NULL DEFAULT 'active',
        last_heartbeat {_TS} DEFAULT CURRENT_TIMESTAMP,
        capabilities {_T},
        current_task_id {_T},
        metadata {_T},
        registered_at {_TS},
        FOREIGN KEY (current_task_id) REFERENCES tasks (id) ON DELETE SET NULL
    )
    """,
    f"""
    CREATE TABLE planning_queue (
        id {_T} PRIMARY KEY,
        task_description {_T} NOT NULL,
        priority {_INT} DEFAULT 50,
        requestor {_T},
        context_data {_T},
        complexity_estimate {_T},
        status {_T} NOT NULL DEFAULT 'pending',
        assigned_agent {_T},
        assigned_at {_TS},
        completed_at {_TS},
        created_at {_TS}
    )
    """,
    f"""
    CREATE TABLE execution_plans (
        id {_T} PRIMARY KEY,
        planning_task_id {_T} NOT NULL,
        plan_data {_T} NOT NULL,
        estimated_duration {_INT},
        estimated_complexity {_T},
        generated_workflow {_T},
        subtask_count {_INT} DEFAULT 0,
        dependency_count {_INT} DEFAULT 0,
        generated_at {_TS},
        status {_T} DEFAULT 'draft',
        FOREIGN KEY (planning_task_id) REFERENCES planning_queue (id)
    )
    """,
    f"""
    CREATE TABLE plan_execution (
        id {_T} PRIMARY KEY,
        plan_id {_T} NOT NULL REFERENCES execution_plans (id) ON DELETE CASCADE,
        subtask_id {_T} NOT NULL,
        task_id {_T} REFERENCES tasks (id) ON DELETE SET NULL,
        status {_T} NOT NULL DEFAULT 'pending',
        started_at {_TS},
        completed_at {_TS},
        UNIQUE (plan_id, subtask_id)
    )
    """,
    # seq: given by the writer in commit order, never a serial (see the module).
    f"""
    CREATE TABLE events (
        seq {_INT} PRIMARY KEY,
        type {_T} NOT NULL,
        timestamp {_REAL} NOT NULL,
        source {_T} NOT NULL,
        correlation_id {_T},
        task_id {_T},
        plan_id {_T},
        worker_id {_T},
        data {_T} NOT NULL DEFAULT '{{}}'
    )
    """,
    "CREATE INDEX idx_tasks_status ON tasks (status)",
    "CREATE INDEX idx_tasks_priority ON tasks (priority DESC, created_at)",
    "CREATE INDEX idx_runs_task_id ON runs (task_id)",
    "CREATE INDEX idx_runs_worker_id ON runs (worker_id)",
    "CREATE INDEX idx_workers_status ON workers (status)",
    "CREATE INDEX idx_workers_role ON workers (role)",
    "CREATE INDEX idx_planning_queue_status ON planning_queue (status)",
    "CREATE INDEX idx_execution_plans_status ON execution_plans (status)",
    "CREATE INDEX idx_plan_execution_plan_id ON plan_execution (plan_id)",
    "CREATE INDEX idx_events_task_id ON events (task_id) WHERE task_id IS NOT NULL",
    "CREATE INDEX idx_events_correlation_id ON events (correlation_id)"
    " WHERE correlation_id IS NOT NULL",
)

_V2: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN attempts {_INT} NOT NULL DEFAULT 0",
    f"ALTER TABLE tasks ADD COLUMN result {_T}",
    f"ALTER TABLE tasks ADD COLUMN error {_T}",
    f"ALTER TABLE tasks ADD COLUMN idempotency_key {_T}",
    f"ALTER TABLE tasks ADD COLUMN correlation_id {_T}",
    f"ALTER TABLE tasks ADD COLUMN source_agent {_T}",
    "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
)

_V3: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN timeout {_REAL}",
    f"ALTER TABLE tasks ADD COLUMN available_at {_TS}",
    f"ALTER TABLE tasks ADD COLUMN concurrency_key {_T}",
    f"ALTER TABLE tasks ADD COLUMN concurrency_limit {_INT}",
    f"ALTER TABLE runs ADD COLUMN lease_seconds {_REAL}",
    f"ALTER TABLE runs ADD COLUMN lease_expires_at {_TS}",
    f"ALTER TABLE runs ADD COLUMN progress {_T}",
)

_V4: tuple[str, ...] = (
    f"ALTER TABLE workers ADD COLUMN incarnation {_T}",
    f"ALTER TABLE tasks ADD COLUMN requires {_T}",
)

_V5: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN plan_id {_T}",
    f"ALTER TABLE tasks ADD COLUMN subtask_id {_T}",
    "CREATE UNIQUE INDEX idx_tasks_plan_subtask ON tasks (plan_id, subtask_id)"
    " WHERE plan_id IS NOT NULL",
    f"ALTER TABLE execution_plans ADD COLUMN failure_policy {_T} NOT NULL DEFAULT 'fail_fast'",
    f"ALTER TABLE execution_plans ADD COLUMN source_agent {_T}",
    f"ALTER TABLE execution_plans ADD COLUMN started_at {_TS}",
    f"ALTER TABLE execution_plans ADD COLUMN completed_at {_TS}",
    f"ALTER TABLE execution_plans ADD COLUMN error {_T}",
    f"ALTER TABLE plan_execution ADD COLUMN dependencies {_T} NOT NULL DEFAULT '[]'",
    f"ALTER TABLE plan_execution ADD COLUMN error {_T}",
    f"ALTER TABLE planning_queue ADD COLUMN error {_T}",
)

# PostgreSQL has no rowid: "seq order" within the index is its key order only because
# seq is in it, so the index names it (SQLite's carries the rowid implicitly).
_V6: tuple[str, ...] = (
    "CREATE INDEX idx_events_plan_id ON events (plan_id, seq) WHERE plan_id IS NOT NULL",
)

_V7: tuple[str, ...] = ("ALTER TABLE runs ADD COLUMN lease_hash bytea",)

# As in version 6, seq is named where SQLite's index holds the rowid implicitly.
_V8: tuple[str, ...] = (
    "CREATE INDEX idx_events_type ON events (type, seq)",
    "CREATE INDEX idx_tasks_status_order ON tasks (status, priority DESC, created_at, id)",
)

_V9: tuple[str, ...] = (
    "CREATE INDEX idx_tasks_ready ON tasks"
    " (task_type, requires, concurrency_key, priority DESC, created_at, id)"
    " WHERE status = 'queued'",
)

_V10: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN idempotency_scope {_T}",
    "DROP INDEX idx_tasks_idempotency_key",
    "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
    " WHERE idempotency_key IS NOT NULL AND (idempotency_scope IS NULL"
    " OR status IN ('queued', 'blocked', 'assigned', 'running'))",
    f"""
    CREATE TABLE revoked_task_types (
        task_type {_T} PRIMARY KEY,
        revoked_at {_TS} NOT NULL,
        source_agent {_T},
        reason {_T}
    )
    """,
)

_V11: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN traceparent {_T}",
    f"ALTER TABLE tasks ADD COLUMN tracestate {_T}",
)

_V12: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN run_at {_TS}",
    f"ALTER TABLE tasks ADD COLUMN expires_at {_TS}",
    "DROP INDEX idx_tasks_ready",
    "CREATE INDEX idx_tasks_ready ON tasks"
    " (task_type, requires, concurrency_key, priority DESC, created_at, id)"
    " WHERE status = 'queued' AND run_at IS NULL",
    "CREATE INDEX idx_tasks_delayed ON tasks (run_at, id)"
    " WHERE status = 'queued' AND run_at IS NOT NULL",
    "CREATE INDEX idx_tasks_expiring ON tasks (expires_at, id)"
    " WHERE status = 'queued' AND expires_at IS NOT NULL",
    "CREATE INDEX idx_runs_started ON runs (started_at) WHERE lease_seconds IS NOT NULL",
)

_V13: tuple[str, ...] = (
    f"CREATE TABLE IF NOT EXISTS event_log (id {_INT} PRIMARY KEY CHECK (id = 1),"
    f" trimmed_through {_INT} NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS idx_tasks_finished ON tasks (updated_at)"
    " WHERE status IN ('completed', 'failed', 'cancelled', 'timed_out')",
    "CREATE INDEX IF NOT EXISTS idx_plan_execution_task_id ON plan_execution (task_id)",
    "CREATE INDEX IF NOT EXISTS idx_workers_current_task_id ON workers (current_task_id)",
)

# Times as fixed-width UTC text, as on SQLite (storage/schedules.py compares the text).
_V14: tuple[str, ...] = (
    "CREATE TABLE schedules ("
    f" id {_T} PRIMARY KEY,"
    f" name {_T} NOT NULL UNIQUE,"
    f" definition {_T} NOT NULL,"
    f" paused {_INT} NOT NULL DEFAULT 0,"
    f" not_before {_T} NOT NULL,"
    f" last_slot {_T},"
    f" last_task_id {_T},"
    f" fired {_INT} NOT NULL DEFAULT 0,"
    f" created_at {_T} NOT NULL,"
    f" updated_at {_T} NOT NULL)",
)

# Several nodes on one database (pg-design 4): which node holds a claimed task, and a
# version bumped by each batch that changes the task, which a node's write is fenced by.
# The holder is set by the database itself, as a task enters assigned or running, from
# the writer's session (``hive.node``, set by each node's write connection: claim.py),
# so that no statement shared with SQLite names it; NULL (not held, or written by no
# node) is recovered by whoever opens the database next.
_V15: tuple[str, ...] = (
    f"ALTER TABLE tasks ADD COLUMN node_id {_T}",
    f"ALTER TABLE tasks ADD COLUMN version {_INT} NOT NULL DEFAULT 0",
    "CREATE OR REPLACE FUNCTION hive_claim_holder() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN"
    "  IF NEW.status NOT IN ('assigned', 'running') THEN NEW.node_id := NULL;"
    "  ELSIF TG_OP = 'INSERT' OR OLD.status NOT IN ('assigned', 'running') THEN"
    "   NEW.node_id := nullif(current_setting('hive.node', true), '');"
    "  END IF;"
    "  RETURN NEW;"
    " END $$",
    "CREATE TRIGGER tasks_claim_holder BEFORE INSERT OR UPDATE OF status ON tasks"
    " FOR EACH ROW EXECUTE FUNCTION hive_claim_holder()",
    "CREATE INDEX idx_tasks_node ON tasks (node_id) WHERE node_id IS NOT NULL",
    # A worker is watched (heartbeats, worker_timeout) by the node it talks to: each write
    # of its row names that node, and a node opening loads only the workers of no live
    # node besides itself (sql.py, LoadWorkers), never declaring another's offline.
    f"ALTER TABLE workers ADD COLUMN node_id {_T}",
    "CREATE OR REPLACE FUNCTION hive_writer_node() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN NEW.node_id := nullif(current_setting('hive.node', true), ''); RETURN NEW; END $$",
    "CREATE TRIGGER workers_node BEFORE INSERT OR UPDATE ON workers"
    " FOR EACH ROW EXECUTE FUNCTION hive_writer_node()",
    # A plan is driven by the node that created it while it lives (plans.py, TakePlan).
    f"ALTER TABLE execution_plans ADD COLUMN node_id {_T}",
    "CREATE TRIGGER plans_node BEFORE INSERT ON execution_plans"
    " FOR EACH ROW EXECUTE FUNCTION hive_writer_node()",
    # A claim of a task with a concurrency key counts the key's claimed tasks (rows.py).
    "CREATE INDEX idx_tasks_held_key ON tasks (concurrency_key)"
    " WHERE status IN ('assigned', 'running') AND concurrency_key IS NOT NULL",
)

# The counter row that numbers events in commit order across nodes (pg-design 4.4): each
# transaction that appends events ends by adding their count to it, its events numbered
# from the result (sql.py's numbered_events). Its row lock is held to the end of COMMIT,
# so the transaction that takes N + 1 commits after the one that took N: a reader that
# sees N + 1 sees N. It starts where the log is, or where it was trimmed to (the numbers
# a log trimmed to nothing gave are never given again). A ``hive_`` table: this store's
# own, its SQLite twin is no table at all (one writer numbers in memory there).
_V16: tuple[str, ...] = (
    "CREATE TABLE hive_event_seq (id integer PRIMARY KEY CHECK (id = 1), last bigint NOT NULL)",
    "INSERT INTO hive_event_seq (id, last) SELECT 1, GREATEST("
    " (SELECT coalesce(max(seq), 0) FROM events),"
    " (SELECT coalesce(max(trimmed_through), 0) FROM event_log))",
)

# The leader of the nodes (pg-design 4.3, storage/pg/leader.py): the node holding the
# leader's advisory lock bumps the epoch as it takes the role, and every duty it then does
# is fenced by it (storage/grouping.py's FENCE_LEADER), so that a leader that lost the role
# without noticing changes nothing. A ``hive_`` table: its SQLite twin is empty (one owner).
_V17: tuple[str, ...] = (
    "CREATE TABLE hive_leader (id integer PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL,"
    f" node_id {_T}, since timestamptz)",
    "INSERT INTO hive_leader (id, epoch) VALUES (1, 0)",
)

# Leases by the database's clock (pg-design 4.3, storage/pg/leader.py): a claimed run's
# ``lease_deadline`` is set by the database as its lease is set or renewed, to its own
# now() plus the span the node set (the node's ``lease_expires_at`` less the wall time it
# set it from, which the node's write gives as ``hive.clock``: storage/grouping.py's
# LEASE_CLOCK); NULL once the run ends. So the leader finds the expired leases of a live
# node that does not act on them (its event loop stuck, its process stopped) by one clock,
# the database's, whatever the nodes' clocks say. Its SQLite twin is the column, unused.
_V18: tuple[str, ...] = (
    f"ALTER TABLE runs ADD COLUMN lease_deadline {_TS}",
    "CREATE OR REPLACE FUNCTION hive_lease_deadline() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN"
    "  IF NEW.status NOT IN ('assigned', 'running') OR NEW.lease_expires_at IS NULL THEN"
    "   NEW.lease_deadline := NULL;"
    "  ELSIF TG_OP = 'INSERT' OR NEW.lease_expires_at IS DISTINCT FROM OLD.lease_expires_at"
    "   OR OLD.lease_deadline IS NULL THEN"
    "   NEW.lease_deadline := now() + GREATEST(NEW.lease_expires_at - coalesce("
    "    nullif(current_setting('hive.clock', true), '')::timestamptz, now()), interval '0');"
    "  END IF;"
    "  RETURN NEW;"
    " END $$",
    "CREATE TRIGGER runs_lease_deadline BEFORE INSERT OR UPDATE ON runs"
    " FOR EACH ROW EXECUTE FUNCTION hive_lease_deadline()",
    "CREATE INDEX idx_runs_lease_deadline ON runs (lease_deadline)"
    " WHERE lease_deadline IS NOT NULL",
)

# The twin of SQLite's version 19 (its two partial indexes whose IN lists it builds a
# temporary table for at every row written, rewritten as equalities joined by OR):
# nothing here. PostgreSQL tests an IN list of constants in place.
_V19: tuple[str, ...] = ()

#: MIGRATIONS[n - 1] brings a database from version n - 1 to n (the twin of the SQLite
#: list's entry n - 1: same tables, columns and indexes).
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

#: This store's own tables, made at every open if missing (under the migration lock):
#: the schema version, one row.
_BOOTSTRAP: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS hive_schema ("
    " id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)",
    "INSERT INTO hive_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
)


def _version(conn: psycopg.Connection[tuple[Any, ...]]) -> int | None:
    """The version in ``hive_schema``, or None where the table is not (a database no
    runtime has opened yet: version 0)."""
    row = conn.execute("SELECT to_regclass('hive_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = conn.execute("SELECT version FROM hive_schema WHERE id = 1").fetchone()
    return None if found is None else int(found[0])


def _step(conn: psycopg.Connection[tuple[Any, ...]], target: int) -> tuple[int, bool]:
    """Take the database one version toward ``target`` in one transaction, under the
    migration lock; returns the version it is at now and whether there is more to do."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        if _version(conn) is None:
            for sql in _BOOTSTRAP:
                conn.execute(sql)
        version = _version(conn) or 0
        if version > SCHEMA_VERSION or version >= target:
            return version, False
        for sql in MIGRATIONS[version]:
            conn.execute(sql)
        conn.execute("UPDATE hive_schema SET version = %s WHERE id = 1", (version + 1,))
        return version + 1, version + 1 < target


async def read_version(db: PostgresDriver) -> int:
    """The schema version of the database (0: no runtime has opened it), read only."""
    return await db.run(lambda conn: _version(conn) or 0)


async def migrate(db: PostgresDriver, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to version ``target`` (the latest unless a test asks for an
    older one), a version per transaction; returns the version it is at.

    Raises :class:`NewerSchemaError`, having written nothing, for a database whose version
    is newer than this code knows. A runtime that starts while another one migrates waits
    for it (the lock), then goes on from where it left off.
    """
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {target}: versions run from 0 to {SCHEMA_VERSION}")
    current = await read_version(db)
    if current > SCHEMA_VERSION:
        raise NewerSchemaError(display_url(db.url), current, SCHEMA_VERSION)
    more = current < target
    while more:
        current, more = await db.run(_step, target)
    if current > SCHEMA_VERSION:  # another runtime, newer than this one, migrated meanwhile
        raise NewerSchemaError(display_url(db.url), current, SCHEMA_VERSION)
    return current


async def check_version(db: PostgresDriver) -> int:
    """For a connection that must not write (the inspector): the database's version, if
    it is the one this code knows; else :class:`NewerSchemaError`, or a
    :class:`StorageError` saying how to migrate an older one."""
    version = await read_version(db)
    shown = display_url(db.url)
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(shown, version, SCHEMA_VERSION)
    if version < SCHEMA_VERSION:
        raise StorageError(
            f"database {shown!r} has schema version {version}, older than this version of"
            f" hive-orchestration ({SCHEMA_VERSION}); it cannot be read until it is"
            f" migrated: run `hive-orchestration db upgrade --db {shlex.quote(shown)}`",
            path=shown,
        )
    return version
