"""A database with a little of everything, written through a Runtime: what the inspector
and the command line tests read back (``tests/test_inspector.py``, ``tests/test_cli.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from hive_orchestration import Runtime

WORKER = "worker-1"
#: The plan's subtasks, in dependency layers: build, then test and review, then ship.
PLAN = {
    "title": "Ship it",
    "subtasks": [
        {"id": "build", "task_type": "build"},
        {"id": "test", "task_type": "test", "dependencies": ["build"]},
        {"id": "review", "task_type": "review", "dependencies": ["build"]},
        {"id": "ship", "task_type": "ship", "dependencies": ["test", "review"]},
    ],
}


@dataclass(frozen=True)
class Populated:
    queued: str  # a 'deploy' task, priority 5, waiting in the queue
    running: str  # a 'compile' task the worker claimed and started
    run_id: str  # its run
    completed: str  # a 'compile' task the worker completed
    plan_id: str  # an executing plan: build is queued, the rest wait for it
    note_seq: int  # an 'app.note' event about the queued task, correlation 'corr-1'


async def populate(runtime: Runtime) -> Populated:
    await runtime.register_worker(WORKER, "compiler", ["compile"], {"host": "box-1"})
    completed = await runtime.create_task("compile", {"n": 1}, title="compile one")
    claim = await runtime.claim_task(WORKER, "compile")
    assert claim is not None
    assert claim.task.id == completed
    await runtime.start_task(claim.lease)
    await runtime.complete_task(claim.lease, {"ok": True})
    running = await runtime.create_task("compile", {"n": 2}, title="compile two")
    claim = await runtime.claim_task(WORKER, "compile")
    assert claim is not None
    assert claim.task.id == running
    await runtime.start_task(claim.lease)
    queued = await runtime.create_task("deploy", {"env": "prod"}, priority=5, title="deploy")
    plan_id = await runtime.create_execution_plan(PLAN)
    assert await runtime.mark_plan_execution_started(plan_id)
    note = await runtime.publish(
        "app.note", {"text": "hello"}, task_id=queued, correlation_id="corr-1"
    )
    return Populated(
        queued=queued,
        running=running,
        run_id=claim.lease.run_id,
        completed=completed,
        plan_id=plan_id,
        note_seq=note.seq,
    )
