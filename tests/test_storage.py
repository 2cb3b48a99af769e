"""The storage actor: group commit, durability of replies, atomicity under cancellation,
isolation of a faulty write. Runs against both drivers (aiosqlite and the worker thread)."""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import msgspec
import pytest
from _interrupt import Interrupter, Statement, interrupt
from _raw import raw_rows

from hive_orchestration import RuntimeConfig, Task, TaskStatus
from hive_orchestration.errors import RuntimeStoppedError, StorageError
from hive_orchestration.messages.events import Event, JsonValue
from hive_orchestration.messages.storage import (
    AppendEvent,
    GetStorageStats,
    PutTask,
    ReadEvents,
    StorageMessage,
    Write,
)
from hive_orchestration.runtime import ActorRef, ChildSpec, Supervisor
from hive_orchestration.storage import StorageActor

pytestmark = pytest.mark.anyio

Driver = Literal["aiosqlite", "thread"]
INTERRUPT = Path(__file__).with_name("_interrupt.py")


@pytest.fixture(params=["aiosqlite", "thread"])
def driver(request: pytest.FixtureRequest, anyio_backend: str) -> Driver:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def storage(
    db_path: str, driver: Driver, **config: object
) -> AsyncIterator[ActorRef[StorageMessage]]:
    cfg = RuntimeConfig.from_mapping({"storage_driver": driver, **config})
    ref: ActorRef[StorageMessage] = ActorRef("storage", mailbox_size=4096, ask_timeout=30.0)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: StorageActor(db_path, cfg))],
        max_restarts=0,
        restart_window=10.0,
        shutdown_timeout=10.0,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            yield ref
        finally:
            await supervisor.stop()


def append(kind: str, **data: JsonValue) -> AppendEvent:
    event = Event(type=kind, timestamp=1.0, source="test", data=data)
    return AppendEvent(event, msgspec.json.encode(data))


def stored_events(db_path: str) -> list[tuple[Any, ...]]:
    return raw_rows(db_path, "SELECT seq, type, data FROM events ORDER BY seq")


async def test_group_commit_batches_concurrent_writes(db_path: str, driver: Driver) -> None:
    writers = 100
    async with storage(db_path, driver) as ref:
        seqs: list[int] = []

        async def write(i: int) -> None:
            committed = await ref.ask(Write(ops=(append("w", i=i),)))
            seqs.extend(committed.seqs)

        async with anyio.create_task_group() as tg:
            for i in range(writers):
                tg.start_soon(write, i)
        stats = await ref.ask(GetStorageStats())
    assert sorted(seqs) == list(range(1, writers + 1))
    assert stats.writes == writers
    # 100 concurrent writers share a handful of transactions, not one each.
    assert stats.transactions <= writers // 10, stats
    assert stats.largest_batch >= 10
    assert len(stored_events(db_path)) == writers


async def test_each_commit_is_timed_and_sized_in_fixed_buckets(
    db_path: str, driver: Driver
) -> None:
    async with storage(db_path, driver) as ref:
        await ref.ask(Write(ops=(append("alone"),)))
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(ref.ask, Write(ops=(append("w", i=i),)))
        # A write that fails is not a commit: it is in neither histogram.
        # A Struct is not validated when built: this event's type (NOT NULL) is None.
        bad = Event(type=None, timestamp=1.0, source="test")  # type: ignore[arg-type]
        with pytest.raises(StorageError):
            await ref.ask(Write(ops=(AppendEvent(bad, b"{}"),)))
        stats = await ref.ask(GetStorageStats())
    seconds, sizes = stats.commit_seconds, stats.commit_batch_size
    assert len(seconds.counts) == len(seconds.bounds) + 1
    assert sum(seconds.counts) == stats.transactions
    assert seconds.sum > 0
    assert sum(sizes.counts) == stats.transactions
    assert sizes.sum == stats.writes == 51
    assert sizes.counts[0] >= 1  # the first write, committed alone
    # The largest batch is in the bucket whose bound is the first to hold it.
    largest = max(i for i, count in enumerate(sizes.counts) if count)
    assert sizes.bounds[largest - 1] < stats.largest_batch <= sizes.bounds[largest]


async def test_a_reply_means_the_write_is_on_disk(db_path: str, driver: Driver) -> None:
    """Each acknowledged write is visible to a separate connection at once (committed)."""
    async with storage(db_path, driver) as ref:
        for i in range(5):
            committed = await ref.ask(Write(ops=(append("d", i=i),)))
            rows = stored_events(db_path)
            assert rows[-1][0] == committed.seqs[0]
            assert msgspec.json.decode(rows[-1][2]) == {"i": i}


async def test_ops_of_one_write_apply_in_order_with_consecutive_seqs(
    db_path: str, driver: Driver
) -> None:
    async with storage(db_path, driver) as ref:
        committed = await ref.ask(Write(ops=tuple(append(f"op{i}") for i in range(4))))
        events = await ref.ask(ReadEvents(after=0, limit=10))
    assert committed.seqs == (1, 2, 3, 4)
    assert [e.type for e in events] == ["op0", "op1", "op2", "op3"]
    assert [e.seq for e in events] == [1, 2, 3, 4]


async def test_an_event_is_stored_and_read_back_exactly_as_written(
    db_path: str, driver: Driver
) -> None:
    """Every field and the data's text as given, whatever they hold: quotes, backslashes,
    JSON escapes, text beyond ASCII, a timestamp to the last bit, fields left empty
    (PostgreSQL's numbered events travel as one JSON array: this is what it must keep)."""
    odd = 'a "quoted" \\ back\\slash, \u00e9t\u00e9 \u2603 \U0001f41d {"x": [1]}'
    data_json = b'{"text": "say \\"hi\\"\\n\\u00e9", "n": 1.5e-7, "deep": {"b": [true, null]}}'
    events = [
        Event(
            type="odd.event",
            timestamp=1765000000.1234567,
            source=odd,
            correlation_id=odd,
            task_id="t\\1",
            plan_id='p"1',
            worker_id="w\u00e9",
        ),
        Event(type="plain", timestamp=1e-7, source="s"),
        Event(type="big", timestamp=4102444800.000001, source="s", task_id=""),
    ]
    ops = (
        AppendEvent(events[0], data_json),
        AppendEvent(events[1], b"{}"),
        AppendEvent(events[2], '{"\u2603": "\u00e9"}'.encode()),
    )
    async with storage(db_path, driver) as ref:
        committed = await ref.ask(Write(ops=ops))
        read = await ref.ask(ReadEvents(after=0, limit=10))
    assert committed.seqs == (1, 2, 3)
    for op, seq, back in zip(ops, committed.seqs, read, strict=True):
        wanted = msgspec.structs.replace(op.event, seq=seq, data=msgspec.json.decode(op.data_json))
        assert back == wanted
        assert back.timestamp.hex() == op.event.timestamp.hex()
    # The data's text is stored as given, byte for byte.
    assert [row[2] for row in stored_events(db_path)] == [op.data_json.decode() for op in ops]


def a_task(task_id: str) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=task_id, title=task_id, task_type="job", status=TaskStatus.QUEUED,
        created_at=now, updated_at=now,
    )  # fmt: skip


@pytest.mark.sqlite_only(
    "interrupts the SQLite drivers' transaction between two statements (tests/_interrupt.py)"
)
async def test_cancelled_writers_leave_no_partial_write(
    db_path: str, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes of several statements (a task row and three events) by writers cancelled at
    random points, while every other transaction is interrupted between two of its
    statements (SQLite's I/O error, as from a failing disk). In the database file, read
    directly: each write is there whole or not at all, every acknowledged write is there,
    no refused one is, and the connection is never left inside a transaction that a later
    commit would finish."""
    rng = random.Random(1234)
    cuts = random.Random(99)
    transactions = itertools.count()
    interrupting = True

    def choose(statements: Sequence[Statement]) -> int | None:
        if not interrupting or next(transactions) % 2 == 0:
            return None
        return cuts.randrange(1, len(statements))  # every write has four statements

    interrupter = interrupt(monkeypatch.setattr, Interrupter(choose))
    writes = 151
    acknowledged: set[int] = set()
    refused: dict[int, StorageError] = {}
    async with storage(db_path, driver) as ref:

        async def write(i: int, delay: float) -> None:
            ops = (PutTask(a_task(f"t{i}")), *(append("part", write=i, part=p) for p in range(3)))
            with anyio.move_on_after(delay):
                try:
                    await ref.ask(Write(ops=ops))
                except StorageError as exc:
                    refused[i] = exc
                else:
                    acknowledged.add(i)

        for first in range(0, 150, 50):  # rounds: transactions end at different points
            async with anyio.create_task_group() as tg:
                for i in range(first, first + 50):
                    tg.start_soon(write, i, rng.choice([0, 0, 0.0001, 0.0005, 0.001, 0.005, 1.0]))
                    if i % 10 == 0:
                        await anyio.lowlevel.checkpoint()
        # One more, alone and never cancelled, so that a refused writer hears of it
        # whatever the storm did. (First what cancelled writers left queued: a read is
        # answered after the writes before it.)
        await ref.ask(GetStorageStats())
        stormed = interrupter.interrupted
        transactions = itertools.count(1)
        await write(150, 10.0)
        assert 150 in refused
        interrupting = False
        # A last write commits only itself.
        try:
            final: object = (await ref.ask(Write(ops=(append("final"),)))).seqs
        except StorageError as exc:
            final = exc  # (checked below, after what the file holds)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        tasks = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
        events = conn.execute("SELECT seq, type, data FROM events ORDER BY seq").fetchall()
    parts: dict[int, list[int]] = {i: [] for i in range(writes)}
    for _, kind, data in events:
        if kind == "part":
            part = msgspec.json.decode(data)
            parts[part["write"]].append(part["part"])
    stored = {i for i in parts if f"t{i}" in tasks}
    torn = {
        i: (f"t{i}" in tasks, p)
        for i, p in parts.items()
        if p != ([0, 1, 2] if i in stored else [])
    }
    assert torn == {}, "writes in the database in part: {write: (its task row?, its events)}"
    assert acknowledged <= stored  # every acknowledged write is there
    assert not refused.keys() & stored  # and no write its writer was told is not
    for error in refused.values():
        assert error.fault == "io_error", error
        assert "nothing of it was applied" in str(error)
    # The random deadlines really cut writers short at different points, and the storm's
    # transactions were really interrupted half-way.
    assert 0 < len(acknowledged) < 150
    assert stormed > 0
    assert final == (events[-1][0],)
    assert events[-1][1] == "final"
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1))  # no gap


@pytest.mark.sqlite_only(
    "its child interrupts the SQLite thread driver's transaction (tests/_interrupt.py)"
)
async def test_a_process_killed_in_the_middle_of_a_write_leaves_none_of_it(
    new_db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    """A real process (``tests/_interrupt.py``) killed with SIGKILL half-way through the
    transaction of a 20-task batch: reopened, the database has the acknowledged tasks and
    not one row of the batch, and its tasks and log agree."""
    Path(new_db_path).parent.mkdir(parents=True)
    stderr = tmp_path / "child.err"
    with stderr.open("wb") as err:
        done = await anyio.run_process(
            [sys.executable, str(INTERRUPT), anyio_backend, new_db_path], stderr=err, check=False
        )
    lines = done.stdout.decode().splitlines()
    context = f"child output {lines}, stderr:\n{stderr.read_text()}"
    assert done.returncode == -signal.SIGKILL, context
    assert lines[-1] == "cut", context  # killed in the batch's transaction
    acknowledged = [line.removeprefix("ack ") for line in lines[:-1]]
    assert len(acknowledged) == 5, context
    with contextlib.closing(sqlite3.connect(new_db_path)) as conn:
        tasks = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
        logged = conn.execute("SELECT type, task_id FROM events ORDER BY seq").fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert tasks == set(acknowledged)  # no row of the batch
    assert logged == [("task.created", task_id) for task_id in acknowledged]


async def test_one_faulty_write_does_not_fail_its_batch(db_path: str, driver: Driver) -> None:
    """A write that breaks a constraint fails alone; the rest of its batch commits."""
    # A Struct is not validated when built: this event's type (NOT NULL) is None.
    bad_event = Event(type=None, timestamp=1.0, source="test")  # type: ignore[arg-type]
    bad = Write(ops=(append("before-bad"), AppendEvent(bad_event, b"{}")))
    outcomes: dict[int, object] = {}
    async with storage(db_path, driver) as ref:

        async def write(i: int, message: Write) -> None:
            try:
                outcomes[i] = (await ref.ask(message)).seqs
            except StorageError as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(write, i, bad if i == 15 else Write(ops=(append("ok", i=i),)))
        events = await ref.ask(ReadEvents(after=0, limit=100))
        stats = await ref.ask(GetStorageStats())
    assert isinstance(outcomes.pop(15), StorageError)
    assert all(isinstance(seqs, tuple) for seqs in outcomes.values())
    # Nothing of the faulty write (not even its first, valid op), and no gap in seqs.
    assert [e.type for e in events] == ["ok"] * 29
    assert [e.seq for e in events] == list(range(1, 30))
    assert stats.failed_writes == 1
    assert stats.writes == 29


async def test_seqs_continue_after_reopen(db_path: str, driver: Driver) -> None:
    async with storage(db_path, driver) as ref:
        await ref.ask(Write(ops=(append("a"), append("b"))))
    async with storage(db_path, driver) as ref:
        committed = await ref.ask(Write(ops=(append("c"),)))
        stats = await ref.ask(GetStorageStats())
    assert committed.seqs == (3,)
    assert stats.last_seq == 3


@pytest.mark.sqlite_only("SQLite's synchronous pragma and the SQLite driver choice")
async def test_synchronous_setting_is_applied(db_path: str, driver: Driver) -> None:
    async with storage(db_path, driver, synchronous="NORMAL") as ref:
        stats = await ref.ask(GetStorageStats())
    assert stats.synchronous == "NORMAL"
    assert stats.driver == driver


@pytest.mark.sqlite_only("another connection holds SQLite's write lock past busy_timeout")
async def test_a_locked_database_fails_the_write_cleanly(db_path: str, driver: Driver) -> None:
    """SQLite refusing a write is a StorageError for the writer; the actor keeps serving."""
    async with storage(db_path, driver, busy_timeout=0.05) as ref:
        await ref.ask(Write(ops=(append("before"),)))
        with contextlib.closing(sqlite3.connect(db_path)) as other:
            # Another process holds the write lock past the busy timeout.
            other.execute("PRAGMA busy_timeout=0")
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StorageError, match="locked"):
                await ref.ask(Write(ops=(append("while-locked"),)))
            other.rollback()
        committed = await ref.ask(Write(ops=(append("after"),)))
        events = await ref.ask(ReadEvents(after=0, limit=10))
    assert [e.type for e in events] == ["before", "after"]
    assert committed.seqs == (2,)


async def test_an_unhandled_message_is_refused_at_once(db_path: str, driver: Driver) -> None:
    from hive_orchestration.errors import HiveError
    from hive_orchestration.messages.events import GetBroadcastStats

    async with storage(db_path, driver) as ref:
        with anyio.fail_after(5), pytest.raises(HiveError, match="does not handle"):
            await ref.ask(GetBroadcastStats())  # type: ignore[arg-type]
        assert (await ref.ask(GetStorageStats())).writes == 0


@pytest.mark.sqlite_only("slows the SQLite thread driver's transaction (drivers._transaction_sync)")
async def test_a_runtime_cancelled_mid_commit_commits_whole_and_answers_truthfully(
    db_path: str, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """The shutdown deadline passes while a batch is inside its transaction: the batch
    still ends in COMMIT, every writer is told it is durable, and no transaction is left
    open. (Thread driver: the slow-down is injected in its worker thread.)"""
    import time

    from hive_orchestration import Runtime
    from hive_orchestration.storage.sqlite import drivers

    original = drivers._transaction_sync
    entered = anyio.Event()
    token = anyio.lowlevel.current_token()

    def slow(conn: sqlite3.Connection, statements: list[drivers.Statement]) -> None:
        if len(statements) > 1:  # the batch of writes, not the migrations at open
            anyio.from_thread.run_sync(entered.set, token=token)
            time.sleep(0.3)
        original(conn, statements)

    monkeypatch.setattr(drivers, "_transaction_sync", slow)
    config = RuntimeConfig(storage_driver="thread", shutdown_timeout=0.05)
    outcomes: dict[int, object] = {}
    async with anyio.create_task_group() as writers, Runtime.open(db_path, config=config) as rt:

        async def write(i: int) -> None:
            try:
                outcomes[i] = (await rt.publish("w", {"i": i})).seq
            except Exception as exc:
                outcomes[i] = type(exc)

        for i in range(20):
            writers.start_soon(write, i)
        with anyio.fail_after(5):
            await entered.wait()
        # Leaving the block: the deadline passes with the batch inside its transaction.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        stored = {
            msgspec.json.decode(data)["i"]: seq
            for seq, data in conn.execute("SELECT seq, data FROM events").fetchall()
        }
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # Every writer is told the truth: its seq if and only if it is on disk, and
    # RuntimeStoppedError (not durable) otherwise. The batch in flight did commit.
    committed = {i: seq for i, seq in outcomes.items() if isinstance(seq, int)}
    assert committed == stored
    assert stored, "the batch inside its transaction must have committed"
    assert all(outcomes[i] is RuntimeStoppedError for i in outcomes.keys() - stored.keys())


async def test_memory_database_survives_a_storage_restart(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    from hive_orchestration import Runtime
    from hive_orchestration.errors import ActorFailedError

    original = StorageActor._read_events
    faults = [RuntimeError("transient")]

    async def flaky(self: StorageActor, read: ReadEvents) -> tuple[Event, ...]:
        if faults:
            raise faults.pop()
        return await original(self, read)

    monkeypatch.setattr(StorageActor, "_read_events", flaky)
    async with Runtime.open(":memory:") as rt:
        for i in range(3):
            await rt.publish("before", {"i": i})
        with pytest.raises(ActorFailedError):
            await rt.read_events()
        after = await rt.publish("after")
        events = await rt.read_events()
    assert [e.type for e in events] == ["before"] * 3 + ["actor.restarted", "after"]
    assert after.seq == 5


@pytest.mark.sqlite_only(
    "one owner per file: a PostgreSQL database takes a second runtime as a node"
    " (tests/test_pg_nodes.py)"
)
async def test_a_second_runtime_on_the_same_file_is_refused(
    db_path: str, anyio_backend: str
) -> None:
    from hive_orchestration import Runtime

    async with Runtime.open(db_path) as first:
        await first.publish("mine")
        with pytest.raises(StorageError, match="already open in another runtime"):
            async with Runtime.open(db_path):
                pytest.fail("two runtimes own one database")
        await first.publish("still mine")
    async with Runtime.open(db_path) as second:  # free again once the first has closed
        assert [e.type for e in await second.read_events()] == ["mine", "still mine"]
