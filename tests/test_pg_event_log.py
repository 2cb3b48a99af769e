"""One event log across nodes on PostgreSQL: every event once, in one order, no gap.

Several runtimes (nodes) commit events to one database at once. The database numbers
each commit's events from a counter row updated last in the transaction, whose row lock
orders the commits (storage/pg/sql.py, pg-design 4.4): a number becomes visible only
after every lower one, so ``read_events(after=)`` / ``events(after=)`` never pass a number
that commits later. Each node's log tailer (storage/pg/tailer.py) publishes the other
nodes' events to its own subscribers, in seq order, woken by ``NOTIFY``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _pg
import anyio
import anyio.to_thread
import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import EventsTrimmedError, HiveError, Runtime, StorageError  # noqa: E402
from hive_orchestration.client import EventStream  # noqa: E402
from hive_orchestration.messages.events import Event  # noqa: E402
from hive_orchestration.messages.storage import AppendEvent  # noqa: E402
from hive_orchestration.storage.pg import claim as pg_claim  # noqa: E402
from hive_orchestration.storage.pg.driver import translate  # noqa: E402
from hive_orchestration.storage.pg.sql import PostgresSql  # noqa: E402

pytestmark = [pytest.mark.postgres]

#: Seconds a condition may take to hold on a loaded 2-core machine (generous: the tests
#: wait on conditions, this only bounds a failure).
WAIT = 60


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several nodes admitted on one database: the store's private switch while the
    claims work keeps it (claim.py's ``_SHARED``); a no-op once several nodes are the rule
    and the switch is gone."""
    monkeypatch.setattr(pg_claim, "_SHARED", True, raising=False)


def _numbered(count: int, origin: str = "raw") -> tuple[str, tuple[Any, ...]]:
    """The statement a node runs last in a transaction that appends ``count`` events, in
    psycopg's marks: what a writer of another process would run."""
    ops = [
        AppendEvent(Event(type="raw.event", timestamp=0.0, source="raw"), b"{}")
        for _ in range(count)
    ]
    statement = PostgresSql().numbered_events(ops, origin)
    assert statement is not None
    text, order = translate(statement[0])
    assert order is None
    return text, statement[1]


# -- the ordering itself, made to happen ----------------------------------------------------


def _waiting_on_a_lock(url: str, pid: int) -> bool:
    rows = raw(url, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
    return bool(rows) and rows[0][0] == "Lock"


def test_a_number_is_visible_only_after_every_lower_one(pg_url: str) -> None:
    """Two transactions append events; the first holds its number uncommitted. With the
    counter row the second waits for it, so a reader never sees number 2 without 1.
    The negative control, a bare serial: the second commits first, a reader sees 2, moves
    its cursor past 1, and never reads 1 (pg-design 4.4 measured thousands lost so)."""

    async def migrate() -> None:
        async with Runtime.open(pg_url):
            pass

    anyio.run(migrate)
    text, params = _numbered(1)
    first = psycopg.connect(pg_url, autocommit=True)
    second = psycopg.connect(pg_url, autocommit=True)
    try:
        first.execute("BEGIN")
        assert first.execute(text, params).fetchone()[0] == 1
        done = threading.Event()

        def commit_second() -> None:
            second.execute("BEGIN")
            second.execute(text, params)
            second.execute("COMMIT")
            done.set()

        thread = threading.Thread(target=commit_second)
        thread.start()
        pid = second.info.backend_pid
        for _ in range(WAIT * 100):
            if _waiting_on_a_lock(pg_url, pid):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the second writer never waited for the first's counter row lock")
        assert raw(pg_url, "SELECT seq FROM events ORDER BY seq") == []  # nothing to pass
        first.execute("COMMIT")
        thread.join(WAIT)
        assert done.is_set()
        assert raw(pg_url, "SELECT seq FROM events ORDER BY seq") == [(1,), (2,)]

        # The control: numbers from a serial, taken in the order the writers started.
        raw(pg_url, "CREATE TABLE serial_log (seq bigserial PRIMARY KEY, note text)")
        first.execute("BEGIN")
        first.execute("INSERT INTO serial_log (note) VALUES ('first')")
        second.execute("INSERT INTO serial_log (note) VALUES ('second')")  # commits at once
        cursor = max(seq for (seq,) in raw(pg_url, "SELECT seq FROM serial_log"))
        first.execute("COMMIT")
        after = raw(pg_url, "SELECT seq FROM serial_log WHERE seq > %s", (cursor,))
        assert cursor == 2
        assert after == []
    finally:
        first.close()
        second.close()


# -- several nodes ----------------------------------------------------------------------


class Finish:
    """Where the log ends once the writers are done (None while they write)."""

    def __init__(self) -> None:
        self.at: int | None = None

    def reached(self, got: list[int]) -> bool:
        return self.at is not None and (self.at == 0 or (bool(got) and got[-1] >= self.at))

    def set(self, url: str) -> None:
        self.at = int(raw(url, "SELECT coalesce(max(seq), 0) FROM events")[0][0])


async def _follow(stream: EventStream, finish: Finish, into: list[int]) -> None:
    """A stream's reader, until it has given the log's last event."""
    async with stream:
        while not finish.reached(into):
            with anyio.move_on_after(0.1):
                try:
                    into.append((await stream.receive()).seq)
                except StorageError:
                    # The database went (its replay read failed): a client carries on
                    # with the same stream, from the last event it gave.
                    await anyio.sleep(0.01)


async def _read_log(runtime: Runtime, finish: Finish, into: list[int]) -> None:
    """A reader following the log with read_events(after=cursor), as a client would."""
    cursor = 0
    while not finish.reached(into):
        page = await runtime.read_events(cursor, limit=37)
        if not page:
            await anyio.sleep(0.005)
            continue
        into.extend(event.seq for event in page)
        cursor = page[-1].seq


def _raw_writer(url: str, commits: int, batch: int, stop: threading.Event) -> int:
    """Another process's writer: commits ``commits`` transactions of ``batch`` events each
    through the counter statement, holding the counter row a moment before each COMMIT
    (the window a serial would reorder in). Returns the events it committed."""
    text, params = _numbered(batch)
    written = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(commits):
            if stop.is_set():
                break
            conn.execute("BEGIN")
            conn.execute(text, params)
            conn.execute("SELECT pg_sleep(0.002)")
            conn.execute("COMMIT")
            written += batch
    return written


@pytest.mark.anyio
async def test_concurrent_writers_give_every_reader_every_event_once_in_order(
    pg_url: str, shared: None
) -> None:
    """Three nodes and a raw writer of another connection commit events at once. Readers
    following read_events(after=) and every node's events(after=0) stream (replay, then
    live) each get every event exactly once, dense, in order, ending at the log's end."""
    per_node, tasks_per_node, raw_commits, raw_batch = 60, 3, 40, 5
    async with (
        Runtime.open(pg_url) as a,
        Runtime.open(pg_url) as b,
        Runtime.open(pg_url) as c,
    ):
        nodes = (a, b, c)
        acknowledged: list[int] = []
        readers: list[list[int]] = [[], []]
        streams: list[list[int]] = [[] for _ in nodes]
        finish = Finish()

        async def publish(node: Runtime, name: str) -> None:
            client = node.client(source_agent=name)
            for _ in range(per_node):
                acknowledged.append((await client.publish("job.step")).seq)

        with anyio.fail_after(WAIT * 3):
            async with anyio.create_task_group() as tg:
                for i, node in enumerate(nodes):
                    stream = node.client(source_agent="reader").events(after=0)
                    await stream.open()
                    tg.start_soon(_follow, stream, finish, streams[i])
                tg.start_soon(_read_log, a, finish, readers[0])
                tg.start_soon(_read_log, c, finish, readers[1])
                async with anyio.create_task_group() as writers:
                    for i, node in enumerate(nodes):
                        for j in range(tasks_per_node):
                            writers.start_soon(publish, node, f"w{i}{j}")
                    writers.start_soon(
                        _run_thread, _raw_writer, pg_url, raw_commits, raw_batch, threading.Event()
                    )
                finish.set(pg_url)
        logged = [seq for (seq,) in raw(pg_url, "SELECT seq FROM events ORDER BY seq")]
        total = len(nodes) * per_node * tasks_per_node + raw_commits * raw_batch
        assert len(logged) >= total
        assert logged == list(range(1, len(logged) + 1))  # dense
        assert len(acknowledged) == len(set(acknowledged))  # no number given twice
        for got in (*readers, *streams):
            assert got == logged  # each once, in order, to the end
        assert await a.last_seq() == logged[-1]


async def _run_thread(job: Any, *args: Any) -> None:
    await anyio.to_thread.run_sync(job, *args)


@pytest.mark.anyio
async def test_a_subscriber_on_one_node_sees_the_other_nodes_events(
    pg_url: str, shared: None
) -> None:
    """Node A writes nothing; its live subscriber gets node B's and C's events and a raw
    writer's, each once, in seq order, as they commit (woken by NOTIFY, not by A)."""
    async with (
        Runtime.open(pg_url) as a,
        Runtime.open(pg_url) as b,
        Runtime.open(pg_url) as c,
    ):
        start = await a.last_seq()
        got: list[Event] = []
        async with a.subscribe("job.*") as subscription:
            sent = [await b.publish("job.b", {"n": 1}, source="b")]
            sent.append(await c.publish("job.c", {"n": 2}, source="c"))
            await anyio.to_thread.run_sync(_raw_writer, pg_url, 1, 3, threading.Event())
            sent.append(await b.publish("job.b", {"n": 3}, source="b"))
            with anyio.fail_after(WAIT):
                while len(got) < 3:
                    got.append(await subscription.receive())
        assert [event.seq for event in got] == [sent[0].seq, sent[1].seq, sent[2].seq]
        assert [(e.type, e.source, e.data) for e in got] == [
            (e.type, e.source, e.data) for e in sent
        ]
        assert sent[0].seq > start
        assert sent[2].seq == sent[1].seq + 4  # the raw writer's three between


@pytest.mark.anyio
async def test_a_node_reads_of_the_others_events_only_what_its_subscribers_could_match(
    pg_url: str, shared: None
) -> None:
    """Node A's subscribers take ``job.*`` (and its plan feed, plan tasks' ends): of B's
    events it reads and fans out the jobs only, in order, none of B's other events (a
    node's share of the fan-out follows its subscribers, not every node's commits); a
    subscriber of everything then widens it at once."""
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        got: list[Event] = []
        async with a.subscribe("job.*") as jobs:
            before = (await a.statistics()).broadcast.published
            sent = []
            for n in range(3):
                await b.publish("other.b", {"n": n}, source="b")
                await b.create_task("work")  # task.created: no plan, not read either
                sent.append(await b.publish("job.b", {"n": n}, source="b"))
            with anyio.fail_after(WAIT):
                while len(got) < 3:  # the last: B's last commit, so A is past them all
                    got.append(await jobs.receive())
            published = (await a.statistics()).broadcast.published - before
            assert [e.seq for e in got] == [e.seq for e in sent]
            assert published == 3  # the jobs: nothing else of B's was fanned out
            async with a.subscribe("*") as everything:
                seen = await b.publish("other.b", {"n": 9}, source="b")
                with anyio.fail_after(WAIT):
                    assert (await everything.receive()).seq == seen.seq


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The log reads of every node's tailer in this process (each the seq read through),
    its safety poll put out of reach: its reads are then the notices' and its start's."""
    from hive_orchestration.storage.pg import tailer as pg_tailer

    monkeypatch.setattr(pg_tailer, "POLL_SECONDS", 3600.0)
    found: list[int] = []
    catch_up = pg_tailer.LogTailer._catch_up

    async def counted(self: pg_tailer.LogTailer, through: int) -> None:
        found.append(through)
        await catch_up(self, through)

    monkeypatch.setattr(pg_tailer.LogTailer, "_catch_up", counted)
    return found


@pytest.mark.anyio
async def test_a_node_passes_the_commits_nobody_there_wants_without_reading_them(
    pg_url: str, reads: list[int]
) -> None:
    """Each commit's notice names its event types (and which fields some event of each
    sets): node A, whose subscribers take ``job.*`` and plan tasks' ends, moves past B's
    other commits unread, and reads the one that holds a job; its subscriber gets the
    jobs in order. (A's safety poll is put out of reach: its reads are the notices'.)"""
    async with (
        Runtime.open(pg_url) as a,
        Runtime.open(pg_url) as b,
        a.subscribe("job.*") as jobs,
    ):
        first = await b.publish("job.b", {"n": 0}, source="b")
        with anyio.fail_after(WAIT):
            assert (await jobs.receive()).seq == first.seq
        reads.clear()
        for n in range(10):
            await b.publish("other.b", {"n": n}, source="b", task_id=f"t{n}")
            await b.create_task("work")  # task.created, no plan: not wanted either
            await anyio.sleep(0.02)  # each its own notice
        last = await b.publish("job.b", {"n": 1}, source="b")
        with anyio.fail_after(WAIT):
            assert (await jobs.receive()).seq == last.seq
    assert len(reads) <= 2, reads  # the job's commit (and at most one more)


@pytest.mark.anyio
async def test_replay_then_live_across_nodes_has_no_gap_or_duplicate(
    pg_url: str, shared: None
) -> None:
    """A stream opened on node A from a point in the log, while B and C keep committing:
    it replays from the log, then goes live on what A's tailer publishes, and gives every
    later event once, in order, whoever wrote it."""
    async with (
        Runtime.open(pg_url) as a,
        Runtime.open(pg_url) as b,
        Runtime.open(pg_url) as c,
    ):
        for node in (b, c):
            for _ in range(20):
                await node.publish("job.before", source="x")
        after = 15
        got: list[int] = []
        finish = Finish()

        async def publish(node: Runtime) -> None:
            for _ in range(50):
                await node.publish("job.during", source="x")

        with anyio.fail_after(WAIT * 2):
            async with anyio.create_task_group() as tg:
                stream = a.client(source_agent="r").events(after=after, buffer=8)
                tg.start_soon(_follow, stream, finish, got)
                async with anyio.create_task_group() as writers:
                    writers.start_soon(publish, b)
                    writers.start_soon(publish, c)
                # A stream that caught up is live: what the nodes write next reaches it
                # through A's tailer, not the log (however fast the replay kept up before).
                end = int(raw(pg_url, "SELECT max(seq) FROM events")[0][0])
                while not got or got[-1] < end:  # noqa: ASYNC110 (got is a plain list)
                    await anyio.sleep(0.01)
                # Having given the last event it read, the stream goes live at its next
                # replay page, found empty; what commits before that read still comes by
                # the replay (it lagged under load in CI, and the two events written next
                # were both replayed). So write until one comes live.
                while True:
                    for node in (b, c):
                        last = (await node.publish("job.after", source="x")).seq
                    while got[-1] < last:  # noqa: ASYNC110 (got is a plain list)
                        await anyio.sleep(0.01)
                    if stream.live:
                        break
                finish.set(pg_url)
        assert finish.at is not None
        assert finish.at >= 142
        assert got == list(range(after + 1, finish.at + 1))
        assert stream.replayed > 0
        assert stream.live > 0


@pytest.mark.anyio
async def test_a_trim_on_one_node_refuses_a_replay_from_before_it_on_another(
    pg_url: str, shared: None
) -> None:
    """Node B trims the log; a read on node A from before the trim is refused
    (EventsTrimmedError), never answered short: A asks the database how far the log was
    trimmed, not its own memory (which only knows its own trims)."""
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        for _ in range(10):
            await a.publish("job.step", source="a")
        assert (await a.read_events(after=2))[0].seq == 3
        through = await b.trim_events(max_events=3)
        assert through > 3
        with pytest.raises(EventsTrimmedError) as caught:
            await a.read_events(after=2)
        assert caught.value.oldest_seq == through + 1
        assert (await a.read_events(after=through))[0].seq == through + 1


@pytest.mark.anyio
async def test_one_node_publishes_its_own_commits_without_reading_the_log(
    pg_url: str, reads: list[int]
) -> None:
    """A single node's commits are always next: its tailer publishes them from memory,
    so PostgreSQL costs no read per commit. The only read is the sweep the listener asks
    for as it starts listening (a notification may have been missed before), the safety
    poll being put out of reach here."""
    async with Runtime.open(pg_url) as runtime:
        got: list[int] = []
        sent: list[int] = []
        async with runtime.subscribe("job.*") as subscription:

            async def publish() -> None:
                for _ in range(25):
                    sent.append((await runtime.publish("job.step", source="x")).seq)

            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(publish)
                while len(got) < len(sent):
                    got.append((await subscription.receive()).seq)
    assert got == sorted(sent)
    assert len(reads) <= 1, reads


# -- the database restarted under load ---------------------------------------------------


def _terminate_backends(url: str) -> int:
    """Every other session on the test's database ends, as in a restart of the server."""
    rows = raw(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return int(rows[0][0])


def _listeners(url: str) -> int:
    """The nodes' listeners connected now (0 while the server is unreachable)."""
    try:
        rows = raw(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'hive-orchestration:listener'",
        )
    except psycopg.OperationalError:
        return 0
    return int(rows[0][0])


@pytest.mark.anyio
async def test_the_database_restarted_under_load(pg_url: str, shared: None) -> None:
    """Every session of the database is terminated, twice, while two nodes publish and
    each follows the log live: what a server restart does to its clients
    (pg_terminate_backend of all of them), without restarting the server the parallel
    tests share (tests/_pg.py's one cluster per session; the real restart is the slow
    test below, on a cluster of its own). Writers hear errors, then carry on; every
    acknowledged event is in the log; each node's stream gives every event exactly once,
    in order; the listeners come back."""
    await _outages_under_load(pg_url, functools.partial(_terminate_backends, pg_url))


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[dict[str, Any]]:
    """A PostgreSQL cluster of this module's own, which a test may restart."""
    if _pg.unavailable_reason() is not None or os.environ.get(_pg.URL_ENV):
        pytest.skip("needs PostgreSQL's programs to start a cluster of its own")
    cluster = _pg._start_cluster(os.getpid())
    try:
        yield cluster
    finally:
        _pg._stop_cluster(cluster)


def _restart(cluster: dict[str, Any]) -> int:
    """``pg_ctl restart -m fast``: the server ends every session and starts again (on the
    options it was started with)."""
    pg_ctl = [str(Path(cluster["bin"]) / "pg_ctl"), "-D", str(Path(cluster["folder"], "data"))]
    log = str(Path(cluster["folder"], "server.log"))
    subprocess.run(
        [*_pg._as_pg(), *pg_ctl, "-l", log, "-m", "fast", "-w", "restart"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_server_restarted_under_load(own_cluster: dict[str, Any], shared: None) -> None:
    """The same, with the server itself restarted (``pg_ctl restart -m fast``) twice."""
    name = f"hive_restart_{uuid.uuid4().hex[:12]}"
    raw(own_cluster["url"], f"CREATE DATABASE {name}")
    url = own_cluster["url"].rsplit("/", 1)[0] + "/" + name
    await _outages_under_load(url, functools.partial(_restart, own_cluster))


async def _outages_under_load(pg_url: str, outage: Callable[[], int]) -> None:
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        nodes = (a, b)
        with anyio.fail_after(WAIT):
            while _listeners(pg_url) < len(nodes):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        acknowledged: list[int] = []
        errors: list[str] = []
        done = anyio.Event()
        streams: list[list[int]] = [[] for _ in nodes]
        finish = Finish()

        async def publish(node: Runtime, name: str) -> None:
            client = node.client(source_agent=name)
            while not done.is_set():
                try:
                    acknowledged.append((await client.publish("job.step")).seq)
                except HiveError as exc:
                    errors.append(type(exc).__name__)
                    await anyio.sleep(0.01)

        async def acknowledged_grows(by: int) -> None:
            before = len(acknowledged)
            while len(acknowledged) < before + by:  # noqa: ASYNC110
                await anyio.sleep(0.01)

        with anyio.fail_after(WAIT * 3):
            async with anyio.create_task_group() as tg:
                for i, node in enumerate(nodes):
                    stream = node.client(source_agent="r").events(after=0)
                    await stream.open()
                    tg.start_soon(_follow, stream, finish, streams[i])
                async with anyio.create_task_group() as writers:
                    for i, node in enumerate(nodes):
                        for j in range(2):
                            writers.start_soon(publish, node, f"w{i}{j}")
                    for _ in range(2):
                        await acknowledged_grows(30)
                        assert await anyio.to_thread.run_sync(outage) > 0
                        while await anyio.to_thread.run_sync(_listeners, pg_url) < 2:  # noqa: ASYNC110
                            await anyio.sleep(0.02)
                    await acknowledged_grows(30)
                    done.set()
                finish.set(pg_url)
        logged = [seq for (seq,) in raw(pg_url, "SELECT seq FROM events ORDER BY seq")]
        assert set(acknowledged) <= set(logged)  # nothing acknowledged is lost
        assert len(acknowledged) == len(set(acknowledged))
        assert logged == list(range(1, len(logged) + 1))
        for got in streams:
            assert got == logged  # every event once, in order, across the reconnections
        print(f"errors the writers heard: {sorted(set(errors))} ({len(errors)})")


def test_a_commits_notice_says_its_range_and_kinds() -> None:
    """What a node decides to pass unread from: the notice's numbers and kinds (each type
    with the fields set on some event of it), against what its subscribers could match."""
    from hive_orchestration.messages.events import Interest
    from hive_orchestration.storage.pg.sql import parse_events_notice
    from hive_orchestration.storage.pg.tailer import wanted

    kinds = (("task.created", "ct"), ("task.completed", "ptw"))
    assert parse_events_notice('ab12:17:15:[["task.created","ct"],["task.completed","ptw"]]') == (
        "ab12",
        17,
        15,
        kinds,
    )
    assert parse_events_notice("ab12:17") == ("ab12", 17, 0, None)  # the older form
    assert parse_events_notice("ab12:17:15:*") == ("ab12", 17, 15, None)
    assert parse_events_notice("ab12:x") is None
    plans = Interest(types=(("task.completed", ("plan_id",)),))
    assert wanted(plans, kinds)
    assert not wanted(plans, (("task.created", "ct"), ("task.completed", "tw")))
    assert not wanted(Interest(), kinds)
    assert wanted(Interest(prefixes=("task.",)), (("task.x", ""),))
    assert not wanted(Interest(prefixes=("job.",)), (("task.x", ""),))
    assert wanted(Interest(everything=True), (("anything", ""),))
    assert wanted(plans, None)  # not said: read it
