"""Recovery of claims after SIGKILL: what a dead process held goes back to the queue.

A child process (``tests/_claimer.py``) creates tasks, claims some (one running, one only
assigned), completes one, prints the ids and waits. The parent kills it with SIGKILL,
reopens the database in-process and checks that opening recovered the claims: the held
tasks are queued again with one attempt counted and their runs ended as lost, with a
``task.retrying`` event (reason ``recovered``) each; the completed and untouched tasks are
as they were; and every queued task can be claimed again. With no retry left
(``max_retries=0``) the held tasks end failed instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import Claim, Event, RunStatus, Runtime, TaskStatus

pytestmark = pytest.mark.anyio

CLAIMER = Path(__file__).with_name("_claimer.py")
#: Generous bound on the child's setup, so that a hung child fails the test instead of CI.
DEADLINE = 60.0
RECOVERED = "recovered"


async def _read_line(stream: BufferedByteReceiveStream) -> str | None:
    """The next complete line, or None at end of output."""
    try:
        return (await stream.receive_until(b"\n", 65536)).decode()
    except (anyio.EndOfStream, anyio.IncompleteRead):
        return None


def _child_output(message: str, stderr_path: Path) -> str:
    return f"{message}; child stderr:\n{stderr_path.read_text(errors='replace')}"


async def _run_and_kill(db: str, mode: str, backend: str, stderr_path: Path) -> dict[str, object]:
    """Run the claimer child until it reports its task ids, SIGKILL it, return the ids."""
    command = [sys.executable, str(CLAIMER), backend, db, mode]
    with stderr_path.open("wb") as stderr:
        process: Process = await anyio.open_process(command, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        stream = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(DEADLINE):
            line = await _read_line(stream)
            assert line is not None, _child_output("child exited before reporting", stderr_path)
            # Claims held, nothing released: kill it without a chance to clean up.
            os.kill(process.pid, signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            rest = await _read_line(stream)
            assert rest is None, _child_output(f"unexpected output {rest!r}", stderr_path)
        ids = json.loads(line)
        assert isinstance(ids, dict), line
        return ids
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def _read_all(runtime: Runtime) -> list[Event]:
    events: list[Event] = []
    while True:
        page = await runtime.read_events(after=events[-1].seq if events else 0, limit=1000)
        if not page:
            return events
        events.extend(page)


def _events_of(events: list[Event], task_id: str) -> list[Event]:
    return [event for event in events if event.task_id == task_id]


async def _check_lost_runs(runtime: Runtime, task_id: str) -> None:
    """The task's one run (claimed by the dead process) ended as lost."""
    runs = await runtime.get_runs(task_id)
    assert len(runs) == 1, runs
    assert runs[0].status is RunStatus.LOST, runs[0]
    assert runs[0].worker_id == "worker-1"
    assert runs[0].completed_at is not None


async def test_held_claims_are_requeued_after_sigkill(
    anyio_backend: str, db_path: str, tmp_path: Path
) -> None:
    ids = await _run_and_kill(db_path, "mixed", anyio_backend, tmp_path / "claimer.stderr")
    running, assigned, completed = ids["running"], ids["assigned"], ids["completed"]
    queued = ids["queued"]
    assert isinstance(running, str)
    assert isinstance(assigned, str)
    assert isinstance(completed, str)
    assert isinstance(queued, list)
    assert len(queued) == 3
    assert len({running, assigned, completed, *queued}) == 6

    async with Runtime.open(db_path) as runtime:
        # The two held tasks: queued again, one attempt counted, no worker.
        for task_id in (running, assigned):
            task = await runtime.get_task(task_id)
            assert task is not None, task_id
            assert task.status is TaskStatus.QUEUED, (task_id, task.status)
            assert task.attempts == 1
            assert task.assigned_worker is None
            assert task.available_at is None  # no backoff: ready at once
            await _check_lost_runs(runtime, task_id)

        # The completed task is untouched.
        done = await runtime.get_task(completed)
        assert done is not None
        assert done.status is TaskStatus.COMPLETED
        assert done.result == {"ok": True}
        done_runs = await runtime.get_runs(completed)
        assert [run.status for run in done_runs] == [RunStatus.COMPLETED]

        # The untouched ones too.
        for task_id in queued:
            task = await runtime.get_task(task_id)
            assert task is not None, task_id
            assert task.status is TaskStatus.QUEUED
            assert task.attempts == 0
            assert await runtime.get_runs(task_id) == []

        # One task.retrying (reason: recovered) per recovered task, and none for the others.
        events = await _read_all(runtime)
        for task_id in (running, assigned):
            retrying = [e for e in _events_of(events, task_id) if e.type == "task.retrying"]
            assert len(retrying) == 1, retrying
            assert isinstance(retrying[0].data, dict)
            assert retrying[0].data["reason"] == RECOVERED
            assert retrying[0].data["attempts"] == 1
        assert not [
            event
            for task_id in (completed, *queued)
            for event in _events_of(events, task_id)
            if event.type == "task.retrying"
        ]

        # Every queued task can be claimed again, best first, and only once.
        claims: list[Claim] = []
        for _ in range(5):
            claim = await runtime.claim_task("worker-2", "job", lease=60, wait=0)
            assert claim is not None, f"only {len(claims)} claims succeeded"
            claims.append(claim)
        assert await runtime.claim_task("worker-2", "job", lease=60, wait=0) is None
        claimed = [claim.task.id for claim in claims]
        assert len(set(claimed)) == 5
        assert set(claimed) == {running, assigned, *queued}
        # Created with priorities 1..6; the held ones were the best two, still first.
        assert claimed[:2] == [running, assigned]
        assert [claim.task.priority for claim in claims] == [6, 5, 3, 2, 1]
        # A recovered task's new claim is its second run.
        assert [claim.lease.attempt for claim in claims[:2]] == [2, 2]
        assert [claim.lease.attempt for claim in claims[2:]] == [1, 1, 1]


async def test_held_claims_without_retries_fail_after_sigkill(
    anyio_backend: str, db_path: str, tmp_path: Path
) -> None:
    ids = await _run_and_kill(db_path, "exhausted", anyio_backend, tmp_path / "claimer.stderr")
    running, assigned = ids["running"], ids["assigned"]
    assert isinstance(running, str)
    assert isinstance(assigned, str)

    async with Runtime.open(db_path) as runtime:
        events = await _read_all(runtime)
        for task_id in (running, assigned):
            task = await runtime.get_task(task_id)
            assert task is not None, task_id
            assert task.status is TaskStatus.FAILED, (task_id, task.status)
            assert task.attempts == 1
            assert task.assigned_worker is None
            assert task.error is not None
            await _check_lost_runs(runtime, task_id)

            mine = _events_of(events, task_id)
            assert not [event for event in mine if event.type == "task.retrying"]
            failed = [event for event in mine if event.type == "task.failed"]
            assert len(failed) == 1, failed
            assert isinstance(failed[0].data, dict)
            assert failed[0].data["reason"] == RECOVERED

        # Nothing is left to claim.
        assert await runtime.claim_task("worker-2", "job", lease=60, wait=0) is None
