"""Where a hand-off's time goes: each stage from ``create_task`` to the waiting worker
holding its claim, against the floor of the same run.

The hand-off is ``bench/tasks.py``'s (8 workers wait in ``claim_task``, one producer
creates tasks one at a time, each once the last one's completion is committed and
2 ms have passed); the script stamps, by patching the runtime's
internals for the run, when each stage is first reached after the create is called:

- ``tm_batch``: the TaskManager's batch starts (the API's checks, the ask, its wake)
- ``commit``: the storage actor's commit starts (the create and the hand-out decided)
- ``driver``: the store's driver is called (the statements built)
- ``tx_start`` / ``tx_end``: the transaction on the connection's thread
- ``back``: the driver's call returns on the event loop
- ``answered``: the storage actor's commit is done (events fanned out, write answered)
- ``tm_done``: the TaskManager's batch ends (its answers, its upkeep)
- ``producer`` / ``claimer``: the producer's ``create_task`` returns / the worker holds
  the claim (the hand-off)

p50 of each, in microseconds from the call, then the floor's p50 (``bench/tasks.py``'s
``handoff_floor``: the same rows committed through the same driver, bare anyio streams).
The stamps cost a few microseconds each: compare stages, not the total with tasks.py's.
Findings: docs/performance.md, "The hand-off, step by step".

    python bench/handoff.py [--backend asyncio|trio] [--handoffs 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as house

from hive_orchestration import Claim, Runtime, RuntimeConfig
from hive_orchestration.actors.task_manager.actor import TaskManager
from hive_orchestration.storage.actor import StorageActor
from hive_orchestration.storage.sqlite import drivers

STAGES = (
    "tm_batch",
    "commit",
    "driver",
    "tx_start",
    "tx_end",
    "back",
    "answered",
    "tm_done",
    "producer",
    "claimer",
)

_marks: dict[str, float] = {}


def _mark(stage: str) -> None:
    _marks.setdefault(stage, time.perf_counter())


def _patch() -> None:
    """Stamp the stages (for this process's run only)."""
    receive_batch = TaskManager.receive_batch

    async def batch(self: TaskManager, envelopes: Sequence[Any]) -> None:
        _mark("tm_batch")
        await receive_batch(self, envelopes)
        _mark("tm_done")

    commit = StorageActor._commit

    async def committed(self: StorageActor, writes: list[Any], *, isolate: bool) -> None:
        _mark("commit")
        await commit(self, writes, isolate=isolate)
        _mark("answered")

    transaction_sync = drivers._transaction_sync

    def on_thread(conn: Any, statements: Any) -> None:
        _mark("tx_start")
        try:
            transaction_sync(conn, statements)
        finally:
            _mark("tx_end")

    TaskManager.receive_batch = batch  # type: ignore[method-assign]
    StorageActor._commit = committed  # type: ignore[assignment]
    drivers._transaction_sync = on_thread
    for driver in (drivers.AiosqliteDriver, drivers.ThreadDriver):
        _stamp_driver(driver)


def _stamp_driver(driver: Any) -> None:
    call: Callable[[Any, Any], Awaitable[None]] = driver.transaction

    async def transaction(self: Any, statements: Any) -> None:
        _mark("driver")
        await call(self, statements)
        _mark("back")

    driver.transaction = transaction


async def stages(folder: Path, count: int) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    async with Runtime.open(folder / "stages.db", config=RuntimeConfig()) as rt:
        received = anyio.Event()
        completed = anyio.Event()

        async def worker(name: str) -> None:
            while True:
                claim: Claim | None = await rt.claim_task(name, "bench", wait=5.0)
                if claim is None:
                    continue
                _mark("claimer")
                received.set()
                await rt.complete_task(claim.lease)
                completed.set()

        async with anyio.create_task_group() as tg:
            for w in range(house.WORKERS):
                tg.start_soon(worker, f"worker-{w}")
            await anyio.sleep(0.1)  # every worker is waiting
            for n in range(count):
                received = anyio.Event()
                completed = anyio.Event()
                _marks.clear()
                start = time.perf_counter()
                await rt.create_task("bench", {"n": n})
                _mark("producer")
                await received.wait()
                rows.append({k: (v - start) * 1e6 for k, v in _marks.items()})
                # The completion committed, and 2 ms for the worker to wait again: no
                # stage of the next hand-off is stamped by this one's completion.
                await completed.wait()
                await anyio.sleep(0.002)
            tg.cancel_scope.cancel()
    return rows


async def run(backend: str, count: int) -> dict[str, Any]:
    _patch()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = await stages(folder, count)
        floor = await house.handoff_floor(folder, count)
    warm = rows[len(rows) // 10 :] or rows
    p50 = {
        stage: statistics.median(row[stage] for row in warm if stage in row)
        for stage in STAGES
        if any(stage in row for row in warm)
    }
    return {
        "backend": backend,
        "handoffs": count,
        "stages_p50_us": p50,
        "floor_p50_us": statistics.median(floor) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--handoffs", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = anyio.run(run, args.backend, args.handoffs, backend=args.backend)
    print(f"hand-off stages, {args.backend}, {args.handoffs} hand-offs (p50, us from the call):")
    for stage, value in figures["stages_p50_us"].items():
        print(f"  {stage:10s} {value:8.1f}")
    print(f"  floor      {figures['floor_p50_us']:8.1f}  (bench/tasks.py's handoff_floor)")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
