"""The keyed deadline heap: one entry per key, moved and dropped in place, earliest first."""

from __future__ import annotations

import random

import pytest

from hive_orchestration.runtime import Deadlines


def test_earliest_first_and_ties_in_the_order_set() -> None:
    heap: Deadlines[str] = Deadlines()
    for key, at in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)]:
        heap.set(key, at)
    assert heap.first() == (1.0, "a")
    assert [heap.pop_due(2.0) for _ in range(4)] == ["a", "a2", "b", None]
    assert heap.first() == (3.0, "c")
    assert len(heap) == 1


def test_setting_a_key_again_moves_its_one_entry() -> None:
    heap: Deadlines[str] = Deadlines()
    heap.set("lease", 10.0)
    heap.set("other", 5.0)
    for at in range(100):  # a heartbeat moving the deadline each time
        heap.set("lease", 20.0 + at)
    assert len(heap) == 2
    assert heap.get("lease") == 119.0
    heap.set("lease", 1.0)  # shortened: now the earliest
    assert heap.first() == (1.0, "lease")
    heap.discard("lease")
    heap.discard("lease")  # twice: nothing to do
    assert "lease" not in heap
    assert heap.first() == (5.0, "other")


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_match_a_plain_model(seed: int) -> None:
    rng = random.Random(seed)
    heap: Deadlines[int] = Deadlines()
    model: dict[int, float] = {}
    for _ in range(2000):
        key = rng.randrange(60)
        roll = rng.random()
        if roll < 0.5:
            at = float(rng.randrange(1000))
            heap.set(key, at)
            model[key] = at
        elif roll < 0.8:
            heap.discard(key)
            model.pop(key, None)
        else:
            now = float(rng.randrange(1000))
            got = heap.pop_due(now)
            due = [k for k, at in model.items() if at <= now]
            if not due:
                assert got is None
            else:
                assert got is not None
                assert model[got] == min(model[k] for k in due)
                del model[got]
        assert len(heap) == len(model)
        assert all(heap.get(k) == at for k, at in model.items())
        first = heap.first()
        if model:
            assert first is not None
            assert first[0] == min(model.values())
        else:
            assert first is None
