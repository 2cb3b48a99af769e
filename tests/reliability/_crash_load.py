"""Child process of ``tests/reliability/test_crash_loop.py``: a load, until it is killed.

Usage::

    python _crash_load.py BACKEND DB_PATH MODE SEED TAG

Opens the runtime on ``DB_PATH`` and, by ``MODE``:

- ``load``: producers create ``job`` tasks (some with an idempotency key shared across
  children, so that a key used before a crash must give the same task after it), a
  planner creates small execution plans and starts most of them (and starts the drafts an
  earlier child left), and workers claim ``job`` and ``step`` tasks (a plan's subtasks),
  start them, heartbeat them and complete them (a few first attempts fail instead: retried
  at once, or failed for good for a job created without retries; a step has plenty, so
  that every plan completes), for ever: the parent kills it with SIGKILL;
- ``drain``: no producer and no planner; starts the drafts left, then the workers run
  until every plan has ended and no task is left queued, blocked, assigned or running,
  and it exits.

It prints ONE JSON object per line, flushed at once, each written only after the call it
reports returned (so is durable), ``op`` saying which:

- ``{"op": "open"}``: the runtime is open;
- ``{"op": "created", "task": T, "marker": M, "key": K | null}``: ``create_task`` of the
  task whose payload is ``{"marker": M}`` returned ``T`` (with a key used before: the
  first task's id, whose marker is another);
- ``{"op": "claimed" | "started", "task": T, "run": R, "worker": W, "attempt": A}``;
- ``{"op": "heartbeat", "task": T, "run": R, "progress": {...}}``;
- ``{"op": "failed", "task": T, "run": R, "status": S}``: ``fail_task`` returned, the task
  is now ``S``;
- ``{"op": "completed", "task": T, "run": R, "result": {...}}``;
- ``{"op": "plan_created", "plan": P, "subtasks": N}``, ``{"op": "plan_started", "plan":
  P}`` (``mark_plan_execution_started`` returned True);
- ``{"op": "done"}`` (``drain``): everything has ended.

Nothing else goes to stdout; an unexpected error raises, so the parent sees the end of
output and the traceback on stderr. Worker ids are ``TAG-wN``, markers ``TAG-pN-M``.
"""

from __future__ import annotations

import json
import random
import sys

import anyio

from hive_orchestration import PlanStatus, Runtime, RuntimeConfig, TaskStatus

MODES = ("load", "drain")
JOB, STEP = "job", "step"
PRODUCERS, WORKERS = 4, 4
#: Long enough never to expire within a child's life: only a crash ends these claims.
LEASE = 60.0
#: Idempotency keys are drawn from this many, shared by every child of a database.
KEYS = 40
#: Producers wait while this many of their creates are not finished: a closed loop.
BACKLOG = 48
#: Retries of a plan's subtask: recovery counts an attempt for each crash that finds the
#: subtask held, and a plan is to complete, not fail, however many crashes it sees.
STEP_RETRIES = 1000
FAIL_RATE = 0.1
CONFIG = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def plan_data(rng: random.Random, title: str) -> dict[str, object]:
    """A diamond (a; b, c on a; d on b and c), sometimes with a tail (e on d) and a loose
    subtask (f) beside it."""
    subtasks: list[dict[str, object]] = [
        {"id": "a", "task_type": STEP},
        {"id": "b", "task_type": STEP, "dependencies": ["a"]},
        {"id": "c", "task_type": STEP, "dependencies": ["a"]},
        {"id": "d", "task_type": STEP, "dependencies": ["b", "c"]},
    ]
    if rng.random() < 0.5:
        subtasks.append({"id": "e", "task_type": STEP, "dependencies": ["d"]})
    if rng.random() < 0.5:
        subtasks.append({"id": "f", "task_type": STEP})
    for subtask in subtasks:
        subtask.update(max_retries=STEP_RETRIES, priority=2, payload={"plan": title})
    return {"title": title, "subtasks": subtasks}


async def producer(
    runtime: Runtime, tag: str, n: int, rng: random.Random, backlog: anyio.Semaphore
) -> None:
    for count in range(1_000_000):
        await backlog.acquire()  # given back by the workers as jobs finish
        marker = f"{tag}-p{n}-{count}"
        key = f"key-{rng.randrange(KEYS)}" if rng.random() < 0.2 else None
        task_id = await runtime.create_task(
            JOB,
            {"marker": marker},
            priority=rng.randrange(2),
            idempotency_key=key,
            # Some with no retry: a failure or a crash that finds them held fails them.
            max_retries=rng.choice((0, 3, 3, 3)),
        )
        emit(op="created", task=task_id, marker=marker, key=key)
        await anyio.sleep(rng.uniform(0, 0.004))


async def start_drafts(runtime: Runtime) -> None:
    """Start the plans an earlier child created but was killed before (or while) starting."""
    for plan in await runtime.get_execution_plans(PlanStatus.DRAFT, limit=10_000):
        if await runtime.mark_plan_execution_started(plan.id, source_agent="planner"):
            emit(op="plan_started", plan=plan.id)


async def planner(runtime: Runtime, tag: str, rng: random.Random) -> None:
    await start_drafts(runtime)
    for count in range(1_000_000):
        data = plan_data(rng, f"{tag}-plan-{count}")
        plan_id = await runtime.create_execution_plan(data, source_agent="planner")
        subtasks = data["subtasks"]
        assert isinstance(subtasks, list)
        emit(op="plan_created", plan=plan_id, subtasks=len(subtasks))
        if rng.random() < 0.8:  # the others stay drafts until a later child starts them
            assert await runtime.mark_plan_execution_started(plan_id, source_agent="planner")
            emit(op="plan_started", plan=plan_id)
        await anyio.sleep(rng.uniform(0.005, 0.03))


async def worker(
    runtime: Runtime, worker_id: str, rng: random.Random, backlog: anyio.Semaphore
) -> None:
    while True:
        claim = await runtime.claim_task(worker_id, [JOB, STEP], lease=LEASE, wait=0.5)
        if claim is None:
            continue
        task, lease = claim.task, claim.lease
        ids = {"task": task.id, "run": lease.run_id}
        emit(op="claimed", **ids, worker=worker_id, attempt=lease.attempt)
        await runtime.start_task(lease)
        emit(op="started", **ids, worker=worker_id, attempt=lease.attempt)
        progress = {"run": lease.run_id, "step": 1}
        await runtime.heartbeat(lease, progress=progress)
        emit(op="heartbeat", **ids, progress=progress)
        await anyio.sleep(rng.uniform(0, 0.002))
        if lease.attempt == 1 and rng.random() < FAIL_RATE:
            # Queued again at once while attempts are left, else failed for good.
            failed = await runtime.fail_task(lease, "injected failure", retry_after=0)
            emit(op="failed", **ids, status=failed.status.value)
            if task.task_type == JOB and failed.status is TaskStatus.FAILED:
                backlog.release()
            continue
        result = {"run": lease.run_id, "worker": worker_id, "marker": task.payload.get("marker")}
        done = await runtime.complete_task(lease, result)
        assert done.status is TaskStatus.COMPLETED, done
        emit(op="completed", **ids, result=result)
        if task.task_type == JOB:
            backlog.release()


async def settled(runtime: Runtime) -> bool:
    """Every plan has ended and no task is left to do.

    The checks are separate reads, so they count only if nothing was committed from the
    first to the last: a task that failed and was queued again between the check for
    queued tasks and the one for running tasks would slip through both."""
    before = (await runtime.statistics()).storage.last_seq
    if await runtime.get_execution_plans(PlanStatus.EXECUTING, limit=1):
        return False
    for status in (TaskStatus.QUEUED, TaskStatus.BLOCKED, TaskStatus.ASSIGNED, TaskStatus.RUNNING):
        if await runtime.get_tasks_by_status(status, limit=1):
            return False
    # Every change of a plan or a task appends an event: a later one is on its way to the
    # subscription the caller waits on, so it looks again.
    return (await runtime.statistics()).storage.last_seq == before


async def main(path: str, mode: str, seed: int, tag: str) -> None:
    rng = random.Random(seed)
    backlog = anyio.Semaphore(BACKLOG)
    async with Runtime.open(path, config=CONFIG) as runtime:
        emit(op="open")
        async with anyio.create_task_group() as group:
            for n in range(WORKERS):
                seeded = random.Random(rng.random())
                group.start_soon(worker, runtime, f"{tag}-w{n}", seeded, backlog)
            if mode == "load":
                for n in range(PRODUCERS):
                    seeded = random.Random(rng.random())
                    group.start_soon(producer, runtime, tag, n, seeded, backlog)
                group.start_soon(planner, runtime, tag, random.Random(rng.random()))
            else:
                await start_drafts(runtime)
                # Looked at again after each change (events coalesced: one is enough).
                async with runtime.subscribe("*", buffer=1, overflow="drop") as changes:
                    while not await settled(runtime):
                        await changes.receive()
                emit(op="done")
                group.cancel_scope.cancel()


if __name__ == "__main__":
    backend, db, mode, seed, tag = sys.argv[1:]
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}")
    anyio.run(main, db, mode, int(seed), tag, backend=backend)
