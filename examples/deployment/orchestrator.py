"""The orchestrator: it owns the database (the runtime is embedded in this process), asks
for a plan for "Deploy to production", approves and starts it, and waits for it to end,
while the planner, the deployer and the checkers work from processes of their own.

    python examples/deployment/orchestrator.py DB_PATH [--backend trio]

It prints a line ending in "ready" once it owns the database and serves its socket, and
the plan's outcome once the plan has ended; then it serves the others until its stdin
closes (the launcher stops them first).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import anyio

from hive_orchestration import Runtime, SubtaskStatus

GOAL = "Deploy to production"


async def main(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        app = runtime.client(source_agent="orchestrator-app")
        say(f"owns {runtime.path} and serves it to the other processes; ready")
        async with app.subscribe("plan.created") as created:
            request = await app.queue_planning_request(
                GOAL, context_data={"services": ["api", "worker"]}
            )
            say(f"asked for a plan ({request.id})")
            with anyio.fail_after(30):
                event = await created.receive()  # the planner (another process) answered
        plan_id = event.plan_id or ""
        await app.approve_plan(plan_id)
        await app.mark_plan_execution_started(plan_id)
        say("approved and started the plan")
        plan = await app.wait_for_plan(plan_id, timeout=30)

        states = await app.get_plan_subtasks(plan_id)
        by: Counter[str] = Counter()
        for state in states:
            task = await app.get_task(state.task_id or "")
            worker = (task.assigned_worker if task is not None else None) or "nobody"
            say(f"  {state.subtask_id:14} {state.status.value:10} by {worker}")
            by[worker.rsplit("-", 1)[0]] += 1  # the process: its workers are <prefix>-<n>
        done = sum(state.status is SubtaskStatus.COMPLETED for state in states)
        shares = ", ".join(f"{n} by {who}" for who, n in sorted(by.items()))
        print(f"plan {plan.title!r}: {plan.status.value}, {done}/{len(states)} subtasks ({shares})")
        sys.stdout.flush()
        # The others still hold connections: serve them until the launcher says stop.
        await anyio.to_thread.run_sync(sys.stdin.read)


def say(text: str) -> None:
    print(f"orchestrator: {text}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", help="the database file")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.db_path, backend=args.backend)
