"""Workers in their own processes: ``hive-orchestration worker MODULE:HANDLER``, and the
owner's rule that a worker is alive only as long as the connection carrying its work.

Every test runs a real owner process (``_owner.py``) on a real file and real worker
processes (the command, with the handlers of ``_handlers.py``), on both backends; this
process watches through a client of its own. Faults are real signals: SIGTERM drains,
SIGKILL kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from _raw import is_postgres
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import (
    OrchestrationClient,
    RunStatus,
    Task,
    TaskStatus,
    WorkerStatus,
)

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent
OWNER = HERE / "_owner.py"
#: Only turns a hang into a failure. Every lease and worker timeout of these tests is far
#: longer, so what happens within it is not the work of an expiry.
DEADLINE = 30.0
LONG = 600.0


async def _line(lines: BufferedByteReceiveStream, process: Process, what: str) -> str:
    with anyio.fail_after(DEADLINE):
        try:
            return (await lines.receive_until(b"\n", 1 << 16)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead):
            assert process.stderr is not None
            errors = b""
            with anyio.move_on_after(5):
                errors = await process.stderr.receive()
            raise AssertionError(f"{what} ended early: {errors.decode()}") from None


@asynccontextmanager
async def owner(db_path: str, backend: str, **config: Any) -> AsyncIterator[Process]:
    """A process that owns ``db_path`` and serves it, until the block ends."""
    settings = {"lease_timeout": LONG, "worker_timeout": LONG, "retry_backoff": 0.01}
    settings.update(config)
    command = [sys.executable, str(OWNER), db_path, backend, json.dumps(settings)]
    process = await anyio.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        ready = json.loads(await _line(BufferedByteReceiveStream(process.stdout), process, "owner"))
        assert ready["ready"]
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


class Worker:
    def __init__(self, process: Process, lines: BufferedByteReceiveStream, ready: str) -> None:
        self.process = process
        self.lines = lines
        self.ready = ready

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit(self) -> tuple[int, str, str]:
        """Its exit code, and the rest of its stdout and its stderr."""
        with anyio.fail_after(DEADLINE):
            code = await self.process.wait()
            out = b""
            while True:
                try:
                    out += await self.lines.receive()
                except anyio.EndOfStream:
                    break
            assert self.process.stderr is not None
            err = b""
            while True:
                try:
                    err += await self.process.stderr.receive()
                except anyio.EndOfStream:
                    break
        return code, out.decode(), err.decode()


def command(db_path: str, backend: str, *arguments: str) -> list[str]:
    worker = [sys.executable, "-m", "hive_orchestration", "worker"]
    return [*worker, "--db", db_path, "--backend", backend, *arguments]


@asynccontextmanager
async def worker(db_path: str, backend: str, target: str, *options: str) -> AsyncIterator[Worker]:
    """``hive-orchestration worker TARGET`` run from this folder, once it says it is ready."""
    # A file is passed absolute (the worker runs from this folder); a URL as it is.
    target_db = db_path if is_postgres(db_path) else str(Path(db_path).absolute())  # noqa: ASYNC240
    process = await anyio.open_process(
        command(target_db, backend, target, *options),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=HERE,
    )
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        ready = await _line(lines, process, "the worker")
        assert ready.rstrip().endswith("ready"), ready
        yield Worker(process, lines, ready)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def until(client: OrchestrationClient, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds: checked now, then after each event (every change
    this waits for is logged)."""
    async with client.subscribe("*") as events:
        with anyio.fail_after(DEADLINE):
            while not await check():
                await events.receive()


async def status_is(client: OrchestrationClient, task_id: str, status: TaskStatus) -> bool:
    task = await client.get_task(task_id)
    return task is not None and task.status is status


async def offline(client: OrchestrationClient, worker_id: str) -> bool:
    found = await client.get_worker(worker_id)
    assert found is not None
    return found.status is WorkerStatus.OFFLINE


async def get(client: OrchestrationClient, task_id: str) -> Task:
    task = await client.get_task(task_id)
    assert task is not None
    return task


# -- running tasks -----------------------------------------------------------------------


async def test_a_worker_process_runs_tasks_to_completion(db_path: str, anyio_backend: str) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(
            db_path,
            anyio_backend,
            "_handlers:echo",
            "--concurrency",
            "2",
            "--task-types",
            "echo",
            "shout",
            "--worker-id",
            "echoer",
        ) as process,
    ):
        assert client.remote
        assert "2 worker(s) echoer-1 .. echoer-2 taking echo, shout" in process.ready
        workers = sorted(await client.get_active_workers(), key=lambda w: w.id)
        assert [(w.id, w.role, w.capabilities) for w in workers] == [
            ("echoer-1", "echo", ("echo", "shout")),
            ("echoer-2", "echo", ("echo", "shout")),
        ]
        ids = [await client.create_task("echo", {"n": n}) for n in range(5)]
        ids.append(await client.create_task("shout", {"n": 5}))

        async def all_done() -> bool:
            return all([await status_is(client, i, TaskStatus.COMPLETED) for i in ids])

        await until(client, all_done)
        for n, task_id in enumerate(ids):
            task = await get(client, task_id)
            assert task.result is not None
            assert task.result["echo"] == {"n": n}
            assert task.result["worker"] == task.assigned_worker
            assert task.assigned_worker in ("echoer-1", "echoer-2")
            assert task.attempts == 0  # runs that end without success are counted
        process.signal(signal.SIGTERM)
        code, out, err = await process.exit()
        assert code == 0, err
        assert out.splitlines()[-1] == "worker: stopped: 6 completed, 0 failed, 0 handed back"
        assert err == ""
        # Stopped cleanly: unregistered, not merely offline.
        assert await client.get_worker("echoer-1") is None
        assert await client.get_active_workers() == []


async def test_a_handler_that_raises_fails_its_task_and_the_worker_goes_on(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(db_path, anyio_backend, "_handlers:picky", "--task-types", "job") as process,
    ):
        bad = await client.create_task("job", {"fail": True}, max_retries=0)
        good = await client.create_task("job", {})

        async def both_ended() -> bool:
            return await status_is(client, bad, TaskStatus.FAILED) and await status_is(
                client, good, TaskStatus.COMPLETED
            )

        await until(client, both_ended)
        failed = await get(client, bad)
        assert failed.error == f"ValueError: refusing {bad}"
        (run,) = await client.get_runs(bad)
        assert run.status is RunStatus.FAILED
        assert (await get(client, good)).result == {"ok": True}
        process.signal(signal.SIGINT)  # Ctrl-C stops it as SIGTERM does
        code, out, err = await process.exit()
        assert code == 0, err
        assert out.splitlines()[-1] == "worker: stopped: 1 completed, 1 failed, 0 handed back"


async def test_retry_on_and_fail_on_say_which_exceptions_are_retried(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(
            db_path,
            anyio_backend,
            "_handlers:erring",
            "--task-types",
            "job",
            "--retry-on",
            "_handlers:Transient",
            "OSError",
            "--fail-on",
            "FileNotFoundError",
        ) as process,
    ):
        jobs = {
            "transient": {"raise": "Transient", "succeed_on": 2},
            "os": {"raise": "ConnectionError", "succeed_on": 3},  # an OSError
            "not_found": {"raise": "FileNotFoundError"},  # an OSError, but --fail-on
            "other": {"raise": "ValueError"},  # not named: fails at once
        }
        ids = {
            name: await client.create_task("job", job, max_retries=5) for name, job in jobs.items()
        }

        async def all_ended() -> bool:
            for task_id in ids.values():
                task = await get(client, task_id)
                if task.status not in (TaskStatus.COMPLETED, TaskStatus.FAILED):
                    return False
            return True

        await until(client, all_ended)
        ended = {name: await get(client, task_id) for name, task_id in ids.items()}
        assert ended["transient"].result == {"attempt": 2}
        assert ended["os"].result == {"attempt": 3}
        for name in ("not_found", "other"):
            assert ended[name].status is TaskStatus.FAILED
            assert ended[name].attempts == 1, name
            assert len(await client.get_runs(ids[name])) == 1
        process.signal(signal.SIGTERM)
        code, out, err = await process.exit()
        assert code == 0, err
        assert out.splitlines()[-1] == "worker: stopped: 2 completed, 5 failed, 0 handed back"


async def test_a_plan_step_in_a_worker_process_reads_its_dependencies_results(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(db_path, anyio_backend, "_handlers:summing", "--task-types", "sum"),
    ):
        plan_id = await client.create_execution_plan(
            {
                "subtasks": [
                    {"id": f"n{i}", "task_type": "number", "payload": {"n": i}} for i in range(5)
                ]
                + [{"id": "total", "task_type": "sum", "dependencies": [f"n{i}" for i in range(5)]}]
            }
        )
        assert await client.mark_plan_execution_started(plan_id)
        for _ in range(5):
            got = await client.claim_task("numbers", ["number"], wait=DEADLINE, start=True)
            assert got is not None
            await client.complete_task(got.lease, {"n": got.task.payload["n"]})
        plan = await client.wait_for_plan(plan_id, timeout=DEADLINE)
        assert plan.status.value == "completed", plan.error
        (total,) = [s for s in await client.get_plan_subtasks(plan_id) if s.subtask_id == "total"]
        assert total.task_id is not None
        assert (await get(client, total.task_id)).result == {"sum": 10}


# -- stopping ------------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_work_and_hands_back_the_rest_uncounted(
    db_path: str, anyio_backend: str, tmp_path: Path
) -> None:
    finishing, stuck = tmp_path / "finishing", tmp_path / "stuck"
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(
            db_path,
            anyio_backend,
            "_handlers:gated",
            "--concurrency",
            "2",
            "--drain-timeout",
            "3",
        ) as process,
    ):
        first = await client.create_task("gated", {"gate": str(finishing)})
        second = await client.create_task("gated", {"gate": str(stuck)})

        async def both_running() -> bool:
            return await status_is(client, first, TaskStatus.RUNNING) and await status_is(
                client, second, TaskStatus.RUNNING
            )

        await until(client, both_running)
        process.signal(signal.SIGTERM)
        assert (await process.lines.receive_until(b"\n", 1 << 16)).startswith(
            b"worker: SIGTERM: draining"
        )
        # Draining: nothing new is claimed, and the first task may finish (the second
        # never does: it is cut off after --drain-timeout, 3 s, or the test's deadline
        # catches a worker that waited for it).
        later = await client.create_task("gated", {"gate": str(finishing)})
        await anyio.Path(finishing).touch()
        code, out, err = await process.exit()
        assert code == 0, err
        assert out.splitlines()[-1] == "worker: stopped: 1 completed, 0 failed, 1 handed back", err
        done = await get(client, first)
        assert (done.status, done.attempts) == (TaskStatus.COMPLETED, 0)
        back = await get(client, second)
        assert (back.status, back.attempts, back.assigned_worker) == (TaskStatus.QUEUED, 0, None)
        (run,) = await client.get_runs(second)
        assert run.status is RunStatus.RELEASED
        untouched = await get(client, later)
        assert (untouched.status, untouched.attempts) == (TaskStatus.QUEUED, 0)
        assert await client.get_runs(later) == []
        assert await client.get_active_workers() == []


# -- liveness: the connection that carries the work ---------------------------------------


async def test_a_killed_worker_process_has_its_tasks_requeued_at_once(
    db_path: str, anyio_backend: str, tmp_path: Path
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
        worker(
            db_path,
            anyio_backend,
            "_handlers:gated",
            "--concurrency",
            "2",
            "--worker-id",
            "doomed",
        ) as process,
    ):
        ids = [await client.create_task("gated", {"gate": str(tmp_path / "never")}) for _ in "ab"]

        async def all_running() -> bool:
            # Running is not enough: a claim answered with start=True is running before its
            # answer reaches the worker, and a worker killed before that never had it (the
            # owner gives it back uncounted). The handler's progress says it has it.
            for task_id in ids:
                runs = await client.get_runs(task_id)
                if not runs or runs[0].progress is None:
                    return False
            return True

        await until(client, all_running)
        async with client.subscribe("worker.offline") as offline:
            process.signal(signal.SIGKILL)

            # Leases and the worker timeout are 600 s: only the connection's end can do it.
            async def all_back() -> bool:
                return all([await status_is(client, i, TaskStatus.QUEUED) for i in ids])

            await until(client, all_back)
            with anyio.fail_after(DEADLINE):
                gone = {(await offline.receive()).worker_id for _ in range(2)}
        assert gone == {"doomed-1", "doomed-2"}
        for task_id in ids:
            task = await get(client, task_id)
            assert task.attempts == 1  # the worker died holding it: an attempt, as offline
            (run,) = await client.get_runs(task_id)
            assert run.status is RunStatus.LOST
            assert run.error is not None
            assert "connection" in run.error
        for worker_id in ("doomed-1", "doomed-2"):
            found = await client.get_worker(worker_id)
            assert found is not None
            assert found.status is WorkerStatus.OFFLINE
        assert await client.get_active_workers() == []


async def test_a_worker_whose_connection_ends_is_offline(db_path: str, anyio_backend: str) -> None:
    """Connections of this process, each its own client: which worker each carries is
    what it registered, heartbeat or claimed for, and the last connection to act for a
    worker is the one whose end is its death."""
    async with owner(db_path, anyio_backend), OrchestrationClient(db_path=db_path) as watch:
        task_id = await watch.create_task("build")
        async with OrchestrationClient(db_path=db_path) as first:
            await first.register_worker("idle", "builder", ["build"])
            await first.register_worker("leaving", "builder")
            await first.unregister_worker("leaving")
            # A claimer that never registered holds a task until its connection ends.
            claim = await first.claim_task("anonymous", ["build"])
            assert claim is not None
            assert claim.task.id == task_id
            async with OrchestrationClient(db_path=db_path) as second:
                # "moved" moves: a restarted worker registers again from a new process.
                await first.register_worker("moved", "builder")
                await second.register_worker("moved", "builder")
                await second.update_worker_heartbeat("unknown")  # no such worker: nothing
            # The second connection's end is the death of the worker it carried last.
            await until(watch, lambda: offline(watch, "moved"))
            assert not await offline(watch, "idle")
            await first.register_worker("moved", "builder")  # and back on the first
        # Both, in turn (each is released, then declared offline, one after the other).
        await until(watch, lambda: offline(watch, "idle"))
        await until(watch, lambda: offline(watch, "moved"))
        for worker_id in ("idle", "moved"):
            found = await watch.get_worker(worker_id)
            assert found is not None
            assert found.status is WorkerStatus.OFFLINE, worker_id
        assert await watch.get_worker("leaving") is None  # unregistered: not resurrected
        task = await get(watch, task_id)
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 1)
        (run,) = await watch.get_runs(task_id)
        assert run.status is RunStatus.LOST


async def test_a_worker_keeps_its_leases_by_the_owners_timeouts(
    db_path: str, anyio_backend: str
) -> None:
    """The owner's lease and worker timeouts are 2 s (the defaults are 30 s): the worker
    process renews and heartbeats every third of them, by what the owner told it. Margin:
    a stall of 1.3 s of the worker's loop would lose the lease."""
    async with (
        owner(db_path, anyio_backend, lease_timeout=2.0, worker_timeout=2.0),
        OrchestrationClient(db_path=db_path) as client,
        worker(db_path, anyio_backend, "_handlers:lasting") as process,
    ):
        task_id = await client.create_task("lasting", {"seconds": 3.0}, max_retries=0)
        await until(client, lambda: status_is(client, task_id, TaskStatus.COMPLETED))
        task = await get(client, task_id)
        assert (task.attempts, task.result) == (0, {"worked": 3.0})
        (run,) = await client.get_runs(task_id)
        assert run.status is RunStatus.COMPLETED
        process.signal(signal.SIGTERM)
        code, _, err = await process.exit()
        assert code == 0, err


async def test_a_worker_exits_1_when_its_runtime_goes_away(
    db_path: str, anyio_backend: str, tmp_path: Path
) -> None:
    """The owner is killed while a handler runs (its lease is 600 s, its gate never
    opens): the handler is cancelled at once, the copies stop, and the process exits 1
    saying why, for a supervisor to start it again."""
    async with (
        owner(db_path, anyio_backend) as owning,
        OrchestrationClient(db_path=db_path) as client,
        worker(db_path, anyio_backend, "_handlers:gated", "--concurrency", "3") as process,
    ):
        task_id = await client.create_task("gated", {"gate": str(tmp_path / "never")})

        async def waiting() -> bool:  # the handler reported progress: it waits on its gate
            runs = await client.get_runs(task_id)
            return bool(runs) and runs[0].progress is not None

        await until(client, waiting)
        owning.kill()
        code, out, err = await process.exit()
    assert code == 1, err
    assert "error: the workers stopped: lost the runtime of process" in err
    assert out.splitlines()[-1] == "worker: stopped: 0 completed, 0 failed, 0 handed back"


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["_handlers"], "invalid MODULE:HANDLER: must name a module and a handler in it, as"),
        (["_handlers:"], "invalid MODULE:HANDLER: must name a module and a handler"),
        (["no_such_module_here:run"], "no module named 'no_such_module_here'"),
        (["_handlers:missing"], "module '_handlers' has no 'missing'"),
        (["_handlers:not_async"], "_handlers:not_async is not an async function of a Task"),
        (["_handlers:NOT_CALLABLE"], "_handlers:NOT_CALLABLE is not an async function"),
        (["_broken:run"], "importing '_broken' failed: RuntimeError: no config file"),
        (["_handlers:echo", "--worker-id", "a\tb"], "invalid --worker-id: must not contain"),
        (["_handlers:echo", "--task-types", " "], "invalid --task-types: must not be empty"),
        (
            ["_handlers:echo", "--retry-on", "no_such_module_here:Error"],
            "invalid --retry-on: 'no_such_module_here:Error': no module named",
        ),
        (
            ["_handlers:echo", "--fail-on", "ValueError", "_handlers:Missing"],
            "invalid --fail-on: '_handlers:Missing': module '_handlers' has no 'Missing'",
        ),
        (
            ["_handlers:echo", "--fail-on", "_handlers:echo"],
            "invalid --fail-on: '_handlers:echo' is not an exception class (it is a function)",
        ),
    ],
)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_bad_handler_is_refused_with_exit_code_2(
    arguments: list[str], said: str, backend: str, tmp_path: Path
) -> None:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "_handlers.py").write_text((HERE / "_handlers.py").read_text())
    (folder / "_broken.py").write_text("raise RuntimeError('no config file')\n")
    db = tmp_path / "data" / "hive.db"
    result = subprocess.run(
        command(str(db), backend, *arguments),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=folder,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid ")
    assert said in result.stderr
    assert result.stdout == ""
    assert not db.parent.exists()  # nothing opened, nothing written
