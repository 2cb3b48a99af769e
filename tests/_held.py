"""Holding an actor in a batch, as a busy one is (a commit held up by a slow disk or a
starved database backend), while what is sent to it meanwhile waits in its mailbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest


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
