"""Transactions interrupted between two of their statements, for the tests of atomicity.

A write is applied whole or not at all: that only shows when something stops a
transaction half-way, which cancelling a caller never does (the storage actor's batch is
shielded) and which a write of one statement cannot show. Here the transactions a test
picks really stop half-way: after ``cut`` of their rows, the connection either fails with
SQLite's I/O error (as a failing disk would) or the whole process is killed with SIGKILL.
With BEGIN and COMMIT in place nothing of such a transaction is left; without them (each
statement committing on its own), or with a write split over two transactions, the rows
before the cut stay, and the tests that use this find them in the database.

Every transaction of the storage drivers (aiosqlite's thread and the worker thread alike)
runs as ``drivers._transaction_sync(connection, statements)``; :func:`interrupt` wraps it.

Run as a script, this is the child process of
``tests/test_storage.py::test_a_process_killed_in_the_middle_of_a_write_leaves_none_of_it``::

    python _interrupt.py BACKEND DB_PATH

It creates tasks one by one, printing ``ack TASK_ID`` as each create returns, then prints
``cut`` and creates a batch of tasks (one write, one transaction): the process kills itself
after half the rows of that transaction.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Statement = tuple[str, tuple[object, ...]]
#: Given the statements of a transaction: after how many rows to interrupt it, or None.
Choose = Callable[[Sequence[Statement]], "int | None"]

_ROW_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def io_error() -> None:
    """Fail as SQLite does when the disk fails under it."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # what classify() reads
    error.sqlite_errorname = "SQLITE_IOERR"
    raise error


def kill() -> None:
    """Die as a process killed in the middle of a transaction does (from the driver's
    thread: the whole process goes)."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not a statement more while the signal lands


def _rows_in(sql: str) -> int:
    """The rows one parameter row of ``sql`` writes: one, or one per VALUES row of a
    multi-row INSERT (the drivers send a run of an INSERT so: ``drivers._runs``)."""
    values = sql.find(" VALUES (")
    return 1 + sql.count("), (", values) if sql.startswith("INSERT") and values > 0 else 1


class InterruptedConnection:
    """A connection that runs ``cut`` rows of the transaction, then ``stop()`` is called."""

    def __init__(self, conn: sqlite3.Connection, cut: int, stop: Callable[[], None]) -> None:
        self._conn = conn
        self._left = cut
        self._stop = stop

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(_ROW_WRITES):
            self._take(1)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:
        rows = list(rows)
        each = _rows_in(sql)
        if len(rows) * each > self._left:
            whole = self._left // each  # a multi-row INSERT's parameter row goes whole
            if whole:
                self._conn.executemany(sql, rows[:whole]).close()
            self._left = 0
            self._stop()
        self._take(len(rows) * each)
        return self._conn.executemany(sql, rows)

    def _take(self, rows: int) -> None:
        if rows > self._left:
            self._left = 0
            self._stop()
        self._left -= rows

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class Interrupter:
    """Wraps the drivers' transaction function; counts the transactions it interrupted."""

    def __init__(self, choose: Choose, stop: Callable[[], None] = io_error) -> None:
        self.choose = choose
        self.stop = stop
        self.interrupted = 0
        from hive_orchestration.storage.sqlite import drivers

        self.original = drivers._transaction_sync

    def __call__(self, conn: sqlite3.Connection, statements: Sequence[Statement]) -> None:
        cut = self.choose(statements)
        if cut is None:
            self.original(conn, statements)
            return
        assert 0 < cut < len(statements), (cut, len(statements))
        self.interrupted += 1
        self.original(InterruptedConnection(conn, cut, self.stop), statements)  # type: ignore[arg-type]


def interrupt(patch: Callable[[Any, str, Any], None], interrupter: Interrupter) -> Interrupter:
    """Install ``interrupter`` with ``patch`` (a test's ``monkeypatch.setattr``)."""
    from hive_orchestration.storage.sqlite import drivers

    patch(drivers, "_transaction_sync", interrupter)
    return interrupter


def event_rows(statements: Sequence[Statement]) -> list[dict[str, object]]:
    """The event rows a transaction inserts, by column (``type``, ``plan_id``, ``data``...)."""
    rows: list[dict[str, object]] = []
    for sql, params in statements:
        if sql.startswith("INSERT INTO events"):
            columns = [name.strip() for name in sql[sql.index("(") + 1 : sql.index(")")].split(",")]
            rows.append(dict(zip(columns, params, strict=True)))
    return rows


# -- the child process ---------------------------------------------------------------------


async def _child(path: str) -> None:
    from hive_orchestration import Runtime

    armed = False

    def choose(statements: Sequence[Statement]) -> int | None:
        return len(statements) // 2 if armed and len(statements) > 1 else None

    interrupt(setattr, Interrupter(choose, kill))
    async with Runtime.open(path) as runtime:
        for n in range(5):
            task_id = await runtime.create_task("job", {"n": n})
            print(f"ack {task_id}", flush=True)
        armed = True
        print("cut", flush=True)
        await runtime.create_tasks([{"task_type": "job", "payload": {"n": n}} for n in range(20)])
        print("survived", flush=True)  # the test fails on this line


if __name__ == "__main__":
    import anyio

    backend, db_path = sys.argv[1:]
    anyio.run(_child, db_path, backend=backend)
