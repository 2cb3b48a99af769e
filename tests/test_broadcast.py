"""The broadcast actor, end to end through a real runtime on a real SQLite file.

Covers pattern matching, filters, ordering (also under concurrent publishers), fan-out to
several subscribers, isolation from a stuck subscriber (both overflow policies), removal of
subscribers that leave or crash, replay after lag, and the end of iteration at shutdown.

No test sleeps to wait for delivery: ``Runtime.publish`` returns after its event was handed
to the broadcast actor, and ``Runtime.statistics()`` asks the broadcast actor, so awaiting
it is a barrier behind every earlier publish (its mailbox is handled in order).
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from anyio.abc import TaskStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration.api.embedded import Runtime, Subscription
from hive_orchestration.config import RuntimeConfig
from hive_orchestration.errors import RuntimeStoppedError, SubscriberLaggedError
from hive_orchestration.messages.events import (
    BroadcastStats,
    Event,
    EventFeed,
    Interest,
    InterestCell,
    Subscribe,
    Unsubscribe,
    compile_pattern,
)

pytestmark = pytest.mark.anyio

# Generous: only there so that a bug fails fast instead of hanging.
TIMEOUT = 20


async def _receive_n(sub: Subscription, n: int) -> list[Event]:
    with anyio.fail_after(TIMEOUT):
        return [await sub.receive() for _ in range(n)]


# -- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        ("*", "task.created", True),
        ("*", "x", True),
        ("task.*", "task.created", True),
        ("task.*", "task.a.b", True),
        ("task.*", "task.", True),
        ("task.*", "taskx.created", False),
        ("task.*", "task", False),
        ("task.*", "Task.created", False),
        ("task.*", "plan.task.created", False),
        ("plan.completed", "plan.completed", True),
        ("plan.completed", "plan.completedx", False),
        ("plan.completed", "plan_completed", False),
        ("plan.completed", "xplan.completed", False),
        ("task.?", "task.a", True),
        ("task.?", "task.ab", False),
        ("task.?", "task.", False),
        ("task.[cu]*", "task.created", True),
        ("task.[cu]*", "task.updated", True),
        ("task.[cu]*", "task.failed", False),
        ("task.[!c]*", "task.failed", True),
        ("task.[!c]*", "task.created", False),
        ("*.completed", "plan.completed", True),
        ("*.completed", "plan.completed.not", False),
        ("t*.*d", "task.created", True),
        ("t*.*d", "task.create", False),
    ],
)
def test_compile_pattern(pattern: str, event_type: str, expected: bool) -> None:
    assert compile_pattern(pattern)(event_type) is expected


@settings(max_examples=200, deadline=None, database=None)
@given(
    pattern=st.text(alphabet="ab.*?[]!", min_size=1, max_size=8),
    event_type=st.text(alphabet="ab.[]", min_size=1, max_size=8),
)
def test_compile_pattern_agrees_with_fnmatchcase(pattern: str, event_type: str) -> None:
    # The fast paths ("*", exact, "prefix.*") must mean what the glob means.
    assert compile_pattern(pattern)(event_type) is fnmatch.fnmatchcase(event_type, pattern)


EVENT_TYPES = [
    "job.created",
    "jobx.created",
    "job.updated",
    "job.a",
    "flow.completed",
    "flow.completedx",
    "flow.created",
    "job",
    "job.b.c",
]

# Written out by hand, not computed with compile_pattern, so that a wrong matcher fails.
PATTERN_EXPECTATIONS = {
    "*": EVENT_TYPES,
    "job.*": ["job.created", "job.updated", "job.a", "job.b.c"],
    "flow.completed": ["flow.completed"],
    "job.?": ["job.a"],
    "job.[cu]*": ["job.created", "job.updated"],
    "*.completed": ["flow.completed"],
    "nothing.matches": [],
}


async def test_patterns_end_to_end(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, AsyncExitStack() as stack:
        subs = {
            pattern: await stack.enter_async_context(rt.subscribe(pattern))
            for pattern in PATTERN_EXPECTATIONS
        }
        for event_type in EVENT_TYPES:
            await rt.publish(event_type, {"type": event_type})
        stats = await rt.statistics()  # barrier: every publish has been fanned out
        for pattern, expected in PATTERN_EXPECTATIONS.items():
            got = await _receive_n(subs[pattern], len(expected))
            assert [e.type for e in got] == expected, pattern
        # Nothing beyond the expected deliveries happened.
        assert stats.broadcast.published == len(EVENT_TYPES)
        assert stats.broadcast.delivered == sum(map(len, PATTERN_EXPECTATIONS.values()))


# -- filters --------------------------------------------------------------------------------


async def test_filters_on_event_fields_and_data_keys(db_path: str) -> None:
    published: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("job.created", {"color": "red"}, {"task_id": "t1"}),
        ("job.created", {"color": "blue"}, {"task_id": "t2"}),
        ("flow.created", {"count": 3}, {"task_id": "t1", "source": "worker"}),
        ("job.updated", {"count": "3", "color": "red"}, {"correlation_id": "c9"}),
        ("job.updated", {"count": 30}, {"source": "worker", "task_id": "t1"}),
    ]
    # (pattern, filters) -> indexes of the published events it must receive, in order.
    expectations: list[tuple[str, dict[str, str], list[int]]] = [
        ("*", {"task_id": "t1"}, [0, 2, 4]),
        ("*", {"color": "red"}, [0, 3]),
        ("*", {"count": "3"}, [2, 3]),  # data values compare as strings
        ("*", {"source": "worker"}, [2, 4]),
        ("*", {"correlation_id": "c9"}, [3]),
        ("job.*", {"task_id": "t1"}, [0, 4]),
        ("*", {"task_id": "t1", "source": "worker"}, [2, 4]),
        ("*", {"task_id": "t3"}, []),
    ]
    async with Runtime.open(db_path) as rt, AsyncExitStack() as stack:
        subs = [
            await stack.enter_async_context(rt.subscribe(pattern, **filters))
            for pattern, filters, _ in expectations
        ]
        events = [
            await rt.publish(event_type, data, **fields) for event_type, data, fields in published
        ]
        stats = await rt.statistics()
        for sub, (pattern, filters, indexes) in zip(subs, expectations, strict=True):
            got = await _receive_n(sub, len(indexes))
            assert got == [events[i] for i in indexes], (pattern, filters)
        assert stats.broadcast.delivered == sum(len(i) for _, _, i in expectations)


async def test_data_filter_does_not_match_a_missing_key(db_path: str) -> None:
    # A filter on a data key the event lacks must not match, whatever the wanted value.
    async with Runtime.open(db_path) as rt, rt.subscribe(color="None") as sub:
        await rt.publish("paint", {"shape": "square"})  # no "color" at all
        wanted = await rt.publish("paint", {"color": "None"})
        (first,) = await _receive_n(sub, 1)
        assert first == wanted


# -- ordering and fan-out -------------------------------------------------------------------


async def test_events_arrive_in_publication_order(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, rt.subscribe() as sub:
        published = [await rt.publish("step", {"i": i}) for i in range(50)]
        got = await _receive_n(sub, 50)
    assert got == published
    assert [e.seq for e in got] == list(range(1, 51))


async def test_concurrent_publishers_are_seen_in_seq_order(db_path: str) -> None:
    publishers, per_publisher = 4, 30
    total = publishers * per_publisher
    async with Runtime.open(db_path) as rt, rt.subscribe() as a, rt.subscribe("work.*") as b:

        async def publish(p: int) -> None:
            for i in range(per_publisher):
                await rt.publish("work.done", {"p": p, "i": i}, source=f"pub{p}")

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for p in range(publishers):
                    tg.start_soon(publish, p)
        got_a = await _receive_n(a, total)
        got_b = await _receive_n(b, total)
        log = await rt.read_events(limit=total + 1)

    seqs = [e.seq for e in got_a]
    assert all(x < y for x, y in itertools.pairwise(seqs))
    assert got_a == got_b == log  # every subscriber sees exactly the durable log, in order
    for p in range(publishers):
        mine = [e.data["i"] for e in got_a if e.data["p"] == p]
        assert mine == list(range(per_publisher))  # each publisher's own order is kept


async def test_every_subscriber_gets_every_matching_event(db_path: str) -> None:
    types = ["job.created", "flow.created", "job.done"] * 10
    async with Runtime.open(db_path) as rt, AsyncExitStack() as stack:
        everything = [await stack.enter_async_context(rt.subscribe()) for _ in range(3)]
        tasks_only = await stack.enter_async_context(rt.subscribe("job.*"))
        published = [await rt.publish(t, {"n": n}) for n, t in enumerate(types)]
        stats = await rt.statistics()
        for sub in everything:
            assert await _receive_n(sub, len(published)) == published
        task_events = [e for e in published if e.type.startswith("job.")]
        assert await _receive_n(tasks_only, len(task_events)) == task_events
    assert stats.broadcast.subscribers == 4
    assert stats.broadcast.delivered == 3 * len(published) + len(task_events)


async def test_draining_a_full_buffer_lets_other_tasks_run(db_path: str) -> None:
    """Buffered events are handed out without a trip round the loop each, but a
    subscriber working through a backlog still yields every so often."""
    backlog = 640
    async with Runtime.open(db_path) as rt, rt.subscribe(buffer=backlog) as sub:
        published = [await rt.publish("step", {"i": i}) for i in range(backlog)]
        await _until_buffered(sub, backlog)
        turns = 0
        draining = True

        async def other() -> None:
            nonlocal turns
            while draining:
                turns += 1
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(other)
                await anyio.lowlevel.checkpoint()  # the other task is running
                before = turns
                got = [await sub.receive() for _ in range(backlog)]
                during = turns - before
                draining = False
    assert got == published
    # It yields once per 64 events (9 times here), not on each. On trio the last turn
    # may come after the drain ends (a tick runs its tasks in random order).
    assert backlog // 64 - 2 <= during < backlog // 2


async def test_a_cancelled_subscriber_stops_even_with_events_buffered(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, rt.subscribe() as sub:
        for i in range(10):
            await rt.publish("step", {"i": i})
        await _until_buffered(sub, 10)
        got: list[Event] = []
        with anyio.CancelScope() as scope:
            for _ in range(10):
                got.append(await sub.receive())
                if len(got) == 3:
                    scope.cancel()
        assert scope.cancelled_caught
        assert [e.data["i"] for e in got] == [0, 1, 2]
        # Nothing was lost: the next receive goes on where the cancelled one stopped.
        assert (await sub.receive()).data["i"] == 3


async def test_a_feeds_receive_is_a_cancellation_point_queued_or_not() -> None:
    """Every receive is a cancellation point and a cancelled one takes nothing: with
    events queued it checks before taking one; with none, its wait is the point (it no
    longer checks before the wait as well), and an event that arrives for a cancelled
    wait stays queued for the next receive."""
    feed = EventFeed()
    entry = (Event(type="e", timestamp=0.0, source="t", data={}), b'{"n":1}')
    with anyio.CancelScope() as scope:
        scope.cancel()
        await feed.receive()  # nothing queued: the wait raises
    assert scope.cancelled_caught
    feed.push([entry])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await feed.receive()  # queued: cancelled before it takes it
    assert scope.cancelled_caught
    assert feed.unread == 1
    assert (await feed.receive()).data == {"n": 1}
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as waiting:
            tg.start_soon(lambda: _cancel_soon(waiting))
            await feed.receive()  # waits: cancelled there, then an event comes
        feed.push([entry])
    assert waiting.cancelled_caught
    assert feed.unread == 1
    assert (await feed.receive()).data == {"n": 1}


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.sleep(0.01)
    scope.cancel()


async def _until_buffered(sub: Subscription, n: int) -> None:
    with anyio.fail_after(TIMEOUT):
        # The broadcast actor fills the buffer after publish returns; nothing signals it.
        while sub.unread < n:  # noqa: ASYNC110
            await anyio.sleep(0.001)


# -- a slow subscriber does not slow the others ---------------------------------------------

N_EVENTS = 200
SMALL_BUFFER = 5


async def test_stuck_subscriber_does_not_slow_the_others(db_path: str) -> None:
    async with (
        Runtime.open(db_path) as rt,
        rt.subscribe(buffer=SMALL_BUFFER) as stuck,  # never reads while events flow
        rt.subscribe() as fast,
    ):
        fast_got: list[Event] = []

        async def read_fast() -> None:
            for _ in range(N_EVENTS):
                fast_got.append(await fast.receive())

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_fast)
                published = [await rt.publish("job.progress", {"i": i}) for i in range(N_EVENTS)]

        assert fast_got == published
        stats = await rt.statistics()
        assert stats.broadcast.lagged == 1
        assert stats.broadcast.subscribers == 1  # the stuck one was let go, not kept growing

        # When it finally reads: its buffered events, then the lag with the last seq it got.
        buffered = await _receive_n(stuck, SMALL_BUFFER)
        assert buffered == published[:SMALL_BUFFER]
        with anyio.fail_after(TIMEOUT), pytest.raises(SubscriberLaggedError) as info:
            await stuck.receive()
        assert info.value.last_seq == published[SMALL_BUFFER - 1].seq

        # The durable log has exactly what it missed: no gap, no duplicate.
        missed = await rt.read_events(after=info.value.last_seq)
        assert missed == published[SMALL_BUFFER:]


@pytest.mark.parametrize("policy_from", ["config", "argument"])
async def test_drop_policy_skips_overflow_for_that_subscriber_only(
    db_path: str, policy_from: str
) -> None:
    if policy_from == "config":
        config, kwargs = RuntimeConfig(subscriber_overflow="drop"), {}
    else:
        config, kwargs = RuntimeConfig(), {"overflow": "drop"}
    async with (
        Runtime.open(db_path, config=config) as rt,
        rt.subscribe(buffer=SMALL_BUFFER, **kwargs) as stuck,
        rt.subscribe(buffer=N_EVENTS + 10) as other,
    ):
        with anyio.fail_after(TIMEOUT):
            published = [await rt.publish("job.progress", {"i": i}) for i in range(N_EVENTS)]
        stats = await rt.statistics()
        assert stats.broadcast.dropped == N_EVENTS - SMALL_BUFFER
        assert stats.broadcast.lagged == 0
        assert stats.broadcast.subscribers == 2  # still subscribed

        assert await _receive_n(other, N_EVENTS) == published
        assert await _receive_n(stuck, SMALL_BUFFER) == published[:SMALL_BUFFER]
        # Nothing else was buffered (memory stayed bounded): the next event it gets is
        # one published now, and it keeps receiving once it has room again.
        sentinel = await rt.publish("job.done", None)
        assert await _receive_n(stuck, 1) == [sentinel]
        assert await _receive_n(other, 1) == [sentinel]
        assert (await rt.statistics()).broadcast.dropped == N_EVENTS - SMALL_BUFFER


async def test_lagged_subscriber_can_resubscribe_and_replay_without_gap(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        async with rt.subscribe("a.*", buffer=2) as sub:
            first = [await rt.publish("a.x", {"i": i}) for i in range(4)]
            await rt.publish("b.x", None)  # not for this subscriber
            assert await _receive_n(sub, 2) == first[:2]
            with anyio.fail_after(TIMEOUT), pytest.raises(SubscriberLaggedError) as info:
                await sub.receive()
        last_seq = info.value.last_seq
        assert last_seq == first[1].seq
        # Catch up: subscribe for what comes next, then replay what was missed.
        async with rt.subscribe("a.*") as again:
            later = await rt.publish("a.x", {"i": 4})
            replayed = [e for e in await rt.read_events(after=last_seq) if e.seq < later.seq]
            assert await _receive_n(again, 1) == [later]
        assert [e.seq for e in replayed] == list(range(last_seq + 1, later.seq))
        assert [e for e in replayed if e.type.startswith("a.")] == first[2:]


# -- subscribers that leave or crash --------------------------------------------------------


async def test_subscriber_leaving_or_crashing_is_removed(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, rt.subscribe() as stays:
        published = []
        async with rt.subscribe() as leaves:
            published.append(await rt.publish("a", None))
            assert await _receive_n(leaves, 1) == published
            assert (await rt.statistics()).broadcast.subscribers == 2
        assert (await rt.statistics()).broadcast.subscribers == 1

        async def crash() -> None:
            async with rt.subscribe() as crashes:
                published.append(await rt.publish("b", None))
                await _receive_n(crashes, 1)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await crash()
        assert (await rt.statistics()).broadcast.subscribers == 1

        # Publishing and the remaining subscriber are unaffected.
        with anyio.fail_after(TIMEOUT):
            published += [await rt.publish("c", {"i": i}) for i in range(10)]
        assert await _receive_n(stays, len(published)) == published
        stats = await rt.statistics()
        assert stats.broadcast.subscribers == 1
        assert stats.broadcast.lagged == 0


async def test_subscriber_task_cancelled_while_waiting_is_removed(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, rt.subscribe() as stays:

        async def waits_forever(*, task_status: TaskStatus[None]) -> None:
            async with rt.subscribe() as sub:
                task_status.started()
                await sub.receive()
                await sub.receive()  # never comes: the task is cancelled here

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(waits_forever)
                assert (await rt.statistics()).broadcast.subscribers == 2
                first = await rt.publish("a", None)
                assert await _receive_n(stays, 1) == [first]
                tg.cancel_scope.cancel()
        assert (await rt.statistics()).broadcast.subscribers == 1
        second = await rt.publish("b", None)
        assert await _receive_n(stays, 1) == [second]


# -- shutdown -------------------------------------------------------------------------------


async def test_iteration_ends_cleanly_when_the_runtime_closes(db_path: str) -> None:
    received: list[Event] = []
    published: list[Event] = []
    finished = anyio.Event()

    async def consume(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
        async with rt.subscribe() as sub:
            task_status.started()
            async for event in sub:
                received.append(event)
            # Once the stream ended, receiving again says why.
            with pytest.raises(RuntimeStoppedError):
                await sub.receive()
        finished.set()

    with anyio.fail_after(TIMEOUT):
        # The task group outlives the runtime, so the consumer sees the runtime stop.
        async with anyio.create_task_group() as tg, Runtime.open(db_path) as rt:
            await tg.start(consume, rt)
            published += [await rt.publish("x", {"i": i}) for i in range(3)]
            # Leaving Runtime.open stops the runtime; the consumer's loop must end on its own.
    assert finished.is_set()
    assert received == published  # what was published before closing was still delivered


async def test_a_broadcast_crash_tells_subscribers_where_their_stream_broke(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a broadcast restart the runtime goes on: subscribers get a replayable lag,
    not the clean end that means the runtime stopped."""
    from hive_orchestration.actors.broadcast import BroadcastActor

    original = BroadcastActor._fan_out
    armed = {"crash": False}

    def flaky(self: BroadcastActor, entries: tuple[tuple[Event, bytes], ...]) -> bool:
        if armed["crash"]:
            armed["crash"] = False
            raise RuntimeError("fan-out fault")
        return original(self, entries)

    monkeypatch.setattr(BroadcastActor, "_fan_out", flaky)
    async with Runtime.open(db_path) as rt:
        async with rt.subscribe("*") as sub:
            first = await rt.publish("a.one")
            with anyio.fail_after(5):
                assert (await sub.receive()).seq == first.seq
            armed["crash"] = True
            missed = await rt.publish("a.two")
            with anyio.fail_after(5), pytest.raises(SubscriberLaggedError) as caught:
                await sub.receive()
        assert caught.value.last_seq == first.seq
        replay = await rt.read_events(after=caught.value.last_seq)
        assert missed.seq in [e.seq for e in replay]
        async with rt.subscribe("a.*") as again:
            third = await rt.publish("a.three")
            with anyio.fail_after(5):
                assert (await again.receive()).seq == third.seq
        assert (await rt.statistics()).restarts["broadcast"] == 1


async def test_subscribers_and_publisher_do_not_share_mutable_data(db_path: str) -> None:
    async with Runtime.open(db_path) as rt, rt.subscribe("*") as one, rt.subscribe("*") as two:
        published = await rt.publish("d.x", {"items": [1, 2]})
        with anyio.fail_after(5):
            seen_one = await one.receive()
            seen_two = await two.receive()
        items = seen_one.data["items"]
        assert isinstance(items, list)
        items.append(3)
        assert seen_two.data == {"items": [1, 2]}
        assert published.data == {"items": [1, 2]}


# -- large commits: a reader that keeps up never lags -----------------------------------------


async def _whole_log(rt: Runtime) -> list[Event]:
    log: list[Event] = []
    while page := await rt.read_events(log[-1].seq if log else 0, limit=10_000):
        log += page
    return log


async def _two_batches_of_600(rt: Runtime) -> None:
    async with anyio.create_task_group() as tg:
        for batch in range(2):
            tg.start_soon(rt.create_tasks, [{"task_type": f"bulk{batch}"}] * 600)


async def _start_a_1500_subtask_plan(rt: Runtime) -> None:
    subtasks = [{"id": f"s{i}", "task_type": "step"} for i in range(1500)]
    plan_id = await rt.create_execution_plan({"subtasks": subtasks}, approved=True)
    assert await rt.mark_plan_execution_started(plan_id)


async def _four_creators_of_4_times_600(rt: Runtime) -> None:
    """Commits of about 2 400 events, one after another: the reader works through each
    while the next is being made, so it is often part of a commit behind, never more."""

    async def creator() -> None:
        for _ in range(4):
            await rt.create_tasks([{"task_type": "bulk"}] * 600)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(creator)


LARGE_COMMITS = {
    "sustained_2400": _four_creators_of_4_times_600,
    "two_create_tasks_600": _two_batches_of_600,
    "plan_1500": _start_a_1500_subtask_plan,
}


@pytest.mark.parametrize("load", sorted(LARGE_COMMITS))
async def test_a_reader_that_keeps_up_never_lags_through_large_commits(
    db_path: str, load: str
) -> None:
    """One commit of more events than the buffer (1 000 by default) goes to readers that
    read as fast as they can: each must get every event, not a SubscriberLaggedError."""
    patterns = ["*", "task.*", "task.created"]
    async with Runtime.open(db_path) as rt, AsyncExitStack() as stack:
        readers = [_Reader(await stack.enter_async_context(rt.subscribe(p))) for p in patterns]
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for reader in readers:
                    tg.start_soon(reader.run)
                await LARGE_COMMITS[load](rt)
                log = await _whole_log(rt)
                for reader in readers:
                    await reader.wait_for(log)
                tg.cancel_scope.cancel()
        stats = (await rt.statistics()).broadcast
    for reader in readers:
        assert reader.error is None, reader.sub.pattern
        assert reader.got == reader.expected(log), reader.sub.pattern
    assert stats.lagged == 0
    assert stats.largest_commit > 1000  # the load did make a commit larger than the buffer


class _Reader:
    """Reads a subscription as fast as it can, keeping what it got and how it ended."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.got: list[Event] = []
        self.error: BaseException | None = None
        self.ended = False
        self._changed = anyio.Event()

    def expected(self, log: list[Event]) -> list[Event]:
        matches = compile_pattern(self.sub.pattern)
        return [event for event in log if matches(event.type)]

    async def run(self) -> None:
        try:
            async for event in self.sub:
                self.got.append(event)
                self._changed.set()
            self.ended = True
        except (SubscriberLaggedError, RuntimeStoppedError) as exc:
            self.error = exc
        self._changed.set()

    async def changed(self) -> None:
        """Until it gets an event or its stream ends."""
        self._changed = anyio.Event()
        await self._changed.wait()

    async def wait_for(self, log: list[Event]) -> None:
        """Until it got every event of ``log`` it matches, or its stream ended."""
        count = len(self.expected(log))
        while len(self.got) < count and self.error is None and not self.ended:
            await self.changed()


async def test_subscribers_end_cleanly_at_shutdown_with_creates_in_flight(db_path: str) -> None:
    """Leaving the block while large creates are queued: every plain subscriber gets what
    was committed, then a clean end of iteration, not a SubscriberLaggedError."""
    readers: list[_Reader] = []

    async def consume(rt: Runtime, pattern: str, *, task_status: TaskStatus[None]) -> None:
        async with rt.subscribe(pattern) as sub:
            reader = _Reader(sub)
            readers.append(reader)
            task_status.started()
            await reader.run()

    async def create(rt: Runtime) -> None:
        try:
            for _ in range(20):
                await rt.create_tasks([{"task_type": "bulk"}] * 600)
        except RuntimeStoppedError:
            return  # the block ended while it went on creating
        pytest.fail("the block was meant to end with creates in flight")

    with anyio.fail_after(TIMEOUT):
        # The task group outlives the runtime, so the readers see it stop.
        async with anyio.create_task_group() as tg, Runtime.open(db_path) as rt:
            for pattern in ["*", "task.*", "task.created"]:
                await tg.start(consume, rt, pattern)
            for _ in range(4):
                tg.start_soon(create, rt)
            while not readers[0].got:  # a first commit landed; more are in flight
                await readers[0].changed()
    async with Runtime.open(db_path) as rt:
        log = await _whole_log(rt)
    assert len(log) >= 1200
    for reader in readers:
        assert reader.error is None, (reader.sub.pattern, reader.error)
        assert reader.ended, reader.sub.pattern
        # Everything committed before the stop was delivered.
        assert reader.got == reader.expected(log), reader.sub.pattern


# -- a reader that does not keep up ---------------------------------------------------------


async def test_a_reader_part_way_through_its_last_commit_does_not_lag(db_path: str) -> None:
    """Behind by more than its buffer, but only on the last commit it was given: it is
    reading, so the next commit is handed over. Behind on an earlier one too, it lags."""
    async with Runtime.open(db_path) as rt, rt.subscribe("task.*", buffer=10) as sub:
        await rt.create_tasks([{"task_type": "first"}] * 30)
        got = await _receive_n(sub, 15)  # 15 of the first commit left: more than 10
        await rt.create_tasks([{"task_type": "second"}] * 30)
        got += await _receive_n(sub, 45)  # handed over, not dropped
        log = await _whole_log(rt)
        assert got == log

        await rt.create_tasks([{"task_type": "third"}] * 30)
        got = await _receive_n(sub, 5)  # 25 of the third left
        await rt.create_tasks([{"task_type": "fourth"}] * 30)  # 55 behind, on two commits
        await rt.create_tasks([{"task_type": "fifth"}] * 30)  # lags here
        got += await _receive_n(sub, 55)
        with anyio.fail_after(TIMEOUT), pytest.raises(SubscriberLaggedError) as info:
            await sub.receive()
        log = await _whole_log(rt)
        assert got == log[60:120]
        assert info.value.last_seq == log[119].seq
        assert (await rt.statistics()).broadcast.lagged == 1


async def test_a_lagging_reader_gets_whole_commits_then_a_replayable_lag(db_path: str) -> None:
    """A commit is handed over whole; the subscriber lags at the first commit that finds
    it its buffer's worth behind on more than the last commit, and the log has exactly
    what it missed."""
    async with Runtime.open(db_path) as rt, rt.subscribe("task.*", buffer=5) as stuck:
        # Commits of 3, then 4 (3 unread < 5: taken whole, 7 unread), then 2 (lags).
        for size in (3, 4, 2, 1):
            await rt.create_tasks([{"task_type": f"size{size}"}] * size)
        log = await _whole_log(rt)
        stats = (await rt.statistics()).broadcast
        assert stats.lagged == 1
        # It holds 7: 3 (fewer than 5) when the second commit came, then that commit.
        given = await _receive_n(stuck, 7)
        assert given == log[:7]
        with anyio.fail_after(TIMEOUT), pytest.raises(SubscriberLaggedError) as info:
            await stuck.receive()
        assert info.value.last_seq == log[6].seq
        # Replaying from last_seq gives the rest: nothing missed, nothing twice.
        assert given + await rt.read_events(after=info.value.last_seq) == log
        with pytest.raises(SubscriberLaggedError):  # it stays dropped
            await stuck.receive()


async def test_a_dropping_reader_skips_whole_commits_and_holds_a_bounded_backlog(
    db_path: str,
) -> None:
    async with (
        Runtime.open(db_path) as rt,
        rt.subscribe("task.*", buffer=5, overflow="drop") as stuck,
    ):
        for size in (3, 4, 2, 1):
            await rt.create_tasks([{"task_type": f"size{size}"}] * size)
        log = await _whole_log(rt)
        stats = (await rt.statistics()).broadcast
        assert (stats.dropped, stats.lagged) == (3, 0)
        assert stuck.unread == 7
        assert await _receive_n(stuck, 7) == log[:7]
        # Read out, it takes commits again.
        later = await rt.create_task("later")
        (event,) = await _receive_n(stuck, 1)
        assert (event.type, event.task_id) == ("task.created", later)


# -- matching through the index -------------------------------------------------------------

_TYPES = ["a", "b", "a.b", "a.bb", "ab.b", "b.a", "a.", "a.b.a", "ba"]
_type_text = st.text(alphabet="ab.", min_size=1, max_size=4)
_patterns = st.one_of(
    st.just("*"),
    st.sampled_from(_TYPES),  # exact
    # Prefixes ("a.*" among them), often a whole type ("a.*" and "a.", "a*" and "a").
    st.tuples(st.one_of(st.sampled_from(_TYPES), _type_text), st.sampled_from(["*", ".*"])).map(
        "".join
    ),
    st.text(alphabet="ab.*?[]!", min_size=1, max_size=6),  # any glob, brackets too
)
_values = st.sampled_from(["x", "y"])
_subscriptions = st.fixed_dictionaries(
    {
        "pattern": _patterns,
        "filters": st.one_of(
            st.just({}),
            st.dictionaries(
                st.sampled_from(["task_id", "source", "plan_id", "color"]), _values, max_size=2
            ),
        ),
        "types": st.one_of(st.just(()), st.lists(st.sampled_from(_TYPES), max_size=3).map(tuple)),
        "require": st.sampled_from([(), (), ("plan_id",), ("task_id",)]),
    }
)
_events = st.builds(
    lambda type_, task_id, plan_id, source, color: (type_, task_id, plan_id, source, color),
    st.sampled_from(_TYPES),
    st.sampled_from([None, "x", "y"]),
    st.sampled_from([None, "x"]),
    _values,
    st.sampled_from([None, "x", "y", 1]),
)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("subscribe"), _subscriptions),
        st.tuples(st.just("unsubscribe"), st.integers(min_value=0, max_value=30)),
        st.tuples(st.just("publish"), st.lists(_events, min_size=1, max_size=6)),
    ),
    max_size=30,
)


def _brute_force(spec: dict[str, Any], event: Event) -> bool:
    """What a subscription means, tested the slow way: fnmatch, then each condition."""
    if not fnmatch.fnmatchcase(event.type, spec["pattern"]):
        return False
    if spec["types"] and event.type not in spec["types"]:
        return False
    if any(getattr(event, key) is None for key in spec["require"]):
        return False
    for key, wanted in spec["filters"].items():
        if key in ("task_id", "source", "plan_id"):
            if getattr(event, key) != wanted:
                return False
        elif key not in event.data or str(event.data[key]) != wanted:
            return False
    return True


async def _check_index(operations: list[tuple[str, Any]]) -> None:
    from hive_orchestration.actors.broadcast import BroadcastActor
    from hive_orchestration.messages.events import (
        EventFeed,
        GetBroadcastStats,
        Publish,
        Subscribe,
        Unsubscribe,
    )

    actor = BroadcastActor()
    live: dict[int, tuple[dict[str, Any], EventFeed, list[Event]]] = {}
    ended: list[tuple[list[Event], list[Event]]] = []
    seq = itertools.count(1)
    expected_deliveries = 0

    def drain(feed: EventFeed) -> list[Event]:
        got: list[Event] = []
        while True:
            try:
                item = feed.receive_nowait()
            except anyio.WouldBlock:
                return got
            assert isinstance(item, Event)
            got.append(item)

    for operation, argument in operations:
        if operation == "subscribe":
            feed = EventFeed()
            filters = tuple(sorted(argument["filters"].items()))
            message = Subscribe(
                argument["pattern"],
                filters,
                feed,
                1_000_000,
                "error",
                types=argument["types"],
                require=argument["require"],
            )
            live[await actor.receive(message)] = (argument, feed, [])
        elif operation == "unsubscribe" and live:
            subscription_id = sorted(live)[argument % len(live)]
            _, feed, expected = live.pop(subscription_id)
            ended.append((drain(feed), expected))
            await actor.receive(Unsubscribe(subscription_id))
        elif operation == "publish":
            events = []
            for type_, task_id, plan_id, source, color in argument:
                data: dict[str, Any] = {} if color is None else {"color": color}
                events.append(
                    Event(
                        seq=next(seq),
                        type=type_,
                        timestamp=0.0,
                        source=source,
                        task_id=task_id,
                        plan_id=plan_id,
                        data=data,
                    )
                )
            payloads = tuple(msgspec.json.encode(event.data) for event in events)
            await actor.receive(Publish(tuple(events), payloads))
            for spec, _, expected in live.values():
                matched = [event for event in events if _brute_force(spec, event)]
                expected += matched
                expected_deliveries += len(matched)
    for subscription_id, (_, feed, expected) in list(live.items()):
        ended.append((drain(feed), expected))
        await actor.receive(Unsubscribe(subscription_id))
    for got, expected in ended:
        assert got == expected
    stats = await actor.receive(GetBroadcastStats())
    assert isinstance(stats, BroadcastStats)
    # Nothing went to a subscription that was gone (its feed would have ignored it).
    assert stats.delivered == expected_deliveries
    assert not actor._index.buckets
    assert not actor._index._globs
    assert not actor._index.everything


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, database=None)
@given(operations=_operations)
def test_the_index_matches_what_brute_force_matches(
    backend: str, operations: list[tuple[str, Any]]
) -> None:
    anyio.run(_check_index, operations, backend=backend)


async def test_a_publish_tests_only_the_subscriptions_that_can_match_it(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 000 subscriptions, two of which can take a ``job.7`` event of task ``t7``: a
    publish must not test the pattern and filters of every one (the fan-out cost)."""
    from hive_orchestration.actors import broadcast

    pattern_tests = 0

    def counting_compile(pattern: str) -> Callable[[str], bool]:
        matches = compile_pattern(pattern)

        def counted(event_type: str) -> bool:
            nonlocal pattern_tests
            pattern_tests += 1
            return matches(event_type)

        return counted

    monkeypatch.setattr(broadcast, "compile_pattern", counting_compile)
    published = 10
    async with Runtime.open(db_path) as rt, AsyncExitStack() as stack:
        subscribe = stack.enter_async_context
        for i in range(300):
            await subscribe(rt.subscribe(f"job.{i}"))
            await subscribe(rt.subscribe(f"flow{i}.*"))
            await subscribe(rt.subscribe("*", task_id=f"t{i}"))
        for i in range(100):  # globs: tested once per new event type, not per event
            await subscribe(rt.subscribe(f"*.n{i}"))
        exact = await subscribe(rt.subscribe("job.7"))
        filtered = await subscribe(rt.subscribe("*", task_id="t7"))
        pattern_tests = 0
        events = [await rt.publish("job.7", {"i": i}, task_id="t7") for i in range(published)]
        stats = (await rt.statistics()).broadcast
        assert await _receive_n(exact, published) == events
        assert await _receive_n(filtered, published) == events
    assert pattern_tests <= 100
    # Per event: job.7's bucket (2 subscriptions) and task_id t7 under "*" (2).
    assert stats.examined == 4 * published
    assert stats.delivered == 4 * published


async def test_the_interest_cell_says_what_the_subscribers_could_match() -> None:
    """What a log tailer reads of other nodes' events: exact types with the fields all
    their subscribers require, prefixes, or everything (any other glob, or ``*``); as
    subscribers come and go, and nothing once none is left."""
    from hive_orchestration.actors.broadcast import BroadcastActor

    cell = InterestCell()
    actor = BroadcastActor(interest=cell)
    assert cell.get() == Interest()
    assert cell.get().nothing

    async def sub(pattern: str, *filters: tuple[str, str], **kw: Any) -> int:
        return int(await actor.receive(Subscribe(pattern, filters, EventFeed(), 10, "error", **kw)))

    plans = await sub("*", types=("task.completed", "plan.x"), require=("plan_id",))
    assert cell.get() == Interest(
        types=(("plan.x", ("plan_id",)), ("task.completed", ("plan_id",)))
    )
    keyed = await sub("task.completed", ("task_id", "t1"))  # a value filter: left out
    assert cell.get() == Interest(types=(("plan.x", ("plan_id",)), ("task.completed", ())))
    prefix = await sub("job.*")
    assert cell.get().prefixes == ("job.",)
    glob = await sub("*.done")
    assert cell.get() == Interest(everything=True)
    await actor.receive(Unsubscribe(glob))
    assert cell.get() == Interest(
        types=(("plan.x", ("plan_id",)), ("task.completed", ())), prefixes=("job.",)
    )
    await actor.receive(Unsubscribe(keyed))
    assert cell.get().types == (("plan.x", ("plan_id",)), ("task.completed", ("plan_id",)))
    everything = await sub("*")
    assert cell.get().everything
    for subscription in (everything, prefix, plans):
        await actor.receive(Unsubscribe(subscription))
    assert cell.get().nothing
