"""Agents: the registry (the follow-up seed's AgentRegistry) and the runner that runs
each agent's copies as workers. Real SQLite files, both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from hive_orchestration import (
    AgentCapability,
    AgentHealth,
    AgentRegistry,
    AgentRunner,
    InvalidInputError,
    RunStatus,
    Runtime,
    RuntimeConfig,
    StorageError,
    TaskContext,
    TaskStatus,
    auto_register_adapters,
)

pytestmark = pytest.mark.anyio

SOON = 10.0


@asynccontextmanager
async def runtime(db_path: str, **config: Any) -> AsyncIterator[Runtime]:
    settings: dict[str, Any] = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings)) as rt:
        yield rt


async def until_status(rt: Runtime, task_id: str, *statuses: TaskStatus) -> None:
    async with rt.subscribe("task.*", task_id=task_id) as events:
        task = await rt.get_task(task_id)
        assert task is not None
        if task.status in statuses:
            return
        with anyio.fail_after(SOON):
            async for event in events:
                if event.data.get("status") in statuses:
                    return


# -- the registry -------------------------------------------------------------------------------


def test_auto_registered_adapters_give_the_seeds_stats() -> None:
    registry = auto_register_adapters(AgentRegistry())
    stats = registry.get_stats()
    assert stats["total_agents"] == 5
    assert stats["agent_types"] == 5
    assert stats["capabilities"] == 5
    assert stats["healthy"] == 5
    assert [spec.agent_type for spec in registry.find("deployment")] == ["ai-deployer"]


def test_registry_operations_and_health() -> None:
    registry = AgentRegistry()

    async def handler(context: TaskContext) -> None:
        return None

    spec = registry.register(
        "builder", handler, capabilities=["python", AgentCapability("docker", ("image",))]
    )
    assert spec.handles == ("python", "image")
    assert "builder" in registry
    assert registry.get("builder") is spec
    registry.set_health("builder", "degraded")
    assert registry.get_stats()["degraded"] == 1
    assert registry.unregister("builder")
    assert not registry.unregister("builder")
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"agent_type": ""}, "agent_type"),
        ({"handler": "not callable"}, "handler"),
        ({"copies": 0}, "copies"),
        ({"capabilities": [f"c{n}" for n in range(257)]}, "capabilities"),
        (
            {"capabilities": [AgentCapability("convert", tuple(f"t{n}" for n in range(257)))]},
            "capabilities[0].task_types",
        ),
        (
            {
                "capabilities": [
                    AgentCapability("a", tuple(f"a{n}" for n in range(200))),
                    AgentCapability("b", tuple(f"b{n}" for n in range(57))),
                ]
            },
            "capabilities",
        ),
        ({"capabilities": [AgentCapability("")]}, "capabilities[0].name"),
        ({"capabilities": [AgentCapability("x", ("ok", 3))]}, "capabilities[0].task_types[1]"),  # type: ignore[arg-type]
        ({"capabilities": [3]}, "capabilities[0]"),
        ({"lease": -1}, "lease"),
    ],
)
def test_bad_agent_registrations_are_refused(kwargs: dict[str, Any], field: str) -> None:
    async def handler(context: TaskContext) -> None:
        return None

    args: dict[str, Any] = {"agent_type": "a", "handler": handler}
    args.update(kwargs)
    with pytest.raises(InvalidInputError) as caught:
        AgentRegistry().register(**args)
    assert caught.value.field == field


def test_bad_health_is_refused() -> None:
    registry = auto_register_adapters(AgentRegistry())
    with pytest.raises(InvalidInputError):
        registry.set_health("ai-planner", "sleepy")
    with pytest.raises(InvalidInputError):
        registry.set_health("nobody", AgentHealth.HEALTHY)


# -- the runner -----------------------------------------------------------------------------


async def test_the_example_agents_run_their_tasks(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = auto_register_adapters(AgentRegistry(), copies=2)
        kinds = ["planning", "review", "deployment", "testing", "monitoring"]
        ids = [await rt.create_task(kind, {"step_seconds": 0.001}) for kind in kinds * 3]
        async with AgentRunner(rt, registry, claim_wait=0.5) as runner:
            assert len(await rt.get_active_workers()) == 10
            for task_id in ids:
                await until_status(rt, task_id, TaskStatus.COMPLETED)
        assert runner.completed == len(ids)
        deploy = await rt.get_task(ids[2])
        assert deploy is not None
        assert deploy.result == {"environment": "production", "deployed": ["api"]}
        assert (await rt.get_runs(ids[2]))[0].worker_id.startswith("ai-deployer-")  # type: ignore[union-attr]
        progress = [e for e in await rt.read_events(0, limit=10_000) if e.type == "task.progress"]
        assert progress
        assert await rt.get_active_workers() == []  # unregistered on stop


async def test_an_agent_that_raises_fails_the_task_and_carries_on(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()

        async def flaky(context: TaskContext) -> Mapping[str, object]:
            if context.payload.get("boom"):
                raise ValueError("bad payload")
            return {"ok": True}

        registry.register("flaky", flaky)
        bad = await rt.create_task("flaky", {"boom": True}, max_retries=0)
        good = await rt.create_task("flaky", {"boom": False})
        async with AgentRunner(rt, registry, claim_wait=0.5) as runner:
            await until_status(rt, bad, TaskStatus.FAILED)
            await until_status(rt, good, TaskStatus.COMPLETED)
        failed = await rt.get_task(bad)
        assert failed is not None
        assert failed.error == "ValueError: bad payload"
        assert (runner.failed, runner.completed) == (1, 1)


async def test_cancel_task_reaches_a_running_handler(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        started = anyio.Event()
        cancelled = anyio.Event()

        async def forever(context: TaskContext) -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        registry.register("slow", forever)
        task_id = await rt.create_task("slow")
        async with AgentRunner(rt, registry, claim_wait=0.5):
            with anyio.fail_after(SOON):
                await started.wait()
                await rt.cancel_task(task_id, reason="changed my mind")
                await cancelled.wait()
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.CANCELLED
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.CANCELLED


async def test_the_task_timeout_cancels_the_handler(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        cancelled = anyio.Event()

        async def forever(context: TaskContext) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        registry.register("slow", forever)
        task_id = await rt.create_task("slow", timeout=0.2, max_retries=0)
        async with AgentRunner(rt, registry, claim_wait=0.5):
            await until_status(rt, task_id, TaskStatus.TIMED_OUT)
            with anyio.fail_after(SOON):
                await cancelled.wait()


async def test_a_handler_longer_than_its_lease_keeps_its_task(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()

        async def long(context: TaskContext) -> Mapping[str, object]:
            await anyio.sleep(1.8)  # three leases: renewed all along
            return {"attempt": context.attempt}

        # Renewed every third of the lease (0.2 s): a renewal may come up to 0.4 s late
        # before the lease runs out, which a loaded machine needs (0.3 s failed at load 12).
        registry.register("long", long, lease=0.6)
        task_id = await rt.create_task("long")
        async with AgentRunner(rt, registry, claim_wait=0.5):
            await until_status(rt, task_id, TaskStatus.COMPLETED)
        task = await rt.get_task(task_id)
        assert task is not None
        assert (task.result, task.attempts) == ({"attempt": 1}, 0)
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.COMPLETED


async def test_a_lost_lease_stops_the_handler_and_the_task_runs_again(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        started = anyio.Event()
        stopped = anyio.Event()

        async def work(context: TaskContext) -> Mapping[str, object]:
            if context.attempt == 1:
                started.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    stopped.set()
            return {"attempt": context.attempt}

        registry.register("job", work, lease=0.3)
        task_id = await rt.create_task("job")
        async with AgentRunner(rt, registry, claim_wait=0.5):
            with anyio.fail_after(SOON):
                await started.wait()
                # Put back in the queue behind the handler's back: no task.cancelled event,
                # only the lease renewal can tell the handler.
                await rt.update_task_status(task_id, TaskStatus.QUEUED)
                await stopped.wait()
            await until_status(rt, task_id, TaskStatus.COMPLETED)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.result == {"attempt": 2}


async def test_stopping_lets_in_flight_work_finish(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        started = anyio.Event()

        async def short(context: TaskContext) -> Mapping[str, object]:
            started.set()
            await anyio.sleep(0.2)
            return {"done": True}

        registry.register("short", short)
        task_id = await rt.create_task("short")
        async with AgentRunner(rt, registry, claim_wait=0.5, stop_timeout=SOON):
            with anyio.fail_after(SOON):
                await started.wait()
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.COMPLETED


async def test_stopping_hands_back_work_that_does_not_finish_in_time(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        started = anyio.Event()

        async def stuck(context: TaskContext) -> None:
            started.set()
            await anyio.sleep_forever()

        registry.register("stuck", stuck)
        task_id = await rt.create_task("stuck", max_retries=0)
        async with AgentRunner(rt, registry, claim_wait=0.5, stop_timeout=0.2):
            with anyio.fail_after(SOON):
                await started.wait()
        task = await rt.get_task(task_id)
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)  # back, not counted
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.RELEASED
        assert await rt.get_active_workers() == []


async def test_a_runner_with_no_agents_starts_and_stops(db_path: str) -> None:
    async with runtime(db_path) as rt, AgentRunner(rt, AgentRegistry()) as runner:
        assert runner.worker_ids == []


async def test_an_agent_survives_a_runtime_error_and_the_task_comes_back(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = [StorageError("disk hiccup")]
    original = Runtime.complete_task

    async def flaky_complete(self: Runtime, lease: Any, result: Any = None) -> Any:
        if faults:
            raise faults.pop()
        return await original(self, lease, result)

    monkeypatch.setattr(Runtime, "complete_task", flaky_complete)
    async with runtime(db_path) as rt:
        registry = AgentRegistry()

        async def work(context: TaskContext) -> Mapping[str, object]:
            return {"attempt": context.attempt}

        registry.register("job", work, lease=0.3)
        task_id = await rt.create_task("job")
        async with AgentRunner(rt, registry, claim_wait=0.5) as runner:
            # The first result could not be reported: that claim's lease runs out, and
            # the agent, still alive, takes the task again.
            await until_status(rt, task_id, TaskStatus.COMPLETED)
        assert faults == []
        assert runner.completed == 1
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.result == {"attempt": 2}


@pytest.mark.parametrize("operation", ["claim_task", "heartbeat", "update_worker_heartbeat"])
async def test_a_runtime_error_inside_a_copy_does_not_stop_the_runner(
    db_path: str, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    faults = [StorageError("disk hiccup")]
    original = getattr(Runtime, operation)

    async def flaky(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        if faults:
            raise faults.pop()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, operation, flaky)
    async with runtime(db_path, worker_timeout=0.3) as rt:
        registry = AgentRegistry()

        async def work(context: TaskContext) -> Mapping[str, object]:
            await anyio.sleep(0.4)  # a few lease renewals and worker heartbeats
            return {"ok": True}

        registry.register("job", work, lease=0.3)
        task_id = await rt.create_task("job")
        async with AgentRunner(rt, registry, claim_wait=0.2):
            await until_status(rt, task_id, TaskStatus.COMPLETED)
        assert faults == []


async def test_an_error_in_the_block_hands_in_flight_work_back(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        started = anyio.Event()

        async def work(context: TaskContext) -> None:
            started.set()
            await anyio.sleep_forever()

        registry.register("job", work)
        task_id = await rt.create_task("job", max_retries=0)

        async def app_with_a_bug() -> None:
            async with AgentRunner(rt, registry, stop_timeout=SOON):
                with anyio.fail_after(SOON):
                    await started.wait()
                raise KeyError("app bug")

        with pytest.raises(KeyError, match="app bug"):  # itself, not wrapped in a group
            await app_with_a_bug()
        task = await rt.get_task(task_id)
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.RELEASED


async def test_a_cancel_between_the_claim_and_the_handler_keeps_it_from_running(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim starts the task in its commit; a cancellation committed before the copy
    registers the handler's scope reaches the runner's watcher first, and the handler
    never runs."""
    original = Runtime.claim_task
    cancelled: list[str] = []
    handed = anyio.Event()  # the cancelled claim went back to the runner

    async def claim_then_cancel(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        claim = await original(self, *args, **kwargs)
        if claim is not None and not cancelled:
            cancelled.append(claim.task.id)
            await self.cancel_task(claim.task.id)
            # Every other task idle: the broadcast actor has fanned task.cancelled out and
            # the watcher has handled it, before this copy registers the handler's scope.
            await anyio.wait_all_tasks_blocked()
            handed.set()
        return claim

    monkeypatch.setattr(Runtime, "claim_task", claim_then_cancel)
    async with runtime(db_path) as rt:
        registry = AgentRegistry()
        ran: list[str] = []

        a_handler_ran = anyio.Event()

        async def work(context: TaskContext) -> None:
            ran.append(context.task.id)
            a_handler_ran.set()
            if not context.payload.get("marker"):
                await anyio.sleep_forever()

        registry.register("job", work, lease=60)
        task_id = await rt.create_task("job")
        with anyio.fail_after(5):  # well under the 10 s stop deadline: nothing was left running
            async with AgentRunner(rt, registry, claim_wait=0.2) as runner:
                await handed.wait()
                # The copy takes its tasks one at a time: had it run the cancelled one, it
                # would have done so before it takes the next.
                marker = await rt.create_task("job", {"marker": True})
                await a_handler_ran.wait()
                assert ran == [marker], "the handler ran for the cancelled task"
        assert cancelled == [task_id]
        assert (runner.completed, runner.failed) == (1, 0)
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.CANCELLED


async def test_a_cancel_the_watcher_dropped_still_keeps_the_handler_from_running(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's subscription drops events when it falls behind (here: a tiny buffer
    and a flood of cancellations). A cancel between the claim and the handler that it
    dropped is still caught, by a heartbeat the TaskManager answers from memory."""
    original = Runtime.claim_task
    others: list[str] = []
    handed = anyio.Event()

    async def claim_then_flood(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        claim = await original(self, *args, **kwargs)
        if claim is not None and not handed.is_set():
            async with anyio.create_task_group() as tg:  # one batch, one burst of events
                for task_id in others:
                    tg.start_soon(self.cancel_task, task_id)
                tg.start_soon(self.cancel_task, claim.task.id)
            # Every other task idle: the watcher has taken what its buffer held of the
            # burst, before this copy registers the handler's scope.
            await anyio.wait_all_tasks_blocked()
            handed.set()
        return claim

    monkeypatch.setattr(Runtime, "claim_task", claim_then_flood)
    async with runtime(db_path, subscriber_buffer=10) as rt:
        others.extend(await rt.create_tasks([{"task_type": "other"}] * 500))
        registry = AgentRegistry()
        ran: list[str] = []

        a_handler_ran = anyio.Event()

        async def work(context: TaskContext) -> None:
            ran.append(context.task.id)
            a_handler_ran.set()
            if not context.payload.get("marker"):
                await anyio.sleep_forever()

        registry.register("job", work, lease=60)
        task_id = await rt.create_task("job")
        with anyio.fail_after(5):
            async with AgentRunner(rt, registry, claim_wait=0.2):
                await handed.wait()
                # One task at a time: the next one's handler runs only after the copy is
                # done with the cancelled one.
                marker = await rt.create_task("job", {"marker": True})
                await a_handler_ran.wait()
                assert ran == [marker], "the handler ran for the cancelled task"
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.CANCELLED


async def test_a_copy_whose_record_is_gone_takes_only_its_agents_tasks(db_path: str) -> None:
    async with runtime(db_path, worker_timeout=0.3) as rt:
        registry = AgentRegistry()
        seen: list[str] = []

        async def work(context: TaskContext) -> None:
            seen.append(context.task.task_type)

        registry.register("job", work)
        async with AgentRunner(rt, registry, claim_wait=0.2):
            assert await rt.unregister_worker("job-1")
            other = await rt.create_task("deploy-prod")
            mine = await rt.create_task("job")
            await until_status(rt, mine, TaskStatus.COMPLETED)

            async def registered_again() -> bool:
                return await rt.get_worker("job-1") is not None

            with anyio.fail_after(SOON):
                while True:  # the copy's next heartbeat finds it gone and registers again
                    if await registered_again():
                        break
                    await anyio.sleep(0.05)
        assert seen == ["job"]
        task = await rt.get_task(other)
        assert task is not None
        assert task.status is TaskStatus.QUEUED


async def test_a_result_that_cannot_be_stored_fails_the_task_at_once(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()

        async def work(context: TaskContext) -> Mapping[str, object]:
            return {"when": object()}

        registry.register("job", work)
        task_id = await rt.create_task("job", max_retries=0)
        async with AgentRunner(rt, registry, claim_wait=0.2):
            await until_status(rt, task_id, TaskStatus.FAILED)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.error is not None
        assert "invalid result" in task.error
