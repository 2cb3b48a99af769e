"""Priority within a concurrency key holds across task types: the best waiting task of a
key gets the key, whichever claimer asks first. A claimer whose types leave that task out
gets nothing of the key (another task if it has one) and the key waits for a claimer that
can take it. Through the public API (``claim_task`` / ``claim_tasks`` with task types),
waiting claimers included. Real SQLite files, both backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from hive_orchestration import Claim, Runtime, RuntimeConfig
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api import embedded as embedded_module

pytestmark = pytest.mark.anyio

SOON = 10.0  # a bound that only a hang reaches


@asynccontextmanager
async def runtime(db_path: str) -> AsyncIterator[Runtime]:
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)
    async with Runtime.open(db_path, config=config) as rt:
        yield rt


async def claim(rt: Runtime, *types: str, worker: str = "w") -> Claim:
    got = await rt.claim_task(worker, list(types))
    assert got is not None, f"expected a task of {types}"
    return got


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(SOON):
        while not predicate():  # noqa: ASYNC110 - polls the TaskManager's state
            await anyio.sleep(0.005)


async def key_held_with_two_waiting(rt: Runtime) -> tuple[Claim, str, str]:
    """Key "a" (limit 1) held by a claim of a ``tc`` task; waiting for it, a high-priority
    ``ta`` task and a low-priority ``tb`` task (created first: older)."""
    await rt.create_task("tc", priority=5, concurrency_key="a")
    holder = await claim(rt, "tc", worker="wc")
    low = await rt.create_task("tb", priority=1, concurrency_key="a")
    high = await rt.create_task("ta", priority=9, concurrency_key="a")
    return holder, high, low


async def test_a_freed_key_goes_to_its_best_task_not_to_the_first_claimer(db_path: str) -> None:
    async with runtime(db_path) as rt:
        holder, high, low = await key_held_with_two_waiting(rt)
        free = await rt.create_task("tb", priority=0)  # no key: a tb claimer may have it
        await rt.complete_task(holder.lease)
        # The tb claimer asks first: the key is kept for "high"; it gets the other task.
        assert (await claim(rt, "tb", worker="wb")).task.id == free
        assert await rt.claim_task("wb2", ["tb"]) is None
        assert (await rt.get_task(low)).status.value == "queued"  # type: ignore[union-attr]
        got = await claim(rt, "ta", worker="wa")
        assert got.task.id == high
        assert await rt.claim_task("wb", ["tb"]) is None  # the key is held again
        await rt.complete_task(got.lease)
        assert (await claim(rt, "tb", worker="wb")).task.id == low


async def test_a_claimer_of_both_types_gets_the_best_and_a_batch_claim_keeps_the_limit(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        holder, high, low = await key_held_with_two_waiting(rt)
        other = await rt.create_task("tb", priority=0)
        await rt.complete_task(holder.lease)
        # One claim for both types and many slots: the key's best, then nothing more of
        # the key (its one slot is taken), then the rest.
        got = await rt.claim_tasks("wab", ["tb", "ta"], limit=5)
        assert [c.task.id for c in got] == [high, other]
        assert await rt.claim_tasks("wb", ["tb"], limit=5) == []
        await rt.complete_task(got[0].lease)
        assert [c.task.id for c in await rt.claim_tasks("wb", ["tb"], limit=5)] == [low]


async def test_a_waiting_claimer_of_the_wrong_type_waits_for_the_better_task_to_finish(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers: list[TaskManager] = []

    def build(*args: Any, **kwargs: Any) -> TaskManager:
        managers.append(TaskManager(*args, **kwargs))
        return managers[-1]

    monkeypatch.setattr(embedded_module, "TaskManager", build)
    async with runtime(db_path) as rt:
        [manager] = managers
        holder, high, low = await key_held_with_two_waiting(rt)
        got: list[Claim | None] = []

        async def tb_worker() -> None:
            got.append(await rt.claim_task("wb", ["tb"], wait=SOON))

        async with anyio.create_task_group() as tg:
            tg.start_soon(tb_worker)
            await wait_until(lambda: len(manager._waiters) == 1)  # parked, key still held
            await rt.complete_task(holder.lease)  # the key frees while it waits
            taken = await claim(rt, "ta", worker="wa")
            assert taken.task.id == high
            assert got == []  # still waiting: the key went to "high"
            await rt.complete_task(taken.lease)
        [waited] = got
        assert waited is not None
        assert waited.task.id == low
        events = await rt.read_events(0, limit=1000)
        completed = next(e.seq for e in events if e.type == "task.completed" and e.task_id == high)
        assigned = next(e.seq for e in events if e.type == "task.assigned" and e.task_id == low)
        assert assigned > completed


async def test_a_cancelled_best_task_lets_the_next_one_of_its_key_go(db_path: str) -> None:
    async with runtime(db_path) as rt:
        holder, high, low = await key_held_with_two_waiting(rt)
        await rt.complete_task(holder.lease)
        assert await rt.claim_task("wb", ["tb"]) is None
        await rt.cancel_task(high)
        assert (await claim(rt, "tb", worker="wb")).task.id == low


async def test_a_task_in_backoff_holds_nothing_back(db_path: str) -> None:
    async with runtime(db_path) as rt:
        high = await rt.create_task("ta", priority=9, concurrency_key="a")
        first = await claim(rt, "ta", worker="wa")
        assert first.task.id == high
        low = await rt.create_task("tb", priority=1, concurrency_key="a")
        # "high" fails and waits out a long backoff: it is not ready, so "low" may go.
        await rt.fail_task(first.lease, "boom", retry_after=60.0)
        assert (await claim(rt, "tb", worker="wb")).task.id == low
