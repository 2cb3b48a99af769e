"""``count_tasks``, ``list_tasks`` and ``list_workers``: the reads an operator's view needs
(``hive-orchestration status``, ``tasks``, ``workers`` ask them of a runtime), answering
as the read-only Inspector answers from the file, in-process and from another process
through the owner's socket, with the same checks. Both backends, real files."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from _populate import WORKER, populate
from reliability._remote import owner

from hive_orchestration import (
    SCHEMA_VERSION,
    InvalidInputError,
    OrchestrationClient,
    Runtime,
    SyncOrchestrationClient,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.inspector import Inspector

pytestmark = pytest.mark.anyio


async def test_they_answer_as_the_file_does(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
        await runtime.register_worker("gone", "builder", ["build"])
        await runtime.update_worker_heartbeat("gone", WorkerStatus.OFFLINE)
        async with Inspector.open(db_path) as inspector:
            assert await runtime.count_tasks() == await inspector.task_counts()
            assert (await runtime.count_tasks())["queued"] >= 1
            for status in (None, "queued", TaskStatus.RUNNING, "completed"):
                for task_type in (None, "compile", "nothing"):
                    for limit in (1, 100):
                        assert await runtime.list_tasks(
                            status, task_type=task_type, limit=limit
                        ) == await inspector.tasks(status, task_type=task_type, limit=limit)
            newest = await runtime.list_tasks()
            assert newest[0].created_at >= newest[-1].created_at
            assert made.queued in {task.id for task in newest}
            listed = await runtime.list_workers()
            assert {w.id for w in listed} == {WORKER, "gone"}  # offline ones too
            assert [w.id for w in await runtime.list_workers("offline")] == ["gone"]
            assert [w.id for w in await runtime.list_workers(WorkerStatus.OFFLINE)] == ["gone"]
            in_file = {w.id: w for w in await inspector.workers()}
            for worker in listed:
                written = in_file[worker.id]
                assert msgspec.structs.replace(worker, last_heartbeat=written.last_heartbeat) == (
                    written
                )
                # The registry's own: a worker's work is a sign of life, kept in memory.
                assert worker.last_heartbeat >= written.last_heartbeat
            beats = [worker.last_heartbeat for worker in listed]
            assert beats == sorted(beats, reverse=True)  # newest heartbeat first
            assert await inspector.schema_version() == SCHEMA_VERSION
        bad = [
            (lambda: runtime.list_tasks("sleeping"), "status"),
            (lambda: runtime.list_tasks(limit=0), "limit"),
            (lambda: runtime.list_tasks(limit=10_001), "limit"),
            (lambda: runtime.list_tasks(task_type=""), "task_type"),
            (lambda: runtime.list_workers("lazy"), "status"),
        ]
        for call, field in bad:
            with pytest.raises(InvalidInputError) as caught:
                await call()
            assert caught.value.field == field


async def test_they_answer_the_same_through_the_owners_socket(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        await populate(runtime)
        expected = (
            await runtime.count_tasks(),
            await runtime.list_tasks(limit=3),
            await runtime.list_tasks("completed", task_type="compile"),
            await runtime.list_workers(),
        )
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            assert client.remote
            got = (
                await client.count_tasks(),
                await client.list_tasks(limit=3),
                await client.list_tasks("completed", task_type="compile"),
                await client.list_workers(),
            )
            status = await client.server_status()
            with pytest.raises(InvalidInputError) as caught:
                await client.list_tasks(limit=0)
            assert caught.value.field == "limit"
        # Opening requeued the task the stopped runtime left running: the same counts
        # but for that move.
        counts, *rest = expected
        counts = dict(counts)
        counts["queued"] += counts.pop("running")
        assert got[0] == counts
        assert [t.id for t in got[1]] == [t.id for t in rest[0]]
        assert got[2] == rest[1]
        assert [w.id for w in got[3]] == [w.id for w in rest[2]]
        assert (status.pid, status.schema_version) == (process.pid, SCHEMA_VERSION)
        await process.stop()


def test_the_sync_client_has_them(tmp_path: Path) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path) + "/hive.db") as client:
        client.create_task("deploy", {})
        assert client.count_tasks() == {"queued": 1}
        assert [t.task_type for t in client.list_tasks()] == ["deploy"]
        assert client.list_workers() == []
