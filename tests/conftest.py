"""Shared fixtures. Every async test runs on asyncio and on trio (``anyio_backend``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A real SQLite file in a fresh folder (that does not exist yet)."""
    return str(tmp_path / "data" / "hive.db")
