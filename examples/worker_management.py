"""Workers: roles, capabilities, heartbeats, and what happens when one goes silent.

    python examples/worker_management.py [DB_PATH] [--backend trio]

Three workers register with a role and capabilities and keep heartbeating. Tasks are
routed by capability; one that no worker can take shows up in ``get_unroutable_tasks``.
``builder-1`` claims a build and then stops heartbeating, as a crashed process would: the
runtime declares it offline after ``worker_timeout`` (short here: 0.5 s), puts its task
back in the queue, and ``builder-2`` takes it over and completes it. The stale lease of
``builder-1`` is refused, so its late result cannot overwrite the new one. Finally every
worker unregisters.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import (
    Claim,
    LeaseLostError,
    OrchestrationClient,
    RunStatus,
    RuntimeConfig,
    TaskStatus,
)

#: worker id -> (role, capabilities). A worker claims only tasks it has a capability for.
WORKERS = {
    "builder-1": ("builder", ["build", "python"]),
    "builder-2": ("builder", ["build", "python"]),
    "reviewer-1": ("reviewer", ["review"]),
}
#: Short enough for the example to be quick (the defaults are 30 s and 1 s). The lease
#: stays long (30 s), so what recovers the task below is the worker's death, not its lease;
#: a lost run counts as a failed attempt, retried after ``retry_backoff``.
CONFIG = RuntimeConfig(worker_timeout=0.5, retry_backoff=0.05)


async def keep_alive(client: OrchestrationClient, alive: set[str]) -> None:
    """What each running worker process does in the background: heartbeat well within
    the timeout. A worker taken out of ``alive`` has crashed: it heartbeats no more."""
    while True:
        for worker_id in sorted(alive):
            await client.update_worker_heartbeat(worker_id)
        await anyio.sleep(CONFIG.worker_timeout / 4)


async def main(db_path: str) -> None:
    async with OrchestrationClient(db_path, config=CONFIG, source_agent="ops-app") as client:
        async with (
            # Subscribed first: the events below cannot slip by before we listen.
            client.subscribe("worker.offline") as offline,
            client.subscribe("task.retrying", worker_id="builder-1") as requeued,
            anyio.create_task_group() as tg,
        ):
            alive = set(WORKERS)
            for worker_id, (role, caps) in WORKERS.items():
                worker = await client.register_worker(worker_id, role, caps, {"host": "box-1"})
                print(f"registered {worker.id:10} role={worker.role:8} can={list(caps)}")
            tg.start_soon(keep_alive, client, alive)
            builders = await client.get_active_workers(role="builder")
            print(f"active builders: {sorted(w.id for w in builders)}")

            build_id = await client.create_task("build", {"repo": "hive", "ref": "main"})
            await client.create_task("review", {"change": "PR-7"})
            await client.create_task("gpu-training", {"model": "tiny"})  # nobody can do this
            unroutable = await client.get_unroutable_tasks()
            print(f"unroutable: {[t.task_type for t in unroutable]}")

            # builder-1 takes the build (only a "build" task fits its capabilities) ...
            claim = await client.claim_task("builder-1")
            assert claim is not None
            assert claim.task.id == build_id
            stale = claim.lease  # builder-1 keeps it, unaware of what happens next
            await client.start_task(stale)
            print(f"builder-1 claimed and started the build (attempt {claim.lease.attempt})")
            # The same call for the reviewer hands it the review: routing is by capability.
            review = await client.claim_task("reviewer-1")
            assert review is not None
            await client.complete_task(review.lease, {"approved": True})
            print(f"reviewer-1 claimed and completed the {review.task.task_type}")

            # ... then crashes: it heartbeats no more (and holds the build).
            alive.discard("builder-1")
            with anyio.fail_after(5):
                gone = await offline.receive()
                print(f"#{gone.seq} {gone.type}: {gone.worker_id} ({gone.data['timeout']}s silent)")
                back = await requeued.receive()
                why, delay = back.data["reason"], back.data.get("retry_in", 0)
                print(f"#{back.seq} {back.type}: {why}, the build is queued again in {delay:.2f}s")
            await take_over(client, "builder-2", build_id)
            tg.cancel_scope.cancel()  # the heartbeats stop

        # The first worker wakes up and tries to report: its lease is no longer valid.
        try:
            await client.complete_task(stale, {"artifact": "late"})
        except LeaseLostError as refused:
            print(f"builder-1's late result refused: {type(refused).__name__}")

        for worker_id in WORKERS:
            await client.unregister_worker(worker_id)
        remaining = await client.get_active_workers()
        print(f"unregistered all; {len(remaining)} active worker(s) left")

        # The proof, read back: who ran the build, how each run ended, how the task ended.
        task = await client.get_task(build_id)
        runs = await client.get_runs(build_id)
        assert task is not None
        for run in runs:
            print(f"  run {run.run_number}: {run.worker_id} -> {run.status.value}")
        lost = ", ".join(str(r.worker_id) for r in runs if r.status is RunStatus.LOST)
        done = ", ".join(str(r.worker_id) for r in runs if r.status is RunStatus.COMPLETED)
        if task.status is TaskStatus.COMPLETED and lost and done:
            print(f"build lost by {lost}, completed by {done}")
        else:
            print(f"unexpected: build {task.status.value}, runs {[r.status.value for r in runs]}")


async def take_over(client: OrchestrationClient, worker_id: str, task_id: str) -> None:
    """Another builder claims the requeued build and completes it."""
    # wait: the claim is parked until a matching task is queued (no polling).
    claim: Claim | None = await client.claim_task(worker_id, wait=5)
    assert claim is not None
    assert claim.task.id == task_id
    await client.start_task(claim.lease)
    task = await client.complete_task(claim.lease, {"artifact": "hive-1.0.whl"})
    print(f"{worker_id} completed the build (attempt {claim.lease.attempt}): {task.result}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    # The runtime logs a warning when it declares a worker offline; show it in the trace.
    logging.basicConfig(stream=sys.stdout, format="log: %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
