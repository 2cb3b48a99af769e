"""The PostgreSQL driver, below the storage actor, on a real PostgreSQL server: a
transaction is all or nothing, a state UPDATE of a missing row fails it, a probe tells the
faulty unit apart and writes nothing, SQLite's ``?`` marks reach psycopg as ``%s``, every
psycopg error leaves as a port exception, and a lost connection is told apart by when it
was lost (before COMMIT: nothing applied; during COMMIT: unknown) and opened again on the
next call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration.errors import StorageError  # noqa: E402
from hive_orchestration.storage.pg.driver import (  # noqa: E402
    PostgresDriver,
    PostgresReader,
    translate,
)
from hive_orchestration.storage.pg.faults import storage_error  # noqa: E402
from hive_orchestration.storage.pg.url import display_url  # noqa: E402
from hive_orchestration.storage.port import (  # noqa: E402
    CommitUnknownError,
    StoreError,
    StoreIntegrityError,
)

INSERT = "INSERT INTO workers (id, role) VALUES (?, ?)"
SET_ROLE = "UPDATE workers SET role = ? WHERE id = ?"
RENAME = "DELETE FROM workers WHERE role = ? AND id = ?"
TABLE = 'CREATE TABLE workers (id text COLLATE "C" PRIMARY KEY, role text NOT NULL)'


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read on a connection of the test's own, beside the driver's."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
async def db(pg_url: str, anyio_backend: str) -> AsyncIterator[PostgresDriver]:
    raw(pg_url, TABLE)
    driver = await PostgresDriver.open(pg_url)
    try:
        yield driver
    finally:
        await driver.close()


def roles(url: str) -> list[tuple[Any, ...]]:
    return raw(url, "SELECT id, role FROM workers ORDER BY id")


def kill(url: str, driver: PostgresDriver) -> None:
    """End the driver's server session from outside, as an operator (or a restart) does."""
    pid = driver._conn.info.backend_pid  # type: ignore[union-attr]
    assert raw(url, "SELECT pg_terminate_backend(%s, 10000)", (pid,)) == [(True,)]


# -- placeholders (no server needed) -----------------------------------------------------


def test_question_marks_become_psycopg_marks() -> None:
    assert translate("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == (
        "SELECT a FROM t WHERE b = %s AND c IN (%s, %s)",
        None,
    )


def test_marks_inside_literals_names_and_comments_are_left_alone() -> None:
    sql = """SELECT '?', "a?b", x -- why?\n FROM t /* ? */ WHERE y = ?"""
    assert translate(sql) == (
        """SELECT '?', "a?b", x -- why?\n FROM t /* ? */ WHERE y = %s""",
        None,
    )


def test_percent_signs_are_doubled_everywhere() -> None:
    # psycopg reads % as a mark even inside a literal: each must reach it doubled.
    assert translate("SELECT 5 % 2 FROM t WHERE a LIKE 'x%' AND b = ?")[0] == (
        "SELECT 5 %% 2 FROM t WHERE a LIKE 'x%%' AND b = %s"
    )


def test_quotes_escaped_by_doubling_stay_inside_the_literal() -> None:
    assert translate("SELECT 'it''s ?' WHERE a = ?")[0] == "SELECT 'it''s ?' WHERE a = %s"


def test_numbered_marks_reorder_and_repeat_parameters() -> None:
    text, order = translate("SELECT ?2, ?1, ?2, ?")
    assert text == "SELECT %s, %s, %s, %s"
    # A plain ? after numbered ones takes the number after the largest (SQLite's rule).
    assert order == (1, 0, 1, 2)


def test_sqlites_bytes_of_a_text_become_postgresqls() -> None:
    assert translate("SELECT length(CAST(t.result AS BLOB)) FROM t WHERE a = ?")[0] == (
        "SELECT length(convert_to(t.result, 'UTF8')) FROM t WHERE a = %s"
    )


def test_translation_is_cached_per_text() -> None:
    translate.cache_clear()
    translate("SELECT ? -- cached")
    translate("SELECT ? -- cached")
    assert translate.cache_info().hits == 1


# -- transactions ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_transaction_applies_every_statement_in_order(
    db: PostgresDriver, pg_url: str
) -> None:
    await db.transaction(
        [
            (INSERT, ("w1", "a")),
            (INSERT, ("w2", "b")),
            (SET_ROLE, ("c", "w1")),
            (INSERT, ("w3", "d")),
            (SET_ROLE, ("e", "w3")),
        ]
    )
    assert roles(pg_url) == [("w1", "c"), ("w2", "b"), ("w3", "e")]


@pytest.mark.anyio
async def test_constraint_error_rolls_back_the_whole_transaction(
    db: PostgresDriver, pg_url: str
) -> None:
    with pytest.raises(StoreIntegrityError) as caught:
        await db.transaction([(INSERT, ("w1", "a")), (INSERT, ("w1", "b"))])
    assert caught.value.fault is None
    assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
    assert roles(pg_url) == []
    # The connection is usable again: the failed transaction was rolled back.
    await db.transaction([(INSERT, ("w2", "b"))])
    assert roles(pg_url) == [("w2", "b")]


@pytest.mark.anyio
async def test_update_of_a_missing_row_fails_the_transaction(
    db: PostgresDriver, pg_url: str
) -> None:
    with pytest.raises(StoreIntegrityError, match="a workers row to update is missing"):
        await db.transaction(
            [(INSERT, ("w1", "a")), (SET_ROLE, ("b", "w1")), (SET_ROLE, ("b", "ghost"))]
        )
    assert roles(pg_url) == []


@pytest.mark.anyio
async def test_missing_rows_again_and_again_leave_the_connection_usable(
    db: PostgresDriver, pg_url: str
) -> None:
    """An UPDATE that finds no row fails its pipeline in the server (COMMIT goes in the
    same round trip), again and again, past psycopg's threshold for preparing statements:
    each time nothing is applied, and the next transaction on the same connection works.
    (psycopg's cache of prepared statements after such failures is what
    test_pg_planning_nodes' racing claims exercise: "prepared statement ... does not
    exist" without the driver's _forget_prepared.)"""
    for n in range(12):
        with pytest.raises(StoreIntegrityError, match="a workers row to update is missing"):
            await db.transaction(
                [(INSERT, (f"w{n}", "a")), (SET_ROLE, ("b", "ghost")), (RENAME, (f"v{n}", f"w{n}"))]
            )
        await db.transaction([(INSERT, (f"w{n}", "a")), (SET_ROLE, ("b", f"w{n}"))])
    assert roles(pg_url) == sorted((f"w{n}", "b") for n in range(12))
    assert db.connects == 1


@pytest.mark.anyio
async def test_statement_error_leaves_as_a_store_error(db: PostgresDriver) -> None:
    with pytest.raises(StoreError) as caught:
        await db.transaction([("INSERT INTO nowhere VALUES (?)", (1,))])
    assert not isinstance(caught.value, StoreIntegrityError)
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)
    with pytest.raises(StoreError):
        await db.fetchall("SELECT * FROM nowhere")


@pytest.mark.anyio
async def test_fetchall_and_execute_take_question_marks(db: PostgresDriver, pg_url: str) -> None:
    await db.execute(INSERT, ("w%1", "a?"))
    rows = await db.fetchall(
        "SELECT id, role, '?' FROM workers WHERE id LIKE 'w%' AND role = ?", ("a?",)
    )
    assert rows == [("w%1", "a?", "?")]


@pytest.mark.anyio
async def test_byte_length_counts_utf8_bytes_and_takes_backslashes(db: PostgresDriver) -> None:
    await db.execute(INSERT, ("w1", "é\\x41"))
    assert await db.fetchall("SELECT length(CAST(role AS BLOB)) FROM workers") == [(6,)]


@pytest.mark.anyio
async def test_probe_tells_the_faulty_unit_and_writes_nothing(
    db: PostgresDriver, pg_url: str
) -> None:
    await db.transaction([(INSERT, ("w1", "a"))])
    results = await db.probe(
        [
            [(INSERT, ("w2", "b"))],
            [(INSERT, ("w1", "dup"))],  # a constraint: the transaction would be aborted
            [(SET_ROLE, ("x", "ghost"))],  # a missing row
            [(INSERT, ("w3", "c")), (SET_ROLE, ("d", "w3"))],
        ]
    )
    assert results[0] is None
    assert isinstance(results[1], StoreIntegrityError)
    assert isinstance(results[2], StoreIntegrityError)
    assert results[3] is None  # a unit after a failed one still runs on a clean transaction
    assert roles(pg_url) == [("w1", "a")]


@pytest.mark.anyio
async def test_cancelled_caller_does_not_cut_a_transaction_short(
    db: PostgresDriver, pg_url: str
) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await db.transaction([(INSERT, ("w1", "a")), (INSERT, ("w2", "b"))])
        await anyio.lowlevel.checkpoint()  # the cancellation is delivered after it
    assert scope.cancelled_caught
    assert roles(pg_url) == [("w1", "a"), ("w2", "b")]
    await db.transaction([(INSERT, ("w3", "c"))])  # and the connection is not left in one


# -- connections lost ------------------------------------------------------------------


@pytest.mark.anyio
async def test_connection_killed_before_commit_is_unavailable_and_next_call_reconnects(
    db: PostgresDriver, pg_url: str
) -> None:
    await db.transaction([(INSERT, ("w1", "a"))])
    kill(pg_url, db)
    with pytest.raises(StoreError) as caught:
        await db.transaction([(INSERT, ("w2", "b"))])
    assert not isinstance(caught.value, CommitUnknownError)
    assert caught.value.fault == "unavailable"
    assert roles(pg_url) == [("w1", "a")]
    assert db.connects == 1
    await db.transaction([(INSERT, ("w3", "c"))])
    assert db.connects == 2
    assert roles(pg_url) == [("w1", "a"), ("w3", "c")]


@pytest.mark.anyio
async def test_fetch_on_a_killed_connection_is_unavailable_then_reconnects(
    db: PostgresDriver, pg_url: str
) -> None:
    kill(pg_url, db)
    with pytest.raises(StoreError) as caught:
        await db.fetchall("SELECT 1")
    assert caught.value.fault == "unavailable"
    assert await db.fetchall("SELECT ?::int", (7,)) == [(7,)]


@pytest.mark.anyio
async def test_connection_lost_during_commit_is_an_unknown_outcome(
    db: PostgresDriver, pg_url: str
) -> None:
    # A deferred constraint trigger runs at COMMIT: this one ends its own session there,
    # which is the connection going away while COMMIT is on its way.
    raw(
        pg_url,
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$",
    )
    raw(
        pg_url,
        "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON workers"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.role = 'die')"
        " EXECUTE FUNCTION die()",
    )
    with pytest.raises(CommitUnknownError) as caught:
        await db.transaction([(INSERT, ("w1", "die"))])
    assert caught.value.fault == "unavailable"
    await db.transaction([(INSERT, ("w2", "b"))])
    assert db.connects == 2
    message = str(storage_error(pg_url, caught.value, action="write failed"))
    assert "may or may not have been applied" in message


@pytest.mark.anyio
async def test_server_out_of_reach_fails_the_open_as_unavailable(anyio_backend: str) -> None:
    with pytest.raises(StoreError) as caught:
        await PostgresDriver.open("postgresql://nobody@127.0.0.1:1/hive", connect_timeout=2)
    assert caught.value.fault == "unavailable"
    message = str(storage_error("postgresql://u:s3cret@127.0.0.1:1/hive", caught.value, action="x"))
    assert "s3cret" not in message
    assert "pg_isready -h 127.0.0.1 -p 1" in message


@pytest.mark.anyio
async def test_missing_database_fails_the_open_as_cannot_open(pg_url: str) -> None:
    with pytest.raises(StoreError) as caught:
        await PostgresDriver.open(pg_url + "_missing")
    assert caught.value.fault == "cannot_open"
    error = storage_error(pg_url + "_missing", caught.value, action="cannot open")
    assert isinstance(error, StorageError)
    assert "does not exist" in str(error)
    assert error.path == pg_url + "_missing"


@pytest.mark.anyio
async def test_reader_refuses_writes(db: PostgresDriver, pg_url: str) -> None:
    await db.transaction([(INSERT, ("w1", "a"))])
    reader = await PostgresReader.open(pg_url)
    try:
        assert await reader.fetchall("SELECT role FROM workers WHERE id = ?", ("w1",)) == [("a",)]
        with pytest.raises(StoreError) as caught:
            await reader.execute(INSERT, ("w2", "b"))
        assert caught.value.fault == "read_only"
    finally:
        await reader.close()
    assert roles(pg_url) == [("w1", "a")]


# -- messages ----------------------------------------------------------------------------


def test_display_url_drops_the_password() -> None:
    assert display_url("postgresql://u:pw@h:5432/db") == "postgresql://u@h:5432/db"
    assert display_url("postgres://:pw@h/db") == "postgres://h/db"
    assert (
        display_url("postgresql://u@h/db?sslmode=require&password=pw")
        == "postgresql://u@h/db?sslmode=require"
    )
    assert display_url("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("job.*", ["job.", "job.created"], ["jobs.x", "Job.created"]),
        ("?ob", ["job", "mob"], ["ob", "jjob"]),
        ("[dt]eploy", ["deploy", "teploy"], ["reploy"]),
        ("[^d]eploy", ["teploy"], ["deploy"]),
        ("[]a]x", ["]x", "ax"], ["bx"]),
        ("a.b%c_d\\e", ["a.b%c_d\\e"], ["aXb%c_d\\e", "a.b%cXd\\e"]),
    ],
)
def test_globs_become_anchored_regular_expressions(
    pattern: str, matches: list[str], misses: list[str]
) -> None:
    import re

    from hive_orchestration.storage.pg.sql import glob_regex

    regex = glob_regex(pattern)
    assert regex is not None
    for text in matches:
        assert re.fullmatch(regex, text), (pattern, text)
    for text in misses:
        assert not re.fullmatch(regex, text), (pattern, text)


def test_an_unclosed_bracket_matches_nothing_as_in_sqlite() -> None:
    from hive_orchestration.storage.pg.sql import glob_regex

    assert glob_regex("job.[abc") is None
