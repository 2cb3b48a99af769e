"""A write's ops as the statements that apply them: grouped by kind, each row once, in
an order that leaves the same rows as the ops applied one by one (``_row_statements``); or
one by one, in order (``_in_order``), where a row is both written and deleted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..messages.plans import PlanningRequest, SubtaskState
from ..messages.storage import (
    AppendEvent,
    DeleteRevokedType,
    DeleteScheduleRow,
    DeleteTaskEvents,
    DeleteTaskRow,
    DeleteWorkerRow,
    FenceLeader,
    FencePlanningRequest,
    FenceTask,
    FenceWorker,
    LeaseClock,
    PutPlan,
    PutPlanningRequest,
    PutRevokedType,
    PutRun,
    PutSchedule,
    PutSubtask,
    PutTask,
    PutWorker,
    SetPlanStatus,
    SetRunState,
    SetScheduleSlot,
    SetTaskState,
    TrimEventLog,
    WriteOp,
)
from ..messages.tasks import Run, Task
from ..messages.workers import Worker
from . import plans
from .control import frees_key, revoked_statement
from .port import Statement
from .retention import delete_events_statements, trim_statements
from .rows import (
    DELETE_TASK,
    DELETE_WORKER,
    FENCE_CLAIM,
    FENCE_TASK,
    KEY_LOCK,
    fenced_task_state_statement,
    run_state_statement,
    run_statement,
    task_state_statement,
    task_statement,
    time_text,
    worker_statement,
)
from .schedules import schedule_statement

#: A duty of the leader of several nodes (PostgreSQL only): the epoch it was given is still
#: the leader's; the row lock it takes makes a new leader's bump wait for this commit.
FENCE_LEADER = "UPDATE hive_leader SET epoch = epoch WHERE id = 1 AND epoch = ?"
#: The wall time a write's leases were set from (messages.storage.LeaseClock; PostgreSQL
#: only), for the trigger that keeps each lease's deadline by the database's clock (schema
#: version 18): to the end of the transaction, or the next write's.
LEASE_CLOCK = "SELECT set_config('hive.clock', ?, true)"
#: A dead node's worker is still that node's (it did not come back on a live node).
FENCE_WORKER = "UPDATE workers SET node_id = node_id WHERE id = ? AND node_id = ?"
FENCE_REQUEST = (
    "UPDATE planning_queue SET status = status"
    " WHERE id = ? AND status = ? AND COALESCE(assigned_agent, '') = ?"
)


def _row_statements(ops: Sequence[WriteOp]) -> list[Statement]:
    """The row statements of one write, grouped by kind (its events follow): see
    :func:`_grouped`. A write of the task path (tasks and runs put or changed, and
    events: every TaskManager write of a create, a claim or an end) takes a short
    way to the same statements."""
    statements = _task_path(ops)
    return _grouped(ops) if statements is None else statements


def _task_path(ops: Sequence[WriteOp]) -> list[Statement] | None:
    """:func:`_grouped`'s statements of a write made of :class:`PutTask`,
    :class:`SetTaskState`, :class:`PutRun`, :class:`SetRunState` and
    :class:`AppendEvent` ops only, in the same order; ``None`` for any other write.

    The general way sets up a score of collections and a dozen comprehensions for the
    kinds of row a write may hold, about 10 us a write whatever it holds: a third of
    the grouping of a create handed to a parked claim."""
    tasks: dict[str, Task] = {}
    runs: dict[str, Run] = {}
    put_tasks: set[str] = set()
    put_runs: set[str] = set()
    lease_hashes: dict[str, bytes] = {}
    for op in ops:
        kind = type(op)
        if kind is AppendEvent:
            continue
        if kind is SetTaskState:
            task = op.task  # type: ignore[union-attr]
            tasks[task.id] = task
        elif kind is PutTask:
            task = op.task  # type: ignore[union-attr]
            tasks[task.id] = task
            put_tasks.add(task.id)
        elif kind is SetRunState:
            run = op.run  # type: ignore[union-attr]
            runs[run.id] = run
        elif kind is PutRun:
            run = op.run  # type: ignore[union-attr]
            runs[run.id] = run
            put_runs.add(run.id)
            lease_hash = op.lease_hash  # type: ignore[union-attr]
            if lease_hash is not None:
                lease_hashes[run.id] = lease_hash
        else:
            return None
    statements: list[Statement] = []
    states = _task_and_run_rows(statements, tasks, runs, put_tasks, put_runs, lease_hashes)
    return statements + states


def _task_and_run_rows(
    statements: list[Statement],
    tasks: dict[str, Task],
    runs: dict[str, Run],
    put_tasks: set[str],
    put_runs: set[str],
    lease_hashes: dict[str, bytes],
    fenced: Collection[str] = (),
) -> list[Statement]:
    """Add to ``statements`` the puts of a write's tasks and runs (a task that frees its
    concurrency key first of all: a task created in this write may take the key it
    frees), leaving out the tasks written by their fence; return their state updates,
    which go after every put."""
    states: list[Statement] = []
    for task_id, task in tasks.items():
        if task_id in fenced:
            continue  # written by its fence
        if task_id in put_tasks:
            statements.append(task_statement(task))
        elif frees_key(task):
            statements.insert(0, task_state_statement(task))
        else:
            states.append(task_state_statement(task))
    for run_id, run in runs.items():
        if run_id in put_runs:
            statements.append(run_statement(run, lease_hashes.get(run_id)))
        else:
            states.append(run_state_statement(run))
    return states


def _grouped(ops: Sequence[WriteOp]) -> list[Statement]:
    """The row statements of one write, grouped by kind (its events follow).

    Applying them grouped, each row once, leaves the same rows as applying the ops in
    order: a put replaces every column of its row and a state write every column that
    changes after creation, so only the last op of a row counts (written whole if the row
    was put in this write, as it may be new; else its state columns only); tasks go
    before runs, so a run's task exists; deletes go first, so a key a deleted task held is
    free for a task created in the same write (a task is put once, at its creation, and
    its keys never change, so only a delete frees one); events reference no row. The one
    case where order matters, a row both written and deleted in one write, is applied in
    order.
    Grouping turns a write into a few long ``executemany`` runs.
    """
    tasks: dict[str, Task] = {}
    runs: dict[str, Run] = {}
    put_tasks: set[str] = set()  # rows that may be new in this write: written whole
    put_runs: set[str] = set()
    lease_hashes: dict[str, bytes] = {}  # a put run's, kept when a state write follows it
    workers: dict[str, Worker] = {}
    deleted: list[str] = []
    fences: dict[str, FenceTask] = {}  # task id -> the version the writer read
    duty: list[Statement] = []  # a leader's fences (epoch, workers): first of all
    clock: list[Statement] = []  # the wall time its leases were set from: before its rows
    gone: list[str] = []  # deleted workers
    requests: dict[str, PlanningRequest] = {}
    new_plans: list[Statement] = []
    plan_updates: list[Statement] = []  # in order: each sets whole status and times
    subtasks: dict[tuple[str, str], SubtaskState] = {}
    control: list[Statement] = []  # revoked task types, in order
    retention: list[Statement] = []  # a purge's events, a trim: before the rows go
    schedules: list[Statement] = []  # in order: they reference no other row
    for op in ops:
        match op:
            case SetTaskState(task=task):
                tasks[task.id] = task
            case SetRunState(run=run):
                runs[run.id] = run
            case AppendEvent():
                pass
            case PutTask(task=task):
                tasks[task.id] = task
                put_tasks.add(task.id)
            case PutRun(run=run, lease_hash=lease_hash):
                runs[run.id] = run
                put_runs.add(run.id)
                if lease_hash is not None:
                    lease_hashes[run.id] = lease_hash
            case PutPlanningRequest(request=request):
                requests[request.id] = request
            case PutPlan():
                new_plans.append(plans.plan_statement(op))
            case SetPlanStatus():
                plan_updates.append(plans.plan_status_statement(op))
            case PutSubtask(state=state):
                subtasks[state.plan_id, state.subtask_id] = state
            case DeleteTaskRow(task_id=task_id):
                deleted.append(task_id)
            case FenceTask(task_id=task_id):
                fences.setdefault(task_id, op)
            case FenceLeader() | FenceWorker() | FencePlanningRequest():
                duty.append(_in_order(op))
            case LeaseClock():
                clock.append(_in_order(op))
            case PutWorker(worker=worker):
                workers[worker.id] = worker
            case DeleteWorkerRow(worker_id=worker_id):
                gone.append(worker_id)
            case PutRevokedType() | DeleteRevokedType():
                control.append(revoked_statement(op))
            case DeleteTaskEvents(task_ids=task_ids):
                retention += delete_events_statements(task_ids)
            case TrimEventLog(through=through):
                retention += trim_statements(through)
            case PutSchedule() | SetScheduleSlot() | DeleteScheduleRow():
                schedules.append(schedule_statement(op))
    if (
        deleted
        and (
            not tasks.keys().isdisjoint(deleted)
            or any(run.task_id in deleted for run in runs.values())
        )
    ) or (gone and not workers.keys().isdisjoint(gone)):
        rest = [
            op
            for op in ops
            if not isinstance(
                op, AppendEvent | FenceLeader | FenceWorker | FencePlanningRequest | LeaseClock
            )
        ]
        return duty + clock + [s for op in rest for s in _in_order_all(op)]
    # The fences first, in one order on every node: they lock the rows the write changes,
    # so two nodes' writes of the same tasks wait for each other, never deadlock. A task
    # whose state this write sets (an existing row, no key to free, no concurrency key to
    # count) has its state written by its fence's UPDATE itself, there.
    fenced: dict[str, Statement] = {}
    for task_id, fence in fences.items():
        changed = tasks.get(task_id)
        if (
            fence.key is None
            and changed is not None
            and task_id not in put_tasks
            and not frees_key(changed)
        ):
            fenced[task_id] = fenced_task_state_statement(changed, fence.version)
    keys = sorted({fence.key for fence in fences.values() if fence.key is not None})
    statements: list[Statement] = duty + clock + [(KEY_LOCK, (key,)) for key in keys]
    statements += [fenced.get(task_id) or _fence(fences[task_id]) for task_id in sorted(fences)]
    statements += retention
    statements += [(DELETE_TASK, (task_id,)) for task_id in deleted]
    statements += [(DELETE_WORKER, (worker_id,)) for worker_id in gone]
    # Referenced rows before the rows that reference them: request <- plan <- subtask,
    # task <- run, task <- subtask. New rows before state writes, so that a statement
    # follows the one before it (same SQL) more often and executemany takes longer runs.
    statements += [plans.request_statement(request) for request in requests.values()]
    statements += new_plans
    statements += plan_updates
    states = _task_and_run_rows(statements, tasks, runs, put_tasks, put_runs, lease_hashes, fenced)
    statements += [worker_statement(worker) for worker in workers.values()]
    statements += [plans.subtask_statement(state) for state in subtasks.values()]
    return statements + states + control + schedules


def _fence(fence: FenceTask) -> Statement:
    if fence.key is None:
        return (FENCE_TASK, (fence.task_id, fence.version))
    return (FENCE_CLAIM, (fence.task_id, fence.version, fence.key, fence.task_id, fence.room))


def _in_order_all(op: WriteOp) -> list[Statement]:
    """The statements of one op (a retention op has several, a row op one)."""
    match op:
        case DeleteTaskEvents(task_ids=task_ids):
            return delete_events_statements(task_ids)
        case TrimEventLog(through=through):
            return trim_statements(through)
    return [_in_order(op)]


def _in_order(op: WriteOp) -> Statement:
    match op:
        case PutTask(task=task):
            return task_statement(task)
        case SetTaskState(task=task):
            return task_state_statement(task)
        case PutRun(run=run, lease_hash=lease_hash):
            return run_statement(run, lease_hash)
        case SetRunState(run=run):
            return run_state_statement(run)
        case DeleteTaskRow(task_id=task_id):
            return (DELETE_TASK, (task_id,))
        case FenceTask():
            return _fence(op)
        case FenceLeader(epoch=epoch):
            return (FENCE_LEADER, (epoch,))
        case FenceWorker(worker_id=worker_id, node_id=node_id):
            return (FENCE_WORKER, (worker_id, node_id))
        case LeaseClock(at=at):
            return (LEASE_CLOCK, (time_text(at),))
        case FencePlanningRequest(request_id=request_id, status=status, agent=agent):
            return (FENCE_REQUEST, (request_id, status, agent))
        case PutWorker(worker=worker):
            return worker_statement(worker)
        case DeleteWorkerRow(worker_id=worker_id):
            return (DELETE_WORKER, (worker_id,))
        case PutPlanningRequest(request=request):
            return plans.request_statement(request)
        case PutPlan():
            return plans.plan_statement(op)
        case SetPlanStatus():
            return plans.plan_status_statement(op)
        case PutSubtask(state=state):
            return plans.subtask_statement(state)
        case PutRevokedType() | DeleteRevokedType():
            return revoked_statement(op)
        case PutSchedule() | SetScheduleSlot() | DeleteScheduleRow():
            return schedule_statement(op)
    raise AssertionError(f"not a row write: {op!r}")
