"""The mailbox: order, backpressure, close and discard, and what taking a message costs.

An actor takes what is queued without yielding to the event loop (a memory stream's
``receive`` yields on every call), and still yields now and then when it is never idle,
so that a busy actor cannot starve the loop.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from hive_orchestration.errors import RuntimeStoppedError
from hive_orchestration.runtime import Actor, ActorRef, ChildSpec, Envelope, Mailbox, Supervisor

pytestmark = pytest.mark.anyio


def envelope(n: int) -> Envelope[int]:
    return Envelope(n)


async def test_waiting_senders_get_in_first_come_first_served_behind_the_queue() -> None:
    box: Mailbox[int] = Mailbox("box", 2)
    assert box.put_nowait(envelope(0))
    assert box.put_nowait(envelope(1))
    assert not box.put_nowait(envelope(9))  # full
    async with anyio.create_task_group() as tg:
        for n in (2, 3, 4):
            tg.start_soon(box.put, envelope(n))
            await anyio.wait_all_tasks_blocked()
        assert box.statistics().tasks_waiting_send == 3
        # A sender that finds senders waiting queues behind them, even with room.
        taken = [e.message for e in box.take(1)]
        assert not box.put_nowait(envelope(9))
        taken += [e.message for e in box.take(10)]
    assert taken == [0, 1, 2, 3, 4]
    assert box.statistics().tasks_waiting_send == 0


async def test_a_cancelled_sender_withdraws_its_message() -> None:
    box: Mailbox[int] = Mailbox("box", 1)
    assert box.put_nowait(envelope(0))
    with anyio.move_on_after(0.01):
        await box.put(envelope(1))
    assert [e.message for e in box.take(10)] == [0]


async def test_close_keeps_what_is_queued_and_waiting_then_ends_the_wait() -> None:
    box: Mailbox[int] = Mailbox("box", 1)
    assert box.put_nowait(envelope(0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(box.put, envelope(1))
        await anyio.wait_all_tasks_blocked()
        box.close()
        with pytest.raises(RuntimeStoppedError):
            box.put_nowait(envelope(2))
        assert await box.wait()
        assert [e.message for e in box.take(10)] == [0, 1]
    assert not await box.wait()  # closed and drained


async def test_discard_fails_the_queued_and_the_waiting() -> None:
    box: Mailbox[int] = Mailbox("box", 1)
    reply_envelope: Envelope[int] = Envelope(0, reply=None)
    assert box.put_nowait(reply_envelope)
    errors: list[BaseException] = []

    async def send() -> None:
        try:
            await box.put(envelope(1))
        except RuntimeStoppedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        await anyio.wait_all_tasks_blocked()
        box.discard(RuntimeStoppedError("gone"))
    assert reply_envelope.done
    assert len(errors) == 1
    assert not await box.wait()
    assert box.discard(RuntimeStoppedError("again")) == 0


async def test_a_waiting_actor_is_woken_by_a_message() -> None:
    box: Mailbox[int] = Mailbox("box", 4)
    woke: list[bool] = []

    async def receiver() -> None:
        woke.append(await box.wait())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await anyio.wait_all_tasks_blocked()
        assert box.statistics().tasks_waiting_receive == 1
        assert box.put_nowait(envelope(7))
    assert woke == [True]
    assert [e.message for e in box.take(4)] == [7]


class Counter(Actor[Any]):
    def __init__(self, handled: list[int]) -> None:
        self.handled = handled

    async def receive(self, message: Any) -> object:
        self.handled.append(message)
        return None


async def test_a_busy_actor_takes_its_backlog_with_few_yields_but_still_yields() -> None:
    """64 queued messages, one per batch: the actor yields to the loop once per eight
    batches (a memory stream yielded once per message), so that a task beside it runs
    8 times while the backlog is handled: neither once per message nor never."""
    ref: ActorRef[Any] = ActorRef("counter", mailbox_size=128, ask_timeout=5.0)
    handled: list[int] = []
    for n in range(64):
        assert ref.try_tell(n)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: Counter(handled))],
        max_restarts=0,
        restart_window=60.0,
        shutdown_timeout=5.0,
    )
    turns = 0
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)

        async def beside() -> None:
            nonlocal turns
            while len(handled) < 64:
                turns += 1
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(5):
            await beside()
        await supervisor.stop()
    assert handled == list(range(64))
    assert 4 <= turns <= 16


class Inline(Actor[Any]):
    """Handles ints inline when idle (strings never); 0 crashes it inline."""

    def __init__(self, log: list[tuple[str, object]]) -> None:
        self.log = log

    def receive_inline(self, message: Any) -> bool:
        if not isinstance(message, int):
            return False
        if message == 0:
            raise ZeroDivisionError("inline boom")
        self.log.append((anyio.get_current_task().name, message))
        return True

    async def receive(self, message: Any) -> object:
        self.log.append((anyio.get_current_task().name, message))
        return None


async def test_a_tell_to_an_idle_actor_is_handled_in_the_senders_task_in_order() -> None:
    ref: ActorRef[Any] = ActorRef("inline", mailbox_size=16, ask_timeout=5.0)
    log: list[tuple[str, object]] = []
    restarts: list[str] = []
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: Inline(log))],
        max_restarts=3,
        restart_window=60.0,
        shutdown_timeout=5.0,
        on_restart=lambda restart: restarts.append(restart.error_type),
    )
    me = anyio.get_current_task().name
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await anyio.wait_all_tasks_blocked()
        assert ref.try_tell(1)  # idle: handled here, at once
        assert log == [(me, 1)]
        assert ref.try_tell("queued")  # not for inline: queued, the actor's task wakes
        assert ref.try_tell(2)  # something is queued: queued behind it, to keep order
        await anyio.wait_all_tasks_blocked()
        assert [message for _, message in log] == [1, "queued", 2]
        assert all(task != me for task, _ in log[1:])
        # A crash inline crashes the actor; its replacement serves what follows.
        assert ref.try_tell(0)
        await anyio.wait_all_tasks_blocked()
        assert restarts == ["ZeroDivisionError"]
        assert supervisor.restarts == {"inline": 1}
        assert ref.try_tell(3)
        await anyio.wait_all_tasks_blocked()
        assert log[-1] == (me, 3)
        await supervisor.stop()


class Peeking(Actor[Any]):
    """Batches of at most 2; the batch holding "hold" records what waits behind it
    (Actor.waiting), then waits for ``gate``."""

    max_batch = 2

    def __init__(self, gate: anyio.Event, seen: list[list[object]]) -> None:
        self.gate = gate
        self.seen = seen

    async def receive_batch(self, batch: Any) -> None:
        for envelope in batch:
            envelope.started = True
            envelope.resolve(None)
        if any(e.message == "hold" for e in batch):
            self.seen.append(list(self.waiting()))
            await self.gate.wait()
            self.seen.append(list(self.waiting()))


async def test_an_actor_sees_what_waits_behind_its_batch_queued_then_waiting_for_room() -> None:
    ref: ActorRef[Any] = ActorRef("peeking", mailbox_size=3, ask_timeout=5.0)
    assert list(Peeking(anyio.Event(), []).waiting()) == []  # not running: nothing
    gate = anyio.Event()
    seen: list[list[object]] = []
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: Peeking(gate, seen))],
        max_restarts=0,
        restart_window=60.0,
        shutdown_timeout=5.0,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        for message in ("hold", 1, 2):
            assert ref.try_tell(message)
        await anyio.wait_all_tasks_blocked()  # the actor took "hold" and 1, and holds
        assert seen == [[2]]
        assert ref.try_tell(3)
        assert ref.try_tell(4)  # full now
        for n in (5, 6):
            tg.start_soon(ref.tell, n)  # waits for room
            await anyio.wait_all_tasks_blocked()
        with anyio.move_on_after(0.01):
            await ref.tell(7)  # withdrawn: never sent
        gate.set()
        await anyio.wait_all_tasks_blocked()
        assert seen == [[2], [2, 3, 4, 5, 6]]
        await supervisor.stop()
