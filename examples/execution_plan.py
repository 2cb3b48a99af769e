"""Run an execution plan: "Deploy to production" as a DAG of subtasks run by agents.

    python examples/execution_plan.py [DB_PATH] [--backend trio]

An orchestrator app asks for a plan (the planning queue); a planner takes the request and
answers it with plan data: analyse, then test and review side by side, then deploy, then
monitor. The app approves and starts the plan; the example agents (``AgentRunner``) claim
each subtask's task the moment its dependencies are done, and the app follows the plan's
events until it ends.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import (
    AgentRegistry,
    AgentRunner,
    PlanningRequest,
    Runtime,
    auto_register_adapters,
)

GOAL = "Deploy to production"


def plan_for(request: PlanningRequest) -> dict[str, object]:
    """What a planner agent would produce for the request."""
    services = ["api", "worker"]
    return {
        "title": request.task_description,
        "subtasks": [
            {"id": "analyse", "task_type": "planning", "payload": {"goal": GOAL}},
            {"id": "test", "task_type": "testing", "dependencies": ["analyse"]},
            {"id": "review", "task_type": "review", "dependencies": ["analyse"]},
            {
                "id": "deploy",
                "task_type": "deployment",
                "dependencies": ["test", "review"],
                "payload": {"services": services, "environment": "production"},
                "priority": 5,
            },
            {"id": "monitor", "task_type": "monitoring", "dependencies": ["deploy"]},
        ],
    }


async def main(db_path: str) -> None:
    registry = auto_register_adapters(AgentRegistry())
    async with Runtime.open(db_path) as runtime:
        request = await runtime.queue_planning_request(GOAL, requestor="orchestrator-app")
        # The planner's side: take the request, answer it with a plan.
        claimed = await runtime.claim_planning_request("ai-planner-1")
        assert claimed is not None
        assert claimed.id == request.id
        plan_id = await runtime.create_execution_plan(
            plan_for(claimed), planning_task_id=claimed.id, source_agent="ai-planner"
        )
        # The app's side: approve, start, and follow the plan until it ends.
        await runtime.approve_plan(plan_id, source_agent="orchestrator-app")
        async with (
            runtime.subscribe("plan.*", plan_id=plan_id) as events,
            AgentRunner(runtime, registry),
        ):
            await runtime.mark_plan_execution_started(plan_id)
            with anyio.fail_after(30):
                async for event in events:
                    progress = await runtime.get_plan_progress(plan_id)
                    step = event.data.get("subtask_id") or ""
                    print(f"#{event.seq} {event.type} {step} ({progress.percent:.0f}% done)")
                    if event.type in ("plan.completed", "plan.failed", "plan.cancelled"):
                        break
        for state in await runtime.get_plan_subtasks(plan_id):
            task = await runtime.get_task(state.task_id or "")
            result = task.result if task is not None else None
            print(f"  {state.subtask_id:8} {state.status.value:10} {result}")
        plan = await runtime.get_execution_plan(plan_id)
        assert plan is not None
        print(f"plan {plan.title!r}: {plan.status.value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
