"""The audit the reliability tests rely on finds what it is meant to find: a log and a
tasks table that disagree in any way is reported, so a passing reliability test means
something. Real runtime, real tasks; the log is tampered with after reading it."""

from __future__ import annotations

import msgspec
import pytest

from hive_orchestration import Event, OrchestrationClient, Runtime

from ._audit import audit_tasks, read_log

pytestmark = pytest.mark.anyio


async def populate(client: OrchestrationClient) -> dict[str, str]:
    """A task of each kind: completed by a claim, held by a claim, completed by hand,
    retried after a failure, deleted."""
    ids = {name: await client.create_task(name) for name in ("done", "held", "hand", "retry")}
    for name in ("done", "held", "retry"):
        claim = await client.claim_task("w1", name)
        assert claim is not None
        await client.start_task(claim.lease)
        await client.heartbeat(claim.lease, progress={"half": True})
        if name == "done":
            await client.complete_task(claim.lease, {"ok": True})
        elif name == "retry":
            await client.fail_task(claim.lease, "boom", retry_after=0)
    await client.update_task_status(ids["hand"], "running")
    await client.update_task_status(ids["hand"], "completed")
    gone = await client.create_task("gone")
    await client.delete_task(gone)
    return ids


async def test_a_consistent_runtime_audits_clean_and_every_tampering_is_found(
    db_path: str,
) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="auditor")
        ids = await populate(client)
        events = await read_log(client)
        _, tasks, _, problems = await audit_tasks(client, events)
        assert problems == []
        assert len(tasks) == 4

        def without(event_type: str, task_id: str) -> list[Event]:
            drop = next(e for e in events if e.type == event_type and e.task_id == task_id)
            return [e for e in events if e is not drop]

        def renumbered(log: list[Event]) -> list[Event]:
            return [msgspec.structs.replace(e, seq=n) for n, e in enumerate(log, 1)]

        completed = next(e for e in events if e.type == "task.completed")
        retried = next(e for e in events if e.type == "task.retrying" and e.task_id == ids["retry"])
        uncounted = msgspec.structs.replace(retried, data={**retried.data, "attempts": 0})
        tampered = {
            # A state change without its event.
            "missing completed": renumbered(without("task.completed", ids["done"])),
            "missing created": renumbered(without("task.created", ids["hand"])),
            "missing assigned": renumbered(without("task.assigned", ids["held"])),
            # An event without its state change.
            "extra completed": renumbered([*events, completed]),
            # A gap in the log.
            "gap": without("task.started", ids["retry"]),
            # A failed run requeued without counting its attempt.
            "uncounted attempt": [uncounted if e is retried else e for e in events],
        }
        for name, log in tampered.items():
            _, _, _, found = await audit_tasks(client, log)
            assert found, f"{name}: not noticed"


async def test_a_task_retried_by_hand_audits_clean(db_path: str) -> None:
    """``retry_task`` (``task.retried``) sends an ended task back to the queue with a fresh
    attempt budget; the audit follows it (before, it took the event for an unknown one:
    the fuzz harness on PostgreSQL hit it once, a mutated request retrying a task)."""
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="auditor")
        task_id = await client.create_task("job", max_retries=0)
        claim = await client.claim_task("w", "job")
        assert claim is not None
        await client.fail_task(claim.lease, "first try")
        cancelled = await client.create_task("job")
        await client.cancel_task(cancelled)
        await client.retry_task(task_id, reason="again")
        await client.retry_task(cancelled)
        while (claim := await client.claim_task("w", "job")) is not None:
            await client.complete_task(claim.lease)
        _, tasks, _, problems = await audit_tasks(client, await read_log(client))
    assert problems == []
    assert tasks[task_id].attempts == 0
