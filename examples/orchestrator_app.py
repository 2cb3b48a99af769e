"""An orchestrator app: the runtime embedded, a planner agent and deployer agents around it.

    python examples/orchestrator_app.py [DB_PATH] [--backend trio]

The app owns the runtime (``async with Runtime.open(path)``) and gives each agent its
own client (``runtime.client(source_agent=...)``), so that every event says who caused
it. The app asks for a plan; the planner agent claims the request and answers it with an
execution plan; the app approves and starts it; two deployer agents, plain claim loops
(``claim_task`` / ``start_task`` / ``report_progress`` / ``complete_task``), run the
subtasks as their dependencies allow; the app waits for the plan to end
(``wait_for_plan``) and counts the run's events by who caused them (``source``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import anyio

from hive_orchestration import Event, PlanningRequest, Runtime, Subscription, SubtaskStatus

GOAL = "Deploy api and worker to production"
DEPLOYERS = ["ai-deployer-1", "ai-deployer-2"]
#: What the deployers can do: a plan's subtasks are routed to them by these task types.
CAPABILITIES = ["deployment", "verification"]


def plan_for(request: PlanningRequest) -> dict[str, object]:
    """The planner's answer: migrate, then both services side by side, then a smoke test."""
    services = (request.context_data or {}).get("services", [])
    assert isinstance(services, list)
    deploys = [
        {
            "id": f"deploy-{service}",
            "task_type": "deployment",
            "payload": {"service": service, "version": "1.4.0"},
            "dependencies": ["migrate-db"],
        }
        for service in services
    ]
    return {
        "title": request.task_description,
        "subtasks": [
            {"id": "migrate-db", "task_type": "deployment", "payload": {"service": "db"}},
            *deploys,
            {
                "id": "smoke-test",
                "task_type": "verification",
                "dependencies": [d["id"] for d in deploys],
            },
        ],
    }


async def planner_agent(runtime: Runtime) -> None:
    """Take one planning request (waiting for it, not polling) and answer it with a plan."""
    planner = runtime.client(source_agent="ai-planner")
    request = await planner.claim_planning_request("ai-planner", wait=10)
    assert request is not None
    plan_id = await planner.create_execution_plan(
        plan_for(request), planning_task_id=request.id, estimated_complexity="medium"
    )
    print(f"ai-planner: planned {request.task_description!r} as plan {plan_id}")


async def deployer_agent(runtime: Runtime, worker_id: str) -> None:
    """Claim what a deployer can do, run it, report it; forever (the app cancels it)."""
    deployer = runtime.client(source_agent=worker_id)
    await deployer.register_worker(worker_id, "deployer", CAPABILITIES)
    while True:
        # Parked in the runtime until a subtask is ready; cancelling it here is safe
        # (a task handed over as the claim is cancelled goes back to the queue).
        claim = await deployer.claim_task(worker_id, wait=10)
        if claim is None:
            continue
        task = await deployer.start_task(claim.lease)
        service = task.payload.get("service", "all")
        await anyio.sleep(0.02)  # the work itself
        await deployer.report_progress(claim.lease, {"service": service}, phase="rollout")
        await anyio.sleep(0.02)
        await deployer.complete_task(claim.lease, {"service": service, "healthy": True})
        print(f"{worker_id}: {task.subtask_id} done")


async def main(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        app = runtime.client(source_agent="orchestrator-app")
        async with app.subscribe("plan.created") as created, anyio.create_task_group() as agents:
            agents.start_soon(planner_agent, runtime)
            for worker_id in DEPLOYERS:
                agents.start_soon(deployer_agent, runtime, worker_id)

            request = await app.queue_planning_request(
                GOAL, context_data={"services": ["api", "worker"]}
            )
            print(f"orchestrator-app: asked for a plan ({request.id})")
            plan_id = await next_plan(created)
            # The app decides: a plan runs only once approved and started.
            plan = await app.approve_plan(plan_id)
            await app.mark_plan_execution_started(plan_id)
            print(f"orchestrator-app: approved and started {len(plan.subtasks)} subtask(s)")

            plan = await app.wait_for_plan(plan_id, timeout=30)
            agents.cancel_scope.cancel()  # the deployers' claim loops end here
        for worker_id in DEPLOYERS:
            await app.unregister_worker(worker_id)

        states = await app.get_plan_subtasks(plan_id)
        for state in states:
            task = await app.get_task(state.task_id or "")
            worker = task.assigned_worker if task is not None else None
            print(f"  {state.subtask_id:14} {state.status.value:10} by {worker}")
        done = sum(state.status is SubtaskStatus.COMPLETED for state in states)

        # This run's events: the plan's and its tasks' (plan_id), and the planning
        # request's (its id is their correlation id). Paged: the log may be long.
        counts: Counter[str] = Counter()
        seq = 0
        while page := await app.read_events(after=seq, limit=1000):
            seq = page[-1].seq
            counts.update(e.source for e in page if ours(e, plan_id, request.id))
        for source, count in sorted(counts.items()):
            print(f"  {source:16} {count} event(s)")
        # Which deployer took which subtask varies from run to run; their total does not.
        deployers = sum(counts.pop(worker_id, 0) for worker_id in DEPLOYERS)
        others = ", ".join(f"{source}={n}" for source, n in sorted(counts.items()))
        print(
            f"plan {plan.status.value}: {done}/{len(states)} subtasks; "
            f"events by agent: {others}, deployers={deployers}"
        )


async def next_plan(created: Subscription) -> str:
    """The id of the next plan created (the planner answered)."""
    with anyio.fail_after(10):
        event = await created.receive()
    assert event.plan_id is not None
    return event.plan_id


def ours(event: Event, plan_id: str, request_id: str) -> bool:
    """Whether the event belongs to this run of the app."""
    return event.plan_id == plan_id or event.correlation_id == request_id


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
