"""The message-sending API: OrchestrationClient (owning or bound), its events (live,
replay-then-live, callbacks), the seeds' event classes and protocols. Real SQLite files,
both backends."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

import hive_orchestration
from hive_orchestration import (
    DEFAULT_DB_PATH,
    Event,
    EventProtocol,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    OrchestrationClient,
    Runtime,
    RuntimeStoppedError,
    Task,
    TaskCancelledEvent,
    TaskCompletedEvent,
    TaskCreatedEvent,
    TaskFailedEvent,
    TaskOperations,
    TaskStartedEvent,
    TaskStatus,
    TopicRegistry,
    UnifiedEvent,
    UnifiedEventType,
    WorkerHeartbeatEvent,
    WorkerOfflineEvent,
    WorkerOperations,
    WorkerRegisteredEvent,
    WorkerStatus,
    create_task_event,
)
from hive_orchestration.events import RUNTIME_EVENT_TYPES, is_runtime_event
from hive_orchestration.storage import readers

pytestmark = pytest.mark.anyio

SOON = 10.0


async def wait_until(predicate: Any) -> None:
    with anyio.fail_after(SOON):
        while not predicate():  # noqa: ASYNC110 - polls state the callbacks fill
            await anyio.sleep(0.005)


# -- the seeds' tests, as written ---------------------------------------------------------


async def test_seed_client_create_task() -> None:
    async with OrchestrationClient(db_path=":memory:") as client:
        task_id = await client.create_task(task_type="deployment", payload={"script": "deploy.sh"})
        task = await client.get_task(task_id)
        assert task is not None
        assert task.type == "deployment"
        assert task.task_type == "deployment"
        assert task.status == TaskStatus.PENDING
        assert task.payload == {"script": "deploy.sh"}


@pytest.mark.parametrize("style", ["sync", "async"])
async def test_seed_client_task_lifecycle(style: str) -> None:
    async with OrchestrationClient(db_path=":memory:") as client:
        events: list[Event] = []

        async def handler(event: Event) -> None:
            events.append(event)

        callback = events.append if style == "sync" else handler
        await client.subscribe_to_task_events("*", callback)

        task_id = await client.create_task("deployment", {})
        await client.update_task_status(task_id, "running")
        await client.update_task_status(task_id, "completed")

        # And nothing more arrives: callbacks get events in log order, so anything more
        # for these calls would come before the next task's task.created.
        marker = await client.create_task("marker", {})
        await wait_until(lambda: any(e.task_id == marker for e in events))
        assert [(e.event_type, e.task_id) for e in events] == [
            ("task.created", task_id),
            ("task.started", task_id),
            ("task.completed", task_id),
            ("task.created", marker),
        ]
        task = await client.get_task(task_id)
        assert task is not None
        assert task.status == TaskStatus.COMPLETED


async def test_seed_full_workflow_with_result(db_path: str) -> None:
    async with OrchestrationClient(db_path=db_path) as client:
        task_id = await client.create_task(
            task_type="deployment",
            payload={"script": "deploy.sh", "env": "production", "services": ["api", "worker"]},
        )
        seen: list[str] = []
        await client.subscribe_to_task_events(task_id, lambda e: seen.append(e.event_type))
        other = await client.create_task("other", {})
        await client.update_task_status(other, TaskStatus.RUNNING)
        await client.update_task_status(task_id, TaskStatus.RUNNING)
        await client.update_task_status(
            task_id, TaskStatus.COMPLETED, result={"deployed_services": ["api", "worker"]}
        )
        task = await client.get_task(task_id)
        assert task is not None
        assert task.result == {"deployed_services": ["api", "worker"]}
        # Callbacks get events in log order: the other task's, all logged before this
        # task's completion, would have come before it.
        await wait_until(lambda: "task.completed" in seen)
        assert seen == ["task.started", "task.completed"]  # only this task's events


# -- lifetime -------------------------------------------------------------------------------


async def test_an_unopened_client_says_how_to_open_it() -> None:
    client = OrchestrationClient(db_path=":memory:")
    with pytest.raises(RuntimeStoppedError, match="async with OrchestrationClient"):
        await client.create_task("x", {})


async def test_an_owning_client_stops_its_runtime_and_keeps_the_data(db_path: str) -> None:
    async with OrchestrationClient(db_path=db_path) as client:
        assert client.db_path == db_path
        task_id = await client.create_task("deployment", {"n": 1})
    with pytest.raises(RuntimeStoppedError):
        await client.get_task(task_id)
    with pytest.raises(RuntimeStoppedError):
        async with client:
            pass
    # The runtime is gone (its claim released): another can open the file and see the task.
    async with OrchestrationClient(db_path=db_path) as again:
        task = await again.get_task(task_id)
        assert task is not None
        assert task.payload == {"n": 1}


async def test_the_default_database_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVE_ORCHESTRATION_DB_PATH", raising=False)
    assert OrchestrationClient().db_path == str(Path.cwd() / DEFAULT_DB_PATH)


async def test_an_error_in_the_block_propagates_and_closes_the_runtime(db_path: str) -> None:
    async def fail() -> None:
        async with OrchestrationClient(db_path=db_path) as client:
            await client.create_task("x", {})
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail()
    async with Runtime.open(db_path) as runtime:  # the claim was released
        assert len(await runtime.get_tasks_by_status("queued")) == 1


async def test_a_bound_client_lives_with_its_runtime(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="ai-planner")
        assert client.runtime is runtime
        assert client.db_path == runtime.path
        async with client:
            await client.create_task("x", {})
        with pytest.raises(RuntimeStoppedError, match="closed"):
            await client.create_task("x", {})
        # The runtime itself goes on.
        assert len(await runtime.get_tasks_by_status("queued")) == 1
    with pytest.raises(RuntimeStoppedError):
        await runtime.client().create_task("y", {})


async def test_bad_client_arguments_are_refused(db_path: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        OrchestrationClient(source_agent="")
    assert info.value.field == "source_agent"
    async with Runtime.open(db_path) as runtime:
        with pytest.raises(InvalidInputError) as info:
            runtime.client(correlation_id=7)  # type: ignore[arg-type]
        assert info.value.field == "correlation_id"
        client = runtime.client()
        with pytest.raises(InvalidInputError) as info:
            await client.subscribe_to_task_events("*", "not callable")  # type: ignore[arg-type]
        assert info.value.field == "callback"
        with pytest.raises(InvalidInputError) as info:
            client.events(after=-1)
        assert info.value.field == "after"


# -- who is calling: source agent and correlation id -----------------------------------------


async def test_source_agent_and_correlation_id_reach_every_event(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        planner = runtime.client(source_agent="ai-planner", correlation_id="workflow-123")
        deployer = runtime.client(source_agent="ai-deployer")
        task_id = await planner.create_task("deployment", {})
        task = await planner.get_task(task_id)
        assert task is not None
        assert (task.source_agent, task.correlation_id) == ("ai-planner", "workflow-123")
        await deployer.update_task_status(task_id, "running")
        await deployer.update_task_status(task_id, "completed")
        published = await planner.publish("review.completed", {"score": 9}, task_id=task_id)
        events = await runtime.read_events()
        assert [(e.type, e.source, e.correlation_id) for e in events] == [
            ("task.created", "ai-planner", "workflow-123"),
            ("task.started", "ai-deployer", "workflow-123"),
            ("task.completed", "ai-deployer", "workflow-123"),
            ("review.completed", "ai-planner", "workflow-123"),
        ]
        assert published == events[-1]
        assert await planner.last_seq() == published.seq == 4
        # A call may name its own; bind() derives a client with other defaults.
        other = await planner.create_task("x", {}, correlation_id="other", source_agent="me")
        bound = planner.bind(correlation_id="wf-2")
        assert (bound.source_agent, bound.correlation_id) == ("ai-planner", "wf-2")
        third = await bound.create_task("x", {})
        tasks = {t.id: t for t in await runtime.get_tasks_by_status("queued")}
        assert (tasks[other].correlation_id, tasks[other].source_agent) == ("other", "me")
        assert (tasks[third].correlation_id, tasks[third].source_agent) == ("wf-2", "ai-planner")


async def test_the_client_stamps_plans_and_planning_requests(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="ai-planner")
        request = await client.queue_planning_request("ship it")
        assert request.requestor == "ai-planner"
        plan_id = await client.create_execution_plan(
            {"subtasks": [{"id": "a", "task_type": "build"}]}, planning_task_id=request.id
        )
        await client.approve_plan(plan_id)
        events = await runtime.read_events()
        plan_events = [e for e in events if e.type.startswith("plan.")]
        assert [e.type for e in plan_events] == ["plan.created", "plan.approved"]
        assert {e.source for e in plan_events} == {"ai-planner"}


# -- publishing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type", ["task.completed", "plan.completed", "worker.offline", "actor.restarted"]
)
async def test_nobody_but_the_runtime_publishes_its_events(db_path: str, event_type: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        for publish in (runtime.publish, client.publish):
            with pytest.raises(InvalidInputError, match="runtime's own namespace") as info:
                await publish(event_type, {"task_id": "t"})
            assert info.value.field == "event_type"
        assert await runtime.read_events() == []  # nothing half-written


async def test_publishing_a_lifecycle_event_makes_it_true(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="agent-7")
        done, failed, cancelled = [await client.create_task("x", {}) for _ in range(3)]
        await client.publish_task_event(TaskStartedEvent(task_id=done, worker_id="w1"))
        await client.publish_task_event(TaskCompletedEvent(task_id=done, result={"ok": True}))
        await client.publish_task_event(TaskStartedEvent(task_id=failed))
        await client.publish_task_event(TaskFailedEvent(task_id=failed, error="boom"))
        await client.publish_task_event(TaskCancelledEvent(task_id=cancelled, reason="no"))
        tasks = {t: await client.get_task(t) for t in (done, failed, cancelled)}
        assert tasks[done] is not None
        assert tasks[done].status == TaskStatus.COMPLETED
        assert tasks[done].result == {"ok": True}
        assert tasks[done].assigned_worker == "w1"
        assert tasks[failed] is not None
        assert tasks[failed].error == "boom"
        assert tasks[cancelled] is not None
        assert tasks[cancelled].status == TaskStatus.CANCELLED
        types = [(e.type, e.source) for e in await runtime.read_events() if e.task_id == done]
        assert types == [
            ("task.created", "agent-7"),
            ("task.started", "agent-7"),
            ("task.completed", "agent-7"),
        ]
        # Saying it again is a no-op; saying something else is refused: the state
        # machine still rules, and a finished task does not change.
        seq = await runtime.last_seq()
        await client.publish_task_event(TaskCompletedEvent(task_id=done, result={"ok": True}))
        assert await runtime.last_seq() == seq
        with pytest.raises(IllegalTransitionError):
            await client.publish_task_event(TaskCompletedEvent(task_id=done, result={"ok": 0}))
        with pytest.raises(IllegalTransitionError):
            await client.publish_task_event(TaskStartedEvent(task_id=failed))
        queued = await client.create_task("x", {})
        with pytest.raises(InvalidInputError, match="create_task") as info:
            await client.publish_task_event(
                TaskCreatedEvent(task_id=queued, task_type="x", payload={})
            )
        assert info.value.field == "event"
        with pytest.raises(InvalidInputError) as info:
            await client.publish_task_event({"event_type": "task.completed"})  # type: ignore[arg-type]
        assert info.value.field == "event"


async def test_worker_events_register_heartbeat_and_take_offline(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        await client.publish_event(
            WorkerRegisteredEvent(worker_id="w1", role="deployer", capabilities=("deploy",))
        )
        worker = await client.get_worker("w1")
        assert worker is not None
        assert worker.capabilities == ("deploy",)
        await client.publish_event(WorkerHeartbeatEvent(worker_id="w1", status="busy"))
        worker = await client.get_worker("w1")
        assert worker is not None
        assert worker.status == WorkerStatus.BUSY
        await client.publish_event(WorkerOfflineEvent(worker_id="w1"))
        assert await client.get_active_workers() == []
        with pytest.raises(NotFoundError):
            await client.publish_event(WorkerHeartbeatEvent(worker_id="nobody"))


async def test_unified_events(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="orchestrator", correlation_id="wf-9")
        task_id = await client.create_task("review", {})
        event = create_task_event(
            UnifiedEventType.REVIEW_COMPLETED,
            task_id,
            correlation_id="workflow-123",
            source_agent="ai-reviewer",
            additional_data={"review_score": 92},
        )
        logged = await client.publish_event(event)
        assert logged is not None
        assert (logged.event_type, logged.source_agent) == ("review.completed", "ai-reviewer")
        assert logged.correlation_id == "workflow-123"
        assert logged.task_id == task_id
        assert logged.payload == {"task_id": task_id, "review_score": 92}
        # No correlation id on the event: the client's.
        plain = await client.publish_event(UnifiedEvent(event_type="deployment.started"))
        assert plain is not None
        assert plain.correlation_id == "wf-9"
        assert plain.source == "orchestrator"
        # A unified lifecycle event is made true, like the typed ones.
        await client.update_task_status(task_id, "running")
        completed = create_task_event(
            UnifiedEventType.TASK_COMPLETED, task_id, additional_data={"result": {"ok": 1}}
        )
        assert await client.publish_event(completed) is None
        task = await client.get_task(task_id)
        assert task is not None
        assert task.status == TaskStatus.COMPLETED
        assert task.result == {"ok": 1}
        # The worker of a unified task.started: its payload's, else the event's own field.
        other = await client.create_task("review", {})
        started = UnifiedEvent(
            event_type=UnifiedEventType.TASK_STARTED, task_id=other, worker_id="w-7"
        )
        assert await client.publish_event(started) is None
        task = await client.get_task(other)
        assert task is not None
        assert (task.status, task.assigned_worker) == (TaskStatus.RUNNING, "w-7")
        (event,) = [e for e in await runtime.read_events(0) if e.type == "task.started"
                    and e.task_id == other]  # fmt: skip
        assert event.worker_id == "w-7"
        assert event.correlation_id == "wf-9"  # the task's
        with pytest.raises(InvalidInputError, match="runtime's own namespace"):
            await client.publish_event(UnifiedEvent(event_type="plan.completed"))
        # A UnifiedEvent is built by hand and msgspec does not check it then: a source
        # or worker of the wrong type is refused, not replaced by the client's default.
        for bad in ({"source_agent": []}, {"source_agent": ""}, {"worker_id": 7}):
            for kind, subject in (("app.done", None), (UnifiedEventType.TASK_STARTED, other)):
                with pytest.raises(InvalidInputError) as info:
                    await client.publish_event(
                        UnifiedEvent(event_type=kind, task_id=subject, **bad)  # type: ignore[arg-type]
                    )
                assert info.value.field == next(iter(bad))
        with pytest.raises(InvalidInputError) as info:
            await client.publish_event(
                UnifiedEvent(
                    event_type=UnifiedEventType.TASK_STARTED,
                    task_id=other,
                    payload={"worker_id": ""},
                )
            )
        assert info.value.field == "payload.worker_id"
        with pytest.raises(InvalidInputError) as info:
            create_task_event("review.completed", "")
        assert info.value.field == "task_id"


def test_unified_event_types_cover_every_event_the_runtime_publishes() -> None:
    # Every event type literal in the actors' source must be a member, so a new event
    # cannot be added without its UnifiedEventType.
    root = Path(hive_orchestration.__file__).parent
    literal = re.compile(r'"((?:task|run|worker|plan|planning|actor|retention|schedule)\.[a-z_]+)"')
    found: set[str] = set()
    for path in [
        *root.glob("actors/**/*.py"),
        root / "api" / "embedded.py",
        root / "api" / "ops" / "retention.py",
    ]:
        found.update(literal.findall(path.read_text()))
    found.update(f"planning.{status}" for status in ("failed", "cancelled"))  # f-string
    assert "task.completed" in found
    assert "plan.subtask_ready" in found
    members = {member.value for member in UnifiedEventType}
    assert found <= members, found - members
    assert found == RUNTIME_EVENT_TYPES
    assert all(is_runtime_event(t) for t in RUNTIME_EVENT_TYPES)
    assert not is_runtime_event("review.completed")
    assert UnifiedEventType.TASK_CREATED == "task.created"


# -- live events, replay-then-live, callbacks ------------------------------------------------


async def test_subscribe_filters_live_events(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        first = await client.create_task("x", {})
        async with client.subscribe("task.*", task_id=first) as events:
            second = await client.create_task("x", {})
            await client.update_task_status(second, "running")
            await client.update_task_status(first, "running")
            with anyio.fail_after(SOON):
                event = await events.receive()
        assert (event.type, event.task_id) == ("task.started", first)


async def test_events_replays_then_goes_live_without_gap_or_duplicate(db_path: str) -> None:
    """Every path of the stream, each made to happen rather than left to timing: events
    logged while the replay runs reach it twice (from the log and live) and are given
    once; it switches to live; a reader held back until the publisher has overrun its
    buffer lags, catches up from the log, and events logged meanwhile are given once
    again. The stream's counters prove that each path was taken."""
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="app")
        got: list[int] = []

        async def publish(count: int) -> None:
            for _ in range(count):
                await client.publish("job.step")

        async def read_until(seq: int) -> None:
            while not got or got[-1] < seq:
                with anyio.move_on_after(SOON):
                    got.append((await stream.receive()).seq)
                    continue
                logged = await client.last_seq()
                pytest.fail(f"the log holds {logged} events, the stream gave {got} and waits")

        async def go_live_then_read(skipped: int, count: int) -> None:
            """Let the stream finish its replay and wait on its subscription (skipping the
            live copies of what it replayed on the way: ``skipped`` in all by then), and
            only then publish ``count`` events: they must come live."""
            before, live = len(got), stream.live
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_until, got[-1] + count)
                with anyio.move_on_after(SOON):
                    while stream.skipped < skipped and len(got) == before:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                assert got[before:] == [], "the replay had given these already"
                assert stream.skipped == skipped, "the live copies of replayed events are missing"
                await publish(count)
            assert stream.live == live + count

        await publish(50)
        async with client.events(after=20, buffer=16) as stream:
            # 1. Logged while the replay runs: 51..60 reach the subscription (registered
            # before the replay began) and the log, where the replay finds them first.
            await read_until(25)
            await publish(10)
            await read_until(60)
            assert (stream.replayed, stream.live, stream.skipped) == (40, 0, 0)
            # 2. The switch to live, skipping the duplicates 51..60 on the way.
            await go_live_then_read(skipped=10, count=5)
            # 3. A lag: 40 events while the reader waits overrun its buffer of 16. The
            # broadcast actor handles messages in order: its statistics count the lag.
            lagged = (await runtime.statistics()).broadcast.lagged
            await publish(40)
            assert (await runtime.statistics()).broadcast.lagged == lagged + 1
            assert stream.lags == 0
            # 4. The reader resumes: what its buffer held, then the gap from the log...
            while stream.lags == 0:
                await read_until(got[-1] + 1)
            assert stream.live > 5  # (the buffered events came first, live)
            # ...with events logged meanwhile reaching it twice again; then live again.
            await publish(5)
            await read_until(110)
            await go_live_then_read(skipped=15, count=1)
        assert got == list(range(21, 112))  # every event once, in order
        assert stream.last_seq == 111
        assert stream.lags == 1
        assert stream.replayed + stream.live == len(got)


async def test_events_keep_up_with_a_concurrent_publisher(db_path: str) -> None:
    """A slow reader with a tiny buffer against a publisher running at full speed: however
    the two interleave, every event comes once, in order."""
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="app")
        for i in range(50):
            await client.publish("job.step", {"i": i})
        got: list[int] = []
        async with client.events(after=20, buffer=2) as stream, anyio.create_task_group() as tg:

            async def publish_more() -> None:
                for i in range(50, 150):
                    await client.publish("job.step", {"i": i})

            tg.start_soon(publish_more)
            with anyio.fail_after(SOON):
                async for event in stream:
                    got.append(event.seq)
                    if len(got) % 7 == 0:
                        await anyio.sleep(0.002)  # a slow reader
                    if event.seq == 150:
                        break
        assert got == list(range(21, 151))
        assert stream.last_seq == 150


async def test_events_from_now_and_with_filters(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        old = await client.create_task("x", {})
        async with client.events(pattern="task.*", task_id=old) as stream:
            new = await client.create_task("x", {})
            await client.update_task_status(new, "running")
            await client.update_task_status(old, "running")
            with anyio.fail_after(SOON):
                event = await stream.receive()
            assert (event.type, event.task_id) == ("task.started", old)
        # From the start, filtered by a data key as well as by type.
        async with client.events(after=0, pattern="task.*", task_type="x") as stream:
            with anyio.fail_after(SOON):
                replayed = [await stream.receive() for _ in range(4)]
        assert [e.type for e in replayed] == [
            "task.created",
            "task.created",
            "task.started",
            "task.started",
        ]


async def test_an_event_stream_ends_when_the_runtime_stops(db_path: str) -> None:
    got: list[Event] = []
    async with anyio.create_task_group() as tg, Runtime.open(db_path) as runtime:
        stream = runtime.client().events(after=0)
        await stream.open()

        async def read() -> None:
            async for event in stream:
                got.append(event)

        tg.start_soon(read)
        await runtime.publish("job.one")
        await wait_until(lambda: len(got) == 1)
    assert [e.type for e in got] == ["job.one"]
    with pytest.raises(RuntimeStoppedError):
        await stream.receive()


class Stepper:
    """Holds an event stream at each step of its open, replay and hand-over to live: before
    each call it makes to the runtime, while a storage reader has its read (opening its
    connection, as the first read of each reader does), and after the answer. The test
    lets it go on step by step, and stops the runtime with it held at the step it wants.
    """

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        #: Where the stream was held, in order.
        self.points: list[str] = []
        self._held = anyio.Event()
        self._go = anyio.Event()
        self._free = False
        for name in ("_open_subscription", "last_seq", "read_events"):
            monkeypatch.setattr(runtime, name, self._around(name, getattr(runtime, name)))
        open_reader = readers.ReaderPool._open

        async def reader_open(pool: readers.ReaderPool) -> Any:
            await self._hold("in a storage reader")
            return await open_reader(pool)

        monkeypatch.setattr(readers.ReaderPool, "_open", reader_open)

    def _around(self, name: str, call: Any) -> Any:
        async def held(*args: Any, **kwargs: Any) -> Any:
            await self._hold(f"before {name}")
            answer = await call(*args, **kwargs)
            await self._hold(f"after {name}")
            return answer

        return held

    async def _hold(self, point: str) -> None:
        if self._free:
            return
        self.points.append(point)
        go = self._go = anyio.Event()
        self._held.set()
        await go.wait()

    async def next(self) -> str:
        """Wait until the stream is held, and say where."""
        await self._held.wait()
        self._held = anyio.Event()
        return self.points[-1]

    def go(self) -> None:
        self._go.set()

    def free(self) -> None:
        """Hold nothing any more."""
        self._free = True
        self._go.set()


#: Where a stream is held, step by step, up to its live subscription: one that replays
#: the log from the start; one from now (nothing to replay); one that falls behind (a
#: buffer of 1 and three commits) and catches up from the log.
_STREAM_STEPS = {
    "replay": [
        "before _open_subscription",
        "after _open_subscription",
        "before read_events",
        "in a storage reader",
        "after read_events",  # the page with job.one
        "before read_events",
        "in a storage reader",
        "after read_events",  # the empty page: over to live
    ],
    "from now": [
        "before _open_subscription",
        "after _open_subscription",
        "before last_seq",
        "after last_seq",
    ],
    "lagging": [
        "before _open_subscription",
        "after _open_subscription",
        "before last_seq",
        "after last_seq",  # three commits are made here: the third one lags
        "before _open_subscription",  # subscribed again, after two live events
        "after _open_subscription",
        "before read_events",
        "in a storage reader",
        "after read_events",  # the page with job.three
        "before read_events",
        "in a storage reader",
        "after read_events",  # the empty page: over to live
    ],
}


@pytest.mark.parametrize(
    ("kind", "stop_at"),
    [(kind, stop) for kind, steps in _STREAM_STEPS.items() for stop in range(len(steps) + 1)],
)
async def test_an_event_stream_ends_when_the_runtime_stops_at_any_step(
    db_path: str, monkeypatch: pytest.MonkeyPatch, kind: str, stop_at: int
) -> None:
    """Stopped at each step of its open, replay and hand-over to live (or, past the last,
    once it reads live), a stream ends: its reader's ``async for`` finishes, and a read
    raises RuntimeStoppedError. A read a storage reader had taken when the runtime
    stopped once went unanswered, and the stream's reader waited forever."""
    steps = _STREAM_STEPS[kind]
    got: list[str] = []
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with Runtime.open(db_path) as runtime:
            if kind == "replay":
                await runtime.publish("job.one")
            stepper = Stepper(runtime, monkeypatch)
            stream = runtime.client().events(
                after=0 if kind == "replay" else None, buffer=1 if kind == "lagging" else None
            )

            async def read() -> None:
                async for event in stream:
                    got.append(event.type)
                ended.set()

            tg.start_soon(read)
            for step in steps[:stop_at]:
                assert await stepper.next() == step
                if step == "after last_seq" and kind == "lagging":
                    for name in ("job.one", "job.two", "job.three"):
                        await runtime.publish(name)  # one commit each
                stepper.go()
            if stop_at < len(steps):
                assert await stepper.next() == steps[stop_at]
            else:
                # Past the last step: reading live, every event given.
                expected = 1 if kind == "replay" else 3 if kind == "lagging" else 0
                await wait_until(lambda: len(got) == expected)
                await anyio.wait_all_tasks_blocked()
        # The runtime has stopped, with the stream held where the test wanted it.
        stepper.free()
        # Nothing can wake the stream's reader any more but what the stop did: it runs
        # until it ends, or waits for good (left waiting, it is cancelled and this fails).
        await anyio.wait_all_tasks_blocked()
        waiting = not ended.is_set()
        tg.cancel_scope.cancel()
    assert not waiting, f"the stream's reader still waits after the runtime stopped ({kind})"
    assert stepper.points == steps[: stop_at + 1]
    assert stream.lags == (1 if kind == "lagging" and stop_at >= 4 else 0)
    with pytest.raises(RuntimeStoppedError):
        await stream.receive()


async def test_callbacks_go_on_after_an_error_and_stop_when_cancelled(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        seen: list[int] = []

        def callback(event: Event) -> None:
            seen.append(event.seq)
            if event.seq == 2:
                raise ValueError("a bug in the app's callback")

        handle = await client.on_event("job.*", callback)
        for _ in range(3):
            await client.publish("job.step")
        await wait_until(lambda: len(seen) == 3)
        assert (handle.delivered, handle.errors, handle.last_seq) == (3, 1, 3)
        await handle.aclose()
        assert not handle.active
        # The runtime's word that nothing reaches it any more: its subscription is gone,
        # and the next event is delivered to no one. (The unsubscription, and a publish's
        # fan-out, are queued to the broadcast actor before they return, and it answers
        # the statistics after them.)
        before = (await runtime.statistics()).broadcast
        assert before.subscribers == 0
        await client.publish("job.step")
        after = (await runtime.statistics()).broadcast
        assert (after.published, after.delivered) == (before.published + 1, before.delivered)
        assert seen == [1, 2, 3]
        assert handle.delivered == 3


async def test_a_slow_callback_loses_nothing(db_path: str) -> None:
    config = hive_orchestration.RuntimeConfig(subscriber_buffer=4)
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client()
        seen: list[int] = []

        async def slow(event: Event) -> None:
            await anyio.sleep(0.001)
            seen.append(event.data["i"])  # type: ignore[arg-type]

        await client.on_event("job.*", slow)
        for i in range(100):
            await client.publish("job.step", {"i": i})
        await wait_until(lambda: len(seen) == 100)
        assert seen == list(range(100))


async def test_callbacks_stop_with_the_client_and_with_the_runtime(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        async with runtime.client() as client:
            handle = await client.on_event("*", lambda e: None)
            assert handle.active
        assert not handle.active
        forever = await runtime.client().on_event("*", lambda e: None)
    assert not forever.active


async def test_topic_registry_routes_by_pattern(db_path: str) -> None:
    registry = TopicRegistry()
    calls: list[tuple[str, str]] = []

    async def on_review(event: Event) -> None:
        calls.append(("review", event.type))

    registry.register("*", lambda e: calls.append(("all", e.type)))
    registry.register("review.*", on_review)
    registry.register("task.completed", lambda e: calls.append(("done", e.type)))
    assert registry.patterns == ["*", "review.*", "task.completed"]
    assert len(registry.handlers_for("review.completed")) == 2
    assert len(registry.handlers_for("deployment.started")) == 1
    with pytest.raises(InvalidInputError):
        registry.register("", on_review)
    with pytest.raises(InvalidInputError):
        registry.register("x", "nope")  # type: ignore[arg-type]

    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        await client.attach(registry, "review.*")
        await client.publish("deployment.started")  # not attached: "review.*" only
        await client.publish("review.completed")
        await wait_until(lambda: len(calls) == 2)
        assert calls == [("all", "review.completed"), ("review", "review.completed")]
    assert registry.unregister("*") == 1
    assert registry.patterns == ["review.*", "task.completed"]


# -- the protocols --------------------------------------------------------------------------


async def test_the_client_satisfies_the_seeds_protocols() -> None:
    async with OrchestrationClient(db_path=":memory:") as client:
        assert isinstance(client, TaskOperations)
        assert isinstance(client, WorkerOperations)
        assert isinstance(client, EventProtocol)


async def test_an_app_can_write_its_own_implementation() -> None:
    class InMemoryTasks:
        """A test double an app writes against the protocol (no runtime)."""

        def __init__(self) -> None:
            self.tasks: dict[str, Task] = {}

        async def create_task(
            self, task_type: str, payload: Mapping[str, object] | None = None
        ) -> str:
            return str(len(self.tasks))

        async def get_task(self, task_id: str) -> Task | None:
            return self.tasks.get(task_id)

        async def update_task_status(
            self,
            task_id: str,
            status: TaskStatus | str,
            metadata: Mapping[str, object] | None = None,
        ) -> bool:
            return False

        async def get_tasks_by_status(self, status: TaskStatus | str) -> list[Task]:
            return []

        async def get_queued_tasks(
            self, limit: int = 10, task_type: str | None = None
        ) -> list[Task]:
            return []

        async def get_pending_tasks(self) -> list[Task]:
            return []

        async def delete_task(self, task_id: str) -> bool:
            return False

    async def queen(tasks: TaskOperations) -> str:
        return await tasks.create_task("deployment", {})

    assert isinstance(InMemoryTasks(), TaskOperations)
    assert await queen(InMemoryTasks()) == "0"
    assert not isinstance(object(), TaskOperations)


async def test_read_events_filters_and_a_replay_with_a_bracket_glob(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(correlation_id="wf")
        await client.publish("job.a", task_id="t1")
        await client.publish("job.b", task_id="t2")
        await client.publish("other.a", task_id="t1", correlation_id="x")
        assert [e.seq for e in await client.read_events(task_id="t1")] == [1, 3]
        assert [e.seq for e in await client.read_events(pattern="job.*")] == [1, 2]
        assert [e.seq for e in await client.read_events(pattern="*.a", correlation_id="wf")] == [1]
        with pytest.raises(InvalidInputError) as info:
            await client.read_events(pattern="job.[ab]")
        assert info.value.field == "pattern"
        # The replay still takes bracket globs: it decides them as the live side does.
        async with client.events(after=0, pattern="job.[!a]") as stream:
            with anyio.fail_after(SOON):
                event = await stream.receive()
        assert event.type == "job.b"
