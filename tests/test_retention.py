"""Retention (docs/RETENTION.md): purging finished tasks with their runs and events,
delete on success, trimming the event log, and what a reader replaying from a trimmed
sequence number gets. Every test runs on a real SQLite file, on asyncio and trio."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from hive_orchestration import (
    ConfigError,
    Event,
    EventsTrimmedError,
    InvalidInputError,
    OrchestrationClient,
    RetentionPolicy,
    Runtime,
    RuntimeConfig,
    SyncOrchestrationClient,
    TaskStatus,
)
from hive_orchestration.events import EventsTrimmed, TasksPurged
from hive_orchestration.inspector import Inspector
from hive_orchestration.messages.storage import TrimEventLog, Write

#: Only turns a hang into a failure.
DEADLINE = 30.0
PLAN = {
    "title": "Ship it",
    "subtasks": [
        {"id": "build", "task_type": "build"},
        {"id": "ship", "task_type": "ship", "dependencies": ["build"]},
    ],
}


class Clock:
    """A wall clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def _finish(runtime: Runtime, task_type: str, *, fail: bool = False) -> str:
    """A task of ``task_type`` claimed, started and completed (or failed for good)."""
    task_id = await runtime.create_task(task_type, {}, max_retries=0)
    claim = await runtime.claim_task("w1", task_type, start=True)
    assert claim is not None
    assert claim.task.id == task_id
    if fail:
        await runtime.fail_task(claim.lease, "boom")
    else:
        await runtime.complete_task(claim.lease, {"ok": True})
    return task_id


# -- purge ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_purge_deletes_old_finished_tasks_with_their_runs_and_events(
    db_path: str, anyio_backend: str
) -> None:
    clock = Clock()
    async with Runtime.open(db_path, wall_clock=clock) as runtime:
        old_done = await _finish(runtime, "build")
        old_failed = await _finish(runtime, "build", fail=True)
        keyed = await runtime.create_task("build", {}, idempotency_key="once")
        claim = await runtime.claim_task("w1", "build", start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        queued = await runtime.create_task("later", {})
        clock.advance(3600)
        recent = await _finish(runtime, "build")
        before = await runtime.last_seq()

        purged = await runtime.purge_tasks(1800, source_agent="ops")

        assert purged == 2
        # Gone from memory (they were among the recently finished) and from storage.
        for task_id in (old_done, old_failed):
            assert await runtime.get_task(task_id) is None
            assert await runtime.get_runs(task_id) == []
            assert await runtime.read_events(task_id=task_id) == []
        # Kept: a live task, one finished since, one that holds an idempotency key.
        for task_id in (queued, recent, keyed):
            assert await runtime.get_task(task_id) is not None
        assert await runtime.read_events(task_id=recent) != []
        # The key still dedupes: it is its task's for good.
        assert await runtime.create_task("build", {}, idempotency_key="once") == keyed
        logged = await runtime.read_events(before, pattern="retention.purged")
        assert len(logged) == 1
        assert logged[0].source == "ops"
        data = TasksPurged.of(logged[0])
        assert data.count == 2
        assert sorted(data.statuses) == ["cancelled", "completed", "failed", "timed_out"]
        # Nothing more is old enough; asked again, nothing is purged.
        assert await runtime.purge_tasks(1800) == 0
        # include_keyed frees the key with its task.
        assert await runtime.purge_tasks(1800, include_keyed=True) == 1
        assert await runtime.get_task(keyed) is None
        assert await runtime.create_task("build", {}, idempotency_key="once") != keyed
    # Durable: the purged tasks stay gone after a restart.
    async with Runtime.open(db_path) as runtime:
        assert await runtime.get_task(old_done) is None
        assert await runtime.get_task(recent) is not None


@pytest.mark.anyio
async def test_a_purge_works_in_chunks_and_narrows_by_status_and_type(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        done = [await _finish(runtime, "build") for _ in range(7)]
        failed = await _finish(runtime, "build", fail=True)
        other = await _finish(runtime, "mail")
        start = await runtime.last_seq()
        purged = await runtime.purge_tasks(0, statuses=["completed"], task_type="build", chunk=3)
        assert purged == 7
        assert all([await runtime.get_task(t) is None for t in done])
        assert await runtime.get_task(failed) is not None
        assert await runtime.get_task(other) is not None
        chunks = await runtime.read_events(start, pattern="retention.purged")
        assert [TasksPurged.of(e).count for e in chunks] == [3, 3, 1]
        assert {TasksPurged.of(e).task_type for e in chunks} == {"build"}


@pytest.mark.anyio
async def test_a_purge_keeps_the_tasks_of_a_plan_that_has_not_ended(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        plan_id = await runtime.create_execution_plan(PLAN)
        assert await runtime.mark_plan_execution_started(plan_id)
        build = await _claim_and_complete(runtime, "build")
        # The plan goes on: its finished step is the next one's input.
        assert await runtime.purge_tasks(0) == 0
        assert await runtime.get_task(build) is not None
        ship = await _claim_and_complete(runtime, "ship")
        await runtime.wait_for_plan(plan_id, timeout=DEADLINE)
        assert await runtime.purge_tasks(0) == 2
        assert await runtime.get_task(build) is None
        assert await runtime.get_task(ship) is None
        # The plan itself is kept, and still reads.
        assert await runtime.get_execution_plan_status(plan_id) == "completed"
        assert await runtime.get_execution_plan(plan_id) is not None


async def _claim_and_complete(runtime: Runtime, task_type: str) -> str:
    with anyio.fail_after(DEADLINE):
        claim = await runtime.claim_task("w1", task_type, start=True, wait=DEADLINE)
    assert claim is not None
    await runtime.complete_task(claim.lease, {"ok": True})
    return claim.task.id


@pytest.mark.anyio
async def test_purge_and_trim_refuse_bad_arguments(db_path: str, anyio_backend: str) -> None:
    async with Runtime.open(db_path) as runtime:
        for call, field in (
            (runtime.purge_tasks(-1), "older_than"),
            (runtime.purge_tasks(float("nan")), "older_than"),
            (runtime.purge_tasks(0, statuses=["queued"]), "statuses[0]"),
            (runtime.purge_tasks(0, statuses="completed"), "statuses"),
            (runtime.purge_tasks(0, statuses=[]), "statuses"),
            (runtime.purge_tasks(0, chunk=0), "chunk"),
            (runtime.trim_events(), "older_than"),
            (runtime.trim_events(max_events=-1), "max_events"),
            (runtime.trim_events(max_bytes=1.5), "max_bytes"),  # type: ignore[arg-type]
            (runtime.trim_events(max_events=1, chunk=0), "chunk"),
        ):
            with pytest.raises(InvalidInputError) as info:
                await call
            assert info.value.field == field


@pytest.mark.anyio
async def test_a_task_whose_key_was_held_only_while_live_is_purged_and_deleted_on_success(
    db_path: str, anyio_backend: str
) -> None:
    """A key of scope ``active`` was freed when its task ended: nothing holds the task
    back from a purge, nor from delete_on_success."""
    clock = Clock()
    config = RuntimeConfig(delete_on_success=("mail",))
    async with Runtime.open(db_path, wall_clock=clock, config=config) as runtime:
        held = await runtime.create_task("build", {}, idempotency_key="for-ever")
        freed = await runtime.create_task(
            "build", {}, idempotency_key="while-live", idempotency_scope="active"
        )
        for _ in range(2):
            claim = await runtime.claim_task("w1", "build", start=True)
            assert claim is not None
            await runtime.complete_task(claim.lease)
        mail = await runtime.create_task(
            "mail", {}, idempotency_key="mail-1", idempotency_scope="active"
        )
        claim = await runtime.claim_task("w1", "mail", start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        assert await runtime.get_task(mail) is None  # deleted as it completed
        clock.advance(3600)
        assert await runtime.purge_tasks(1800) == 1
        assert await runtime.get_task(freed) is None
        assert await runtime.get_task(held) is not None


# -- delete on success ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_tasks_of_a_delete_on_success_type_go_as_they_complete(
    db_path: str, anyio_backend: str
) -> None:
    config = RuntimeConfig(delete_on_success=("mail",))
    async with Runtime.open(db_path, config=config) as runtime:
        mail = await runtime.create_task("mail", {})
        claim = await runtime.claim_task("w1", "mail", start=True)
        assert claim is not None
        done = await runtime.complete_task(claim.lease, {"sent": True})
        assert done.status is TaskStatus.COMPLETED  # the caller still gets the result
        assert await runtime.get_task(mail) is None
        assert await runtime.get_runs(mail) == []
        # Its events stay: the completion, with its result, then the deletion.
        types = [e.type for e in await runtime.read_events(task_id=mail)]
        assert types[-2:] == ["task.completed", "task.deleted"]
        deleted = (await runtime.read_events(task_id=mail))[-1]
        assert deleted.data["reason"] == "delete_on_success"
        # A failure is kept (it is what needs looking at), and so are other types and
        # a task that holds an idempotency key.
        failed = await _finish(runtime, "mail", fail=True)
        assert await runtime.get_task(failed) is not None
        report = await _finish(runtime, "report")
        assert await runtime.get_task(report) is not None
        keyed = await runtime.create_task("mail", {}, idempotency_key="welcome")
        claim = await runtime.claim_task("w1", "mail", start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        assert await runtime.get_task(keyed) is not None
        # Completed by hand too.
        by_hand = await runtime.create_task("mail", {})
        assert await runtime.update_task_status(by_hand, "completed", result={"x": 1})
        assert await runtime.get_task(by_hand) is None
    async with Runtime.open(db_path) as runtime:
        assert await runtime.get_task(mail) is None
        assert await runtime.get_task(failed) is not None


# -- the event log -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_trimming_the_log_refuses_a_replay_from_before_it(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        for n in range(20):
            await runtime.publish("app.note", {"n": n})
        last = await runtime.last_seq()
        through = await runtime.trim_events(max_events=5, chunk=4, source_agent="ops")
        assert through == last - 5
        kept = await runtime.read_events()  # after=0: from wherever the log starts
        assert [e.seq for e in kept][:5] == list(range(last - 4, last + 1))
        trims = [e for e in kept if e.type == "retention.trimmed"]
        assert trims
        assert all(e.source == "ops" for e in trims)
        assert EventsTrimmed.of(trims[-1]) == EventsTrimmed(through=through, reason="max_events")
        with pytest.raises(EventsTrimmedError) as info:
            await runtime.read_events(after=3)
        assert (info.value.after, info.value.oldest_seq) == (3, through + 1)
        assert str(through + 1) in str(info.value)
        # From the last trimmed seq on, nothing is missing: allowed.
        assert (await runtime.read_events(after=through))[0].seq == through + 1
        # A stream replaying from before it ends with the same error.
        client = runtime.client()
        with pytest.raises(EventsTrimmedError):
            await _first_of_stream(client, after=1)
        # By age: everything older than now, i.e. all but the trim's own event.
        through = await runtime.trim_events(older_than=0)
        assert through >= last
        assert [e.type for e in await runtime.read_events()] == ["retention.trimmed"]


async def _first_of_stream(client: OrchestrationClient, *, after: int) -> None:
    async with client.events(after=after) as stream:
        with anyio.fail_after(DEADLINE):
            await stream.__anext__()


@pytest.mark.anyio
async def test_trimming_by_bytes_keeps_the_newest_that_fit(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        for n in range(50):
            await runtime.publish("app.blob", {"text": "x" * 1000, "n": n})
        last = await runtime.last_seq()
        through = await runtime.trim_events(max_bytes=10_000)
        kept = [e for e in await runtime.read_events() if e.type == "app.blob"]
        # Each is a little over 1 KB: 9 fit in 10 000 bytes, 10 do not.
        assert len(kept) == 9
        assert kept[-1].seq == last
        assert through == last - 9


@pytest.mark.anyio
async def test_sequence_numbers_never_go_back_after_a_trim_even_with_an_empty_log(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        for n in range(10):
            await runtime.publish("app.note", {"n": n})
        last = await runtime.last_seq()
        # The whole log, as a trim that logged nothing would leave it.
        await runtime._storage.ask(Write((TrimEventLog(last),)))
        assert await runtime.read_events() == []
    async with Runtime.open(db_path) as runtime:
        assert await runtime.last_seq() == last
        event = await runtime.publish("app.note", {"n": 10})
        assert event.seq == last + 1
        with pytest.raises(EventsTrimmedError) as info:
            await runtime.read_events(after=2)
        assert info.value.oldest_seq == last + 1


# -- the automatic policy ------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_retention_policy_purges_and_trims_by_itself(
    db_path: str, anyio_backend: str
) -> None:
    policy = RetentionPolicy(finished_max_age=1.0, events_max_count=1, interval=1.0)
    async with Runtime.open(db_path, config=RuntimeConfig(retention=policy)) as runtime:
        async with runtime.subscribe("retention.*") as passes:
            done = await _finish(runtime, "build")
            live = await runtime.create_task("build", {})
            seen: dict[str, Event] = {}
            with anyio.fail_after(DEADLINE):
                while len(seen) < 2:
                    event = await passes.receive()
                    seen[event.type] = event
        assert {event.source for event in seen.values()} == {"retention"}
        assert await runtime.get_task(done) is None
        assert await runtime.get_task(live) is not None
        # One kept when it trimmed, and only retention's own events since.
        kept = await runtime.read_events()
        assert len([e for e in kept if not e.type.startswith("retention.")]) <= 1


# -- through the socket --------------------------------------------------------------------


@pytest.mark.anyio
async def test_retention_through_the_socket_and_the_trimmed_error_crosses_it(
    db_path: str, anyio_backend: str
) -> None:
    from reliability._remote import owner

    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            assert client.remote
            task_id = await client.create_task("build", {})
            claim = await client.claim_task("w1", "build", start=True)
            assert claim is not None
            await client.complete_task(claim.lease)
            assert await client.purge_tasks(0) == 1
            assert await client.get_task(task_id) is None
            for n in range(10):
                await client.publish("app.note", {"n": n})
            through = await client.trim_events(max_events=3)
            assert through > 0
            with pytest.raises(EventsTrimmedError) as info:
                await client.read_events(after=1)
            assert info.value.oldest_seq == through + 1
            last = await client.last_seq()
        process.kill()  # SIGKILL: what was trimmed stays trimmed
        await process.process.wait()
    async with Runtime.open(db_path) as runtime:
        assert await runtime.last_seq() == last
        with pytest.raises(EventsTrimmedError):
            await runtime.read_events(after=1)
        assert await runtime.get_task(task_id) is None


# -- the sync client and the config --------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_sync_client_purges_and_trims(tmp_path: Path, backend: str) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "h.db"), backend=backend) as client:
        task_id = client.create_task("build", {})
        assert client.update_task_status(task_id, "completed")
        assert client.purge_tasks(0) == 1
        assert client.get_task(task_id) is None
        for n in range(3):
            client.publish("app.note", {"n": n})
        through = client.trim_events(max_events=1)
        assert through > 0
        with pytest.raises(EventsTrimmedError):
            client.read_events(after=1)


def test_a_bad_retention_policy_is_refused_naming_its_field() -> None:
    config = RuntimeConfig.load(env={"HIVE_ORCHESTRATION_RETENTION": '{"events_max_age": 3600}'})
    assert config.retention == RetentionPolicy(events_max_age=3600.0)
    for bad, field in (
        ('{"finished_max_age": 0.5}', "retention.finished_max_age"),
        ('{"chunk": 0}', "retention.chunk"),
        ('{"events_max_count": 0}', "retention.events_max_count"),
        ('{"keep": 1}', "retention.keep"),
    ):
        with pytest.raises(ConfigError) as info:
            RuntimeConfig.load(env={"HIVE_ORCHESTRATION_RETENTION": bad})
        assert info.value.field == field, bad


@pytest.mark.anyio
async def test_the_inspector_beside_the_runtime_sees_the_trim(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as runtime:
        for n in range(10):
            await runtime.publish("app.note", {"n": n})
        async with Inspector.open(db_path) as inspector:
            assert len(await inspector.events(after=1)) == 9  # nothing trimmed yet
            through = await runtime.trim_events(max_events=2)
            # Trimmed by the runtime after the inspector opened: it reads the file's mark.
            with pytest.raises(EventsTrimmedError) as info:
                await inspector.events(after=1)
            assert info.value.oldest_seq == through + 1
            assert await inspector.last_seq() == await runtime.last_seq()
