"""Clients in another process: the owner's runtime serves its message API on a Unix
socket, and ``OrchestrationClient(db_path=...)`` of the same database connects to it.

Every test runs a real owner process (``_owner.py``) on a real file, and talks to it from
this process through the real socket, on both backends (the owner runs on the test's
backend too). Faults are real: the owner is killed with SIGKILL, or stopped; hostile
peers write raw bytes to the socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _raw import fresh_database, is_postgres
from reliability._remote import DEADLINE, owner

from hive_orchestration import (
    Claim,
    ConnectionLostError,
    Event,
    IllegalTransitionError,
    InvalidInputError,
    LeaseLostError,
    NotFoundError,
    OrchestrationClient,
    OutcomeUnknownError,
    RuntimeStoppedError,
    SubscriberLaggedError,
    SyncOrchestrationClient,
    Task,
    TaskCompletedEvent,
    TaskOutcome,
    TaskStatus,
)
from hive_orchestration.storage.sqlite.database import read_owner

pytestmark = pytest.mark.anyio

# -- every operation, as in-process ------------------------------------------------------


async def test_a_client_of_another_process_works_as_an_in_process_one(
    db_path: str, anyio_backend: str
) -> None:
    absolute = db_path if is_postgres(db_path) else str(Path(db_path).absolute())  # noqa: ASYNC240
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path, source_agent="planner") as client,
    ):
        assert client.remote
        assert client.db_path == absolute
        task_id = await client.create_task("build", {"n": 1}, priority=5, tags=("a", "b"))
        task = await client.get_task(task_id)
        assert isinstance(task, Task)
        assert (task.status, task.payload, task.tags, task.source_agent) == (
            TaskStatus.QUEUED,
            {"n": 1},
            ("a", "b"),
            "planner",
        )
        # The owner's checks, with the package's errors and their fields.
        with pytest.raises(InvalidInputError) as bad:
            await client.create_task("", {})
        assert bad.value.field == "task_type"
        with pytest.raises(NotFoundError) as missing:
            await client.cancel_task("no-such-task")
        assert (missing.value.kind, missing.value.id) == ("task", "no-such-task")
        with pytest.raises(TypeError):
            await client.create_task()  # type: ignore[call-arg]
        # A claim, its lease, and the worker's calls with it.
        claim = await client.claim_task("w1", ["build"], start=True)
        assert isinstance(claim, Claim)
        assert claim.task.id == task_id
        done = await client.complete_task(claim.lease, {"ok": True})
        assert done.status is TaskStatus.COMPLETED
        with pytest.raises(IllegalTransitionError) as illegal:
            await client.update_task_status(task_id, "running")
        assert (illegal.value.current, illegal.value.requested) == ("completed", "running")
        # The seeds' plan loop, across the socket.
        plan_id = await client.create_execution_plan(
            {
                "subtasks": [
                    {"id": "a", "task_type": "step"},
                    {"id": "b", "task_type": "step", "dependencies": ["a"]},
                ]
            }
        )
        assert await client.mark_plan_execution_started(plan_id)
        ran = []
        while (step := await client.get_next_planned_subtask(plan_id)) is not None:
            ran.append(step.subtask_id)
            await client.update_task_status(step.id, "completed")
        assert ran == ["a", "b"]
        assert await client.get_execution_plan_status(plan_id) == "completed"
        # App events and the log.
        published = await client.publish("review.done", {"score": 9})
        assert isinstance(published, Event)
        assert published.source == "planner"
        log = await client.read_events(published.seq - 1)
        assert [e.type for e in log] == ["review.done"]
        assert await client.last_seq() == published.seq
        # A client bound to other defaults shares the connection.
        bound = client.bind(source_agent="deployer")
        other = await bound.create_task("deploy")
        assert (await client.get_task(other)).source_agent == "deployer"  # type: ignore[union-attr]


async def test_a_sync_client_of_another_process(db_path: str, anyio_backend: str) -> None:
    async with owner(db_path, anyio_backend):

        def use() -> tuple[bool, TaskStatus]:
            with SyncOrchestrationClient(db_path=db_path, backend=anyio_backend) as client:
                task_id = client.create_task("report", {"day": "monday"})
                client.update_task_status(task_id, "completed")
                client.publish_task_event(TaskCompletedEvent(task_id=task_id))  # a no-op
                task = client.get_task(task_id)
                assert task is not None
                return client.remote, task.status

        remote, status = await anyio.to_thread.run_sync(use)
    assert remote
    assert status is TaskStatus.COMPLETED


# -- events --------------------------------------------------------------------------------


async def test_subscriptions_streams_and_callbacks_cross_the_socket(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
    ):
        seen: list[Event] = []
        marker_seen = anyio.Event()

        def collect(event: Event) -> None:
            seen.append(event)
            if event.type == "task.created" and event.data.get("task_type") == "marker":
                marker_seen.set()

        handle = await client.subscribe_to_task_events("*", collect)
        # Two commits larger than the buffer: a reader that keeps up does not lag.
        async with client.subscribe("task.created") as live, anyio.create_task_group() as group:
            for _ in range(2):
                group.start_soon(client.create_tasks, [{"task_type": "bulk"} for _ in range(600)])
            created = [await live.receive() for _ in range(1200)]
        seqs = [event.seq for event in created]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 1200
        last = await client.last_seq()
        # The log, then live, with no gap and no duplicate.
        async with client.events(after=0, pattern="task.created") as stream:
            replayed = [await stream.receive() for _ in range(1200)]
            marker = await client.create_task("marker")
            tail = await stream.receive()
        assert [e.seq for e in replayed] == seqs
        assert tail.task_id == marker
        # The callback saw everything, in order.
        with anyio.fail_after(DEADLINE):
            await marker_seen.wait()
        assert [e.seq for e in seen if e.seq <= last] == seqs
        await handle.aclose()
        assert handle.errors == 0


async def test_a_slow_remote_reader_lags_and_its_stream_catches_up(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
    ):
        async with client.subscribe("app.*", buffer=5) as live:
            for n in range(3):  # commits of one event: the reader falls behind
                await client.publish("app.tick", {"n": n})
            first = await live.receive()
            for n in range(3, 20):
                await client.publish("app.tick", {"n": n})
            with pytest.raises(SubscriberLaggedError) as lagged:
                await _drain(live)
        assert first.data == {"n": 0}
        assert lagged.value.last_seq >= first.seq
        async with client.events(after=0, pattern="app.*", buffer=5) as stream:
            got = [await stream.receive() for _ in range(20)]
        assert [e.data["n"] for e in got] == list(range(20))


async def _drain(subscription: Any) -> None:
    while True:
        await subscription.receive()


# -- the owner goes away -----------------------------------------------------------------


async def test_a_killed_owner_fails_calls_and_subscriptions_promptly(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path) as client,
    ):
        await client.create_task("build")
        outcome: list[BaseException] = []

        async def wait_for_work() -> None:
            try:
                await client.claim_task("w1", ["nothing-of-this-type"], wait=20)
            except ConnectionLostError as exc:
                outcome.append(exc)

        async with client.subscribe("*") as live:
            with anyio.fail_after(DEADLINE):
                async with anyio.create_task_group() as group:
                    group.start_soon(wait_for_work)
                    await anyio.wait_all_tasks_blocked()
                    process.kill()
                    started = anyio.current_time()
                    with pytest.raises(ConnectionLostError) as ended:
                        await live.receive()
            # EOF is seen at once: no waiting for remote_timeout.
            assert anyio.current_time() - started < 5.0
        assert isinstance(outcome[0], OutcomeUnknownError)
        assert str(process.pid) in str(ended.value)
        with pytest.raises(ConnectionLostError) as later:
            await client.get_task("x")
        assert not isinstance(later.value, OutcomeUnknownError)
    # The database can be opened again (recovery runs) by a new client.
    async with OrchestrationClient(db_path=db_path) as client:
        assert not client.remote
        assert len(await client.get_queued_tasks()) == 1


async def test_an_owner_that_stops_ends_streams_cleanly(db_path: str, anyio_backend: str) -> None:
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path) as client,
    ):
        await client.create_task("build")
        got: list[Event] = []
        answers: list[BaseException | None] = []

        async def wait_for_work() -> None:
            try:
                await client.claim_task("w1", ["nothing-of-this-type"], wait=20)
            except RuntimeStoppedError as exc:
                answers.append(exc)

        async with client.subscribe("*") as live:
            with anyio.fail_after(DEADLINE):
                async with anyio.create_task_group() as group:
                    group.start_soon(wait_for_work)
                    await anyio.wait_all_tasks_blocked()
                    assert await process.stop() == 0
                    async for event in live:  # ends, without an error
                        got.append(event)
        assert len(answers) == 1
        with pytest.raises(RuntimeStoppedError):
            await client.get_task("x")


async def test_a_claim_whose_remote_caller_left_goes_back_at_once(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as leaving,
        OrchestrationClient(db_path=db_path) as staying,
    ):
        # Parked, then cancelled before a task comes: nothing is held.
        with anyio.move_on_after(0.2):
            await leaving.claim_task("w-gone", ["job"], wait=10)
        task_id = await staying.create_task("job")
        claim = await staying.claim_task("w-here", ["job"], wait=5)
        assert claim is not None
        assert claim.task.id == task_id
        await staying.complete_task(claim.lease)
        # Many claims cancelled at any moment, answered or not: none is left held.
        for _ in range(30):
            await staying.create_task("job")
        taken: list[Claim] = []
        for i in range(30):
            with anyio.move_on_after(0.0005 * i):
                got = await leaving.claim_task("w-gone", ["job"], wait=1)
                if got is not None:
                    taken.append(got)  # received: it is this caller's to hand back
        for got in taken:
            await leaving.release_task(got.lease)
        with anyio.fail_after(DEADLINE):
            while True:
                held = await staying.get_tasks_by_status("assigned")
                if not held:
                    break
                await anyio.sleep(0.02)  # a give-back is on its way
        queued = await staying.get_queued_tasks(limit=100)
        assert len(queued) == 30


# -- the socket is the owner's alone ------------------------------------------------------


@pytest.fixture
def short_db_path() -> Iterator[str]:
    """As ``db_path``, in a folder of its own right under the temporary folder, not under
    pytest's ``tmp_path``: the socket goes beside the database only while its path fits
    in ``sun_path`` (107 bytes; past that the runtime serves an abstract socket,
    remote/address.py), which a test's folder under a longer temporary root (the suite's
    tmpfs, tests/conftest.py) or a longer user name in ``pytest-of-USER`` passes."""
    folder = Path(tempfile.mkdtemp(prefix="hive-"))
    try:
        yield fresh_database(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.sqlite_only("the socket's path beside the database file and its lock file")
async def test_the_socket_is_private_and_recorded_beside_the_lock(
    short_db_path: str, anyio_backend: str
) -> None:
    db_path = short_db_path
    beside = Path(os.path.realpath(Path(db_path).parent)) / "hive.db.hive"  # noqa: ASYNC240
    async with owner(db_path, anyio_backend) as process:
        pid, address = read_owner(db_path)
        assert pid == str(process.pid)
        assert address == process.address
        assert address is not None
        assert address.startswith("unix:")
        modes = _modes(address.removeprefix("unix:"))
        assert modes == (str(beside), 0o600, 0o700)
        await process.stop()
    # Gone with its owner: the file, its folder and the record.
    assert not _exists(address.removeprefix("unix:"))
    assert not _exists(str(beside))
    assert read_owner(db_path) == (None, None)


def _modes(path: str) -> tuple[str, int, int]:
    found = Path(path)
    return (
        str(found.parent),
        stat.S_IMODE(found.stat().st_mode),
        stat.S_IMODE(found.parent.stat().st_mode),
    )


def _exists(path: str) -> bool:
    return Path(path).exists()


async def test_a_long_path_falls_back_to_a_socket_that_checks_its_peer(
    tmp_path: Path, anyio_backend: str
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    db_path = str(deep / "hive.db")
    async with owner(db_path, anyio_backend) as process:
        assert process.address.startswith(("abstract:", "unix:"))
        assert len(process.address) < 120
        # Another user (uid 65534) connects: refused before a byte is read or written.
        script = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.settimeout(10)\n"
            "target = sys.argv[1]\n"
            "s.connect('\\0' + target[9:] if target.startswith('abstract:') else target[5:])\n"
            "try:\n"
            "    s.sendall(b'\\x00\\x00\\x00\\x05hello')\n"
            "    print(repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print(repr(b''))\n"
        )
        result = await anyio.run_process(
            [sys.executable, "-c", script, process.address], check=False
        )
        assert result.stdout.strip() == b"b''", result.stderr
        # The owner's own user still gets in.
        async with OrchestrationClient(db_path=db_path) as client:
            assert client.remote
            await client.create_task("build")


def _raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(DEADLINE)
    target = address.removeprefix("unix:")
    if address.startswith("abstract:"):
        target = "\0" + address.removeprefix("abstract:")
    sock.connect(target)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it is closed here after)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return True


async def test_hostile_peers_are_cut_off_and_the_owner_serves_on(
    db_path: str, anyio_backend: str
) -> None:
    async with owner(db_path, anyio_backend, remote_timeout=1.0) as process:

        def attack() -> list[bool]:
            # The four peers at once (the owner serves them side by side), each then
            # awaited in turn: the two that wait out a deadline (5 s and 3 s) overlap
            # instead of adding up.
            import msgspec

            hello = msgspec.msgpack.encode({"kind": "hello", "version": 1})
            sent = [
                # Garbage instead of a hello.
                (b"\x00\x00\x00\x08garbage!", 5),
                # A frame announced as 4 GiB: refused without reading it.
                (struct.pack(">I", 0xFFFFFFFF) + b"x" * 100, 5),
                # Nothing at all: cut at the handshake deadline (5 s).
                (b"", 10),
                # A hello, then half a frame, then silence: cut at 3 x remote_timeout.
                (struct.pack(">I", len(hello)) + hello + b"\x00\x00\x01", 10),
            ]
            socks = []
            for data, _ in sent:
                sock = _raw_connect(process.address)
                if data:
                    sock.sendall(data)
                socks.append(sock)
            return [
                _closed_within(sock, bound) for sock, (_, bound) in zip(socks, sent, strict=True)
            ]

        assert await anyio.to_thread.run_sync(attack) == [True, True, True, True]
        async with OrchestrationClient(db_path=db_path) as client:
            assert client.remote
            task_id = await client.create_task("build")
            assert (await client.get_task(task_id)) is not None


async def test_batch_completions_from_another_process(db_path: str, anyio_backend: str) -> None:
    """complete_tasks and fail_tasks through the socket: one outcome per item, a refused
    item's error rebuilt in the caller's process as the package's own, the others done."""
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
    ):
        assert client.remote
        await client.create_tasks([{"task_type": "job", "max_retries": 0} for _ in range(4)])
        claims = await client.claim_tasks("w1", "job", limit=4, start=True)
        after = await client.last_seq()
        outcomes = await client.complete_tasks(
            [
                {"lease": claims[0].lease, "result": {"n": 0}},
                {"lease": msgspec.structs.replace(claims[1].lease, secret="not it")},
                {"lease": claims[2].lease},
            ]
        )
        assert all(isinstance(o, TaskOutcome) for o in outcomes)
        assert outcomes[0].result().result == {"n": 0}
        assert outcomes[2].result().status is TaskStatus.COMPLETED
        refused = outcomes[1].refused
        assert refused is not None
        assert (refused.error, refused.field) == ("LeaseLostError", "items[1].lease")
        with pytest.raises(LeaseLostError) as lost:
            outcomes[1].result()
        assert lost.value.task_id == claims[1].task.id
        [failed] = await client.fail_tasks([{"lease": claims[3].lease, "error": "no"}])
        assert failed.result().status is TaskStatus.FAILED
        events = [(e.type, e.task_id) for e in await client.read_events(after)]
        assert events == [
            ("task.completed", claims[0].task.id),
            ("task.completed", claims[2].task.id),
            ("task.failed", claims[3].task.id),
        ]
        with pytest.raises(InvalidInputError) as bad:
            await client.complete_tasks([{"lease": claims[1].lease, "result": "done"}])
        assert bad.value.field == "items[0].result"


async def test_a_batch_completion_cancelled_in_flight_is_applied_whole_or_not_at_all(
    db_path: str, anyio_backend: str
) -> None:
    """complete_tasks through the socket, its caller cancelled 0 to 30 ms into the call
    (the client sends the frame before its first checkpoint, so the owner has it: it
    decides it whole, whatever the caller's Cancel frame finds): in every snapshot, every
    item completed or none, each completion logged once; the connection serves on."""
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path) as client,
    ):
        assert client.remote
        total = 0
        for delay in [0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.03]:
            await client.create_tasks([{"task_type": "job"} for _ in range(8)])
            claims = await client.claim_tasks("w1", "job", limit=8, start=True)
            with anyio.move_on_after(delay):
                await client.complete_tasks([{"lease": c.lease} for c in claims])
            # Each read is one snapshot of the owner's memory (one batch of its task
            # manager): all eight running or none, whenever the commit lands.
            ids = {c.task.id for c in claims}
            for _ in range(5):
                running = {t.id for t in await client.get_tasks_by_status("running", limit=100)}
                assert running & ids in (ids, set()), (delay, len(running & ids))
                await anyio.sleep(0.02)
            seen = {TaskStatus.RUNNING} if running & ids else {TaskStatus.COMPLETED}
            if seen == {TaskStatus.RUNNING}:
                again = await client.complete_tasks([{"lease": c.lease} for c in claims])
                assert all(o.refused is None for o in again)
            total += len(claims)
        completed = [e for e in await client.read_events(0) if e.type == "task.completed"]
        assert len(completed) == len({e.task_id for e in completed}) == total
