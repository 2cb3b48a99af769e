"""Actor faults: a fault injected into each actor's handler in turn, under load.

A real runtime on a real SQLite file serves a small load of concurrent clients: producers
create tasks (each with an idempotency key, retried with the same key until acknowledged),
registered workers claim, start, heartbeat and complete them, a planner runs a plan, a
reader reads and publishes, a follower reads the whole log (``client.events(after=0)``)
and a watcher holds a live subscription. At a random moment the fault is armed in one
actor's handler (the per-message handler: ``receive`` of the broadcast actor, ``_commit``
and ``_query`` of the storage actor, ``_handle`` of the TaskManager, the WorkerRegistry,
the PlanExecutor and the Scheduler): it raises twice, first on a message a client is
waiting for (after a random number of them), then on any message (after a random number
more).

Then, for each actor (the list is checked against the runtime's own children, so that a
new actor is not forgotten):

- the asker of the faulted message gets :class:`ActorFailedError` naming the actor, with
  the fault as its cause, at once (not by its deadline); no caller sees anything but that
  (no timeout, no stop);
- the supervisor restarted the actor once per fault (``statistics().restarts``), and the log
  holds an ``actor.restarted`` event for every restart, each caused by the fault;
- the runtime then serves every kind of operation (tasks, claims, workers, events, plans,
  the planning queue, schedules, statistics) while the load goes on;
- every create was acknowledged in the end, exactly one task per key; every task and plan
  completed, each task exactly once; the audit of tasks, runs and the event log is clean;
- the follower saw every event once, in order; the watcher kept receiving events;
- all of it again after reopening the file.

And a fault that repeats (every message, in every handler of the actor) past the restart
intensity stops the runtime: ``Runtime.open`` raises :class:`RuntimeFailedError` from the
fault, no caller hangs, and a reopen of the file finds everything acknowledged, requeues
what was held, and runs it all to completion.

Three bugs these tests found are fixed and kept fixed by the tests at the end of this file:
subscription ids reused by a restarted broadcast actor, the restart-limit error naming
an actor that only crashed because the failing one stopped, and a claim whose wait ended
in a batch that crashed left unanswered until its deadline.

The default run has two crashes per actor; the ``slow`` variant five, over more load.
The seed is printed when a test fails; ``HIVE_RELIABILITY_SEED`` replays it (the plan of the
faults, not the scheduler).
"""

from __future__ import annotations

import inspect
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import partial
from typing import Any, Literal, TypeVar

import anyio
import pytest
from anyio.abc import TaskGroup

from hive_orchestration import (
    ActorFailedError,
    Claim,
    Event,
    ExecutionPlan,
    HiveError,
    IllegalTransitionError,
    LeaseLostError,
    OrchestrationClient,
    PlanStatus,
    RunStatus,
    Runtime,
    RuntimeConfig,
    RuntimeFailedError,
    RuntimeStoppedError,
    SubscriberLaggedError,
    Task,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.actors.broadcast import BroadcastActor
from hive_orchestration.actors.plan_executor import PlanExecutor
from hive_orchestration.actors.scheduler import Scheduler
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.actors.worker_registry import WorkerRegistry
from hive_orchestration.messages.storage import AppendEvent, ReadEvents, Write
from hive_orchestration.runtime import ActorRef
from hive_orchestration.storage import StorageActor

from ._audit import HOLDING, audit_tasks, every_task, read_log

pytestmark = pytest.mark.anyio

T = TypeVar("T")

#: Leases of the load's claims; workers renew them on every step.
LEASE = 1.0
#: serve_everything's own claims: each operation must simply work, so no lease of its may
#: run out between its calls (a loaded machine took more than LEASE between two).
SWEEP_LEASE = 60.0
CONFIG = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)
#: The fault's asker must hear of the crash this soon: far below ``ask_timeout`` (30 s), so
#: the answer is the crash's, not a deadline's.
PROMPT = 1.0
#: Safety nets: a hang fails the test instead of blocking the run.
SAFETY = 60.0
DRAIN = 20.0
#: The PlanExecutor's feed may be unsubscribed this long (between a broadcast crash and
#: its subscribing again) before it counts as gone.
FEEDLESS = 1.0
PRODUCERS, WORKERS = 2, 3
PLAN_TYPE, JOB_TYPE, SWEEP_TYPE = "step", "job", "sweep"
UNFINISHED = (TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.BLOCKED)
PLAN_FINAL = (PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED)

#: Set in the load's tasks: their asks are a client's (the actors' own asks are not).
CLIENT: ContextVar[bool] = ContextVar("CLIENT", default=False)


class InjectedFault(RuntimeError):
    """The fault the tests inject; every crash must trace back to one."""


MARK = "injected fault"


# -- where each actor handles a message ------------------------------------------------------


def _message(args: tuple[object, ...]) -> Sequence[object]:
    return (args[0],)


def _writes(args: tuple[object, ...]) -> Sequence[object]:
    pending: Sequence[tuple[object, Write]] = args[0]  # type: ignore[assignment]
    return tuple(write for _, write in pending)


@dataclass(frozen=True)
class Handler:
    """A method an actor runs per message (or per batch of writes): the fault goes in it."""

    cls: type[Any]
    method: str
    #: The messages a call handles, from its positional arguments.
    messages: Callable[[tuple[object, ...]], Sequence[object]]


#: By the name of the actor's mailbox. ``test_every_actor_of_the_runtime_is_covered`` checks
#: that these are exactly the runtime's actors.
HANDLERS: dict[str, tuple[Handler, ...]] = {
    "broadcast": (
        Handler(BroadcastActor, "receive", _message),
        # A commit's events, fanned out in the storage actor's task while it is idle.
        Handler(BroadcastActor, "receive_inline", _message),
    ),
    "storage": (
        Handler(StorageActor, "_commit", _writes),
        Handler(StorageActor, "_query", _message),
    ),
    "tasks": (Handler(TaskManager, "_handle", _message),),
    "workers": (
        Handler(WorkerRegistry, "_handle", _message),
        # WorkersSeen for live workers, handled in the TaskManager's task while it is idle.
        Handler(WorkerRegistry, "receive_inline", _message),
    ),
    "plans": (Handler(PlanExecutor, "_handle", _message),),
    "schedules": (Handler(Scheduler, "_handle", _message),),
}
ACTORS = list(HANDLERS)


# -- the fault -------------------------------------------------------------------------------


@dataclass
class Shot:
    """One crash: on a message a client waits for (``asked``) or on any message, after
    letting ``skip`` such calls through."""

    asked: bool
    skip: int


@dataclass
class Fired:
    """A crash that happened: what it hit, when, and what the asker of ``target`` got."""

    asked: bool
    messages: tuple[object, ...]
    target: object
    at: float
    answered: bool = False
    outcome: BaseException | None = None
    answered_at: float = 0.0


@dataclass
class Fault:
    actor: str
    shots: list[Shot]
    #: Crash on every message once armed (the restart-intensity test).
    forever: bool = False
    armed: bool = False
    fired: list[Fired] = field(default_factory=list)
    #: Messages clients are waiting for an answer to, by id.
    asked: dict[int, object] = field(default_factory=dict)
    spent: anyio.Event = field(default_factory=anyio.Event)

    def strike(self, messages: Sequence[object]) -> None:
        """Called by the actor's handler before it handles ``messages``: raise or not."""
        if not self.armed or not messages:
            return
        if self.forever:
            self._fire(False, messages, messages[0])
        if not self.shots:
            return
        shot = self.shots[0]
        targets = [m for m in messages if not shot.asked or self.asked.get(id(m)) is m]
        if not targets:
            return
        if shot.skip > 0:
            shot.skip -= 1
            return
        self.shots.pop(0)
        if not self.shots:
            self.spent.set()
        self._fire(shot.asked, messages, targets[0])

    def _fire(self, asked: bool, messages: Sequence[object], target: object) -> None:
        self.fired.append(Fired(asked, tuple(messages), target, anyio.current_time()))
        raise InjectedFault(f"{MARK} #{len(self.fired)} in {self.actor}")

    def answer(self, message: object, outcome: BaseException | None) -> None:
        """A client's ask of ``message`` returned (``outcome``: what it raised)."""
        for fired in self.fired:
            if fired.target is message and not fired.answered:
                fired.answered = True
                fired.outcome = outcome
                fired.answered_at = anyio.current_time()


def install(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> None:
    """Put ``fault`` in every handler of its actor, and follow the clients' asks."""
    original_ask = ActorRef.ask

    async def ask(self: ActorRef[Any], message: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        if not CLIENT.get():
            return await original_ask(self, message, timeout=timeout)
        fault.asked[id(message)] = message
        try:
            result = await original_ask(self, message, timeout=timeout)
        except BaseException as exc:
            fault.answer(message, exc)
            raise
        finally:
            fault.asked.pop(id(message), None)
        fault.answer(message, None)
        return result

    monkeypatch.setattr(ActorRef, "ask", ask)
    for handler in HANDLERS[fault.actor]:
        monkeypatch.setattr(handler.cls, handler.method, faulty(handler, fault))


def faulty(handler: Handler, fault: Fault) -> Callable[..., Any]:
    original = getattr(handler.cls, handler.method)
    if inspect.iscoroutinefunction(original):

        async def strike_async(self: object, *args: object, **kwargs: object) -> object:
            fault.strike(handler.messages(args))
            return await original(self, *args, **kwargs)

        return strike_async

    def strike(self: object, *args: object, **kwargs: object) -> object:
        fault.strike(handler.messages(args))
        return original(self, *args, **kwargs)

    return strike


def causes(error: BaseException | None) -> list[BaseException]:
    """``error`` and what caused it, following ``__cause__`` (else ``__context__``)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def caused_by_fault(error: BaseException | None) -> bool:
    """Whether ``error`` is the injected fault or was caused by it."""
    return any(isinstance(e, InjectedFault) for e in causes(error))


# -- the load --------------------------------------------------------------------------------


class _Failed(Enum):
    FAILED = "failed"


FAILED = _Failed.FAILED


@dataclass
class Failure:
    """An ActorFailedError a caller got."""

    at: float
    actor: str
    what: str


@dataclass
class Load:
    rng: random.Random
    #: Idempotency keys of the creates sent, and the task each was acknowledged with.
    attempted: set[str] = field(default_factory=set)
    acknowledged: dict[str, str] = field(default_factory=dict)
    #: Acknowledged completions, by task id.
    completed: Counter[str] = field(default_factory=Counter)
    #: Leases a worker lost (a heartbeat late past its lease): the task went back.
    dropped: int = 0
    plans: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: The follower's log, and what the watcher received (with when).
    followed: list[Event] = field(default_factory=list)
    watched: list[tuple[float, Event]] = field(default_factory=list)
    lags: int = 0
    reopened: int = 0
    #: Subscriptions that ended as if the runtime had stopped while it went on (the bug
    #: ``test_a_stale_unsubscribe_does_not_close_a_subscription_after_a_restart`` keeps
    #: fixed): the subscriber subscribes again, so that the test reports all it finds.
    closed_under: int = 0
    #: RuntimeStoppedError is expected (the restart-intensity test), not an error.
    stop_expected: bool = False
    stopped: int = 0
    stop_producers: anyio.Event = field(default_factory=anyio.Event)
    stop_workers: anyio.Event = field(default_factory=anyio.Event)
    halt: anyio.CancelScope = field(default_factory=anyio.CancelScope)


async def guarded(load: Load, name: str, body: Callable[[], Awaitable[object]]) -> None:
    """Run one client. Anything unexpected is recorded and stops the load at once."""
    CLIENT.set(True)
    try:
        await body()
    except RuntimeStoppedError as exc:
        if not load.stop_expected:
            load.errors.append(f"{name}: RuntimeStoppedError: {exc}")
            load.halt.cancel()
        load.stopped += 1
    except Exception as exc:
        load.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        load.halt.cancel()


async def attempt(
    load: Load, what: str, call: Callable[[], Awaitable[T]]
) -> T | Literal[_Failed.FAILED]:
    """``call()``, or FAILED if the actor crashed on it (recorded)."""
    try:
        return await call()
    except ActorFailedError as exc:
        load.failures.append(Failure(anyio.current_time(), exc.actor, what))
        return FAILED


async def persist(load: Load, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` again until an actor does not crash on it. Only for idempotent calls."""
    for _ in range(200):
        result = await attempt(load, what, call)
        if result is not FAILED:
            return result
        await anyio.sleep(0.005)
    raise AssertionError(f"{what}: the actor crashed on it 200 times")


#: A plan's subtasks: a; b, c and e on a; d on b and c; f on d and e.
DEPENDENCIES = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["a"], "f": ["d", "e"]}
SUBTASKS = len(DEPENDENCIES)


def plan_data(title: str) -> dict[str, object]:
    return {
        "title": title,
        "subtasks": [
            {"id": sub, "task_type": PLAN_TYPE, "dependencies": on, "max_retries": 10}
            for sub, on in DEPENDENCIES.items()
        ],
    }


async def producer(client: OrchestrationClient, i: int, load: Load) -> None:
    n = 0
    while not load.stop_producers.is_set():
        key = f"p{i}-{n}"
        load.attempted.add(key)
        create = partial(client.create_task, JOB_TYPE, {"key": key}, idempotency_key=key)
        # A crash may come after the task was stored: the same key makes the retry safe.
        load.acknowledged[key] = await persist(load, f"create {key}", create)
        n += 1
        await anyio.sleep(load.rng.uniform(0.002, 0.02))


async def worker(client: OrchestrationClient, worker_id: str, load: Load) -> None:
    await persist(
        load,
        f"register {worker_id}",
        partial(client.register_worker, worker_id, "loader", [JOB_TYPE, PLAN_TYPE]),
    )
    alive = anyio.current_time()
    while not load.stop_workers.is_set():
        if anyio.current_time() - alive > 0.5:
            # Claims and leases are not liveness for the registry (yet): say so explicitly.
            beat = partial(client.update_worker_heartbeat, worker_id)
            assert await persist(load, f"{worker_id} heartbeat", beat)
            alive = anyio.current_time()
        claim = await attempt(
            load,
            f"{worker_id} claim",
            partial(client.claim_task, worker_id, lease=LEASE, wait=0.05),
        )
        if claim is FAILED or claim is None:
            continue
        try:
            await work(client, worker_id, claim, load)
        except LeaseLostError:
            load.dropped += 1  # its lease ran out: the task went back, another worker takes it


async def work(client: OrchestrationClient, worker_id: str, claim: Claim, load: Load) -> None:
    lease = claim.lease
    # IllegalTransitionError: an earlier start landed before its actor crashed.
    with suppress(IllegalTransitionError):
        await persist(load, f"{worker_id} start", partial(client.start_task, lease))
    await attempt(load, f"{worker_id} heartbeat", partial(client.heartbeat, lease))
    await anyio.sleep(load.rng.uniform(0, 0.005))
    complete = partial(client.complete_task, lease, {"by": worker_id})
    try:
        await persist(load, f"{worker_id} complete", complete)
    except LeaseLostError:
        # An earlier complete may have landed before its actor crashed: then the run is ours.
        runs = await persist(load, "get runs", partial(client.get_runs, lease.task_id))
        if not any(r.id == lease.run_id and r.status is RunStatus.COMPLETED for r in runs):
            raise
    load.completed[lease.task_id] += 1


async def start_plan(client: OrchestrationClient, load: Load, title: str) -> str:
    """Create and start a plan, through crashes: creating is not idempotent, so after a
    crash the plan is looked for (by its title) before it is created again."""
    plan_id: str | None = None
    while plan_id is None:
        created = await attempt(
            load, f"create plan {title}", partial(client.create_execution_plan, plan_data(title))
        )
        if created is not FAILED:
            plan_id = created
            break
        plans = await persist(load, "list plans", client.get_execution_plans)
        plan_id = next((plan.id for plan in plans if plan.title == title), None)
    load.plans.append(plan_id)
    if not await persist(load, "start plan", partial(client.mark_plan_execution_started, plan_id)):
        status = await persist(
            load, "plan status", partial(client.get_execution_plan_status, plan_id)
        )
        assert status in ("executing", "completed"), status  # an earlier start landed
    return plan_id


async def reader(runtime: Runtime, client: OrchestrationClient, load: Load) -> None:
    """Reads of every kind, and app events, through every actor."""
    rng = random.Random(load.rng.random())
    n = 0
    while not load.stop_producers.is_set():
        if load.acknowledged:
            task_id = rng.choice(list(load.acknowledged.values()))
            task = await attempt(load, "get task", partial(client.get_task, task_id))
            if task is not FAILED:
                assert task is not None, f"acknowledged task {task_id} cannot be read"
                assert task.id == task_id
        await attempt(load, "active workers", client.get_active_workers)
        await attempt(load, "queued", partial(client.get_tasks_by_status, "queued", limit=20))
        await attempt(load, "tail", partial(client.read_events, 0, limit=20))
        await attempt(load, "statistics", runtime.statistics)
        await attempt(load, "schedules", client.list_schedules)
        await attempt(load, "publish", partial(client.publish, "load.tick", {"n": n}))
        for plan_id in load.plans:
            await attempt(load, "plan status", partial(client.get_execution_plan_status, plan_id))
        n += 1
        await anyio.sleep(rng.uniform(0.002, 0.01))


async def still_open(runtime: Runtime) -> bool:
    """Whether the runtime still serves (a subscription that ended cleanly says it stopped)."""
    try:
        await runtime.last_seq()
    except RuntimeStoppedError:
        return False
    except ActorFailedError:
        pass  # crashing, not stopped
    return True


async def follower(client: OrchestrationClient, load: Load) -> None:
    """The whole log from its start, then live, until ``load.end``: resumed after a crash
    from the last event seen."""
    while True:
        after = load.followed[-1].seq if load.followed else 0
        try:
            async with client.events(after=after) as stream:
                async for event in stream:
                    load.followed.append(event)
                    if event.type == "load.end":
                        return
            if not await still_open(client.runtime):
                return
            load.closed_under += 1  # asserted to be 0 at the end
        except ActorFailedError as exc:
            load.failures.append(Failure(anyio.current_time(), exc.actor, "follow"))
            load.reopened += 1


async def watcher(runtime: Runtime, load: Load) -> None:
    """A plain live subscription, subscribed again when told it broke."""
    while True:
        try:
            async with runtime.subscribe("*") as live:
                async for event in live:
                    load.watched.append((anyio.current_time(), event))
                    if event.type == "load.end":
                        return
            if not await still_open(runtime):
                return
            load.closed_under += 1  # asserted to be 0 at the end
        except SubscriberLaggedError:
            load.lags += 1
        except ActorFailedError as exc:
            load.failures.append(Failure(anyio.current_time(), exc.actor, "subscribe"))


def start_load(tg: TaskGroup, runtime: Runtime, load: Load, *, producers: bool = True) -> None:
    """Workers always; producers, the planner and the reader unless ``producers`` is off."""
    for i in range(WORKERS):
        client = runtime.client(source_agent=f"worker-{i}")
        tg.start_soon(guarded, load, f"worker-{i}", partial(worker, client, f"worker-{i}", load))
    if not producers:
        return
    for i in range(PRODUCERS):
        client = runtime.client(source_agent=f"producer-{i}")
        tg.start_soon(guarded, load, f"producer-{i}", partial(producer, client, i, load))
    planner = runtime.client(source_agent="planner")
    tg.start_soon(guarded, load, "planner", partial(start_plan, planner, load, "load plan"))
    tg.start_soon(
        guarded, load, "reader", partial(reader, runtime, runtime.client(source_agent="r"), load)
    )


async def drained(client: OrchestrationClient, load: Load) -> None:
    """Until nothing is left to do: every task ended, every plan ended."""
    feedless_since: float | None = None
    busy: list[Task] = []
    plans: list[ExecutionPlan | None] = []
    try:
        with anyio.fail_after(DRAIN):
            while True:
                busy = [t for s in UNFINISHED for t in await client.get_tasks_by_status(s)]
                plans = [await client.get_execution_plan(plan_id) for plan_id in load.plans]
                if not busy and all(p is not None and p.status in PLAN_FINAL for p in plans):
                    return
                # The PlanExecutor's feed is the broadcast actor's one internal subscriber.
                if (await client.runtime.statistics()).broadcast.internal:
                    feedless_since = None
                elif feedless_since is None:
                    feedless_since = anyio.current_time()
                elif anyio.current_time() - feedless_since > FEEDLESS:
                    raise AssertionError(
                        "the PlanExecutor's feed is gone (a stale Unsubscribe closed it?), "
                        "so the plans stopped moving"
                    )
                await anyio.sleep(0.02)
    except TimeoutError:
        left = [(t.id, t.task_type, t.status.value) for t in busy]
        raise AssertionError(
            f"not drained in {DRAIN:g} s: tasks {left}, plans {[p and p.status for p in plans]}"
        ) from None


# -- every kind of operation -----------------------------------------------------------------


async def serve_everything(runtime: Runtime, client: OrchestrationClient, load: Load) -> None:
    """One of each kind of operation, through every actor; each must simply work."""
    # Tasks and claims (the TaskManager; storage behind it).
    task_id = await client.create_task(SWEEP_TYPE, {"sweep": True})
    claim = await client.claim_task("sweeper", SWEEP_TYPE, lease=SWEEP_LEASE, wait=5)
    assert claim is not None
    assert claim.task.id == task_id
    await client.start_task(claim.lease)
    await client.heartbeat(claim.lease)
    await client.report_progress(claim.lease, {"done": 1}, phase="sweep")
    done = await client.complete_task(claim.lease, {"swept": True})
    assert done.status is TaskStatus.COMPLETED
    assert [run.status for run in await client.get_runs(task_id)] == [RunStatus.COMPLETED]
    assert task_id in {t.id for t in await every_task(client, TaskStatus.COMPLETED)}
    cancelled = await client.create_task(SWEEP_TYPE)
    assert (await client.cancel_task(cancelled, reason="sweep")).status is TaskStatus.CANCELLED
    assert await client.delete_task(cancelled)
    assert await client.get_task(cancelled) is None
    manual = await client.create_task(SWEEP_TYPE)
    assert await client.update_task_status(manual, "running")
    assert await client.update_task_status(manual, "completed", result={"by": "hand"})
    failing = await client.create_task(SWEEP_TYPE, max_retries=0)
    claim = await client.claim_task("sweeper", SWEEP_TYPE, lease=SWEEP_LEASE)
    assert claim is not None
    failed = await client.fail_task(claim.lease, "on purpose")
    assert (failed.id, failed.status) == (failing, TaskStatus.FAILED)
    # Workers (the WorkerRegistry).
    await client.register_worker("sweeper", "sweeper", [SWEEP_TYPE])
    assert await client.update_worker_heartbeat("sweeper")
    worker = await client.get_worker("sweeper")
    assert worker is not None
    assert worker.status is WorkerStatus.ACTIVE
    assert "sweeper" in {w.id for w in await client.get_active_workers()}
    assert await client.unregister_worker("sweeper")
    # Events (storage and broadcast).
    async with client.subscribe("sweep.*") as live:
        published = await client.publish("sweep.done", {"ok": True})
        with anyio.fail_after(5):
            received = await live.receive()
    assert received.seq == published.seq
    assert [e.seq for e in await client.read_events(published.seq - 1, limit=1)] == [published.seq]
    assert await client.last_seq() >= published.seq
    # The planning queue and plans (the PlanExecutor): run by the load's workers.
    request = await client.queue_planning_request("sweep plan")
    taken = await client.claim_planning_request("sweep-planner")
    assert taken is not None
    assert taken.id == request.id
    plan_id = await client.create_execution_plan(
        plan_data("sweep plan"), planning_task_id=request.id
    )
    assert await client.mark_plan_execution_started(plan_id)
    assert await client.get_execution_plan_status_cached(plan_id) == "executing"
    load.plans.append(plan_id)
    # Schedules (the Scheduler, which asks the TaskManager for the slot's task).
    async with client.subscribe("schedule.fired") as fired:
        start = datetime.now(UTC) + timedelta(seconds=0.1)
        await client.create_schedule("sweep", 3600.0, SWEEP_TYPE, start_at=start)
        with anyio.fail_after(5):
            slot = await fired.receive()
    assert slot.task_id is not None
    await client.cancel_task(slot.task_id, reason="sweep")  # nobody takes sweeps
    assert (await client.pause_schedule("sweep")).paused
    swept = await client.get_schedule("sweep")
    assert swept is not None
    assert (swept.fired, swept.last_task_id) == (1, slot.task_id)
    assert await client.delete_schedule("sweep")
    stats = await runtime.statistics()
    assert set(stats.mailboxes) == set(ACTORS)


# -- the tests -------------------------------------------------------------------------------


def seed() -> int:
    return int(os.environ.get("HIVE_RELIABILITY_SEED", "0")) or random.randrange(2**32)


async def test_every_actor_of_the_runtime_is_covered() -> None:
    """The fault tests are parametrised over HANDLERS: it must name every actor there is."""
    async with Runtime.open(":memory:") as runtime:
        actors = set((await runtime.statistics()).restarts)
    assert actors == set(HANDLERS), "add the new actor's handler to HANDLERS"
    for handlers in HANDLERS.values():
        for handler in handlers:
            assert callable(getattr(handler.cls, handler.method, None)), handler


async def check_served(client: OrchestrationClient, load: Load, *, reopened: bool) -> list[str]:
    """After the load: everything acknowledged is there and completed, the audit is clean.
    Returns the audit's problems."""
    events = await read_log(client)
    ledger, tasks, runs, problems = await audit_tasks(client, events)
    jobs = {t.id: t for t in tasks.values() if t.task_type == JOB_TYPE}
    assert load.attempted == set(load.acknowledged), "a create was never acknowledged"
    assert set(jobs) == set(load.acknowledged.values()), "a task lost, or one extra"
    keys = Counter(t.idempotency_key for t in jobs.values())
    assert set(keys) == load.attempted
    assert max(keys.values()) == 1, "two tasks for one key"
    for key, task_id in load.acknowledged.items():
        assert jobs[task_id].idempotency_key == key
    statuses = Counter(t.status for t in tasks.values() if t.task_type != SWEEP_TYPE)
    assert set(statuses) == {TaskStatus.COMPLETED}, statuses
    assert all(ledger.completed[task_id] == 1 for task_id in jobs)
    assert max(load.completed.values(), default=0) <= 1, "a task completed twice"
    for plan_id in load.plans:
        plan = await client.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.status is PlanStatus.COMPLETED, (plan_id, plan.status, plan.error)
        subs = [t for t in tasks.values() if t.plan_id == plan_id]
        assert len(subs) == SUBTASKS, (plan_id, len(subs))
    if reopened:
        assert not [t for t in tasks.values() if t.status in HOLDING]
        assert not [r for rs in runs.values() for r in rs if r.status is RunStatus.ASSIGNED]
    return problems


@pytest.mark.parametrize("actor", ACTORS)
async def test_a_crashing_actor_is_restarted_and_nothing_acknowledged_is_lost(
    actor: str,
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    await crash_under_load(actor, db_path, monkeypatch, record_property, shots=2)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a long variant: past the suite's 300 s (pyproject.toml)
@pytest.mark.parametrize("actor", ACTORS)
async def test_an_actor_crashing_again_and_again_is_restarted_and_loses_nothing(
    actor: str,
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    """Five crashes at random points (the most the default intensity allows), over more
    load."""
    await crash_under_load(actor, db_path, monkeypatch, record_property, shots=5, spread=200)


async def crash_under_load(
    actor: str,
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
    *,
    shots: int,
    spread: int = 20,
) -> None:
    """The first shot hits a message a client asked, the others any message, each after
    up to ``spread`` more calls of the handler."""
    chosen = seed()
    record_property("seed", chosen)
    rng = random.Random(chosen)
    aimed = [Shot(asked=True, skip=rng.randrange(3))]
    aimed += [Shot(asked=False, skip=rng.randrange(spread)) for _ in range(shots - 1)]
    fault = Fault(actor, aimed)
    install(monkeypatch, fault)
    load = Load(rng=rng)
    try:
        with anyio.fail_after(SAFETY):
            async with Runtime.open(db_path, config=CONFIG) as runtime:
                client = runtime.client(source_agent="auditor")
                with load.halt:
                    async with anyio.create_task_group() as listeners:
                        listeners.start_soon(
                            guarded, load, "follower", partial(follower, client, load)
                        )
                        listeners.start_soon(
                            guarded, load, "watcher", partial(watcher, runtime, load)
                        )
                        async with anyio.create_task_group() as tg:
                            start_load(tg, runtime, load)
                            await anyio.sleep(rng.uniform(0.05, 0.15))
                            fault.armed = True
                            with anyio.fail_after(10 * shots):
                                await fault.spent.wait()
                            await anyio.sleep(0.1)  # the load goes on past the restarts
                            await serve_everything(runtime, client, load)
                            load.stop_producers.set()
                            await drained(client, load)
                            load.stop_workers.set()
                        await client.publish("load.end")
                assert load.errors == []
                assert not load.halt.cancelled_caught
                stats = await runtime.statistics()
                problems = await check_served(client, load, reopened=False)
                events = await read_log(client)
            async with Runtime.open(db_path, config=CONFIG) as runtime:
                client = runtime.client(source_agent="auditor")
                after = await check_served(client, load, reopened=True)
    except BaseException:
        print(f"\nseed: {chosen} (HIVE_RELIABILITY_SEED={chosen} replays it)")
        raise

    # The asker of the faulted message was told at once, with the cause.
    first = fault.fired[0]
    assert first.asked
    assert first.answered, "the asker of the faulted message got no answer"
    assert isinstance(first.outcome, ActorFailedError), first.outcome
    assert first.outcome.actor == actor
    assert isinstance(first.outcome.__cause__, InjectedFault)
    answered_in = first.answered_at - first.at
    assert answered_in < PROMPT
    # Callers saw crashes only from the fault on, and only of actors that restarted.
    assert load.failures, "no caller saw the crash"
    assert min(f.at for f in load.failures) >= first.at
    assert {f.actor for f in load.failures} <= {a for a, n in stats.restarts.items() if n}
    # Restarted once per fault; every restart logged, each caused by the fault.
    assert len(fault.fired) == shots
    assert stats.restarts[actor] == shots
    restarted = [e for e in events if e.type == "actor.restarted"]
    assert all(MARK in str(e.data["error"]) for e in restarted), [e.data for e in restarted]
    # A restart event is told to the storage actor: one in a batch the fault hit is lost.
    lost = Counter(
        str(op.event.data["actor"])
        for fired in fault.fired
        for write in fired.messages
        if isinstance(write, Write)
        for op in write.ops
        if isinstance(op, AppendEvent) and op.event.type == "actor.restarted"
    )
    logged = Counter(str(e.data["actor"]) for e in restarted)
    assert {a: n for a, n in stats.restarts.items() if n} == dict(logged + lost)
    # Audited, before and after reopening.
    assert problems == []
    assert after == []
    # Subscribers: the follower saw the whole log once, in order; the watcher went on.
    assert load.followed[-1].type == "load.end"
    assert [(e.seq, e.type) for e in load.followed] == [(e.seq, e.type) for e in events][
        : len(load.followed)
    ]
    assert [e.seq for e in load.followed] == list(range(1, load.followed[-1].seq + 1))
    if actor != "broadcast":
        assert load.closed_under == 0, "a subscription ended while the runtime went on"
    assert load.watched[-1][1].type == "load.end"
    assert any(at > fault.fired[-1].at for at, e in load.watched if e.type == "load.tick")
    print(
        f"\n{actor} (seed {chosen}): asker answered in {answered_in * 1000:.2f} ms; "
        f"restarts {stats.restarts}; callers saw {len(load.failures)} ActorFailedError; "
        f"{len(load.acknowledged)} creates, {len(load.plans)} plans, {len(events)} events; "
        f"watcher lagged {load.lags}x, follower resumed {load.reopened}x, "
        f"leases dropped {load.dropped}, subscriptions closed under them {load.closed_under}"
    )
    record_property("answered_in_ms", round(answered_in * 1000, 3))


@pytest.mark.parametrize("actor", ACTORS)
async def test_a_fault_past_the_restart_limit_stops_the_runtime_and_a_reopen_recovers(
    actor: str,
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    chosen = seed()
    record_property("seed", chosen)
    rng = random.Random(chosen)
    fault = Fault(actor, [], forever=True)
    install(monkeypatch, fault)
    config = RuntimeConfig(
        retry_backoff=0.01, retry_backoff_max=0.05, max_restarts=2, restart_window=10.0
    )
    load = Load(rng=rng, stop_expected=True)
    failure: RuntimeFailedError | None = None
    armed_at = stopped_at = 0.0
    try:
        with anyio.fail_after(SAFETY):
            try:
                async with Runtime.open(db_path, config=config) as runtime:
                    with load.halt:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(
                                guarded,
                                load,
                                "follower",
                                partial(follower, runtime.client(source_agent="f"), load),
                            )
                            tg.start_soon(guarded, load, "watcher", partial(watcher, runtime, load))
                            start_load(tg, runtime, load)
                            await anyio.sleep(rng.uniform(0.1, 0.2))
                            armed_at = anyio.current_time()
                            fault.armed = True
                            await anyio.sleep_forever()  # the runtime must end this block
            except RuntimeFailedError as exc:
                failure = exc
            stopped_at = anyio.current_time()
            fault.armed = False
            assert load.errors == []
            assert failure is not None, "the runtime did not stop"
            # Reopened: everything acknowledged is there; what was held went back.
            async with Runtime.open(db_path, config=CONFIG) as runtime:
                client = runtime.client(source_agent="auditor")
                events = await read_log(client)
                _, tasks, _, problems = await audit_tasks(client, events)
                assert problems == []
                for key, task_id in load.acknowledged.items():
                    task = tasks.get(task_id)
                    assert task is not None, f"acknowledged task {task_id} ({key}) is lost"
                    assert task.idempotency_key == key
                for task_id in load.completed:
                    assert tasks[task_id].status is TaskStatus.COMPLETED
                assert not [t for t in tasks.values() if t.status in HOLDING]
                recovered = [
                    e
                    for e in events
                    if e.type == "task.retrying" and e.data["reason"] == "recovered"
                ]
                # Then everything runs to its end: the plans and every task.
                # A plan created just before the stop was never started by the load (its
                # start is the load's next call): start it now, as its app would.
                for plan_id in load.plans:
                    plan = await client.get_execution_plan(plan_id)
                    if plan is not None and plan.status is PlanStatus.DRAFT:
                        assert await client.mark_plan_execution_started(plan_id)
                rerun = Load(rng=rng, plans=list(load.plans))
                with rerun.halt:
                    async with anyio.create_task_group() as tg:
                        start_load(tg, runtime, rerun, producers=False)
                        await drained(client, rerun)
                        rerun.stop_workers.set()
                assert rerun.errors == []
                final, tasks, _, problems = await audit_tasks(client, await read_log(client))
                assert problems == []
                assert {t.status for t in tasks.values()} <= {TaskStatus.COMPLETED}
                assert all(final.completed[task_id] == 1 for task_id in tasks)
                for plan_id in load.plans:
                    plan = await client.get_execution_plan(plan_id)
                    assert plan is not None
                    assert plan.status is PlanStatus.COMPLETED
    except BaseException:
        print(f"\nseed: {chosen} (HIVE_RELIABILITY_SEED={chosen} replays it)")
        raise

    # The cause: the fault, in this actor (or in one its crashes took down with it), never
    # an actor that crashed only because the failing one stopped.
    chain = causes(failure)
    assert caused_by_fault(failure), [repr(e) for e in chain]
    assert actor in {getattr(e, "actor", None) for e in chain}, chain
    assert len(fault.fired) > config.max_restarts
    # Callers were answered with the crash or the stop, none by a deadline.
    assert load.failures or load.stopped
    print(
        f"\n{actor} (seed {chosen}): stopped {stopped_at - armed_at:.3f} s after the fault, "
        f"by {failure!r}; {len(fault.fired)} crashes injected; callers saw "
        f"{len(load.failures)} ActorFailedError, {load.stopped} RuntimeStoppedError; "
        f"{len(load.acknowledged)} acknowledged creates, {len(load.completed)} completions, "
        f"{len(recovered)} tasks recovered on reopen"
    )
    record_property("stopped_in_s", round(stopped_at - armed_at, 3))


# -- bugs these tests found, kept fixed ----------------------------------------------------


async def test_a_stale_unsubscribe_does_not_close_a_subscription_after_a_restart(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two subscribers lag when the broadcast actor crashes. B subscribes again first; then
    A closes its broken subscription, which tells ``Unsubscribe(A's old id)``. Were ids
    numbered from 1 in each incarnation, B's new subscription would have A's old id and be
    closed instead, its stream ending as if the runtime had stopped (and the PlanExecutor's
    feed, hit the same way, would stop for good). The runtime numbers subscriptions across
    restarts, so B receives on."""
    fault = Fault("broadcast", [Shot(asked=True, skip=0)])
    install(monkeypatch, fault)
    async with Runtime.open(db_path, config=CONFIG) as runtime, runtime.subscribe("*") as a:
        async with runtime.subscribe("*") as b:
            fault.armed = True
            token = CLIENT.set(True)  # this ask is the one the fault hits
            try:
                with pytest.raises(ActorFailedError):
                    await runtime.statistics()
            finally:
                CLIENT.reset(token)
            # The PlanExecutor's feed subscribes again first: id 1 in the new incarnation.
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(5), pytest.raises(SubscriberLaggedError):
                await b.receive()
        async with runtime.subscribe("*") as b_again:
            with anyio.fail_after(5), pytest.raises(SubscriberLaggedError):
                await a.receive()
            a.close()  # as leaving its block would; A's old id is b_again's now
            published = await runtime.publish("after.restart")
            with anyio.fail_after(5):
                received = await b_again.receive()  # RuntimeStoppedError if A closed it
                while received.seq < published.seq:  # the actor.restarted event may come first
                    received = await b_again.receive()
            assert received.seq == published.seq


async def test_the_runtime_failure_names_the_actor_past_its_limit_and_its_fault(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage actor crashes on a read, past its restart intensity (``max_restarts=0``),
    while the TaskManager's write for a ``create_task`` waits in its mailbox. Giving up, the
    supervisor discards that mailbox, so the write fails with RuntimeStoppedError and the
    TaskManager crashes on it (CommitOutcomeUnknown). That crash is a consequence of the
    stop: the supervisor neither restarts nor counts it (``Supervisor._failed``), so
    ``Runtime.open`` raises the storage actor's RuntimeFailedError, from the fault."""
    gate = anyio.Event()
    original = StorageActor._query

    async def query(self: StorageActor, message: object) -> object:
        if isinstance(message, ReadEvents):
            await gate.wait()
            raise InjectedFault(f"{MARK} in a read")
        return await original(self, message)  # type: ignore[arg-type]

    monkeypatch.setattr(StorageActor, "_query", query)
    config = RuntimeConfig(max_restarts=0)
    with anyio.fail_after(10), pytest.raises(RuntimeFailedError) as caught:  # noqa: PT012
        async with Runtime.open(db_path, config=config) as runtime, anyio.create_task_group() as tg:
            tg.start_soon(partial(suppress_hive, runtime.read_events))
            await anyio.wait_all_tasks_blocked()  # the storage actor is in the read
            tg.start_soon(partial(suppress_hive, partial(runtime.create_task, JOB_TYPE)))
            await anyio.wait_all_tasks_blocked()  # its write waits in the storage mailbox
            gate.set()
            await anyio.sleep_forever()
    assert caught.value.actor == "storage"
    assert caused_by_fault(caught.value)


async def suppress_hive(call: Callable[[], Awaitable[object]]) -> None:
    with suppress(HiveError):
        await call()


async def test_a_claim_whose_wait_ends_in_a_batch_that_crashes_is_answered_at_once(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parked claim whose wait runs out is taken off the parked claims by the next batch,
    which answers it (no task) with the rest of its answers, after its commit. Were that
    batch to crash (here on the alarm's wake that the wait's deadline sent), the claim
    would be in neither of the places a crash answers: not the batch's own messages (the
    actor's loop fails those) and no longer parked (the TaskManager fails those as it
    stops). Its asker waited for its whole deadline (``wait`` + ``ask_timeout``, 30 s):
    under load ``test_a_crashing_actor_is_restarted_and_nothing_acknowledged_is_lost[tasks]``
    saw a worker's ``claim_task(wait=0.05)`` hang so, and the worker declared offline. It
    is answered at once with the crash, as every asker is."""
    ended: list[object] = []  # the batch that took the claim off, when it did
    fired: list[object] = []
    settle_due, handle = TaskManager._settle_due, TaskManager._handle

    def settling(self: TaskManager, work: Any, now: datetime, batch: Any = ()) -> None:
        answers = len(work.answers)
        settle_due(self, work, now, batch)
        if len(work.answers) > answers:
            ended.append(work)

    async def handling(self: TaskManager, message: Any, work: Any, now: datetime) -> object:
        if not fired and any(work is batch for batch in ended):
            fired.append(message)
            raise InjectedFault(f"{MARK} in the batch that ended a wait")
        return await handle(self, message, work, now)

    monkeypatch.setattr(TaskManager, "_settle_due", settling)
    monkeypatch.setattr(TaskManager, "_handle", handling)
    # A short ask deadline: the bug's failure is a RequestTimeoutError in 3 s.
    config = RuntimeConfig(ask_timeout=3.0)
    async with Runtime.open(db_path, config=config) as runtime:
        with anyio.fail_after(SAFETY), pytest.raises(ActorFailedError) as caught:
            await runtime.claim_task("w", ["nothing"], wait=0.2)
        assert fired, "the batch that ended the wait did not crash"
        assert caught.value.actor == "tasks"
        assert caused_by_fault(caught.value)
        # Restarted: a claim is served again.
        task_id = await runtime.create_task("something")
        claim = await runtime.claim_task("w", ["something"], wait=1)
        assert claim is not None
        assert claim.task.id == task_id
        assert (await runtime.statistics()).restarts["tasks"] == 1
