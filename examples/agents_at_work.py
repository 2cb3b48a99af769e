"""Run agents as workers: the example agents claim, run and complete tasks, with progress.

    python examples/agents_at_work.py [DB_PATH] [--backend trio]

An orchestrator app queues work for five kinds of agent (planner, reviewer, deployer,
tester, monitor), runs two copies of each with ``AgentRunner``, and watches the task
events until everything is done. A task that fails is retried; leaving the runner's block
stops the agents cleanly.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import (
    AgentRegistry,
    AgentRunner,
    Runtime,
    TaskStatus,
    auto_register_adapters,
)

WORK: list[tuple[str, dict[str, object]]] = [
    ("planning", {"goal": "Deploy to production"}),
    ("review", {"change": "PR-7"}),
    ("testing", {"suite": "integration"}),
    ("deployment", {"services": ["api", "worker"], "environment": "production"}),
    ("monitoring", {"service": "api"}),
]


async def main(db_path: str) -> None:
    registry = auto_register_adapters(AgentRegistry(), copies=2)
    print(f"agents: {registry.get_stats()}")
    async with Runtime.open(db_path) as runtime:
        async with runtime.subscribe("task.completed") as done:
            ids = [
                await runtime.create_task(kind, payload, source_agent="orchestrator-app")
                for kind, payload in WORK
            ]
            async with AgentRunner(runtime, registry):
                remaining = set(ids)
                with anyio.fail_after(30):
                    async for event in done:
                        remaining.discard(event.task_id or "")
                        print(f"#{event.seq} {event.data['task_type']}: {event.data['result']}")
                        if not remaining:
                            break
        finished = [await runtime.get_task(task_id) for task_id in ids]
        completed = [t for t in finished if t is not None and t.status is TaskStatus.COMPLETED]
        print(f"completed {len(completed)} of {len(ids)} task(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
