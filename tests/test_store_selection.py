"""The PostgreSQL selection of tests/conftest.py: what it reads from the guarantees table
(docs/delivery.md), and how it picks one loop of each asyncio/trio pair."""

from __future__ import annotations

from pathlib import Path

import conftest

TABLE = """
## Something else
`tests/test_not_a_guarantee.py::test_x`

### Guarantees and the tests that prove them

| guarantee | proved by |
|---|---|
| one | `tests/test_a.py::test_one`, `::test_two` |
| whole file | `tests/test_b.py` (`test_prefix_...`, ...) |
| pattern | `tests/test_c.py::test_run[deploy-*]`, `tests/test_d.py::test_d` |

### After the table
| `tests/test_after.py::test_late` |
"""


def test_the_table_names_tests_by_file_and_by_name(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(TABLE)
    assert conftest._guarantee_refs(readme) == [
        "tests/test_a.py::test_one",
        "tests/test_a.py::test_two",
        "tests/test_b.py",
        "tests/test_c.py::test_run[deploy-*]",
        "tests/test_d.py::test_d",
    ]
    assert conftest._guarantee_refs(tmp_path / "missing.md") == []


def test_a_reference_matches_its_parameters_and_a_file_its_tests() -> None:
    match = conftest._matches
    assert match("tests/test_a.py::test_one[asyncio]", "tests/test_a.py::test_one")
    assert match("tests/test_a.py::test_one", "tests/test_a.py::test_one")
    assert not match("tests/test_a.py::test_one_more[trio]", "tests/test_a.py::test_one")
    assert match("tests/test_b.py::test_x[trio-7]", "tests/test_b.py")
    assert not match("tests/test_bb.py::test_x", "tests/test_b.py")
    assert match("tests/test_c.py::test_run[deploy-a.py-x]", "tests/test_c.py::test_run[deploy-*]")
    assert not match("tests/test_c.py::test_run[other]", "tests/test_c.py::test_run[deploy-*]")


def test_every_file_the_guarantees_table_names_exists() -> None:
    """A misspelt reference would leave its guarantee out of the PostgreSQL run unseen."""
    root = Path(conftest.__file__).resolve().parent.parent
    refs = conftest._guarantee_refs(root / "docs" / "delivery.md")
    assert len(refs) > 50
    missing = sorted(
        {r.partition("::")[0] for r in refs}
        - {r.partition("::")[0] for r in refs if (root / r.partition("::")[0]).exists()}
    )
    assert missing == []


def test_each_pair_of_loops_runs_one_of_them() -> None:
    ids = [f"tests/test_x.py::test_{n}[{{}}-{n % 3}]" for n in range(200)]
    chosen = [conftest._loop_for(i.format("asyncio")) for i in ids]
    assert chosen == [conftest._loop_for(i.format("trio")) for i in ids]
    assert 60 < chosen.count("asyncio") < 140  # both loops drive the store


class _Item:
    """What ``conftest._on_postgres`` reads of a collected test."""

    def __init__(self, nodeid: str, fixtures: tuple[str, ...], *markers: str) -> None:
        self.nodeid = nodeid
        self.fixturenames = fixtures
        self.markers = markers

    def get_closest_marker(self, name: str) -> object:
        return name if name in self.markers else None


def test_a_test_on_pg_url_alone_runs_in_the_sqlite_run_only() -> None:
    """Its database is PostgreSQL whatever the run: the PostgreSQL run leaves it to the
    SQLite run (which has the server in CI), marked ``postgres`` or not; a test of the
    run's store (``db_path``) marked ``postgres`` stays in the PostgreSQL run."""
    on = conftest._on_postgres
    assert not on(_Item("tests/test_x.py::test_nodes", ("pg_url",), "postgres"))  # type: ignore[arg-type]
    assert not on(_Item("tests/test_x.py::test_nodes", ("pg_url",)))  # type: ignore[arg-type]
    # ... and the SQLite run keeps it (it is deselected only where there is no server).
    assert conftest._needs_postgres(_Item("tests/test_x.py::test_nodes", ("pg_url",)))  # type: ignore[arg-type]
    assert on(_Item("tests/test_x.py::test_store", ("db_path",), "postgres"))  # type: ignore[arg-type]
    both = _Item("tests/test_x.py::test_both", ("db_path", "pg_url"), "postgres")
    assert on(both)  # type: ignore[arg-type]
    assert not on(_Item("tests/test_x.py::test_store", ("db_path",), "postgres", "sqlite_only"))  # type: ignore[arg-type]


def test_a_test_on_pg_url_alone_is_on_the_server_and_no_other_is() -> None:
    """``on_server`` (CI runs these in its PostgreSQL run, and leaves them out of the
    SQLite run): the tests whose database is the server whichever the store, and only
    they, so that each test of the suite is in exactly one of CI's two runs."""
    on_server, on_postgres = conftest._on_server, conftest._on_postgres
    nodes = _Item("tests/test_x.py::test_nodes", ("pg_url",))
    assert on_server(nodes)  # type: ignore[arg-type]
    assert on_server(_Item("tests/test_x.py::test_nodes", ("pg_url",), "postgres"))  # type: ignore[arg-type]
    for item in (
        _Item("tests/test_x.py::test_store", ("db_path",)),
        _Item("tests/test_x.py::test_store", ("db_path",), "postgres"),
        _Item("tests/test_x.py::test_both", ("db_path", "pg_url"), "postgres"),
        _Item("tests/test_x.py::test_file", ("tmp_path",)),
    ):
        assert not on_server(item)  # type: ignore[arg-type]
    # Never in both marks: a test of both would run twice in CI.
    assert not on_postgres(nodes)  # type: ignore[arg-type]
