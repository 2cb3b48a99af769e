"""Shared fixtures. Every async test runs on asyncio and on trio (``anyio_backend``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_only: runs on asyncio only (aiosqlite does not run under trio)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the combinations that cannot run, rather than skip each one: aiosqlite
    under trio (a driver parameter named ``aiosqlite...``, or the ``asyncio_only``
    marker). A skip would say "not tested here" of what is tested on asyncio."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impossible = params.get("anyio_backend") == "trio" and (
            item.get_closest_marker("asyncio_only") is not None
            or any(isinstance(v, str) and v.startswith("aiosqlite") for v in params.values())
        )
        (dropped if impossible else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A real SQLite file in a fresh folder (that does not exist yet)."""
    return str(tmp_path / "data" / "hive.db")
