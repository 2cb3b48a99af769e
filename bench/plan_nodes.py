"""What a PostgreSQL node pays for the plans another node drives.

Every node follows the whole event log, so each sees the end of every plan task, and
asks the database whether the plan is its to drive (``TakePlan``: a conditional update
that changes no row while the plan's driver lives). This measures that: three runtimes
(nodes) in this process on one fresh database; node A creates and starts ``--plans``
plans of ``--depth`` layers of ``--width`` subtasks; ``--workers`` workers on each of B
and C run every subtask. Printed: the time from the first start to the last plan's
end, the subtasks per second, the ``TakePlan`` requests the three nodes made meanwhile
(counted in this process; the driver makes none for plans it holds), and how long the
workers' ``complete_task`` calls took (p50, p99: their answers wait until the node's plan
executor has applied the ends, TakePlan round trips included). ``--compare`` alternates
runs without the cache of plans another node drives (``progress.ELSEWHERE_FOR = 0``).
One JSON object per run.

Usage (a cluster of your own; a database is created per run, then dropped)::

    eval "$(/work/pg-scratch/cluster.sh start)"
    python bench/plan_nodes.py --url "$HIVE_PG_URL" --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from collections import Counter
from typing import Any

import anyio
import psycopg

from hive_orchestration import PlanStatus, Runtime
from hive_orchestration.actors.plan_executor import progress
from hive_orchestration.messages.storage import TakePlan
from hive_orchestration.storage.pg import plans as pg_plans

TASK_TYPE = "step"


def layered(width: int, depth: int) -> dict[str, object]:
    subtasks: list[dict[str, object]] = []
    for layer in range(depth):
        for i in range(width):
            needs = [] if layer == 0 else [f"l{layer - 1}-{i}", f"l{layer - 1}-{(i + 1) % width}"]
            subtasks.append({"id": f"l{layer}-{i}", "task_type": TASK_TYPE, "dependencies": needs})
    return {"subtasks": subtasks}


@contextlib.contextmanager
def fresh_database(url: str) -> Any:
    name = f"plan_nodes_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def one_run(url: str, plans: int, width: int, depth: int, workers: int) -> dict[str, Any]:
    takes = Counter[str]()
    original = pg_plans.query_plans

    async def counted(db: Any, message: Any) -> object:
        if isinstance(message, TakePlan):
            takes["all"] += 1
        return await original(db, message)

    pg_plans.query_plans = counted  # type: ignore[assignment]
    try:
        async with (
            Runtime.open(url) as a,
            Runtime.open(url) as b,
            Runtime.open(url) as c,
        ):
            spec = layered(width, depth)
            ids = [await a.create_execution_plan(spec) for _ in range(plans)]
            before = sum(takes.values())
            total = plans * width * depth
            done = 0
            started = time.perf_counter()

            latencies: list[float] = []

            async def work(node: Runtime, name: str) -> None:
                nonlocal done
                while done < total:
                    claims = await node.claim_tasks(name, TASK_TYPE, limit=8, wait=0.2, start=True)
                    for claim in claims:
                        began = time.perf_counter()
                        await node.complete_task(claim.lease)
                        latencies.append(time.perf_counter() - began)
                        done += 1

            async with anyio.create_task_group() as tg:
                for node, label in ((b, "b"), (c, "c")):
                    for n in range(workers):
                        tg.start_soon(work, node, f"{label}{n}")
                for plan_id in ids:
                    assert await a.mark_plan_execution_started(plan_id)
                for plan_id in ids:
                    ended = await a.wait_for_plan(plan_id, timeout=600)
                    assert ended.status is PlanStatus.COMPLETED, ended
                tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - started
            latencies.sort()
            return {
                "cache": progress.ELSEWHERE_FOR > 0,
                "subtasks": total,
                "seconds": round(elapsed, 2),
                "subtasks_per_s": round(total / elapsed, 1),
                "take_plan_requests": sum(takes.values()) - before,
                "complete_ms_p50": round(1000 * latencies[len(latencies) // 2], 1),
                "complete_ms_p99": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
            }
    finally:
        pg_plans.query_plans = original  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a PostgreSQL URL (a database is made)")
    parser.add_argument("--plans", type=int, default=20)
    parser.add_argument("--width", type=int, default=25)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="workers on each of B and C")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument(
        "--compare",
        action="store_true",
        help="alternate runs without the cache of plans driven elsewhere (asks every time)",
    )
    args = parser.parse_args()
    cached = progress.ELSEWHERE_FOR
    for run in range(args.runs * (2 if args.compare else 1)):
        progress.ELSEWHERE_FOR = 0.0 if args.compare and run % 2 == 0 else cached
        with fresh_database(args.url) as url:
            result = anyio.run(
                one_run,
                url,
                args.plans,
                args.width,
                args.depth,
                args.workers,
                backend=args.backend,
            )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
