"""Data between plan steps, a cleanup step that always runs, and retries by exception type.

    python examples/plan_data_and_cleanup.py [DB_PATH] [--backend trio]

A nightly report as a plan: three ``fetch`` steps pull rows from their regions, a
``merge`` step reads what the ``eu`` and ``us`` fetches returned (``context
.dependency_results()``) and adds them up, ``publish`` needs the merge and the ``asia``
fetch, and ``cleanup`` (``always_run``) runs once every other step has ended, whatever
happened to it, and reads how each one ended.

The agents run with ``retry_on=(TimeoutError,)`` and ``fail_on=(PermissionError,)``: the
``us`` fetch times out once and is retried; the ``asia`` fetch is refused access and fails
at once, with no retry. Under the ``continue`` policy ``publish`` is skipped, the rest
goes on, and the plan ends ``failed`` after its cleanup ran.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import cast

import anyio

from hive_orchestration import AgentRegistry, AgentRunner, Runtime, TaskContext

ROWS = {"eu": [3, 4], "us": [5, 6, 7], "asia": [1]}


def nightly_report() -> dict[str, object]:
    fetches = [
        {"id": f"fetch-{region}", "task_type": "fetch", "payload": {"region": region}}
        for region in ROWS
    ]
    return {
        "title": "Nightly report",
        "subtasks": [
            *fetches,
            {"id": "merge", "task_type": "merge", "dependencies": ["fetch-eu", "fetch-us"]},
            {"id": "publish", "task_type": "publish", "dependencies": ["merge", "fetch-asia"]},
            {
                "id": "cleanup",
                "task_type": "cleanup",
                "dependencies": [f["id"] for f in fetches] + ["merge", "publish"],
                "always_run": True,
            },
        ],
    }


async def fetch(context: TaskContext) -> dict[str, object]:
    region = str(context.payload["region"])
    if region == "us" and context.attempt == 1:
        raise TimeoutError("the us replica did not answer")  # retry_on: tried again
    if region == "asia":
        raise PermissionError("no access to the asia warehouse")  # fail_on: fails at once
    return {"region": region, "rows": ROWS[region]}


async def merge(context: TaskContext) -> dict[str, object]:
    inputs = await context.dependency_results()  # subtask id -> how it ended, its result
    rows = [row for dep in inputs.values() for row in cast(list[int], (dep.result or {})["rows"])]
    return {"rows": len(rows), "total": sum(rows)}


async def publish(context: TaskContext) -> dict[str, object]:
    return {"published": True}


async def cleanup(context: TaskContext) -> dict[str, object]:
    inputs = await context.dependency_results()
    return {"saw": {name: dep.status.value for name, dep in sorted(inputs.items())}}


async def main(db_path: str) -> None:
    registry = AgentRegistry()
    for handler in (fetch, merge, publish, cleanup):
        registry.register(handler.__name__, handler)
    async with Runtime.open(db_path) as runtime:
        plan_id = await runtime.create_execution_plan(nightly_report(), failure_policy="continue")
        async with AgentRunner(
            runtime, registry, retry_on=(TimeoutError,), fail_on=(PermissionError,)
        ):
            await runtime.mark_plan_execution_started(plan_id)
            plan = await runtime.wait_for_plan(plan_id, timeout=30)
        results = {}
        for state in await runtime.get_plan_subtasks(plan_id):
            task = await runtime.get_task(state.task_id or "")
            assert task is not None
            results[state.subtask_id] = task.result
            note = task.result or task.error or ""
            print(f"  {state.subtask_id:11} {state.status.value:9} {task.attempts} {note}")
        merged = results["merge"] or {}
        saw = cast(dict[str, str], (results["cleanup"] or {})["saw"])
        print(f"plan {plan.title!r}: {plan.status.value}; merged {merged['rows']} rows")
        print("cleanup saw " + ", ".join(f"{k}={v}" for k, v in saw.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
