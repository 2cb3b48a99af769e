"""Cancellation: callers cancelled at random points leave no half-written state.

Many callers, each an agent with its own client, call ``create_task`` (some with an
idempotency key), ``update_task_status``, ``cancel_task``, ``delete_task``, the claim cycle
(``claim_task`` with and without a wait, ``start_task``, ``complete_task``),
``create_execution_plan`` + ``mark_plan_execution_started``, ``publish`` and
``register_worker``, each under a cancel scope with a random deadline (from "before the
first checkpoint" to "never"), and whole rounds are cancelled at random moments too. A
cancelled call may or may not have been applied (its message may already be queued): what
must hold is that whatever was applied was applied whole, with its events.

Cancelling a caller never stops a commit half-way (the storage actor's batch is shielded),
so the storm also interrupts some commits between two of their statements, as a failing
disk would (SQLite's I/O error, ``tests/_interrupt.py``): one in two of the transactions
that create a task, picked at random. Those calls, and whatever shared their transaction,
fail whole with ``StorageError``. A change that is not one transaction (a task's row and
its event committed apart, say) leaves a half there, which the audit finds.

Afterwards, with the runtime still open and again after reopening it:

- every task exists fully or not at all: its row, its ``task.created``, each status change
  with its event and each event with its status change (the log folded task by task gives
  the table's statuses), runs that match its claims, at most one task per create call and
  per idempotency key, and every acknowledged create is there;
- no task is held by a claim that no caller received (a claimer that left early is never
  handed a task); after reopening, no task is assigned or running and no run is open;
- plans: each plan has its events and the status they say; an executing plan has exactly
  one task per subtask, blocked or queued as its dependencies say; a draft plan has none;
- app events: each published at most once, every acknowledged one at its seq;
- workers: each registered worker has its ``worker.registered`` event and vice versa.

The seed is printed when the test fails; set ``HIVE_RELIABILITY_SEED`` to replay one
(timing still varies: the seed fixes the plan of calls and deadlines, not the scheduler).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from _interrupt import Interrupter, Statement, event_rows, interrupt
from _raw import STORE

from hive_orchestration import (
    Event,
    IllegalTransitionError,
    LeaseLostError,
    NotFoundError,
    OrchestrationClient,
    PlanStatus,
    Runtime,
    RuntimeConfig,
    StorageError,
    SubtaskStatus,
    Task,
    TaskStatus,
)

from ._audit import HOLDING, audit_tasks, read_log

pytestmark = pytest.mark.anyio

ROUNDS = 30
CALLS_PER_ROUND = 200
WORKER_IDS = [f"w-{n}" for n in range(8)]
#: Deadlines: 0 cancels at the first checkpoint (the request may be queued already), the
#: tiny ones land anywhere in a round trip, 1 s lets the call finish.
DEADLINES = (0.0, 0.0, 0.00001, 0.0001, 0.0003, 0.001, 0.002, 0.005, 0.02, 1.0, 1.0)
#: What a call may be refused with on purpose: the state moved on under it.
EXPECTED = (IllegalTransitionError, NotFoundError, LeaseLostError)
TARGETS = ("running", "completed", "failed", "cancelled", "queued", "assigned")
#: Share of the transactions that create a task that are interrupted half-way.
INTERRUPTED = 0.5
PLAN_TABLES = ("execution_plans", "plan_execution", "planning_queue")


@dataclass
class Ledger:
    """What the callers attempted and what they were told."""

    rng: random.Random
    attempted: set[int] = field(default_factory=set)  # create markers
    acknowledged: dict[int, str] = field(default_factory=dict)  # marker -> id returned
    task_ids: list[str] = field(default_factory=list)
    received: set[str] = field(default_factory=set)  # run ids of claims a caller got
    published: dict[int, int] = field(default_factory=dict)  # marker -> seq
    plans: dict[int, str] = field(default_factory=dict)  # marker -> plan id
    cancelled: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    next_marker: int = 0

    def marker(self) -> int:
        self.next_marker += 1
        return self.next_marker


# -- the calls -------------------------------------------------------------------------------


async def create(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    marker = ledger.marker()
    ledger.attempted.add(marker)
    key = f"key-{rng.randrange(12)}" if rng.random() < 0.3 else None
    kind = rng.choice(["manual", "claimed", "claimed"])
    task_id = await client.create_task(kind, {"marker": marker}, idempotency_key=key)
    ledger.acknowledged[marker] = task_id  # with a key used before: the first task's id
    ledger.task_ids.append(task_id)


async def update(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    if ledger.task_ids:
        await client.update_task_status(rng.choice(ledger.task_ids), rng.choice(TARGETS))


async def cancel(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    if ledger.task_ids:
        if rng.random() < 0.2:
            await client.delete_task(rng.choice(ledger.task_ids))
        else:
            await client.cancel_task(rng.choice(ledger.task_ids), reason="cancelled by a test")


async def claim_cycle(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    worker = rng.choice(WORKER_IDS)
    claim = await client.claim_task(worker, "claimed", wait=rng.choice([0.0, 0.0, 0.01, 0.05]))
    if claim is None:
        return
    ledger.received.add(claim.lease.run_id)  # no checkpoint between the reply and this
    await client.start_task(claim.lease)
    await client.complete_task(claim.lease, {"by": worker})


async def plan(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    marker = ledger.marker()
    subtasks: list[dict[str, object]] = [{"id": "a", "task_type": "planned"}]
    subtasks.append({"id": "b", "task_type": "planned", "dependencies": ["a"]})
    if rng.random() < 0.5:
        subtasks.append({"id": "c", "task_type": "planned"})
    plan_id = await client.create_execution_plan({"title": f"plan {marker}", "subtasks": subtasks})
    ledger.plans[marker] = plan_id
    if rng.random() < 0.8:
        await client.mark_plan_execution_started(plan_id)


async def publish(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    marker = ledger.marker()
    event = await client.publish("app.note", {"marker": marker, "size": rng.randrange(100)})
    ledger.published[marker] = event.seq


async def register(client: OrchestrationClient, ledger: Ledger, rng: random.Random) -> None:
    await client.register_worker(rng.choice(WORKER_IDS), "tester", ["claimed"], {"n": 1})


Call = Callable[[OrchestrationClient, Ledger, random.Random], Awaitable[None]]
CALLS: tuple[tuple[Call, int], ...] = (
    (create, 6),
    (update, 3),
    (cancel, 1),
    (claim_cycle, 5),
    (plan, 2),
    (publish, 2),
    (register, 1),
)


async def call(
    client: OrchestrationClient, ledger: Ledger, function: Call, seed: float, deadline: float
) -> None:
    rng = random.Random(seed)
    name = function.__name__
    with anyio.move_on_after(deadline) as scope:
        try:
            await function(client, ledger, rng)
        except EXPECTED as exc:
            ledger.refused[f"{name}: {type(exc).__name__}"] += 1
        except StorageError as exc:
            if exc.fault == "io_error":  # an interrupted commit
                ledger.refused[f"{name}: {type(exc).__name__}"] += 1
            else:
                ledger.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        except Exception as exc:
            ledger.errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if scope.cancelled_caught:
        ledger.cancelled[name] += 1


async def storm(runtime: Runtime, ledger: Ledger) -> None:
    """Rounds of concurrent calls with random deadlines; some rounds are also cancelled
    whole at a random moment."""
    rng = ledger.rng
    clients = [runtime.client(source_agent=f"agent-{n}") for n in range(40)]
    functions = [function for function, weight in CALLS for _ in range(weight)]
    for _ in range(ROUNDS):
        cut = rng.choice([None, None, None, None, 0.002, 0.01, 0.05])
        with anyio.move_on_after(1e9 if cut is None else cut) as round_scope:
            async with anyio.create_task_group() as tg:
                for n in range(CALLS_PER_ROUND):
                    function = rng.choice(functions)
                    tg.start_soon(
                        call, clients[n % 40], ledger, function, rng.random(), rng.choice(DEADLINES)
                    )
                    if n % 16 == 0:
                        await anyio.lowlevel.checkpoint()
        if round_scope.cancelled_caught:
            ledger.cancelled["round"] += 1


class CreateFaults:
    """Which transactions to interrupt, and where: a random share of those that create a
    task outside any plan, at a random statement.

    Left alone: transactions that touch a plan (a failed write restarts the plan executor,
    whose restart limit is not what this test is about), and those that hand back a claim
    whose claimer left (the task would stay held until its lease runs out: right, but what
    the audit's check of unreceived claims flags)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.on = True

    def __call__(self, statements: Sequence[Statement]) -> int | None:
        if not self.on or any(table in sql for sql, _ in statements for table in PLAN_TABLES):
            return None
        events = event_rows(statements)
        if (
            not any(event["type"] == "task.created" for event in events)
            or any(event["plan_id"] is not None for event in events)
            or any('"unclaimed"' in str(event["data"]) for event in events)
            or self.rng.random() >= INTERRUPTED
        ):
            return None
        return self.rng.randrange(1, len(statements))


# -- the checks -------------------------------------------------------------------------------


async def settle(client: OrchestrationClient) -> None:
    """Wait until what the cancelled callers left queued has been handled: mailboxes are
    first in, first out, so an answer from each actor means the earlier requests are done.
    The plan executor goes first: it asks the task manager in turn."""
    for _ in range(3):
        await client.get_execution_plans(limit=1)
        await client.get_execution_plan_status_cached("none")
        await client.get_worker("none")
        await client.get_task("none")
        await client.last_seq()
        await anyio.sleep(0.05)


@dataclass
class Findings:
    problems: list[str]
    #: Tasks held by a claim that no caller received (see the xfail test below).
    unreceived: list[str]
    #: Tasks assigned or running (by a claim or by hand) when audited.
    holding: int
    #: Tasks made by create calls that were cancelled before their answer.
    unacknowledged: int


async def audit(client: OrchestrationClient, ledger: Ledger, *, reopened: bool) -> Findings:
    """Everything the module docstring promises: what is wrong, as lines of text."""
    events = await read_log(client)
    log, tasks, _, problems = await audit_tasks(client, events)

    # Creates: at most one task per call and per idempotency key; acknowledged ones exist.
    markers: Counter[object] = Counter()
    keys: Counter[str] = Counter()
    for task in tasks.values():
        if task.plan_id is not None:
            continue
        marker = task.payload.get("marker")
        markers[marker] += 1
        if marker not in ledger.attempted:
            problems.append(f"task {task.id} from no create call: {task.payload}")
        if task.idempotency_key is not None:
            keys[task.idempotency_key] += 1
    problems += [f"create call {m} made {n} tasks" for m, n in markers.items() if n > 1]
    problems += [f"idempotency key {k} has {n} tasks" for k, n in keys.items() if n > 1]
    deleted = log.deleted
    for marker, task_id in ledger.acknowledged.items():
        if task_id not in tasks and task_id not in deleted:
            problems.append(f"acknowledged task {task_id} (create call {marker}) is missing")

    # Claims: nobody should hold a task its claimer never received.
    unreceived = [
        f"task {task_id} is {tasks[task_id].status.value} by claim {log.claims[task_id][-1]}, "
        f"which no caller received; events {log.history[task_id]}"
        for task_id in sorted(log.claimed & set(tasks))
        if log.claims[task_id][-1] not in ledger.received
    ]
    if reopened:
        for task in tasks.values():
            if task.status in HOLDING:
                problems.append(f"task {task.id} still {task.status.value} after reopening")

    problems += await audit_plans(client, events, tasks)
    problems += audit_app_events(events, ledger)
    problems += await audit_workers(client, events)
    holding = sum(task.status in HOLDING for task in tasks.values())
    unacknowledged = sum(n for marker, n in markers.items() if marker not in ledger.acknowledged)
    return Findings(problems, unreceived, holding, unacknowledged)


async def audit_plans(
    client: OrchestrationClient, events: list[Event], tasks: dict[str, Task]
) -> list[str]:
    problems: list[str] = []
    status: dict[str, str] = {}
    for event in events:
        if not event.type.startswith("plan.") or event.type == "plan.subtask_ready":
            continue
        plan_id = event.plan_id
        assert plan_id is not None, event
        new = event.data.get("status")
        if event.type == "plan.created":
            if plan_id in status:
                problems.append(f"plan {plan_id}: a second plan.created")
        elif event.data.get("previous") != status.get(plan_id):
            problems.append(f"plan {plan_id}: seq {event.seq} {event.type} does not follow on")
        if isinstance(new, str):
            status[plan_id] = new
    plans = {p.id: p for p in await client.get_execution_plans(limit=10_000)}
    if set(plans) != set(status):
        problems.append(
            f"plans without plan.created: {sorted(set(plans) - set(status))}; "
            f"plan.created without a plan: {sorted(set(status) - set(plans))}"
        )
    by_plan: dict[str, list[Task]] = {}
    for task in await all_plan_tasks(client):
        by_plan.setdefault(task.plan_id or "", []).append(task)
    for plan_id, held in plans.items():
        if status.get(plan_id) != held.status.value:
            problems.append(
                f"plan {plan_id} is {held.status.value}, its events say {status.get(plan_id)}"
            )
        subtasks = await client.get_plan_subtasks(plan_id)
        plan_tasks = by_plan.get(plan_id, [])
        if held.status in (PlanStatus.DRAFT, PlanStatus.APPROVED):
            if plan_tasks or any(sub.task_id is not None for sub in subtasks):
                problems.append(f"draft plan {plan_id} has tasks")
            continue
        if held.status is not PlanStatus.EXECUTING:
            problems.append(f"plan {plan_id} is {held.status.value}: nothing here ends a plan")
            continue
        if len(plan_tasks) != len(subtasks) or len(subtasks) != held.subtask_count:
            problems.append(f"plan {plan_id}: {len(subtasks)} subtasks, {len(plan_tasks)} tasks")
        for sub in subtasks:
            its = tasks.get(sub.task_id) if sub.task_id is not None else None
            want_sub = SubtaskStatus.PENDING if sub.dependencies else SubtaskStatus.READY
            want_task = TaskStatus.BLOCKED if sub.dependencies else TaskStatus.QUEUED
            got = None if its is None else its.status
            if sub.status is not want_sub or got is not want_task:
                problems.append(
                    f"plan {plan_id} subtask {sub.subtask_id}: {sub.status.value}, "
                    f"task {sub.task_id} {got}; expected {want_sub.value}, {want_task.value}"
                )
    return problems


async def all_plan_tasks(client: OrchestrationClient) -> list[Task]:
    found: list[Task] = []
    for status in TaskStatus:
        found += [t for t in await client.get_tasks_by_status(status) if t.plan_id is not None]
    return found


def audit_app_events(events: list[Event], ledger: Ledger) -> list[str]:
    problems: list[str] = []
    seen: Counter[object] = Counter()
    at: dict[int, object] = {}
    for event in events:
        if event.type == "app.note":
            seen[event.data.get("marker")] += 1
            at[event.seq] = event.data.get("marker")
    problems += [f"app event {m} logged {n} times" for m, n in seen.items() if n > 1]
    for marker, seq in ledger.published.items():
        if at.get(seq) != marker:
            problems.append(f"acknowledged app event {marker} is not at its seq {seq}")
    return problems


async def audit_workers(client: OrchestrationClient, events: list[Event]) -> list[str]:
    problems: list[str] = []
    last: dict[str, Event] = {}
    for event in events:
        if event.type == "worker.registered" and event.worker_id is not None:
            last[event.worker_id] = event
    for worker_id in WORKER_IDS:
        worker = await client.get_worker(worker_id)
        registered = last.get(worker_id)
        if registered is None:
            if worker is not None:
                problems.append(f"worker {worker_id} exists without worker.registered")
        elif worker is None:
            problems.append(f"worker {worker_id}: registered in the log, no record")
        elif worker.incarnation != registered.data.get("incarnation"):
            problems.append(f"worker {worker_id}: incarnation differs from its last event")
    return problems


# -- the test ---------------------------------------------------------------------------------


@asynccontextmanager
async def opened(db_path: str) -> AsyncIterator[Runtime]:
    async with Runtime.open(
        db_path, config=RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)
    ) as runtime:
        yield runtime


def seed() -> int:
    return int(os.environ.get("HIVE_RELIABILITY_SEED", "0")) or random.randrange(2**32)


@pytest.mark.sqlite_only("interrupts the SQLite driver's transactions (tests/_interrupt.py)")
async def test_callers_cancelled_at_random_points_leave_no_half_written_state(
    db_path: str, record_property: Callable[[str, object], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = seed()
    record_property("seed", chosen)
    ledger = Ledger(rng=random.Random(chosen))
    faults = CreateFaults(chosen)
    interrupter = interrupt(monkeypatch.setattr, Interrupter(faults))
    try:
        with anyio.fail_after(60):
            async with opened(db_path) as runtime:
                await storm(runtime, ledger)
                faults.on = False
                client = runtime.client(source_agent="auditor")
                await settle(client)
                before = await audit(client, ledger, reopened=False)
            async with opened(db_path) as runtime:
                client = runtime.client(source_agent="auditor")
                await settle(client)
                after = await audit(client, ledger, reopened=True)
        assert before.problems == []
        assert after.problems == []
        assert ledger.errors == []
        assert after.holding == 0  # recovered on open: no claim outlives its process
        assert after.unreceived == []
        assert before.unreceived == []  # claims answered as their claimer left: given back
        # The deadlines really cut calls short, of every kind; many calls landed, and some
        # that were cancelled landed all the same (and whole, as audited); some tasks were
        # held when the runtime closed, so reopening had claims to recover.
        assert set(ledger.cancelled) >= {f.__name__ for f, _ in CALLS}, ledger.cancelled
        assert len(ledger.acknowledged) > 50
        assert after.unacknowledged > 0
        assert ledger.received
        assert ledger.plans
        assert ledger.published
        assert before.holding > 0
        # Commits were really interrupted half-way, and their callers told so.
        assert interrupter.interrupted > 0
        assert ledger.refused["create: StorageError"] > 0
    except BaseException:
        print(f"\nseed: {chosen} (HIVE_RELIABILITY_SEED={chosen} replays it)")
        print(f"cancelled: {dict(ledger.cancelled)}\nrefused: {dict(ledger.refused)}")
        raise
    print(
        f"\nseed {chosen}: cancelled {dict(ledger.cancelled)}, refused {dict(ledger.refused)}, "
        f"acknowledged creates {len(ledger.acknowledged)}, claims received "
        f"{len(ledger.received)}, held at close {before.holding}, tasks of cancelled creates "
        f"{after.unacknowledged}, commits interrupted {interrupter.interrupted}"
    )


# -- a claim answered just as its claimer is cancelled ------------------------------------

# A claim answered just as its claimer's cancel scope fires: the claimer may have left
# before the answer (its reply slot is closed, and the actor hands the claim back at once)
# or after it but before it resumed, having never seen the value (the claimer tells it
# back: Reply.abandon, ActorRef._give_back). Either way no task may stay assigned to
# nobody, and no planning request, which has no lease to expire, may stay assigned.
#: Sweeps of 100 cancelled claims each, before concluding that no claim was lost. On
#: PostgreSQL fewer: the race is the kernel's (a reply slot and its asker), the same on
#: either store, and each sweep there took 2 s of CI's PostgreSQL run, not 0.2 s.
SWEEPS = 6 if STORE == "postgres" else 20


async def round_trip(call: Callable[[], Awaitable[object]]) -> float:
    """The median time of ``call``, to aim the deadlines at the moment of the answer."""
    times = []
    for _ in range(15):
        start = anyio.current_time()
        await call()
        times.append(anyio.current_time() - start)
    return sorted(times)[len(times) // 2]


async def test_a_claimer_cancelled_as_its_claim_is_answered_is_not_left_holding_it(
    db_path: str,
) -> None:
    """Claims cancelled at deadlines swept around the time their answer comes: each one is
    either received (and completed at once, outside the cancel scope) or handed back, so
    no task may stay assigned."""
    async with opened(db_path) as runtime:

        async def create_and_claim() -> None:
            await runtime.create_task("job")
            claim = await runtime.claim_task("w1", "job")
            assert claim is not None
            await runtime.complete_task(claim.lease)

        rtt = await round_trip(create_and_claim) / 3
        stuck: list[str] = []
        for _ in range(SWEEPS):
            for i in range(100):
                await runtime.create_task("job")
                claim = None
                with anyio.move_on_after(rtt * (0.2 + (i % 40) / 20)):
                    claim = await runtime.claim_task("w1", "job")
                if claim is not None:
                    await runtime.complete_task(claim.lease)
            await runtime.get_task("none")  # after the hand-backs: the mailbox is FIFO
            stuck = [task.id for task in await runtime.get_tasks_by_status("assigned")]
            if stuck:
                break
        assert stuck == [], f"assigned to a claimer that never received them: {stuck}"


async def test_a_planner_cancelled_as_its_request_is_answered_is_not_left_holding_it(
    db_path: str,
) -> None:
    """The same for the planning queue: a request is received by its planner or released."""
    async with opened(db_path) as runtime:

        async def queue_and_claim() -> None:
            await runtime.queue_planning_request("plan it")
            request = await runtime.claim_planning_request("planner")
            assert request is not None
            await runtime.cancel_planning_request(request.id)

        rtt = await round_trip(queue_and_claim) / 3
        received: set[str] = set()
        stuck: list[str] = []
        for _ in range(SWEEPS):
            for i in range(100):
                await runtime.queue_planning_request(f"plan {i}")
                with anyio.move_on_after(rtt * (0.2 + (i % 40) / 20)):
                    request = await runtime.claim_planning_request("planner")
                    if request is not None:
                        received.add(request.id)
            await runtime.get_execution_plan_status_cached("none")  # after the releases
            assigned = await runtime.get_planning_queue("assigned", limit=10_000)
            stuck = [request.id for request in assigned if request.id not in received]
            if stuck:
                break
        assert stuck == [], f"assigned to a planner that never received them: {stuck}"
