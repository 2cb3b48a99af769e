"""Retry by exception type: ``AgentRunner(retry_on=..., fail_on=...)``, the policy that
says whether a handler's exception sends its task back to the queue or fails it at once.
Real SQLite files, both backends (the worker command's options: test_worker_process.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

from hive_orchestration import (
    AgentRegistry,
    AgentRunner,
    InvalidInputError,
    Runtime,
    RuntimeConfig,
    TaskContext,
    TaskStatus,
)
from hive_orchestration.agents.retry import RetryPolicy, load_exception_type

pytestmark = pytest.mark.anyio

SOON = 10.0


class Transient(Exception):
    pass


class Flaky(Transient):
    pass


async def handler(context: TaskContext) -> Mapping[str, object]:
    kinds: dict[str, type[Exception]] = {
        "Transient": Transient,
        "Flaky": Flaky,
        "ValueError": ValueError,
        "KeyError": KeyError,
    }
    if context.attempt < int(str(context.payload.get("succeed_on", 1_000))):
        raise kinds[str(context.payload["raise"])](f"attempt {context.attempt}")
    return {"attempt": context.attempt}


async def run(db_path: str, jobs: list[dict[str, object]], **policy: Any) -> list[Any]:
    """Run ``jobs`` (payloads of ``handler``, each with 3 retries) until each has ended;
    returns the tasks as they ended."""
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.02)
    async with Runtime.open(db_path, config=config) as rt:
        registry = AgentRegistry()
        registry.register("job", handler)
        ids = [await rt.create_task("job", job, max_retries=3) for job in jobs]
        ended = (TaskStatus.COMPLETED, TaskStatus.FAILED)
        async with (
            rt.subscribe("task.*") as events,
            AgentRunner(rt, registry, claim_wait=0.2, **policy),
        ):
            with anyio.fail_after(SOON):
                while True:
                    tasks = [await rt.get_task(task_id) for task_id in ids]
                    if all(t is not None and t.status in ended for t in tasks):
                        return tasks
                    await events.receive()


async def test_by_default_every_exception_is_retried(db_path: str) -> None:
    (task,) = await run(db_path, [{"raise": "ValueError"}])
    assert task.status is TaskStatus.FAILED
    assert task.attempts == 4  # the first attempt and its 3 retries


async def test_retry_on_retries_those_classes_and_fails_the_others_at_once(
    db_path: str,
) -> None:
    retried, subclass, other = await run(
        db_path,
        [
            {"raise": "Transient", "succeed_on": 3},
            {"raise": "Flaky"},  # a subclass of Transient: retried too
            {"raise": "ValueError"},
        ],
        retry_on=(Transient,),
    )
    assert (retried.status, retried.result) == (TaskStatus.COMPLETED, {"attempt": 3})
    assert (subclass.status, subclass.attempts) == (TaskStatus.FAILED, 4)
    assert (other.status, other.attempts) == (TaskStatus.FAILED, 1)
    assert other.error == "ValueError: attempt 1"


async def test_fail_on_fails_at_once_and_wins_over_retry_on(db_path: str) -> None:
    failed, retried = await run(
        db_path,
        [{"raise": "Flaky"}, {"raise": "Transient", "succeed_on": 2}],
        retry_on=(Transient,),
        fail_on=(Flaky,),
    )
    assert (failed.status, failed.attempts, failed.error) == (
        TaskStatus.FAILED,
        1,
        "Flaky: attempt 1",
    )
    assert (retried.status, retried.result) == (TaskStatus.COMPLETED, {"attempt": 2})


async def test_the_failed_event_says_the_failure_was_not_retryable(db_path: str) -> None:
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.02)
    async with Runtime.open(db_path, config=config) as rt:
        registry = AgentRegistry()
        registry.register("job", handler)
        at_once = await rt.create_task("job", {"raise": "KeyError"}, max_retries=3)
        exhausted = await rt.create_task("job", {"raise": "ValueError"}, max_retries=0)
        async with (
            rt.subscribe("task.failed") as events,
            AgentRunner(rt, registry, claim_wait=0.2, fail_on=(KeyError,)),
        ):
            seen: dict[str, Any] = {}
            with anyio.fail_after(SOON):
                while len(seen) < 2:
                    event = await events.receive()
                    seen[str(event.task_id)] = event.data
        assert seen[at_once]["retryable"] is False
        assert seen[at_once]["attempts"] == 1
        assert "retryable" not in seen[exhausted]  # it ran out of attempts instead


async def test_an_agents_own_policy_replaces_the_runners(db_path: str) -> None:
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.02)
    async with Runtime.open(db_path, config=config) as rt:
        registry = AgentRegistry()
        registry.register("strict", handler, fail_on=(ValueError,))
        registry.register("lenient", handler)  # the runner's: retry only KeyError

        @registry.agent("picky", retry_on=(KeyError,), fail_on=())
        async def picky(context: TaskContext) -> Mapping[str, object]:
            return await handler(context)

        strict = await rt.create_task("strict", {"raise": "ValueError"}, max_retries=3)
        # Failed at once by the runner's policy, retried by the agent's own.
        own = await rt.create_task("strict", {"raise": "Transient", "succeed_on": 2})
        lenient = await rt.create_task("lenient", {"raise": "ValueError"}, max_retries=3)
        retried = await rt.create_task("picky", {"raise": "KeyError", "succeed_on": 2})
        ids = (strict, own, lenient, retried)
        async with (
            rt.subscribe("task.*") as events,
            AgentRunner(rt, registry, claim_wait=0.2, retry_on=(KeyError,)),
        ):
            with anyio.fail_after(SOON):
                while True:
                    tasks = [await rt.get_task(task_id) for task_id in ids]
                    ended = (TaskStatus.COMPLETED, TaskStatus.FAILED)
                    if all(t is not None and t.status in ended for t in tasks):
                        break
                    await events.receive()
        assert registry.get("lenient").retry_policy is None  # type: ignore[union-attr]
        by_id = {t.id: t for t in tasks if t is not None}
        assert (by_id[strict].status, by_id[strict].attempts) == (TaskStatus.FAILED, 1)
        assert by_id[own].result == {"attempt": 2}
        assert (by_id[lenient].status, by_id[lenient].attempts) == (TaskStatus.FAILED, 1)
        assert by_id[retried].result == {"attempt": 2}


def test_an_agents_policy_is_checked_when_it_registers() -> None:
    with pytest.raises(InvalidInputError) as refused:
        AgentRegistry().register("a", handler, fail_on=("KeyError",))  # type: ignore[arg-type]
    assert refused.value.field == "fail_on[0]"


async def test_fail_on_alone_keeps_retrying_everything_else(db_path: str) -> None:
    failed, retried = await run(
        db_path,
        [{"raise": "KeyError"}, {"raise": "ValueError", "succeed_on": 2}],
        fail_on=[LookupError],  # KeyError's base class
    )
    assert (failed.status, failed.attempts) == (TaskStatus.FAILED, 1)
    assert (retried.status, retried.result) == (TaskStatus.COMPLETED, {"attempt": 2})


@pytest.mark.parametrize(
    ("policy", "field", "said"),
    [
        ({"retry_on": ValueError}, "retry_on", "must be a list of exception classes"),
        ({"retry_on": "ValueError"}, "retry_on", "must be a list of exception classes"),
        ({"fail_on": (ValueError, "KeyError")}, "fail_on[1]", "must be an exception class"),
        ({"fail_on": (ValueError(),)}, "fail_on[0]", "got ValueError"),
        ({"retry_on": (int,)}, "retry_on[0]", "must be an exception class"),
    ],
)
def test_a_policy_that_is_not_exception_classes_is_refused(
    policy: dict[str, Any], field: str, said: str
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        AgentRunner(None, AgentRegistry(), **policy)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert said in refused.value.reason


def test_the_policy_matches_by_isinstance() -> None:
    policy = RetryPolicy.of([OSError], [FileNotFoundError])
    assert policy.retryable(ConnectionError())  # an OSError
    assert not policy.retryable(FileNotFoundError())  # an OSError, but fail_on wins
    assert not policy.retryable(ValueError())
    assert RetryPolicy().retryable(ValueError())


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("", "must name an exception class"),
        ("nosuchmodule_xyz:Error", "no module named 'nosuchmodule_xyz'"),
        ("json:NoSuchError", "module 'json' has no 'NoSuchError'"),
        ("json:dumps", "is not an exception class (it is a function)"),
        ("NotABuiltin", "module 'builtins' has no 'NotABuiltin'"),
    ],
)
def test_a_class_name_that_does_not_import_is_refused(name: str, said: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        load_exception_type(name, "--retry-on")
    assert refused.value.field == "--retry-on"
    assert said in refused.value.reason


def test_class_names_import() -> None:
    assert load_exception_type("TimeoutError", "x") is TimeoutError
    assert load_exception_type("json:JSONDecodeError", "x").__name__ == "JSONDecodeError"
    assert load_exception_type("tests._handlers:Transient", "x").__name__ == "Transient"
