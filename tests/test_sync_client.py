"""SyncOrchestrationClient: the same operations from plain synchronous code, through
anyio's blocking portal, on asyncio and trio. Real SQLite files."""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path

import pytest

from hive_orchestration import (
    Event,
    IllegalTransitionError,
    InvalidInputError,
    OrchestrationClient,
    RuntimeStoppedError,
    SyncOrchestrationClient,
    TaskStatus,
)

backends = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@backends
def test_the_seeds_lifecycle_from_sync_code(tmp_path: Path, backend: str) -> None:
    db = str(tmp_path / "hive.db")
    with SyncOrchestrationClient(db_path=db, source_agent="cron", backend=backend) as client:
        assert client.db_path == db
        seen: list[Event] = []
        threads: set[str] = set()

        def callback(event: Event) -> None:
            threads.add(threading.current_thread().name)
            seen.append(event)

        handle = client.subscribe_to_task_events("*", callback)
        task_id = client.create_task("deployment", {"script": "deploy.sh"})
        client.update_task_status(task_id, "running")
        client.update_task_status(task_id, TaskStatus.COMPLETED, result={"ok": True})
        wait_until(lambda: len(seen) == 3)
        assert [e.event_type for e in seen] == ["task.created", "task.started", "task.completed"]
        assert {e.source for e in seen} == {"cron"}
        assert threading.main_thread().name not in threads  # callbacks ran in worker threads
        task = client.get_task(task_id)
        assert task is not None
        assert task.status == TaskStatus.COMPLETED
        assert task.result == {"ok": True}
        assert handle.delivered == 3
        assert handle.active
        handle.cancel()
        assert not handle.active
    # The data is durable: the async client sees it.
    import anyio

    async def read_back() -> TaskStatus | None:
        async with OrchestrationClient(db_path=db) as again:
            task = await again.get_task(task_id)
            return None if task is None else task.status

    assert anyio.run(read_back) == TaskStatus.COMPLETED


@backends
def test_sync_events_subscribe_and_errors(tmp_path: Path, backend: str) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "h.db"), backend=backend) as client:
        first = client.publish("job.one", {"n": 1})
        with client.events(after=0) as events:
            assert events.get(timeout=5) == first
            assert events.get(timeout=0.05) is None
            client.publish("job.two")
            got = events.get(timeout=5)
            assert got is not None
            assert got.type == "job.two"
        with client.subscribe("job.*") as live:
            client.publish("job.three")
            event = next(iter(live))
            assert event.type == "job.three"
        with pytest.raises(InvalidInputError) as info:
            client.create_task("", {})
        assert info.value.field == "task_type"


@backends
def test_a_refusal_is_raised_in_the_callers_thread_with_its_frames_only(
    tmp_path: Path, backend: str
) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "h.db"), backend=backend) as client:
        task_id = client.create_task("job", {})
        client.cancel_task(task_id)
        with pytest.raises(IllegalTransitionError) as caught:
            client.update_task_status(task_id, "running")
    files = [frame.filename for frame in traceback.extract_tb(caught.value.__traceback__)]
    # This test's frame, then the sync client's: no portal, event loop or actor frames.
    assert files[0] == __file__
    assert [f.rsplit("/", 3)[-3:] for f in files[1:]] == [["hive_orchestration", "api", "sync.py"]]


@backends
def test_a_worker_thread_claims_and_completes(tmp_path: Path, backend: str) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "h.db"), backend=backend) as client:
        ids = [client.create_task("report", {"i": i}) for i in range(5)]
        done: list[str] = []

        def worker() -> None:
            while len(done) < len(ids):
                claim = client.claim_task("w1", "report", wait=1.0)
                if claim is None:
                    continue
                client.start_task(claim.lease)
                client.complete_task(claim.lease, {"by": "w1"})
                done.append(claim.task.id)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=20)
        assert sorted(done) == sorted(ids)
        assert len(client.get_tasks_by_status("completed")) == 5


def test_an_unopened_sync_client_says_how_to_open_it() -> None:
    client = SyncOrchestrationClient(db_path=":memory:")
    with pytest.raises(RuntimeStoppedError, match="with SyncOrchestrationClient"):
        client.create_task("x", {})
    with pytest.raises(InvalidInputError) as info:
        SyncOrchestrationClient(backend="curio")  # type: ignore[arg-type]
    assert info.value.field == "backend"


def test_sync_methods_keep_the_async_signatures_and_docs() -> None:
    import inspect

    sync = inspect.signature(SyncOrchestrationClient.create_task)
    assert "task_type" in sync.parameters
    assert "correlation_id" in sync.parameters
    assert SyncOrchestrationClient.create_task.__doc__ == OrchestrationClient.create_task.__doc__
    async_ops = {
        name
        for name, value in inspect.getmembers(OrchestrationClient)
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    }
    missing = {name for name in async_ops if not hasattr(SyncOrchestrationClient, name)}
    assert missing <= {"aclose_callbacks", "on_event"}, missing
