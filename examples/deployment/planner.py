"""The ai-planner: a process of its own with nothing but a client of the database. It
takes the next planning request, answers it with an execution plan, and exits.

    python examples/deployment/planner.py DB_PATH [--backend trio]
"""

from __future__ import annotations

import argparse

import anyio

from hive_orchestration import OrchestrationClient, PlanningRequest


def plan_for(request: PlanningRequest) -> dict[str, object]:
    """Migrate the database while the change is tested and reviewed, then deploy every
    service side by side, then watch them."""
    services = (request.context_data or {}).get("services", [])
    assert isinstance(services, list)
    deploys = [
        {
            "id": f"deploy-{service}",
            "task_type": "deployment",
            "payload": {"service": service, "version": "1.4.0"},
            "dependencies": ["migrate-db", "test", "review"],
        }
        for service in services
    ]
    return {
        "title": request.task_description,
        "subtasks": [
            {"id": "migrate-db", "task_type": "deployment", "payload": {"service": "db"}},
            {"id": "test", "task_type": "testing"},
            {"id": "review", "task_type": "review"},
            *deploys,
            {
                "id": "monitor",
                "task_type": "monitoring",
                "dependencies": [d["id"] for d in deploys],
            },
        ],
    }


async def main(db_path: str) -> None:
    # The orchestrator's process owns the database: this client connects to it.
    async with OrchestrationClient(db_path=db_path, source_agent="ai-planner") as planner:
        request = await planner.claim_planning_request("ai-planner", wait=30)
        assert request is not None, "no planning request came"
        plan_id = await planner.create_execution_plan(
            plan_for(request), planning_task_id=request.id, estimated_complexity="medium"
        )
        print(f"ai-planner: planned {request.task_description!r} as plan {plan_id}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", help="the database file")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.db_path, backend=args.backend)
