"""The PostgreSQL test fixture (tests/_pg.py): each test gets its own database on a real
server, and the URL it gets is one a client can use as is.

psycopg is imported inside the tests: where it is not installed they are deselected
(conftest), and the module must still import."""

from __future__ import annotations

import _pg
import pytest


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


def test_the_server_runs_durable_commits(pg_url: str) -> None:
    """A throwaway cluster still fsyncs: a durability test on it means what it says."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        settings = conn.execute(
            "select current_setting('fsync'), current_setting('synchronous_commit')"
        ).fetchone()
    assert settings == ("on", "on")
