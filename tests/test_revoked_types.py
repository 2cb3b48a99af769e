"""Revoked task types in the ReadyQueue (docs/CONTROL.md), against the model of
tests/test_ready_queue.py: a revoked type's tasks never come out, stay queued, hold their
places in their concurrency keys, and come out in order once the type is restored."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ready_queue import (
    TASK_IDS,
    TYPE_LIMITS,
    TYPES,
    Model,
    add,
    available_of,
    drain,
    make_task,
    pick,
    pop,
    unhold,
)

from hive_orchestration.actors.task_manager.ready import ReadyQueue


def test_a_revoked_type_waits_in_place_and_comes_back_in_order() -> None:
    revoked: set[str] = set()
    queue = ReadyQueue(revoked=revoked)
    for i, (task_type, priority) in enumerate([("a", 1), ("b", 1), ("a", 3), ("b", 2)]):
        queue.add(make_task(f"t{i}", task_type, priority=priority, created=i), 0.0)
    # Revoked: the type is passed over, whatever the claimer asks for.
    revoked.add("a")
    assert queue.pop(["a"]) is None
    assert queue.pop(None) == "t3"
    assert len(queue) == 3
    revoked.discard("a")
    queue.restored("a")
    assert queue.changed
    assert drain(queue) == ["t2", "t0", "t1"]


def test_a_revoked_task_keeps_its_place_in_its_concurrency_key() -> None:
    """The key's free slot goes to its best ready task, whatever its type (docs/delivery.md): a
    revoked best task holds it until restored, as a type at its limit does."""
    revoked = {"a"}
    queue = ReadyQueue(revoked=revoked)
    queue.add(make_task("best", "a", priority=5, key="k"), 0.0)
    queue.add(make_task("next", "b", priority=1, key="k"), 0.0)
    queue.add(make_task("free", "b", priority=0), 0.0)
    assert drain(queue) == ["free"]
    revoked.clear()
    queue.restored("a")
    assert queue.pop(None) == "best"


class RevokingModel(Model):
    revoked: set[str]

    def eligible(self, task_types: list[str] | None) -> list[Any]:
        return [t for t in super().eligible(task_types) if t.task_type not in self.revoked]


revoke = st.tuples(st.sampled_from(("revoke", "restore")), st.sampled_from(TYPES))
operations = st.lists(
    st.one_of(
        add,
        add,
        add,
        pop,
        pop,
        pop,
        unhold,
        revoke,
        revoke,
        st.tuples(st.just("discard"), pick),
        st.tuples(st.just("take"), pick),
        st.tuples(st.just("promote"), st.integers(0, 4)),
    ),
    min_size=30,
    max_size=150,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_random_operations_with_revocations_match_the_model(ops: list[tuple[Any, ...]]) -> None:
    revoked: set[str] = set()
    queue = ReadyQueue(TYPE_LIMITS, revoked=revoked)
    model = RevokingModel()
    model.revoked = revoked  # the same set: the model reads what the queue reads
    for op in ops:
        match op:
            case ("revoke", str(task_type)):
                revoked.add(task_type)
            case ("restore", str(task_type)):
                if task_type in revoked:
                    revoked.discard(task_type)
                    queue.restored(task_type)
            case ("add", str(task_id), dict(spec)):
                if task_id in model.held:
                    continue
                delay = spec["delay"]
                task = make_task(
                    task_id,
                    spec["task_type"],
                    priority=spec["priority"],
                    created=spec["created"],
                    key=spec["key"],
                    limit=spec["limit"] if spec["key"] is not None else None,
                    available=None if delay is None else model.now + delay,
                )
                queue.add(task, model.now, available_of(task))
                model.tasks[task_id] = task
                model.queued.add(task_id)
                if delay is None or delay <= 0:
                    model.ready.add(task_id)
                else:
                    model.ready.discard(task_id)
            case ("discard", which):
                task_id = model.choose(model.queued, which)
                queue.discard(task_id)
                model.queued.discard(task_id)
                model.ready.discard(task_id)
            case ("take", which):
                task_id = model.choose(model.queued, which)
                if task_id not in model.queued:
                    continue
                queue.discard(task_id)
                queue.hold(model.tasks[task_id])
                model.queued.discard(task_id)
                model.ready.discard(task_id)
                model.held.add(task_id)
            case ("unhold", which):
                task_id = model.choose(model.held, which)
                if task_id not in model.held:
                    continue
                queue.unhold(model.tasks[task_id])
                model.held.discard(task_id)
            case ("promote", int(step)):
                model.now += step
                queue.promote(model.now)
                for task_id in model.queued - model.ready:
                    available = model.tasks[task_id].available_at
                    if available is not None and available.timestamp() <= model.now:
                        model.ready.add(task_id)
            case ("pop", task_types):
                types = None if task_types is None else list(task_types)
                eligible = model.eligible(types)
                got = queue.pop(types)
                if got is None:
                    assert not eligible, f"pop({types}) gave nothing; eligible: {eligible}"
                    continue
                assert got in {task.id for task in eligible}, f"popped ineligible {got}"
                assert model.tasks[got].task_type not in revoked
                task = model.tasks[got]
                best = min((-t.priority, t.created_at) for t in eligible)
                assert (-task.priority, task.created_at) == best, f"popped {got} out of order"
                queue.hold(task)
                model.queued.discard(got)
                model.ready.discard(got)
                model.held.add(got)
            case _:  # pragma: no cover
                pytest.fail(f"unknown operation {op!r}")
        assert len(queue) == len(model.queued)
    assert set(TASK_IDS) >= model.queued
