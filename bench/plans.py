"""Benchmark of plan execution: the scheduling cost of a subtask against an independent task.

What is measured, on a fresh file database per run at the default ``synchronous=FULL``:

1. A plan of ``--layers`` x ``--width`` subtasks (100 x 100 = 10 000), task type
   ``noop``. Subtask ``i`` of layer ``L > 0`` depends on subtasks ``i``, ``i+1`` and
   ``i+2`` (mod width) of layer ``L-1``; layer 0 has no dependencies. The plan data is
   built before the clock starts. Timed: from calling ``create_execution_plan`` to
   ``wait_for_plan`` returning the completed plan; ``create_execution_plan`` plus
   ``mark_plan_execution_started`` is also shown on its own (checking and storing the
   plan, creating its 10 000 blocked tasks and queueing layer 0).
2. The baseline, in the same process run: the same number of independent ``noop`` tasks,
   created one by one with ``create_task`` by concurrent creators while the agents run
   (as in ``bench/tasks.py``). Timed: from the first create to the last completion.

Both are run by the same 8 no-op agents: in-process workers that each loop
``claim_task(lease=60, wait=5)``, ``start_task``, ``complete_task`` (no polling: a claim
waits for a task to be queued). They are waiting before the clock starts and are
cancelled once everything is done, so no idle claim's wait is counted. Two shapes, the
same for the plan and its baseline, as in ``bench/tasks.py``: each agent running 1 task
at a time (8 claims at once; 8 creators for the baseline), and each agent running 16
tasks at once, its slots (128 claims at once; 128 creators for the baseline).

The "scheduling overhead per subtask" of the issue is the plan's wall time per subtask
divided by the baseline's wall time per task, both including creation and execution by
the same agents: how much dearer a subtask is to get through the system than a task that
waits for nothing. Goal: < 2.0. Storage figures are deltas of ``Runtime.statistics()``
over each run: commits, events appended (so events per commit), and write requests per
commit with the largest batch of them (the TaskManager groups its own work into one
write request per commit, so these stay near 1; events per commit shows the grouping).

Run from the repository root::

    python bench/plans.py                          # asyncio, 100 x 100
    python bench/plans.py --backend trio
    python bench/plans.py --layers 10 --width 20   # a quick one
    python bench/plans.py --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from hive_orchestration import Runtime
from hive_orchestration.messages.plans import PlanStatus

OVERHEAD_GOAL = 2.0  # plan per-subtask time / independent per-task time
AGENTS = 8
TASK_TYPE = "noop"
FAN_IN = 3  # dependencies of a subtask of layer L > 0, in layer L-1
#: (tasks each agent runs at once, concurrent create_task callers of the baseline).
SHAPES = ((1, 8), (16, 128))


@dataclass
class Storage:
    """Deltas of ``Runtime.statistics().storage`` over one run."""

    transactions: int
    writes: int  # write requests (each a unit of rows and events), many per commit
    largest_batch: int  # write requests in the largest commit, over the runtime's life
    events: int  # events appended to the log


@dataclass
class Side:
    items: int
    total: float  # seconds, first call to the end
    last_completion: float  # seconds, first call to the last complete_task returning
    storage: Storage

    @property
    def per_item(self) -> float:
        return self.total / self.items


@dataclass
class PlanSide(Side):
    create: float  # seconds in create_execution_plan
    start: float  # seconds in mark_plan_execution_started


@dataclass
class Shape:
    slots: int
    creators: int
    independent: Side
    plan: PlanSide
    overhead: float  # plan per subtask / independent per task


@dataclass
class Result:
    backend: str
    layers: int
    width: int
    subtasks: int
    agents: int
    shapes: list[Shape]


def plan_data(layers: int, width: int) -> dict[str, Any]:
    subtasks: list[dict[str, Any]] = []
    for layer in range(layers):
        for i in range(width):
            subtask: dict[str, Any] = {"id": f"s{layer}-{i}", "task_type": TASK_TYPE}
            if layer:
                needs = dict.fromkeys((i + k) % width for k in range(FAN_IN))
                subtask["dependencies"] = [f"s{layer - 1}-{j}" for j in needs]
            subtasks.append(subtask)
    return {"title": f"bench {layers}x{width}", "subtasks": subtasks}


class Agents:
    """``AGENTS`` no-op agents with ``slots`` claims each; counts completions."""

    def __init__(self, rt: Runtime, slots: int, expected: int) -> None:
        self.rt = rt
        self.slots = slots
        self.expected = expected
        self.completed = 0
        self.last_completion = 0.0  # perf_counter() of the last completion
        self.done = anyio.Event()

    async def loop(self, name: str) -> None:
        rt = self.rt
        while True:
            claim = await rt.claim_task(name, TASK_TYPE, lease=60, wait=5.0)
            if claim is None:
                continue
            await rt.start_task(claim.lease)
            await rt.complete_task(claim.lease, {})
            self.completed += 1
            if self.completed == self.expected:
                self.last_completion = time.perf_counter()
                self.done.set()

    def start(self, tg: TaskGroup) -> None:
        for a in range(AGENTS):
            for _ in range(self.slots):
                tg.start_soon(self.loop, f"agent-{a}")


async def measured(
    path: Path,
    slots: int,
    items: int,
    body: Callable[[Runtime, Agents], Awaitable[float]],
    limit: float,
) -> tuple[float, float, Storage]:
    """Open a runtime at ``path``, start the agents, run ``body`` (which returns the
    perf_counter() at which it started) and wait for ``items`` completions."""
    async with Runtime.open(path) as rt:  # the default config: synchronous=FULL
        before = (await rt.statistics()).storage
        agents = Agents(rt, slots, items)
        async with anyio.create_task_group() as tg:
            agents.start(tg)
            await anyio.sleep(0.1)  # every agent is waiting in claim_task
            with anyio.fail_after(limit):
                began = await body(rt, agents)
                ended = time.perf_counter()
                await agents.done.wait()
            tg.cancel_scope.cancel()
        after = (await rt.statistics()).storage
    storage = Storage(
        transactions=after.transactions - before.transactions,
        writes=after.writes - before.writes,
        largest_batch=after.largest_batch,
        events=after.last_seq - before.last_seq,
    )
    return ended - began, agents.last_completion - began, storage


async def independent(folder: Path, count: int, slots: int, creators: int, limit: float) -> Side:
    async def body(rt: Runtime, agents: Agents) -> float:
        async def creator(first: int) -> None:
            for n in range(first, count, creators):
                await rt.create_task(TASK_TYPE, {"n": n})

        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in range(creators):
                tg.start_soon(creator, c)
        await agents.done.wait()
        return began

    total, last, storage = await measured(
        folder / f"independent-{slots}.db", slots, count, body, limit
    )
    return Side(count, total, last, storage)


async def plan(folder: Path, layers: int, width: int, slots: int, limit: float) -> PlanSide:
    data = plan_data(layers, width)
    count = layers * width
    create = start = 0.0

    async def body(rt: Runtime, agents: Agents) -> float:
        nonlocal create, start
        began = time.perf_counter()
        plan_id = await rt.create_execution_plan(data)
        created = time.perf_counter()
        if not await rt.mark_plan_execution_started(plan_id):
            raise RuntimeError(f"plan {plan_id} did not start")
        started = time.perf_counter()
        finished = await rt.wait_for_plan(plan_id)
        if finished.status is not PlanStatus.COMPLETED:
            raise RuntimeError(f"plan ended {finished.status.value}: {finished.error}")
        create, start = created - began, started - created
        return began

    total, last, storage = await measured(folder / f"plan-{slots}.db", slots, count, body, limit)
    return PlanSide(count, total, last, storage, create, start)


async def run(backend: str, layers: int, width: int, shapes: list[int], limit: float) -> Result:
    count = layers * width
    results = []
    for slots, creators in SHAPES:
        if slots not in shapes:
            continue
        with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
            base = await independent(Path(folder), count, slots, creators, limit)
        with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
            graph = await plan(Path(folder), layers, width, slots, limit)
        overhead = graph.per_item / base.per_item
        results.append(Shape(slots, creators, base, graph, overhead))
    return Result(backend, layers, width, count, AGENTS, results)


def render(r: Result) -> str:
    def storage(s: Storage, items: int) -> str:
        return (
            f"{s.transactions:,} commits ({s.transactions / items:.2f}/item,"
            f" {s.events / max(s.transactions, 1):.1f} events and"
            f" {s.writes / max(s.transactions, 1):.1f} write requests each,"
            f" largest batch {s.largest_batch:,} requests), {s.events:,} events"
        )

    lines = [
        f"backend: {r.backend}  (synchronous=FULL, file database, WAL; {r.agents} no-op agents;"
        f" plan {r.layers} layers x {r.width} = {r.subtasks:,} subtasks, {FAN_IN} dependencies"
        " each after layer 0)"
    ]
    for shape in r.shapes:
        b, p = shape.independent, shape.plan
        verdict = "PASS" if shape.overhead < OVERHEAD_GOAL else "FAIL"
        lines += [
            f"{shape.slots} slot(s)/agent ({shape.slots * r.agents} claims at once):",
            f"  independent tasks, {shape.creators:>3} creators: {b.total:7.2f} s"
            f" = {b.per_item * 1e6:7.1f} us/task    ({b.items / b.total:>6,.0f}/s);"
            f" {storage(b.storage, b.items)}",
            f"  plan (create -> completed):       {p.total:7.2f} s"
            f" = {p.per_item * 1e6:7.1f} us/subtask ({p.items / p.total:>6,.0f}/s);"
            f" {storage(p.storage, p.items)}",
            f"    of which create_execution_plan {p.create:.3f} s,"
            f" mark_plan_execution_started {p.start:.3f} s;"
            f" last completion at {p.last_completion:.2f} s",
            f"  overhead per subtask (plan per subtask / independent per task):"
            f" {shape.overhead:.2f}x  goal < {OVERHEAD_GOAL:g} {verdict}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument(
        "--slots",
        type=int,
        action="append",
        choices=[slots for slots, _ in SHAPES],
        help="run only this shape (repeatable; default: all)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if args.layers < 1 or args.width < 1:
        parser.error("need --layers >= 1 and --width >= 1")
    shapes = args.slots or [slots for slots, _ in SHAPES]
    result: Result = anyio.run(
        run, args.backend, args.layers, args.width, shapes, args.timeout, backend=args.backend
    )
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
