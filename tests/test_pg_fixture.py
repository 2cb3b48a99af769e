"""The PostgreSQL test fixture (tests/_pg.py): each test gets its own database on a real
server, and the URL it gets is one a client can use as is.

psycopg is imported inside the tests: where it is not installed they are deselected
(conftest), and the module must still import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _pg
import pytest
from _raw import never_opened


def test_the_url_answers(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        name = conn.execute("select current_database()").fetchone()
    assert name is not None
    assert pg_url.endswith("/" + str(name[0]))


def test_two_databases_are_separate(pg_url: str) -> None:
    import psycopg

    other = _pg.new_database()
    assert other != pg_url
    with psycopg.connect(pg_url, autocommit=True) as a, psycopg.connect(other) as b:
        a.execute("create table t (x int)")
        a.execute("insert into t values (1)")
        assert a.execute("select x from t").fetchall() == [(1,)]
        with pytest.raises(psycopg.errors.UndefinedTable):
            b.execute("select x from t")


def _schema(conn: Any) -> set[tuple[Any, ...]]:
    """Every column (table, name, type, default, nullability) and index of ``conn``'s
    database."""
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, column_default, is_nullable"
        " FROM information_schema.columns WHERE table_schema = 'public'"
    ).fetchall()
    indexes = conn.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    ).fetchall()
    return {tuple(row) for row in [*columns, *indexes]}


@pytest.mark.anyio
async def test_a_migrated_database_is_what_a_runtime_makes_and_holds_nothing(
    pg_url: str,
) -> None:
    """``new_database(migrated=True)``, the PostgreSQL run's ``db_path``: its own copy of
    the template, with every column and index a runtime's first open of an empty database
    makes (besides the tables an open makes for itself, ``hive_nodes``), at the current
    version, and none of the rows an open writes (no node, no event, no leader)."""
    import psycopg

    from hive_orchestration import Runtime
    from hive_orchestration.storage.pg.schema import SCHEMA_VERSION

    first, second = _pg.new_database(migrated=True), _pg.new_database(migrated=True)
    assert len({first, second, pg_url}) == 3
    with psycopg.connect(first, autocommit=True) as a, psycopg.connect(second) as b:
        assert a.execute("SELECT version FROM hive_schema").fetchall() == [(SCHEMA_VERSION,)]
        for table in ("tasks", "events", "workers", "execution_plans"):
            assert a.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
        assert a.execute("SELECT epoch, node_id FROM hive_leader").fetchall() == [(0, None)]
        assert a.execute("SELECT to_regclass('hive_nodes')").fetchone() == (None,)
        a.execute("UPDATE hive_leader SET epoch = 7")
        assert b.execute("SELECT epoch FROM hive_leader").fetchall() == [(0,)]
        cloned = _schema(a)
    # Both are as the fixture made them, until a runtime opens them (never_opened, which
    # the tests of refusals before the open use).
    assert never_opened(first)
    assert never_opened(pg_url)
    async with Runtime.open(pg_url), Runtime.open(second):
        pass
    assert not never_opened(second)
    assert not never_opened(pg_url)
    with psycopg.connect(pg_url) as made:
        by_runtime = _schema(made)
    assert cloned
    assert cloned == {row for row in by_runtime if not str(row[0]).startswith("hive_nodes")}


def test_the_server_runs_durable_commits(pg_url: str) -> None:
    """A commit is written out before its reply (synchronous_commit), so it survives the
    death of any process, the server's included: a durability test on a throwaway cluster
    means what it says. Whether the server also fsyncs (the fixture's cluster does not,
    tests/_pg.py says why) matters only to a crash of the machine itself, which no test
    makes; asynchronous commits would lose acknowledged work to a killed server."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        settings = conn.execute("select current_setting('synchronous_commit')").fetchone()
    assert settings == ("on",)


def test_without_postgresql_its_tests_are_deselected_with_one_reason(tmp_path: Path) -> None:
    """No PostgreSQL programs and no HIVE_TEST_PG: the tests needing it are left out (not
    skipped one by one) and the summary says why, once; the others run."""
    here = Path(__file__).parent
    hidden = (_pg.URL_ENV, _pg.SHARED_ENV, _pg.OWNER_ENV)
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env[_pg.BIN_GLOB_ENV] = str(tmp_path / "nowhere" / "*" / "bin")
    env.pop("HIVE_TEST_STORE", None)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
    tests = [f"{here / 'test_pg_fixture.py'}::test_the_url_answers", str(here / "test_raw.py")]
    done = subprocess.run(
        [*pytest, *tests],
        cwd=here.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    # The first missing piece is the one named: psycopg where it is not installed (as in a
    # checkout without the postgres extra), else the server's programs.
    reason = "no PostgreSQL under" if _psycopg_installed() else "psycopg is not installed"
    assert out.count(f"tests needing PostgreSQL were deselected: {reason}") == 1, out
    assert "skipped" not in out
    # test_raw: its SQLite half ran, its PostgreSQL half (pg_url) and the fixture's test not.
    assert "4 passed, 4 deselected" in out, out


def _psycopg_installed() -> bool:
    return importlib.util.find_spec("psycopg") is not None
