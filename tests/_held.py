"""Holding an actor in a batch, as a busy one is (a commit held up by a slow disk or a
starved database backend), while what is sent to it meanwhile waits in its mailbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from hive_orchestration.storage.actor import StorageActor


@dataclass
class Held:
    """``gate.set()`` lets the actor go on; ``batches`` are the sizes of its batches
    from the one after the gate."""

    gate: anyio.Event = field(default_factory=anyio.Event)
    batches: list[int] = field(default_factory=list)


def hold_in_batch(monkeypatch: pytest.MonkeyPatch, actor: type[Any], hold: object) -> Held:
    """Patch ``actor`` so that the batch holding the message ``hold`` (compared by
    equality) ends only once ``gate`` is set: busy, what is sent meanwhile waits."""
    held = Held()
    original = actor.receive_batch

    async def receive_batch(self: Any, batch: Any) -> None:
        if held.gate.is_set():
            held.batches.append(len(batch))
        await original(self, batch)
        if any(envelope.message == hold for envelope in batch):
            await held.gate.wait()

    monkeypatch.setattr(actor, "receive_batch", receive_batch)
    return held


class Stall:
    """While ``on``, the storage actor waits ``seconds`` before each commit (a writer held
    up: a slow fsync, a database backend waiting for a CPU)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.on = False


def stall_commits(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Stall:
    """Patch the storage actor so that its commits wait ``seconds`` while the returned
    :class:`Stall` is ``on``."""
    stall = Stall(seconds)
    original = StorageActor._commit

    async def commit(self: StorageActor, *args: Any, **kwargs: Any) -> Any:
        if stall.on:
            await anyio.sleep(stall.seconds)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(StorageActor, "_commit", commit)
    return stall
