"""The client in five minutes: tasks and workers through ``OrchestrationClient``.

    python examples/client_quickstart.py [DB_PATH] [--backend trio]

The seeds' "Simple Client API": the client starts an embedded runtime for its
``async with`` block and stamps everything it does with ``source_agent``. It creates a
deployment task, reads it back, moves it running -> completed with a result, lists tasks
by status, then registers a worker, heartbeats it and lists the live workers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import OrchestrationClient, TaskStatus


async def main(db_path: str) -> None:
    async with OrchestrationClient(db_path=db_path, source_agent="ai-planner") as client:
        # -- tasks ----------------------------------------------------------------------
        task_id = await client.create_task(
            task_type="deployment",
            payload={"script": "deploy.sh", "env": "production", "services": ["api", "worker"]},
        )
        task = await client.get_task(task_id)
        assert task is not None
        # `type` is the seeds' name, `task_type` the stored one: the same value.
        print(f"created {task.id}: type={task.type} task_type={task.task_type}")
        print(f"  status={task.status.value} source_agent={task.source_agent}")

        # The seeds' "pending" is the runtime's "queued": either name lists the same tasks.
        pending = await client.get_tasks_by_status("pending")
        print(f"pending tasks: {len(pending)}")

        await client.update_task_status(task_id, TaskStatus.RUNNING, {"current_phase": "rollout"})
        await client.update_task_status(
            task_id, TaskStatus.COMPLETED, result={"deployed_services": ["api", "worker"]}
        )
        task = await client.get_task(task_id)
        assert task is not None
        print(f"  status={task.status.value} result={task.result}")
        completed = await client.get_tasks_by_status(TaskStatus.COMPLETED)
        print(f"completed tasks: {[t.id for t in completed]}")

        # -- workers --------------------------------------------------------------------
        worker = await client.register_worker(
            worker_id="worker-1", role="deployer", capabilities=["python", "docker"]
        )
        print(f"registered {worker.id}: role={worker.role} can={list(worker.capabilities)}")
        alive = await client.update_worker_heartbeat("worker-1")
        print(f"heartbeat accepted: {alive}")
        workers = await client.get_active_workers()
        for w in workers:
            print(f"  active: {w.id} ({w.status.value}, heartbeat {w.last_heartbeat:%H:%M:%S})")

        # The proof: read back from the runtime, not assumed.
        final = await client.get_task(task_id)
        assert final is not None
        print(f"task {final.task_type}: {final.status.value}, {len(workers)} active worker(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
