"""Child process of ``tests/test_plan_recovery.py``: executes plans until it is killed.

Usage::

    python _plan_runner.py BACKEND DB_PATH MODE

Opens the runtime, creates a three-layer plan of ``step`` subtasks (:func:`plan_data`:
4 roots, 6 middle ones each on 2 roots, 2 final ones each on 3 middle ones), starts it,
then, by ``MODE``:

- ``started``: does nothing more (no worker): the plan is executing, its roots queued;
- ``held``: one worker completes the 4 roots, then claims two middle subtasks, starts the
  first (running) and leaves the second assigned, and stops;
- ``run``: three workers claim, start and complete subtasks (with short random pauses)
  until the plan has completed, and stop;
- ``run2``: the same with two such plans (both created, then both started);
- ``resume``: creates no plan but takes up those already in the database (left by an
  earlier child that was killed): starts any still a draft (or creates one plan if there
  is none), then works like ``run`` until they have all completed.

Then it sleeps until it is killed (SIGKILL, by the parent). The parent decides when to
kill from what the child prints: ONE JSON object per line, flushed at once, each written
only after what it reports has returned (so is durable):

- ``{"event": "open"}``: the runtime is open, nothing is created yet;
- ``{"event": "created", "plan": ID}`` for each plan, then ``{"event": "started",
  "plan": ID}`` for each (with ``resume``, once the plan is executing);
- ``{"event": "claimed" | "running" | "completed", "plan": P, "subtask": S, "task": T,
  "worker": W}`` after ``claim_task``, ``start_task`` and ``complete_task`` returned;
- ``{"event": "held"}`` (``held``): the claims above are all held;
- ``{"event": "done"}`` (``run``, ``run2``, ``resume``): every plan has completed.

Nothing else goes to stdout; a failed check raises, so the parent sees the end of output
and the traceback on stderr. Worker ids are ``MODE-N`` (``run-0``, ``resume-2``...).
"""

from __future__ import annotations

import json
import random
import sys

import anyio

from hive_orchestration import PlanStatus, Runtime, TaskStatus

MODES = ("started", "held", "run", "run2", "resume")
TASK_TYPE = "step"
LEASE = 60.0
WORKERS = 3
#: Longest pause of a worker between two steps: spreads the plan's run over ~0.1-0.2 s.
PAUSE = 0.008


def plan_data() -> dict[str, object]:
    """Three layers: r0-r3; m0-m5 (m{i} on r{i % 4}, r{(i + 1) % 4}); f0-f1 (on 3 m each).

    Earlier layers have the higher priority, so that a ready root is claimed before a
    ready middle subtask."""
    subtasks: list[dict[str, object]] = [
        {"id": f"r{i}", "task_type": TASK_TYPE, "priority": 3} for i in range(4)
    ]
    subtasks += [
        {
            "id": f"m{i}",
            "task_type": TASK_TYPE,
            "priority": 2,
            "dependencies": [f"r{i % 4}", f"r{(i + 1) % 4}"],
        }
        for i in range(6)
    ]
    subtasks += [
        {
            "id": f"f{i}",
            "task_type": TASK_TYPE,
            "priority": 1,
            "dependencies": [f"m{3 * i + k}" for k in range(3)],
        }
        for i in range(2)
    ]
    return {"title": "recovery", "subtasks": subtasks}


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def work(runtime: Runtime, worker: str, rng: random.Random) -> None:
    """Claim, start and complete ``step`` tasks for ever, saying so after each step."""
    while True:
        claim = await runtime.claim_task(worker, TASK_TYPE, lease=LEASE, wait=1.0)
        if claim is None:
            continue
        task = claim.task
        ids = {"plan": task.plan_id, "subtask": task.subtask_id, "task": task.id}
        emit(event="claimed", **ids, worker=worker)
        await anyio.sleep(rng.uniform(0, PAUSE))
        await runtime.start_task(claim.lease)
        emit(event="running", **ids, worker=worker)
        await anyio.sleep(rng.uniform(0, PAUSE))
        done = await runtime.complete_task(claim.lease, {"worker": worker})
        assert done.status is TaskStatus.COMPLETED, done
        emit(event="completed", **ids, worker=worker)


async def run(runtime: Runtime, plan_ids: list[str], mode: str) -> None:
    rng = random.Random()
    async with anyio.create_task_group() as group:
        for n in range(WORKERS):
            group.start_soon(work, runtime, f"{mode}-{n}", random.Random(rng.random()))
        for plan_id in plan_ids:
            plan = await runtime.wait_for_plan(plan_id)
            assert plan.status is PlanStatus.COMPLETED, plan
        emit(event="done")
        group.cancel_scope.cancel()


async def hold(runtime: Runtime) -> None:
    worker = "held-0"
    for _ in range(4):
        claim = await runtime.claim_task(worker, TASK_TYPE, lease=LEASE, wait=10.0)
        assert claim is not None
        task = claim.task
        assert task.subtask_id is not None
        assert task.subtask_id.startswith("r"), task.subtask_id
        ids = {"plan": task.plan_id, "subtask": task.subtask_id, "task": task.id}
        emit(event="claimed", **ids, worker=worker)
        await runtime.start_task(claim.lease)
        emit(event="running", **ids, worker=worker)
        await runtime.complete_task(claim.lease, {"worker": worker})
        emit(event="completed", **ids, worker=worker)
    for start in (True, False):
        claim = await runtime.claim_task(worker, TASK_TYPE, lease=LEASE, wait=10.0)
        assert claim is not None, "no middle subtask was queued after the roots completed"
        task = claim.task
        assert task.subtask_id is not None
        assert task.subtask_id.startswith("m"), task.subtask_id
        ids = {"plan": task.plan_id, "subtask": task.subtask_id, "task": task.id}
        emit(event="claimed", **ids, worker=worker)
        if start:
            await runtime.start_task(claim.lease)
            emit(event="running", **ids, worker=worker)
    emit(event="held")


async def create(runtime: Runtime, count: int) -> list[str]:
    plan_ids = []
    for _ in range(count):
        plan_id = await runtime.create_execution_plan(plan_data(), source_agent="child")
        emit(event="created", plan=plan_id)
        plan_ids.append(plan_id)
    for plan_id in plan_ids:
        assert await runtime.mark_plan_execution_started(plan_id, source_agent="child")
        emit(event="started", plan=plan_id)
    return plan_ids


async def take_up(runtime: Runtime) -> list[str]:
    """The plans an earlier child left, executing (started here if still drafts); one
    new plan if it left none."""
    plans = await runtime.get_execution_plans()
    if not plans:
        return await create(runtime, 1)
    plan_ids = [plan.id for plan in reversed(plans)]  # oldest first
    for plan_id in plan_ids:
        # False if it was executing already (or has ended): either way not a draft now.
        await runtime.mark_plan_execution_started(plan_id, source_agent="child")
        emit(event="started", plan=plan_id)
    return plan_ids


async def main(path: str, mode: str) -> None:
    async with Runtime.open(path) as runtime:
        emit(event="open")
        if mode == "resume":
            plan_ids = await take_up(runtime)
        else:
            plan_ids = await create(runtime, 2 if mode == "run2" else 1)
        if mode in ("run", "run2", "resume"):
            await run(runtime, plan_ids, mode)
        elif mode == "held":
            await hold(runtime)
        await anyio.sleep_forever()


if __name__ == "__main__":
    backend, db, mode = sys.argv[1:]
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}")
    anyio.run(main, db, mode, backend=backend)
