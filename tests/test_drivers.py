"""The two write-connection drivers, below the storage actor: a transaction is all or
nothing, a state UPDATE of a missing row fails it, a probe tells the faulty unit apart
and writes nothing. The aiosqlite driver runs a whole batch on aiosqlite's thread in one
await where aiosqlite allows it, and one await per statement run where it does not: both
ways are run here."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from hive_orchestration.storage.port import ReadJob
from hive_orchestration.storage.sqlite import drivers
from hive_orchestration.storage.sqlite.drivers import (
    AiosqliteDriver,
    Driver,
    Statement,
    ThreadDriver,
    connect,
)
from hive_orchestration.storage.sqlite.faults import IntegrityStoreError, storage_error
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.sqlite_only("the SQLite drivers (aiosqlite, thread) and SQLite's error classes"),
]

INSERT = "INSERT INTO workers (id, role) VALUES (?, ?)"
SET_ROLE = "UPDATE workers SET role = ? WHERE id = ?"
KINDS = ["thread", "aiosqlite", "aiosqlite-per-statement"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, anyio_backend: str) -> str:
    return str(request.param)


@asynccontextmanager
async def opened(path: Path, kind: str) -> AsyncIterator[Driver]:
    with sqlite3.connect(path) as conn:
        for migration in MIGRATIONS:
            for statement in migration:
                conn.execute(statement)
    driver: Driver
    if kind == "thread":
        driver = await ThreadDriver.open(str(path), 5.0)
    else:
        driver = await AiosqliteDriver.open(str(path), 5.0)
        if kind == "aiosqlite-per-statement":
            driver = AiosqliteDriver(driver._conn, whole_batches=False)  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        await driver.close()


def roles(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, role FROM workers ORDER BY id").fetchall()


async def test_a_transaction_applies_every_statement_in_order(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "d.db"
    statements: list[Statement] = [(INSERT, (f"w{n}", "a")) for n in range(5)]
    statements += [(SET_ROLE, ("b", "w1")), (INSERT, ("w9", "c")), (SET_ROLE, ("d", "w9"))]
    async with opened(path, kind) as driver:
        await driver.transaction(statements)
    assert roles(path) == [
        ("w0", "a"),
        ("w1", "b"),
        ("w2", "a"),
        ("w3", "a"),
        ("w4", "a"),
        ("w9", "d"),
    ]


async def test_a_long_run_of_inserts_writes_every_row_in_order(tmp_path: Path, kind: str) -> None:
    """A run of one INSERT goes as multi-row INSERTs (drivers._runs: up to 64 rows each):
    every row is written, in order (an upsert's later row of an id wins over the earlier
    one), a column None in every row of a run is NULL as bound ones are, and one bad row
    anywhere in the run fails the whole transaction."""
    path = tmp_path / "d.db"
    upsert = f"{INSERT} ON CONFLICT (id) DO UPDATE SET role = excluded.role"
    rows = [(f"w{n % 90:02d}", f"r{n}") for n in range(101)]  # w00-w10 twice
    bad = [(f"x{n}", "a") for n in range(70)]
    bad[50] = ("w00", "again")
    # A column None in every row of a run is written as NULL in the statement.
    with_metadata = "INSERT INTO workers (id, role, metadata) VALUES (?, ?, ?)"
    mixed = [(f"m{n}", "a", None if n % 3 else f'{{"n": {n}}}') for n in range(10)]
    empty = [(f"n{n}", "b", None) for n in range(10)]
    async with opened(path, kind) as driver:
        await driver.transaction([(upsert, row) for row in rows])
        with pytest.raises(sqlite3.IntegrityError):
            await driver.transaction([(INSERT, row) for row in bad])
        await driver.transaction(
            [(with_metadata, row) for row in mixed]
            + [(SET_ROLE, ("c", "m1"))]
            + [(with_metadata, row) for row in empty]
        )
        stored = await driver.fetchall(
            "SELECT id, role, metadata FROM workers WHERE id GLOB '[mn]*' ORDER BY id"
        )
    assert stored == sorted([mixed[0], ("m1", "c", None), *mixed[2:], *empty])
    with sqlite3.connect(path) as conn:
        kept = conn.execute(
            "SELECT id, role FROM workers WHERE id GLOB 'w*' ORDER BY id"
        ).fetchall()
    assert kept == sorted({id_: role for id_, role in rows}.items())


async def test_runs_whose_empty_columns_vary_keep_few_statement_texts(
    tmp_path: Path, kind: str
) -> None:
    """Runs of one INSERT whose empty columns differ from run to run: every row is
    written as given, and the texts an INSERT is sent as stay few (at most four sets of
    empty columns, then every column bound; four sizes: drivers._runs), so that the
    connection's statement cache (128) keeps them prepared."""
    path = tmp_path / "d.db"
    sql = (
        "INSERT INTO workers (id, role, capabilities, current_task_id, metadata, incarnation)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    )
    written: list[tuple[object, ...]] = []
    async with opened(path, kind) as driver:
        for shape in range(16):  # which of the four optional columns are set
            rows = [
                (f"w{shape:02d}-{n:03d}", "r", *("x" if shape >> c & 1 else None for c in range(4)))
                for n in range(shape * 7 + 2)
            ]
            await driver.transaction([(sql, row) for row in rows])
            written += rows
        stored = await driver.fetchall(
            "SELECT id, role, capabilities, current_task_id, metadata, incarnation"
            " FROM workers ORDER BY id"
        )
    assert stored == sorted(written)
    texts = [text for (of, _, _), text in drivers._MULTI.items() if of == sql]
    assert 0 < len(texts) <= (drivers._EMPTY_SETS + 1) * len(drivers._SIZES)


async def test_an_adapter_of_none_the_application_registered_is_kept(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 opening a driver registers an adapter for None that returns it
    (drivers.bind_none_directly: 3.11 pays for a failed look-up per None without one);
    an adapter the application registered first is kept and used, and None is written
    as NULL either way."""
    key = (type(None), sqlite3.PrepareProtocol)
    seen: list[object] = []

    def mine(value: None) -> None:
        seen.append(value)

    monkeypatch.setitem(sqlite3.adapters, key, mine)
    async with opened(tmp_path / "d.db", kind) as driver:
        await driver.transaction(
            [("INSERT INTO workers (id, role, metadata) VALUES (?, ?, ?)", ("w0", "a", None))]
        )
        assert await driver.fetchall("SELECT metadata IS NULL FROM workers") == [(1,)]
    assert sqlite3.adapters[key] is mine
    assert seen == [None]


async def test_a_failing_statement_rolls_the_whole_transaction_back(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "d.db"
    async with opened(path, kind) as driver:
        await driver.transaction([(INSERT, ("w0", "a"))])
        with pytest.raises(sqlite3.IntegrityError):
            await driver.transaction([(INSERT, ("w1", "a")), (INSERT, ("w0", "again"))])
        # The connection is out of the transaction and takes the next one.
        await driver.transaction([(INSERT, ("w2", "a"))])
    assert roles(path) == [("w0", "a"), ("w2", "a")]


async def test_an_update_of_a_missing_row_fails_the_transaction(tmp_path: Path, kind: str) -> None:
    """A state write to a row that is not there means memory and disk disagree: refused
    rather than lost in silence, and nothing of its transaction is written."""
    path = tmp_path / "d.db"
    async with opened(path, kind) as driver:
        await driver.transaction([(INSERT, ("w0", "a"))])
        with pytest.raises(sqlite3.IntegrityError, match="1 of 2 workers row"):
            await driver.transaction(
                [(INSERT, ("w1", "a")), (SET_ROLE, ("b", "w0")), (SET_ROLE, ("b", "nobody"))]
            )
    assert roles(path) == [("w0", "a")]


async def test_a_cancelled_caller_leaves_the_transaction_whole(tmp_path: Path, kind: str) -> None:
    """A caller cancelled while its transaction runs stops waiting, but the transaction
    is never cut between BEGIN and COMMIT: all of it is written or none, and the
    connection is out of it for the next one (the aiosqlite driver's whole batch is one
    job on its thread, which ends all the same; one await per statement is shielded)."""
    path = tmp_path / "d.db"
    rows = 3000
    async with opened(path, kind) as driver:
        for delay in (0.0, 0.0005, 0.002):
            with anyio.move_on_after(delay):
                await driver.transaction([(INSERT, (f"d{delay}-{n}", "a")) for n in range(rows)])
            # The next transaction is taken: the connection is not inside the last one.
            await driver.transaction([(INSERT, (f"after-{delay}", "b"))])
    written = roles(path)
    for delay in (0.0, 0.0005, 0.002):
        mine = [row for row in written if row[0].startswith(f"d{delay}-")]
        assert len(mine) in (0, rows)  # all or nothing
        assert (f"after-{delay}", "b") in written


async def test_a_probe_finds_the_faulty_units_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "d.db"
    async with opened(path, kind) as driver:
        await driver.transaction([(INSERT, ("w0", "a"))])
        verdicts = await driver.probe(
            [
                [(INSERT, ("w1", "a"))],
                [(INSERT, ("w2", "a")), (INSERT, ("w0", "dup"))],
                [(SET_ROLE, ("b", "missing"))],
                [(SET_ROLE, ("b", "w0"))],
            ]
        )
    assert [v if v is None else type(v) for v in verdicts] == [
        None,
        IntegrityStoreError,
        IntegrityStoreError,
        None,
    ]
    assert roles(path) == [("w0", "a")]


async def test_a_snapshot_reads_the_database_as_of_one_commit(tmp_path: Path, kind: str) -> None:
    """A read job's statements all see the database as its first one did, though another
    connection commits between them; the read transaction ends with the job (the next
    read sees that commit), and so it does when the job fails."""
    path = tmp_path / "d.db"
    async with opened(path, kind) as driver:
        await driver.execute("PRAGMA journal_mode=WAL")
        await driver.transaction([(INSERT, ("w1", "a"))])
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        count = ("SELECT count(*) FROM workers", ())

        def job() -> ReadJob[tuple[object, object]]:
            before = (yield count)[0][0]
            other.execute(INSERT, ("w2", "b"))  # committed (autocommit) mid-read
            after = (yield count)[0][0]
            return before, after

        def failing() -> ReadJob[None]:
            yield count
            raise ValueError("a row that does not decode")

        try:
            assert await driver.snapshot(job()) == (1, 1)
            assert await driver.fetchall(*count) == [(2,)]
            with pytest.raises(ValueError, match="does not decode"):
                await driver.snapshot(failing())
            other.execute(INSERT, ("w3", "c"))
            assert await driver.fetchall(*count) == [(3,)]  # no read transaction left open
            # Nor anything pinning the log: a checkpoint copies all of it.
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            other.close()


@pytest.mark.asyncio_only
async def test_the_installed_aiosqlite_runs_a_batch_in_one_await(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """With the aiosqlite this project installs, a transaction is one call on its thread,
    not one await per statement: no statement goes through aiosqlite's execute."""
    path = tmp_path / "d.db"
    async with opened(path, "aiosqlite") as driver:
        assert isinstance(driver, AiosqliteDriver)
        calls: list[str] = []
        conn = driver._conn
        for name in ("execute", "executemany"):
            original = getattr(conn, name)

            def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
                calls.append(_name)
                return _original(*args)

            monkeypatch.setattr(conn, name, counted)
        await driver.transaction([(INSERT, (f"w{n}", "a")) for n in range(3)])
        assert calls == []
    assert len(roles(path)) == 3


# -- no statement outlives its call ------------------------------------------------------


class KeepsCursors(sqlite3.Connection):
    """A connection that keeps every cursor it makes alive, as a worker thread's local
    variable does until that thread's next job (aiosqlite's keeps the last result; anyio's
    and trio's threads briefly too): a driver must not count on a cursor being freed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: list[sqlite3.Cursor] = []

    def execute(self, *args: Any) -> sqlite3.Cursor:
        self.kept.append(super().execute(*args))
        return self.kept[-1]

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        self.kept.append(super().executemany(*args))
        return self.kept[-1]


async def keeping(path: Path, kind: str) -> Driver:
    """A driver on a fresh file whose connection keeps every cursor alive."""
    if kind == "thread":
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=KeepsCursors
        )
        return ThreadDriver(conn)
    connection = await aiosqlite.connect(path, isolation_level=None, factory=KeepsCursors)
    return AiosqliteDriver(connection, whole_batches=kind == "aiosqlite")


async def test_a_statement_run_by_execute_is_over_when_it_returns(
    tmp_path: Path, kind: str
) -> None:
    """Open does ``PRAGMA journal_mode=WAL`` (which answers a row), then migrates in one
    transaction: the pragma's statement, had it stayed open, makes that COMMIT fail with
    "SQL statements in progress". Whoever still holds its cursor, the statement is done."""
    path = tmp_path / "fresh.db"
    driver = await keeping(path, kind)
    try:
        await driver.execute("PRAGMA journal_mode=WAL")
        await driver.execute("PRAGMA foreign_keys=ON")
        await driver.transaction([("CREATE TABLE t (x)", ()), ("INSERT INTO t VALUES (1)", ())])
        assert await driver.fetchall("SELECT x FROM t") == [(1,)]
        await driver.transaction([("INSERT INTO t VALUES (2)", ())])
        assert await driver.probe([[("INSERT INTO t VALUES (3)", ())]]) == [None]
        await driver.transaction([("UPDATE t SET x = x + 10 WHERE x = 2", ())])
    finally:
        await driver.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        # The probe wrote nothing.
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (12,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_open_steps_through_the_driver_commit(tmp_path: Path, anyio_backend: str) -> None:
    """The same steps as the open, with the driver ``auto`` picks and nothing holding a
    cursor but the driver's own machinery (on asyncio, aiosqlite's thread kept the
    pragma's cursor until its next job ended: this COMMIT failed every time)."""
    path = tmp_path / "fresh.db"
    driver = await connect(str(path), driver="auto", busy_timeout=5.0)
    try:
        await driver.execute("PRAGMA journal_mode=WAL")
        await driver.transaction([(sql, ()) for sql in MIGRATIONS[0]])
    finally:
        await driver.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


def test_a_statement_left_open_is_not_blamed_on_a_lock(tmp_path: Path) -> None:
    """SQLite answers SQLITE_BUSY to a COMMIT while a statement of the same connection is
    open; that is no lock of another program, and waiting does not help."""
    with contextlib.closing(sqlite3.connect(tmp_path / "d.db", isolation_level=None)) as conn:
        pending = conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE t (x)")
        with pytest.raises(sqlite3.OperationalError, match="in progress") as caught:
            conn.execute("COMMIT")
        pending.close()
        conn.execute("ROLLBACK")
    error = storage_error("/data/hive.db", caught.value, action="cannot open", busy_timeout=5)
    message = str(error)
    assert error.fault is None, message
    assert "locked" not in message, message
    assert "busy_timeout" not in message, message
    assert "no other program holds a lock" in message, message
    assert "statements in progress" in message  # SQLite's own words are kept
    assert error.__cause__ is caught.value
