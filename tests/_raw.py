"""Reading and changing a database behind the runtime's back, on either store.

Tests inspect what is really stored (or corrupt it on purpose) through a connection of
their own rather than through the runtime. ``db`` is what the ``db_path`` fixture gave: a
SQLite file path, or a ``postgresql://`` URL when the suite runs with
``HIVE_TEST_STORE=postgres``. SQL is written once, with ``?`` marks, in the dialect both
stores share; on PostgreSQL each ``?`` becomes psycopg's ``%s`` (so a literal ``?`` in a
string cannot be used, and a literal ``%`` is escaped).

Each call opens its own connection and closes it: a test's raw read never shares a
transaction, a lock or a cache with the runtime it checks. ``raw_rows``/``raw_execute``
block; in async tests use ``araw_rows``/``araw_execute``, which run them on a worker thread
(a SQLite connection waiting for the runtime's write lock must not stop the event loop the
runtime needs to let go of it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

import _pg
import anyio

__all__ = [
    "STORE",
    "araw_execute",
    "araw_rows",
    "as_json",
    "fresh_database",
    "is_postgres",
    "never_opened",
    "raw_execute",
    "raw_rows",
    "refusing_writes",
]

Row = tuple[Any, ...]


def _store() -> Literal["sqlite", "postgres"]:
    store = os.environ.get("HIVE_TEST_STORE", "sqlite")
    if store not in ("sqlite", "postgres"):
        raise ValueError(f"HIVE_TEST_STORE must be 'sqlite' or 'postgres', not {store!r}")
    return "postgres" if store == "postgres" else "sqlite"


#: The store this run of the suite puts its databases in (``HIVE_TEST_STORE``).
STORE = _store()


def fresh_database(folder: Path, *, migrated: bool = True) -> str:
    """A database no runtime has opened, in this run's store, at the current schema
    version already: a SQLite file ``folder/data/hive.db``, a copy of a template file the
    store's own migration made once per process (:func:`_sqlite_template`), or a new
    PostgreSQL database's URL, a template's copy too (tests/_pg.py says why). Not
    ``migrated``, on SQLite the path only, nothing there yet (its folder not made): for
    the tests of what an open does to a path that holds nothing (the ``new_db_path``
    fixture)."""
    if STORE == "postgres":
        return _pg.new_database(migrated=True)
    path = folder / "data" / "hive.db"
    if not migrated:
        return str(path)
    # As the runtime makes them (storage/sqlite/files.py): each missing folder 0700 (the
    # umask may take bits, never add them), the file 0600.
    missing = [p for p in path.parents if not p.exists()]
    for made in reversed(missing):
        made.mkdir(mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(_sqlite_template())
    return str(path)


@functools.cache
def _sqlite_template() -> bytes:
    """The bytes of a SQLite database the store's own open made and migrated to the current
    schema, then closed (its WAL checkpointed into the file): what a runtime's first open
    of an empty file leaves, and nothing more (no runtime, so no lock file; no row).

    Made once per process and copied per test: a runtime's first open of an empty file
    runs every migration in one transaction with its fsyncs, measured at load ~5 as 50 to
    110 ms against 20 to 26 ms for a copy of this template (and half the CPU), in the
    ~2,000 tests that ask for ``db_path``. The store's migration itself is tested on paths
    that hold nothing yet (tests/test_schema.py, tests/test_database_files.py)."""
    import tempfile
    import threading

    from hive_orchestration.storage.sqlite.claim import Target
    from hive_orchestration.storage.sqlite.database import open_database

    async def migrate(path: str) -> None:
        db, _ = await open_database(
            Target(path, path), driver="thread", synchronous="FULL", busy_timeout=10.0
        )
        await db.close()

    with tempfile.TemporaryDirectory(prefix="hive-test-template-") as folder:
        path = os.path.join(folder, "hive.db")
        # On a thread of its own: the caller may be inside a running event loop.
        failed: list[BaseException] = []

        def run() -> None:
            try:
                anyio.run(migrate, path)
            except BaseException as exc:  # pragma: no cover - reraised below
                failed.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        leftovers = sorted(set(os.listdir(folder)) - {"hive.db"})
        if leftovers:  # the WAL not checkpointed into the file: the copy would lack it
            raise RuntimeError(f"the SQLite template left {leftovers} beside its file")
        return Path(path).read_bytes()


def is_postgres(db: str) -> bool:
    """Whether ``db`` names a PostgreSQL database (the port's own rule: the URL scheme)."""
    return db.lower().startswith(("postgresql://", "postgres://"))


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def raw_rows(db: str, sql: str, params: Sequence[object] = ()) -> list[Row]:
    """The rows ``sql`` answers, read by a connection of the test's own."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(_pg_sql(sql), tuple(params)).fetchall()]
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return [tuple(row) for row in conn.execute(sql, tuple(params)).fetchall()]


def raw_execute(db: str, sql: str, params: Sequence[object] = ()) -> int:
    """Run one statement and commit it; returns its row count."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute(_pg_sql(sql), tuple(params)).rowcount
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn, conn:
        return conn.execute(sql, tuple(params)).rowcount


async def araw_rows(db: str, sql: str, params: Sequence[object] = ()) -> list[Row]:
    """:func:`raw_rows` on a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(raw_rows, db, sql, params))


async def araw_execute(db: str, sql: str, params: Sequence[object] = ()) -> int:
    """:func:`raw_execute` on a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(raw_execute, db, sql, params))


def as_json(value: object) -> Any:
    """A JSON column's value as Python: SQLite gives its text, PostgreSQL may give the
    decoded value already (``json``/``jsonb`` columns)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def never_opened(db: str) -> bool:
    """Whether nothing has opened ``db`` yet: on SQLite, no file (nor its folder), or a
    file as the test fixture made it (a copy of the migrated template: no lock file, which
    a runtime's open makes beside it, no WAL, no task or event); on PostgreSQL, a database
    as the test fixture made it, empty (``pg_url``) or a copy of the migrated template
    (``db_path``): no ``hive_nodes`` table, which a runtime's open makes before anything
    else (``storage/pg/claim.py``: its node's row), and no task or event."""
    if is_postgres(db):
        tables = {
            str(name)
            for (name,) in raw_rows(
                db,
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()",
            )
        }
        if not tables:
            return True
        if "hive_nodes" in tables or not {"tasks", "events"} <= tables:
            return False
        return raw_rows(
            db, "SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM events)"
        ) == [(0,)]
    path = Path(db)
    if not path.exists():
        return True
    # A copy of the template (what db_path gives): a runtime's open makes its lock file
    # beside the database (storage/sqlite/claim.py) and leaves it there.
    if Path(f"{db}.lock").exists() or Path(f"{db}-wal").exists():
        return False
    return raw_rows(db, "SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM events)") == [
        (0,)
    ]


_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _create_refusal(db: str, name: str, table: str, event: str, when: str, message: str) -> None:
    if is_postgres(db):
        # PostgreSQL's triggers call a function; RAISE's message carries into the error.
        quoted = message.replace("'", "''")
        raw_execute(
            db,
            f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN IF {when} THEN RAISE EXCEPTION '{quoted}'; END IF; RETURN NEW; END $$",
        )
        raw_execute(
            db,
            f"CREATE TRIGGER {name} BEFORE {event} ON {table}"
            f" FOR EACH ROW EXECUTE FUNCTION {name}_fn()",
        )
    else:
        quoted = message.replace("'", "''")
        raw_execute(
            db,
            f"CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {when}"
            f" BEGIN SELECT RAISE(ABORT, '{quoted}'); END",
        )


def _drop_refusal(db: str, name: str, table: str) -> None:
    if is_postgres(db):
        raw_execute(db, f"DROP TRIGGER {name} ON {table}")
        raw_execute(db, f"DROP FUNCTION {name}_fn()")
    else:
        raw_execute(db, f"DROP TRIGGER {name}")


@contextlib.asynccontextmanager
async def refusing_writes(
    db: str,
    table: str,
    message: str,
    *,
    event: str = "INSERT",
    when: str = "TRUE",
    name: str = "hive_test_refusal",
) -> AsyncIterator[None]:
    """While inside, the database refuses ``event`` (INSERT, UPDATE, DELETE, or
    ``UPDATE OF col``) on ``table`` for rows where ``when`` holds (an expression on
    ``NEW``/``OLD`` both stores read alike, e.g. ``NEW.title = 'bad'``), with an error
    carrying ``message``: a commit failure the runtime cannot tell from a real one."""
    if not (_NAME.fullmatch(name) and _NAME.fullmatch(table)):
        raise ValueError(f"not a plain SQL name: {name!r} / {table!r}")
    await anyio.to_thread.run_sync(_create_refusal, db, name, table, event, when, message)
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_drop_refusal, db, name, table)
