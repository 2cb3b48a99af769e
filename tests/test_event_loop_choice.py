"""The command line's long runners (demo, worker, serve) run asyncio on uvloop when it is
installed (the ``uvloop`` extra); the short readers, and trio, are left as they are."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import anyio
import pytest

from hive_orchestration import _loop
from hive_orchestration.cli import main as cli_main


def test_uvloop_is_asked_for_on_asyncio_only_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _loop.backend_options("trio") == {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _loop.backend_options("asyncio") == {}


def test_the_options_run_the_loop_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    options = _loop.backend_options("asyncio")
    assert options == {"use_uvloop": True}

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert anyio.run(loop_module, backend="asyncio", backend_options=options).startswith("uvloop")


@pytest.mark.parametrize(
    ("argv", "uvloop"),
    [
        (["demo"], True),
        (["serve"], True),
        (["worker", "examples.agents:deploy"], True),
        (["demo", "--backend", "trio"], False),
        (["db", "current"], False),
    ],
)
def test_the_long_runners_get_uvloop(
    argv: list[str], uvloop: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("uvloop")
    calls: list[dict[str, Any]] = []

    def run(handler: object, *args: object, **kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(anyio, "run", run)  # the command line calls anyio.run
    assert cli_main([*argv, "--db", str(tmp_path / "hive.db")]) == 0
    [kwargs] = calls
    assert kwargs["backend_options"] == ({"use_uvloop": True} if uvloop else {})
