"""The actor kernel and the supervisor: replies, errors, restarts, intensity, shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.errors import (
    ActorFailedError,
    HiveError,
    NotFoundError,
    RequestTimeoutError,
    RuntimeFailedError,
    RuntimeStoppedError,
)
from hive_orchestration.runtime import (
    Actor,
    ActorRef,
    ChildRestart,
    ChildSpec,
    Envelope,
    Request,
    Supervisor,
)
from hive_orchestration.runtime.watchdog import AskWatchdog
from hive_orchestration.storage import StorageActor

pytestmark = pytest.mark.anyio


class Echo(Request[int], frozen=True):
    n: int


class Boom(Request[int], frozen=True):
    pass


class Missing(Request[int], frozen=True):
    key: str


class Hold(Request[int], frozen=True):
    """Handled only once the test sets the actor's gate."""


class Record(msgspec.Struct, frozen=True):
    n: int


class History(Request[list[int]], frozen=True):
    pass


class Probe(Actor[Any]):
    """A test actor. ``log`` and ``gate`` are shared across its incarnations on purpose."""

    def __init__(self, log: list[int], gate: anyio.Event, stopped: list[str] | None = None):
        self.log = log
        self.gate = gate
        self.stopped_log = stopped
        self.incarnation_log: list[int] = []

    async def receive(self, message: Any) -> object:
        match message:
            case Echo(n=n):
                self.log.append(n)
                return n + 1
            case Record(n=n):
                self.log.append(n)
                return None
            case Boom():
                raise ZeroDivisionError("boom")
            case Missing(key=key):
                raise NotFoundError("thing", key)
            case Hold():
                await self.gate.wait()
                raise ZeroDivisionError("crash after hold")
            case History():
                return list(self.log)
        return await super().receive(message)

    async def stopped(self, error: BaseException | None) -> None:
        if self.stopped_log is not None:
            self.stopped_log.append(self.name)


@asynccontextmanager
async def supervised(
    specs: Sequence[ChildSpec],
    *,
    max_restarts: int = 3,
    shutdown_timeout: float = 5.0,
    on_restart: Callable[[ChildRestart], None] | None = None,
) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(
        specs,
        max_restarts=max_restarts,
        restart_window=60.0,
        shutdown_timeout=shutdown_timeout,
        on_restart=on_restart,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            yield supervisor
        finally:
            await supervisor.stop()


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def fail_storage_reads_once(monkeypatch: pytest.MonkeyPatch, fault: Exception) -> None:
    """Make the storage actor's next read crash with ``fault``; later reads work."""
    original = StorageActor._read_events
    faults = [fault]

    async def flaky(self: StorageActor, read: Any) -> Any:
        if faults:
            raise faults.pop()
        return await original(self, read)

    monkeypatch.setattr(StorageActor, "_read_events", flaky)


def probe_ref(name: str = "probe") -> ActorRef[Any]:
    return ActorRef(name, mailbox_size=64, ask_timeout=5.0)


async def test_ask_returns_the_typed_reply_and_tells_keep_order() -> None:
    log: list[int] = []
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe(log, anyio.Event()))]):
        for n in range(5):
            await ref.tell(Record(n))
        assert await ref.ask(Echo(41)) == 42
        assert await ref.ask(History()) == [0, 1, 2, 3, 4, 41]


async def test_domain_error_reaches_the_asker_and_the_actor_carries_on() -> None:
    restarts: list[ChildRestart] = []
    ref = probe_ref()
    async with supervised(
        [ChildSpec(ref, lambda: Probe([], anyio.Event()))], on_restart=restarts.append
    ) as supervisor:
        with pytest.raises(NotFoundError, match="'k1'"):
            await ref.ask(Missing("k1"))
        assert await ref.ask(Echo(1)) == 2
        assert supervisor.restarts == {"probe": 0}
    assert restarts == []


async def test_unknown_message_is_an_error_not_a_crash() -> None:
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe([], anyio.Event()))]) as supervisor:
        with pytest.raises(HiveError, match="does not handle"):
            await ref.ask(Request[int]())
        assert supervisor.restarts == {"probe": 0}


async def test_crash_answers_the_asker_with_an_error_naming_actor_and_cause() -> None:
    restarts: list[ChildRestart] = []
    ref = probe_ref()
    async with supervised(
        [ChildSpec(ref, lambda: Probe([], anyio.Event()))], on_restart=restarts.append
    ) as supervisor:
        with anyio.fail_after(5), pytest.raises(ActorFailedError) as caught:
            await ref.ask(Boom())
        assert caught.value.actor == "probe"
        assert "ZeroDivisionError: boom" in str(caught.value)
        assert isinstance(caught.value.__cause__, ZeroDivisionError)
        # The replacement serves the next request.
        assert await ref.ask(Echo(1)) == 2
        assert supervisor.restarts == {"probe": 1}
    assert [(r.actor, r.restarts, r.error_type) for r in restarts] == [
        ("probe", 1, "ZeroDivisionError")
    ]


async def test_restart_keeps_mailbox() -> None:
    """Messages queued while an actor crashes and restarts are all handled, in order."""
    log: list[int] = []
    gate = anyio.Event()
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe(log, gate))]) as supervisor:
        async with anyio.create_task_group() as tg:
            failed: list[BaseException] = []

            async def ask_hold() -> None:
                try:
                    await ref.ask(Hold())
                except ActorFailedError as exc:
                    failed.append(exc)

            tg.start_soon(ask_hold)
            await anyio.wait_all_tasks_blocked()
            # The actor is blocked on Hold; queue more behind it, then let it crash.
            for n in range(20):
                await ref.tell(Record(n))
            replies: list[int] = []

            async def ask_echo() -> None:
                replies.append(await ref.ask(Echo(100)))

            tg.start_soon(ask_echo)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert len(failed) == 1
        assert replies == [101]
        assert log == [*range(20), 100]
        assert supervisor.restarts == {"probe": 1}


class Batcher(Actor[Any]):
    """Takes envelopes in batches and crashes on the first Boom of a batch."""

    max_batch = 10

    def __init__(self, log: list[int]) -> None:
        self.log = log

    async def receive_batch(self, batch: Sequence[Envelope[Any]]) -> None:
        for envelope in batch:
            envelope.started = True
            match envelope.message:
                case Boom():
                    raise ZeroDivisionError("boom in batch")
                case Echo(n=n):
                    self.log.append(n)
                    envelope.resolve(n + 1)


async def test_crash_mid_batch_hands_unstarted_envelopes_to_the_replacement() -> None:
    log: list[int] = []
    ref = probe_ref("batcher")
    # Fill the mailbox before the actor starts, so that one batch holds all of them.
    replies: dict[int, object] = {}
    all_answered = anyio.Event()

    async def ask(message: Any, key: int) -> None:
        try:
            replies[key] = await ref.ask(message)
        except HiveError as exc:
            replies[key] = type(exc)
        if len(replies) == 4:
            all_answered.set()

    async with anyio.create_task_group() as asks:
        for key, message in enumerate([Echo(1), Boom(), Echo(3), Echo(4)], start=1):
            asks.start_soon(ask, message, key)
            await anyio.wait_all_tasks_blocked()  # enqueued in this order
        async with supervised([ChildSpec(ref, lambda: Batcher(log))]) as supervisor:
            with anyio.fail_after(5):
                await all_answered.wait()
            assert supervisor.restarts == {"batcher": 1}
    assert replies == {1: 2, 2: ActorFailedError, 3: 4, 4: 5}
    assert log == [1, 3, 4]


async def test_restart_intensity_stops_the_supervisor_with_the_cause() -> None:
    ref = probe_ref()
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: Probe([], anyio.Event()))],
        max_restarts=2,
        restart_window=60.0,
        shutdown_timeout=5.0,
    )
    errors: list[type[BaseException]] = []
    with pytest.raises(BaseExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            for _ in range(5):
                try:
                    await ref.ask(Boom())
                except HiveError as exc:
                    errors.append(type(exc))
    assert caught.group_contains(RuntimeFailedError, depth=2)
    matched, _ = caught.value.split(RuntimeFailedError)
    assert matched is not None
    failure = leaves(matched)[0]
    assert isinstance(failure, RuntimeFailedError)
    assert failure.actor == "probe"
    assert isinstance(failure.__cause__, ZeroDivisionError)
    # Three crashes answered with ActorFailedError; the third exceeded the intensity.
    assert errors[:3] == [ActorFailedError] * 3
    assert set(errors[3:]) <= {RuntimeStoppedError}


async def test_restart_intensity_stops_the_runtime_and_raises_the_cause(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the storage actor's handler, past the intensity, ends Runtime.open."""

    async def broken(self: StorageActor, read: object) -> object:
        raise RuntimeError("disk gremlin")

    monkeypatch.setattr(StorageActor, "_read_events", broken)
    config = RuntimeConfig(max_restarts=2)
    seen: list[type[BaseException]] = []
    with anyio.fail_after(10), pytest.raises(RuntimeFailedError) as caught:  # noqa: PT012
        async with Runtime.open(db_path, config=config) as runtime:
            await runtime.publish("before.crash")
            for _ in range(10):
                try:
                    await runtime.read_events()
                except HiveError as exc:
                    seen.append(type(exc))
            pytest.fail("the runtime should have stopped")
    assert caught.value.actor == "storage"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "disk gremlin" in str(caught.value)
    assert seen[:3] == [ActorFailedError] * 3


async def test_start_up_failure_reaches_the_starter() -> None:
    class BadStart(Actor[Any]):
        async def started(self) -> None:
            raise OSError("cannot open the thing")

    supervisor = Supervisor(
        [ChildSpec(probe_ref(), BadStart)],
        max_restarts=3,
        restart_window=60.0,
        shutdown_timeout=1.0,
    )
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
    assert caught.group_contains(OSError, match="cannot open the thing")


async def test_ask_deadline_raises_request_timeout() -> None:
    gate = anyio.Event()
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe([], gate))], shutdown_timeout=0.5):
        with anyio.fail_after(5), pytest.raises(RequestTimeoutError) as caught:
            await ref.ask(Hold(), timeout=0.05)
        assert caught.value.actor == "probe"
        assert caught.value.message == "Hold"
        gate.set()


async def test_a_cancelled_asker_does_not_hurt_the_actor() -> None:
    gate = anyio.Event()
    log: list[int] = []
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe(log, gate))]) as supervisor:
        with anyio.move_on_after(0.05) as scope:
            await ref.ask(Hold())
        assert scope.cancelled_caught
        gate.set()  # The actor now answers an asker that has gone away.
        assert await ref.ask(Echo(7)) == 8
        assert supervisor.restarts == {"probe": 1}  # Hold crashes after its gate, by design


class Take(Request[str], frozen=True):
    """Ask for the one thing the Giver holds."""


class GiveBack(msgspec.Struct, frozen=True):
    thing: str


class Giver(Actor[Any]):
    """Hands out one exclusive thing. Before answering, it runs ``before_answer`` (which
    cancels the asker), so that the asker is cancelled with the answer on its way."""

    def __init__(self, before_answer: Callable[[], None], returned: list[str]) -> None:
        self.before_answer = before_answer
        self.returned = returned

    async def receive_batch(self, batch: Sequence[Envelope[Any]]) -> None:
        for envelope in batch:
            envelope.started = True
            if isinstance(envelope.message, GiveBack):
                self.returned.append(envelope.message.thing)
                envelope.resolve(None)
            elif isinstance(envelope.message, Take):
                self.before_answer()
                given = envelope.resolve("the thing", GiveBack("the thing"))
                if not given:
                    self.returned.append("closed reply")
            else:
                envelope.resolve(await self.receive(envelope.message))


async def test_an_answer_its_cancelled_asker_never_received_is_told_back() -> None:
    """The asker's scope is cancelled, then the answer resolves its reply before the asker
    runs again: the asker never sees the value, so it tells the give-back message to the
    actor (which would otherwise believe the thing delivered)."""
    returned: list[str] = []
    scope = anyio.CancelScope()
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Giver(scope.cancel, returned))]):
        got: list[str] = []
        with scope:
            got.append(await ref.ask(Take()))
        assert scope.cancelled_caught
        assert got == []
        # The give-back was told as the asker left, so it comes before this ask (FIFO).
        assert await ref.ask(Take()) == "the thing"
        assert returned == ["the thing"]


async def test_an_answer_received_is_not_told_back() -> None:
    returned: list[str] = []
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Giver(lambda: None, returned))]):
        assert await ref.ask(Take()) == "the thing"
        # A give-back would have been told before this second ask (the mailbox is FIFO).
        assert await ref.ask(Take()) == "the thing"
        assert returned == []


async def test_no_asker_hangs_when_the_runtime_stops_past_its_deadline() -> None:
    gate = anyio.Event()  # never set: the actor is stuck on the first Hold
    ref = probe_ref()
    outcomes: list[type[BaseException]] = []

    async def ask(message: Any) -> None:
        try:
            await ref.ask(message)  # the default deadline: the watchdog path
        except HiveError as exc:
            outcomes.append(type(exc))

    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as askers,
            supervised([ChildSpec(ref, lambda: Probe([], gate))], shutdown_timeout=0.2),
        ):
            askers.start_soon(ask, Hold())
            await anyio.wait_all_tasks_blocked()
            for n in range(5):
                askers.start_soon(ask, Echo(n))
            await anyio.wait_all_tasks_blocked()
    assert outcomes == [RuntimeStoppedError] * 6
    with pytest.raises(RuntimeStoppedError):
        await ref.ask(Echo(1))


class HandOn(Request[int], frozen=True):
    """Handed on by the actor to a helper that never answers it."""


class Relay(Actor[Any]):
    """Hands each message on, as the storage actor hands a large read to its reader pool,
    to a helper that here never runs it (a reader cancelled at the stop before it did)."""

    def __init__(self, handed: list[Envelope[Any]]) -> None:
        self.handed = handed

    async def receive_batch(self, batch: Sequence[Envelope[Any]]) -> None:
        for envelope in batch:
            envelope.started = True
            self.handed.append(envelope)


async def test_no_asker_hangs_on_a_message_handed_on_and_never_answered() -> None:
    handed: list[Envelope[Any]] = []
    ref = probe_ref("relay")
    outcomes: list[type[BaseException]] = []

    async def ask(deadline: float | None) -> None:
        try:
            await ref.ask(HandOn(), timeout=deadline)
        except HiveError as exc:
            outcomes.append(type(exc))

    async with anyio.create_task_group() as askers:
        async with supervised([ChildSpec(ref, lambda: Relay(handed))]) as supervisor:
            assert ref.deadlines.running
            askers.start_soon(ask, None)  # the default deadline: kept by the watchdog
            askers.start_soon(ask, 600.0)  # its own (longer) deadline: the watchdog too
            askers.start_soon(ask, 4.0)  # a shorter one, kept by its cancel scope
            await anyio.wait_all_tasks_blocked()
            assert len(handed) == 3
        # A clean stop: the mailbox drained, and the actor never answered any ask.
        assert supervisor.restarts == {"relay": 0}
        # Only the stop can wake the askers now: they run until they end, or wait for
        # good (left waiting, they are cancelled and this fails).
        await anyio.wait_all_tasks_blocked()
        askers.cancel_scope.cancel()
    assert outcomes == [RuntimeStoppedError] * 3


async def test_shutdown_drains_mailboxes_then_stops_in_reverse_start_order() -> None:
    stopped: list[str] = []
    logs: dict[str, list[int]] = {"first": [], "second": []}
    refs = {name: probe_ref(name) for name in logs}
    specs = [
        ChildSpec(refs[name], lambda name=name: Probe(logs[name], anyio.Event(), stopped))
        for name in logs
    ]
    async with supervised(specs):
        for n in range(50):
            for ref in refs.values():
                await ref.tell(Record(n))
    assert logs == {"first": list(range(50)), "second": list(range(50))}
    assert stopped == ["second", "first"]


async def test_runtime_block_leaves_no_task_behind(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        await runtime.publish("x.y")
    # Everything the runtime started has ended: a closed runtime refuses politely.
    with pytest.raises(RuntimeStoppedError, match="closed"):
        await runtime.publish("x.y")


async def test_an_app_exception_comes_out_of_the_block_unwrapped(db_path: str) -> None:
    with pytest.raises(KeyError, match="app bug"):
        async with Runtime.open(db_path):
            raise KeyError("app bug")


async def test_every_restart_is_published_as_a_durable_event(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_storage_reads_once(monkeypatch, RuntimeError("transient fault"))
    async with Runtime.open(db_path) as runtime:
        async with runtime.subscribe("actor.*") as live:
            with pytest.raises(ActorFailedError, match="transient fault"):
                await runtime.read_events()
            with anyio.fail_after(5):
                event = await live.receive()
        assert event.type == "actor.restarted"
        assert event.source == "supervisor"
        assert event.data == {
            "actor": "storage",
            "restarts": 1,
            "error_type": "RuntimeError",
            "error": "transient fault",
        }
        logged = await runtime.read_events()
        assert [e.type for e in logged] == ["actor.restarted"]
        restarts = (await runtime.statistics()).restarts
        assert restarts == {
            "broadcast": 0,
            "storage": 1,
            "tasks": 0,
            "workers": 0,
            "plans": 0,
            "schedules": 0,
        }


async def test_the_default_deadline_is_kept_by_the_watchdog() -> None:
    """Asks with the default timeout take the timer-free path and still time out."""
    gate = anyio.Event()
    ref: ActorRef[Any] = ActorRef("probe", mailbox_size=8, ask_timeout=0.2)
    async with supervised([ChildSpec(ref, lambda: Probe([], gate))], shutdown_timeout=0.5):
        assert ref.deadlines.running
        started = anyio.current_time()
        with anyio.fail_after(5), pytest.raises(RequestTimeoutError) as caught:
            await ref.ask(Hold())
        waited = anyio.current_time() - started
        gate.set()
    assert caught.value.timeout == 0.2
    assert waited >= 0.2  # never early (lateness is bounded by two ticks, not asserted)


async def test_a_deadline_longer_than_the_default_is_kept_by_the_watchdog() -> None:
    """An ask's own deadline at least the default (a claim's wait plus the default) takes
    the timer-free path too, and still times out with its own deadline, never early."""
    gate = anyio.Event()
    ref: ActorRef[Any] = ActorRef("probe", mailbox_size=8, ask_timeout=0.2)
    async with supervised([ChildSpec(ref, lambda: Probe([], gate))], shutdown_timeout=0.5):
        held: list[int] = []

        async def look() -> None:
            await anyio.wait_all_tasks_blocked()
            held.append(len(ref.deadlines._timed))

        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(look)
            with anyio.fail_after(5), pytest.raises(RequestTimeoutError) as caught:
                await ref.ask(Hold(), timeout=0.4)
        waited = anyio.current_time() - started
        assert held == [1]  # kept by the watchdog: no timer of its own
        gate.set()
    assert caught.value.timeout == 0.4
    assert waited >= 0.4


async def test_the_watchdog_heap_of_own_deadlines_stays_bounded() -> None:
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe([], anyio.Event()))]):
        for n in range(3 * AskWatchdog.COMPACT_ABOVE):
            assert await ref.ask(Echo(n), timeout=600.0) == n + 1
        # Answered entries wait for their deadline (ten minutes) or the compaction.
        assert len(ref.deadlines._timed) <= AskWatchdog.COMPACT_ABOVE + 1


async def test_the_watchdog_queue_only_holds_what_is_in_flight() -> None:
    ref = probe_ref()
    async with supervised([ChildSpec(ref, lambda: Probe([], anyio.Event()))]):
        for n in range(1000):
            assert await ref.ask(Echo(n)) == n + 1
        assert len(ref.deadlines._queue) <= 1


class Slow(Request[int], frozen=True):
    n: int


class GatedActor(Actor[Any]):
    def __init__(self, gate: anyio.Event) -> None:
        self.gate = gate

    async def receive(self, message: Any) -> object:
        await self.gate.wait()
        return message.n


async def test_shutdown_drains_senders_waiting_for_room_in_a_full_mailbox() -> None:
    """Closing a full mailbox keeps the messages of senders already waiting for room."""
    ref: ActorRef[Any] = ActorRef("gated", mailbox_size=1, ask_timeout=10.0)
    gate = anyio.Event()
    replies: list[int] = []

    async def ask(n: int) -> None:
        replies.append(await ref.ask(Slow(n)))

    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as askers,
            supervised([ChildSpec(ref, lambda: GatedActor(gate))], shutdown_timeout=5.0),
        ):
            for n in range(8):
                askers.start_soon(ask, n)
            await anyio.wait_all_tasks_blocked()
            # One in the actor, one in the mailbox, six waiting for room.
            waiting = ref.statistics().tasks_waiting_send
            # The actor only runs again after leaving this block has closed the mailbox.
            gate.set()
    assert waiting == 6
    assert sorted(replies) == list(range(8))


async def test_a_crash_whose_text_cannot_be_encoded_is_still_reported(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_storage_reads_once(monkeypatch, ValueError("bad byte \udc80"))
    async with Runtime.open(db_path) as runtime:
        with pytest.raises(ActorFailedError):
            await runtime.read_events()
        await runtime.publish("still.serving")
        logged = await runtime.read_events()
    assert [e.type for e in logged] == ["actor.restarted", "still.serving"]
    assert logged[0].data["error"] == "bad byte \\udc80"


async def test_a_crash_whose_text_cannot_be_encoded_is_logged_as_text_a_handler_can_write(
    db_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A UTF-8 log file (or pytest-xdist's channel) fails on a lone surrogate and loses the
    # record: the crash is logged escaped, traceback included.
    fail_storage_reads_once(monkeypatch, ValueError("bad byte \udc80"))
    with caplog.at_level(logging.WARNING, logger="hive_orchestration.runtime"):
        async with Runtime.open(db_path) as runtime:
            with pytest.raises(ActorFailedError):
                await runtime.read_events()
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert crashes
    for record in crashes:
        text = logging.Formatter().format(record)
        text.encode("utf-8")  # raises if a surrogate is left
        assert "bad byte \\udc80" in text
        assert "Traceback" in text


async def test_no_thread_or_task_outlives_the_runtime(db_path: str) -> None:
    import threading

    before_threads = set(threading.enumerate())
    async with Runtime.open(db_path) as runtime:
        await runtime.publish("x.y")
        async with runtime.subscribe("*"):
            await runtime.publish("x.z")
    leftover = [
        t.name
        for t in set(threading.enumerate()) - before_threads
        # anyio keeps an idle worker-thread pool alive for reuse; it is not ours.
        if t.is_alive() and not t.name.startswith("AnyIO worker thread")
    ]
    assert leftover == []


class Lender(Actor[Any]):
    """Lends its batches (ActorRef.request_now); records which task ran each message."""

    lends_batches = True

    def __init__(self, gate: anyio.Event, seen: list[tuple[str, int, int]]) -> None:
        self.gate = gate
        self.seen = seen

    async def receive(self, message: Any) -> object:
        task = anyio.get_current_task().id
        match message:
            case Slow(n=n):
                self.seen.append(("start", n, task))
                await self.gate.wait()
                self.seen.append(("end", n, task))
                return n
            case Boom():
                raise ZeroDivisionError("boom")
            case Echo(n=n):
                self.seen.append(("echo", n, task))
                return n + 1
        return await super().receive(message)

    async def stopped(self, error: BaseException | None) -> None:
        self.seen.append(("stopped", 0, 0))


async def test_an_idle_actor_that_lends_its_batches_runs_one_in_the_senders_task() -> None:
    seen: list[tuple[str, int, int]] = []
    ref = probe_ref("lender")
    async with supervised([ChildSpec(ref, lambda: Lender(anyio.Event(), seen))]):
        await anyio.wait_all_tasks_blocked()
        reply = await ref.request_now(Echo(1))
        assert reply.done  # answered before request_now returned: nobody was woken
        assert reply.take() == 2
        assert seen == [("echo", 1, anyio.get_current_task().id)]
        assert await ref.ask(Echo(2)) == 3  # ask still goes through the mailbox
        assert seen[-1][2] != anyio.get_current_task().id


async def test_what_arrives_during_a_lent_batch_waits_for_it_and_never_overlaps() -> None:
    gate = anyio.Event()
    seen: list[tuple[str, int, int]] = []
    ref = probe_ref("lender")
    answers: list[int] = []

    async def lent() -> None:
        answers.append((await ref.request_now(Slow(1))).take())

    async def asked() -> None:
        answers.append(await ref.ask(Slow(2)))

    async with supervised([ChildSpec(ref, lambda: Lender(gate, seen))]):
        await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lent)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(asked)
            await anyio.wait_all_tasks_blocked()
            # Not idle now: a second request_now is queued, as request would.
            queued = await ref.request_now(Echo(3))
            await anyio.wait_all_tasks_blocked()
            assert [step[:2] for step in seen] == [("start", 1)]  # the actor's task slept
            ref.mailbox.close()  # the stop, meanwhile: it waits for the lent batch
            await anyio.wait_all_tasks_blocked()
            assert ("stopped", 0, 0) not in seen
            gate.set()
        assert await queued.wait() == 4
    assert [step[:2] for step in seen] == [
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("end", 2),
        ("echo", 3),
        ("stopped", 0),
    ]
    assert seen[0][2] != seen[2][2]  # the lent batch ran in the sender's task
    assert sorted(answers) == [1, 2]


async def test_a_crash_in_a_lent_batch_fails_the_sender_and_restarts_the_actor() -> None:
    seen: list[tuple[str, int, int]] = []
    ref = probe_ref("lender")
    async with supervised([ChildSpec(ref, lambda: Lender(anyio.Event(), seen))]) as supervisor:
        await anyio.wait_all_tasks_blocked()
        reply = await ref.request_now(Boom())
        with pytest.raises(ActorFailedError):
            reply.take()
        assert supervisor.restarts == {"lender": 1}  # counted at the crash, as in its loop
        await anyio.wait_all_tasks_blocked()
        assert supervisor.restarts == {"lender": 1}
        assert await ref.ask(Echo(5)) == 6
