"""tests/_raw.py reads and changes a database behind the runtime's back on both stores: the
same SQL with ``?`` marks, the same answers, and a refusal the writer sees as an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from _raw import araw_execute, araw_rows, is_postgres, raw_execute, raw_rows, refusing_writes


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg_server)])
def raw_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "raw.db")
    return str(request.getfixturevalue("pg_url"))


def test_rows_and_statements_with_marks(raw_db: str) -> None:
    raw_execute(raw_db, "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, note TEXT)")
    assert raw_execute(raw_db, "INSERT INTO t VALUES (?, ?, ?)", ("a", 1, "50% off")) == 1
    raw_execute(raw_db, "INSERT INTO t VALUES (?, ?, ?)", ("b", 2, None))
    assert raw_rows(raw_db, "SELECT id, n, note FROM t ORDER BY id") == [
        ("a", 1, "50% off"),
        ("b", 2, None),
    ]
    assert raw_rows(raw_db, "SELECT id FROM t WHERE note LIKE '%off'") == [("a",)]
    assert raw_execute(raw_db, "UPDATE t SET n = n + ? WHERE n >= ?", (10, 1)) == 2
    assert raw_rows(raw_db, "SELECT sum(n) FROM t") == [(23,)]


@pytest.mark.anyio
async def test_a_refusal_fails_the_write_and_goes_away(raw_db: str) -> None:
    await araw_execute(raw_db, "CREATE TABLE tasks (id TEXT PRIMARY KEY, title TEXT)")
    async with refusing_writes(raw_db, "tasks", "no bad tasks", when="NEW.title = 'bad'"):
        await araw_execute(raw_db, "INSERT INTO tasks VALUES ('1', 'good')")
        with pytest.raises(Exception, match="no bad tasks"):
            await araw_execute(raw_db, "INSERT INTO tasks VALUES ('2', 'bad')")
    await araw_execute(raw_db, "INSERT INTO tasks VALUES ('3', 'bad')")
    assert await araw_rows(raw_db, "SELECT id FROM tasks ORDER BY id") == [("1",), ("3",)]


def test_the_store_is_told_by_the_url_scheme(tmp_path: Path) -> None:
    assert is_postgres("postgresql://u@127.0.0.1:5432/d")
    assert is_postgres("postgres://u@h/d")
    assert not is_postgres(str(tmp_path / "hive.db"))
    assert not is_postgres(":memory:")
