"""Tells handled in the sender's task while their actor is idle (``Actor.receive_inline``):
a commit's events fanned out by the storage actor's task, and the TaskManager's word of
which workers are at work, for live workers. Each saves waking an actor per batch; the
outcome is what the actor's own batch would have made of the message."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from hive_orchestration import Runtime, WorkerStatus
from hive_orchestration.actors.broadcast import BroadcastActor
from hive_orchestration.actors.worker_registry import WorkerRegistry
from hive_orchestration.messages.events import Publish
from hive_orchestration.messages.workers import WorkersSeen

pytestmark = pytest.mark.anyio


def spy_batches(monkeypatch: pytest.MonkeyPatch, cls: type[Any], kind: type) -> list[object]:
    """Record every message of ``kind`` that reaches ``cls``'s own batches."""
    seen: list[object] = []
    original = cls.receive_batch

    async def receive_batch(self: Any, batch: Any) -> None:
        seen.extend(e.message for e in batch if isinstance(e.message, kind))
        await original(self, batch)

    monkeypatch.setattr(cls, "receive_batch", receive_batch)
    return seen


async def test_a_live_workers_signs_of_life_wake_no_registry_batch(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = spy_batches(monkeypatch, WorkerRegistry, WorkersSeen)
    async with Runtime.open(db_path) as rt:
        registered = await rt.register_worker("w1", capabilities=["job"])
        for _ in range(3):
            await rt.create_task("job")
            claim = await rt.claim_task("w1", "job")
            assert claim is not None
            await rt.complete_task(claim.lease)
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        assert worker.last_heartbeat > registered.last_heartbeat  # seen at work
    assert batched == []


async def test_a_commits_events_reach_subscribers_without_a_broadcast_batch(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = spy_batches(monkeypatch, BroadcastActor, Publish)
    async with Runtime.open(db_path) as rt, rt.subscribe("task.*") as events:
        await anyio.wait_all_tasks_blocked()
        task_id = await rt.create_task("job")
        with anyio.fail_after(5):
            event = await events.receive()
        assert (event.type, event.task_id) == ("task.created", task_id)
    assert batched == []
