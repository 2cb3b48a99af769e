"""Shared fixtures. Every async test runs on asyncio and on trio (``anyio_backend``)."""

from __future__ import annotations

from pathlib import Path

import _pg
import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _is_controller(config: pytest.Config) -> bool:
    """The process that runs the session (xdist's controller, or the only process)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_only: runs on asyncio only (aiosqlite does not run under trio)"
    )
    if _is_controller(config):
        _pg.configure_session()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _is_controller(config):
        _pg.finish_session()


def _needs_postgres(item: pytest.Item) -> bool:
    return "pg_url" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the combinations that cannot run, rather than skip each one: aiosqlite
    under trio (a driver parameter named ``aiosqlite...``, or the ``asyncio_only``
    marker), and tests needing PostgreSQL where there is none (the reason is printed once
    in the summary). A skip would say "not tested here" of what is tested elsewhere."""
    no_postgres = _pg.unavailable_reason() is not None
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impossible = params.get("anyio_backend") == "trio" and (
            item.get_closest_marker("asyncio_only") is not None
            or any(isinstance(v, str) and v.startswith("aiosqlite") for v in params.values())
        )
        impossible = impossible or (no_postgres and _needs_postgres(item))
        (dropped if impossible else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = _pg.unavailable_reason()
    if reason is not None:
        terminalreporter.write_line(f"tests needing PostgreSQL were deselected: {reason}")


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A real SQLite file in a fresh folder (that does not exist yet)."""
    return str(tmp_path / "data" / "hive.db")


@pytest.fixture
def pg_url() -> str:
    """A fresh, empty database on the session's PostgreSQL server (tests/_pg.py)."""
    return _pg.new_database()
