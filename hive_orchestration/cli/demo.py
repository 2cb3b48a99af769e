"""``hive-orchestration demo``: the embedded runtime, live, on a local SQLite file.

It opens the runtime, starts the example agents (planner, reviewer, deployer, tester,
monitor), asks for a plan ("Deploy to production"), has the planner answer it, runs the
plan with live progress, and ends with a summary. Then it closes the runtime, opens it
again and shows that the history survived: run it twice and the first run's plan is
still there. Plain text: it needs no optional extra.
"""

from __future__ import annotations

import time

import anyio

from ..agents import AgentRegistry, AgentRunner, auto_register_adapters
from ..api.embedded import Runtime
from ..messages.plans import PlanningRequest

__all__ = ["GOAL", "run_demo"]

GOAL = "Deploy to production"
_FINAL = ("plan.completed", "plan.failed", "plan.cancelled")


def _plan_data(request: PlanningRequest) -> dict[str, object]:
    """The plan the demo's planner makes for a request."""
    return {
        "title": request.task_description,
        "subtasks": [
            {"id": "analyse", "task_type": "planning", "payload": {"goal": GOAL}},
            {"id": "unit-tests", "task_type": "testing", "dependencies": ["analyse"]},
            {"id": "review", "task_type": "review", "dependencies": ["analyse"]},
            {
                "id": "deploy",
                "task_type": "deployment",
                "dependencies": ["unit-tests", "review"],
                "payload": {"services": ["api", "worker"], "environment": "production"},
            },
            {"id": "monitor", "task_type": "monitoring", "dependencies": ["deploy"]},
        ],
    }


async def run_demo(path: str) -> None:
    registry = auto_register_adapters(AgentRegistry())
    async with Runtime.open(path) as runtime:
        before = (await runtime.statistics()).storage.last_seq
        print(f"opened {runtime.path}: {before} event(s) already in the log")
        request = await runtime.queue_planning_request(
            f"{GOAL} ({time.strftime('%Y-%m-%d %H:%M:%S')})", requestor="demo"
        )
        print(f"queued planning request {request.id}: {request.task_description!r}")
        async with AgentRunner(runtime, registry):
            names = ", ".join(spec.agent_type for spec in registry.list_agents())
            print(f"agents running: {names}")
            claimed = await runtime.claim_planning_request("ai-planner-1", wait=5)
            assert claimed is not None
            plan_id = await runtime.create_execution_plan(
                _plan_data(claimed), planning_task_id=claimed.id, source_agent="ai-planner"
            )
            plan = await runtime.get_execution_plan(plan_id)
            assert plan is not None
            print(f"plan {plan_id}: {plan.subtask_count} subtasks, {plan.dependency_count} deps")
            async with runtime.subscribe("plan.*", plan_id=plan_id) as events:
                await runtime.mark_plan_execution_started(plan_id, source_agent="demo")
                with anyio.fail_after(60):
                    async for event in events:
                        progress = await runtime.get_plan_progress(plan_id)
                        bar = "#" * round(progress.percent / 10)
                        step = str(event.data.get("subtask_id") or "")
                        print(f"  [{bar:<10}] {progress.percent:3.0f}%  {event.type} {step}")
                        if event.type in _FINAL:
                            break
        print("summary:")
        for state in await runtime.get_plan_subtasks(plan_id):
            task = await runtime.get_task(state.task_id or "")
            result = "" if task is None or task.result is None else str(task.result)
            print(f"  {state.subtask_id:<11} {state.status.value:<10} {result[:60]}")
        status = await runtime.get_execution_plan_status(plan_id)
        print(f"plan {plan_id}: {status}")

    print("runtime closed; opening it again")
    async with Runtime.open(path) as runtime:
        plans = await runtime.get_execution_plans(limit=1000)
        history = await runtime.read_events(after=0, limit=10_000)
        print(f"the database holds {len(plans)} plan(s) and {len(history)} event(s):")
        for old in plans[:5]:
            print(f"  {old.generated_at:%Y-%m-%d %H:%M:%S}  {old.status.value:<10} {old.title}")
        print("run the demo again: this history will still be there.")
