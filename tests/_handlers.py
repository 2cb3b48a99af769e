"""Handlers the worker command's tests run (``hive-orchestration worker _handlers:NAME``,
from this folder: the command imports from the current directory)."""

from __future__ import annotations

from pathlib import Path

import anyio

from hive_orchestration import TaskContext


async def echo(context: TaskContext) -> dict[str, object]:
    return {"echo": dict(context.payload), "worker": context.worker_id}


async def gated(context: TaskContext) -> dict[str, object]:
    """Runs until the file its payload names exists (the test creates it, or never)."""
    gate = Path(str(context.payload["gate"]))
    await context.progress({"waiting": str(gate)}, phase="waiting")
    while not await anyio.to_thread.run_sync(gate.exists):  # noqa: ASYNC110 - a file
        await anyio.sleep(0.02)
    return {"gate": str(gate)}


async def lasting(context: TaskContext) -> dict[str, object]:
    """Works for the seconds its payload says (longer than the owner's lease)."""
    seconds = float(str(context.payload["seconds"]))
    await anyio.sleep(seconds)
    return {"worked": seconds}


async def picky(context: TaskContext) -> dict[str, object]:
    if context.payload.get("fail"):
        raise ValueError(f"refusing {context.task.id}")
    return {"ok": True}


def not_async(context: TaskContext) -> None:
    return None


NOT_CALLABLE = 42


class Transient(Exception):
    """A failure worth another attempt (the retry tests name it: ``_handlers:Transient``)."""


async def erring(context: TaskContext) -> dict[str, object]:
    """Raises the builtin exception its payload names (``{"raise": "KeyError"}``), or
    :class:`Transient`, until the attempt its payload says it succeeds on."""
    if context.attempt < int(str(context.payload.get("succeed_on", 1_000))):
        name = str(context.payload["raise"])
        kind = Transient if name == "Transient" else getattr(__import__("builtins"), name)
        raise kind(f"attempt {context.attempt}")
    return {"attempt": context.attempt}


async def summing(context: TaskContext) -> dict[str, object]:
    """A plan step: the sum of its dependencies' ``n`` (read through the runtime)."""
    inputs = await context.dependency_results()
    return {"sum": sum(int(str((dep.result or {})["n"])) for dep in inputs.values())}
