"""Cross-checks of what the runtime holds against its own event log, through the public API.

Every task change is committed together with its event, so the log, folded task by task,
must give exactly the statuses the tasks table holds: a state change without its event, or
an event without its state change, shows up as a difference. The checks collect every
problem as a line of text, so that a failing test says everything that is wrong at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hive_orchestration import Event, OrchestrationClient, Run, RunStatus, Task, TaskStatus

#: Task events that move a task from ``data["previous"]`` to ``data["status"]``.
TRANSITION_EVENTS = frozenset(
    {
        "task.assigned",
        "task.started",
        "task.retrying",
        "task.completed",
        "task.failed",
        "task.timed_out",
        "task.cancelled",
        "task.retried",
        "plan.subtask_ready",
    }
)
HOLDING = frozenset({TaskStatus.ASSIGNED, TaskStatus.RUNNING})
#: Why a run ended without success (``data.reason`` of ``task.retrying``, ``task.failed``
#: and ``task.timed_out``): these count an attempt, the others do not.
COUNTED = frozenset({"failed", "timed_out", "lease_expired", "worker_lost", "recovered"})
NOT_COUNTED = frozenset({"released", "unclaimed", "requeued"})
OPEN_RUN = frozenset({RunStatus.ASSIGNED, RunStatus.RUNNING})


@dataclass
class Ledger:
    """What the event log says about the tasks."""

    status: dict[str, TaskStatus] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    created: Counter[str] = field(default_factory=Counter)
    completed: Counter[str] = field(default_factory=Counter)
    #: The run id of each task.assigned event of a claim, in log order.
    claims: dict[str, list[str]] = field(default_factory=dict)
    #: Tasks assigned or running by a claim (not by ``update_task_status``) at the end.
    claimed: set[str] = field(default_factory=set)
    #: Tasks completed while a claim held them (so with a completed run).
    completed_by_claim: set[str] = field(default_factory=set)
    #: Each task's attempts, as its events say (``data.attempts``).
    attempts: Counter[str] = field(default_factory=Counter)
    #: Each task's events, as "type:status", for the messages.
    history: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


async def read_log(client: OrchestrationClient) -> list[Event]:
    """The whole durable log, oldest first."""
    events: list[Event] = []
    while True:
        page = await client.read_events(events[-1].seq if events else 0, limit=10_000)
        if not page:
            return events
        events.extend(page)


def check_seqs(events: list[Event]) -> list[str]:
    seqs = [event.seq for event in events]
    if seqs != list(range(1, len(seqs) + 1)):
        return [f"the log's seqs are not 1..{len(seqs)} without a gap"]
    return []


def fold(events: list[Event]) -> Ledger:
    """Replay the task events: each transition must start where the previous one ended."""
    ledger = Ledger()
    for event in events:
        task_id = event.task_id
        if task_id is None or not (
            event.type.startswith("task.") or event.type in TRANSITION_EVENTS
        ):
            continue
        where = f"seq {event.seq} {event.type} of task {task_id}"
        ledger.history.setdefault(task_id, []).append(
            f"{event.type}:{event.data.get('status', '')}{'+run' if 'run_id' in event.data else ''}"
        )
        if event.type == "task.created":
            ledger.created[task_id] += 1
            if ledger.created[task_id] > 1:
                ledger.problems.append(f"{where}: a second task.created")
            # A plan's subtasks are created blocked, every other task queued.
            blocked = event.plan_id is not None
            ledger.status[task_id] = TaskStatus.BLOCKED if blocked else TaskStatus.QUEUED
            continue
        current = ledger.status.get(task_id)
        if current is None or task_id in ledger.deleted:
            ledger.problems.append(f"{where}: no live task (no task.created before it)")
            continue
        if event.type == "task.deleted":
            ledger.deleted.add(task_id)
            ledger.claimed.discard(task_id)
            continue
        if event.type == "task.progress":
            if current not in HOLDING:
                ledger.problems.append(f"{where}: progress of a task that is {current.value}")
            continue
        if event.type not in TRANSITION_EVENTS:
            ledger.problems.append(f"{where}: unknown task event")
            continue
        previous, status = event.data.get("previous"), event.data.get("status")
        if previous != current.value or not isinstance(status, str):
            ledger.problems.append(
                f"{where}: says {previous!r} -> {status!r}, but the log had it {current.value}"
            )
            continue
        ledger.status[task_id] = TaskStatus(status)
        check_attempts(ledger, event, task_id, where)
        if event.type == "task.completed":
            ledger.completed[task_id] += 1
            if task_id in ledger.claimed:
                ledger.completed_by_claim.add(task_id)
        run_id = event.data.get("run_id")
        if event.type == "task.assigned" and isinstance(run_id, str):
            ledger.claims.setdefault(task_id, []).append(run_id)
            ledger.claimed.add(task_id)
        elif TaskStatus(status) not in HOLDING or event.type == "task.assigned":
            ledger.claimed.discard(task_id)  # by hand (update_task_status), or over
    return ledger


def check_attempts(ledger: Ledger, event: Event, task_id: str, where: str) -> None:
    """A run that ended without success counts one attempt (lease expiry, a lost worker
    and recovery too), a released one none: each event that says so carries the count."""
    reason, attempts = event.data.get("reason"), event.data.get("attempts")
    if not isinstance(reason, str) or not isinstance(attempts, int):
        return  # no run ended here (a move by hand, a subtask released by its plan)
    if reason == "retried":  # retry_task: the attempts spent so far, then a fresh budget
        if attempts != ledger.attempts[task_id]:
            ledger.problems.append(
                f"{where}: retried after {attempts} attempts, {ledger.attempts[task_id]} "
                "by its events"
            )
        ledger.attempts[task_id] = 0
        return
    if reason not in COUNTED | NOT_COUNTED:
        ledger.problems.append(f"{where}: unknown reason {reason!r}")
        return
    expected = ledger.attempts[task_id] + (reason in COUNTED)
    if attempts != expected:
        ledger.problems.append(
            f"{where}: {reason} with attempts {attempts}, expected {expected} "
            f"({'counts' if reason in COUNTED else 'does not count'} an attempt)"
        )
    ledger.attempts[task_id] = attempts


async def every_task(client: OrchestrationClient, status: TaskStatus) -> list[Task]:
    """Every task of ``status``, page by page (a listing returns at most its limit)."""
    found: list[Task] = []
    after: str | None = None
    while True:
        page = await client.get_tasks_by_status(status, limit=10_000, after=after)
        found += page
        if len(page) < 10_000:
            return found
        after = page[-1].id


async def read_tasks(client: OrchestrationClient) -> tuple[dict[str, Task], list[str]]:
    """Every task, read status by status: a task listed under two statuses is a problem."""
    tasks: dict[str, Task] = {}
    problems: list[str] = []
    for status in TaskStatus:
        for task in await every_task(client, status):
            if task.status is not status:
                problems.append(f"task {task.id} listed as {status.value} is {task.status.value}")
            if task.id in tasks:
                problems.append(
                    f"task {task.id} is both {tasks[task.id].status.value} and {status.value}"
                )
            tasks[task.id] = task
    return tasks, problems


async def audit_tasks(
    client: OrchestrationClient, events: list[Event]
) -> tuple[Ledger, dict[str, Task], dict[str, list[Run]], list[str]]:
    """The tasks table, the runs and the event log, checked against each other:

    - the log's seqs have no gap; every task event follows on from the one before;
    - the tasks the log says exist are exactly the tasks there are, each in the status its
      last event says, and no task is in two statuses;
    - a task completed at most once: with exactly one completed run if a claim held it
      then, with none if it was completed by hand (``update_task_status``);
    - each run that ended without success counted one attempt (a failure, a timeout, lease
      expiry, a lost worker, recovery), a released one none, and the table's ``attempts``
      are what the events counted;
    - every run comes from a claim (``task.assigned``) and a task holds an open run exactly
      while it is assigned or running by a claim: the run of its last claim.
    """
    ledger = fold(events)
    tasks, problems = await read_tasks(client)
    problems += check_seqs(events) + ledger.problems
    logged = {task_id for task_id in ledger.status if task_id not in ledger.deleted}
    for task_id in sorted(logged - set(tasks)):
        problems.append(f"task {task_id}: the log has it ({ledger.status[task_id].value}), no row")
    for task_id in sorted(set(tasks) - logged):
        problems.append(
            f"task {task_id}: a row ({tasks[task_id].status.value}) the log never created"
        )
    runs: dict[str, list[Run]] = {}
    for task_id in sorted(logged & set(tasks)):
        task = tasks[task_id]
        if ledger.status[task_id] is not task.status:
            problems.append(
                f"task {task_id}: {task.status.value} in the table, "
                f"{ledger.status[task_id].value} by its events"
            )
        if task.attempts != ledger.attempts[task_id]:
            problems.append(
                f"task {task_id}: {task.attempts} attempts in the table, "
                f"{ledger.attempts[task_id]} by its events {ledger.history[task_id]}"
            )
        runs[task_id] = found = await client.get_runs(task_id)
        claims = ledger.claims.get(task_id, [])
        if [run.id for run in found] != claims:
            problems.append(f"task {task_id}: runs {[r.id for r in found]} but claims {claims}")
        open_runs = [run for run in found if run.status in OPEN_RUN]
        if task_id in ledger.claimed:
            if [run.id for run in open_runs] != claims[-1:]:
                problems.append(
                    f"task {task_id} is {task.status.value}; open runs {open_runs}, "
                    f"last claim {claims[-1]}; events {ledger.history[task_id]}"
                )
        elif open_runs:
            problems.append(
                f"task {task_id} is {task.status.value} with open runs {open_runs}; "
                f"events {ledger.history[task_id]}"
            )
        done = [run for run in found if run.status is RunStatus.COMPLETED]
        completed = 1 if task.status is TaskStatus.COMPLETED else 0
        by_claim = 1 if task_id in ledger.completed_by_claim else 0
        if ledger.completed[task_id] != completed or len(done) != by_claim:
            problems.append(
                f"task {task_id} ({task.status.value}): {ledger.completed[task_id]} "
                f"task.completed event(s), {len(done)} completed run(s); "
                f"events {ledger.history[task_id]}"
            )
    return ledger, tasks, runs, problems
