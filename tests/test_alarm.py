"""Alarms wake an actor at the time it chose, once per set, without the actor sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from hive_orchestration.runtime import (
    Actor,
    ActorRef,
    Alarm,
    ChildSpec,
    Request,
    Supervisor,
    loop_clock,
)

pytestmark = pytest.mark.anyio


class Wake(msgspec.Struct, frozen=True):
    pass


class Count(Request[int], frozen=True):
    pass


class Sleeper(Actor[Any]):
    """Counts its wake-ups, and signals each one."""

    def __init__(self, woken: list[float], signal: anyio.abc.ObjectSendStream[float]) -> None:
        self.woken = woken
        self.signal = signal

    async def receive(self, message: Any) -> object:
        if isinstance(message, Wake):
            now = anyio.current_time()
            self.woken.append(now)
            self.signal.send_nowait(now)
            return None
        return len(self.woken)


@asynccontextmanager
async def sleeper() -> AsyncIterator[tuple[Alarm[Any], list[float], Any]]:
    ref: ActorRef[Any] = ActorRef("sleeper", mailbox_size=16, ask_timeout=5.0)
    alarm: Alarm[Any] = Alarm(ref, Wake())
    woken: list[float] = []
    send, receive = anyio.create_memory_object_stream[float](16)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: Sleeper(woken, send), services=(alarm.run,))],
        max_restarts=0,
        restart_window=10.0,
        shutdown_timeout=1.0,
    )
    with send, receive:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            try:
                yield alarm, woken, receive
            finally:
                await supervisor.stop()


async def test_an_alarm_fires_once_at_the_time_set() -> None:
    async with sleeper() as (alarm, woken, signal):
        at = anyio.current_time() + 0.05
        alarm.set(at)
        with anyio.fail_after(5):
            fired = await signal.receive()
        assert fired >= at
        assert alarm.at is None
        with anyio.move_on_after(0.1):
            await signal.receive()
            pytest.fail("fired twice for one set")
    assert len(woken) == 1


async def test_setting_again_replaces_the_time_earlier_or_later() -> None:
    async with sleeper() as (alarm, woken, signal):
        now = anyio.current_time()
        alarm.set(now + 60)
        alarm.set(now + 0.02)  # earlier: must not wait for the first one
        with anyio.fail_after(5):
            await signal.receive()
        alarm.set(anyio.current_time() + 0.02)
        alarm.set(anyio.current_time() + 0.5)  # later: the earlier one is gone
        with anyio.move_on_after(0.1):
            await signal.receive()
            pytest.fail("fired at a replaced time")
        with anyio.fail_after(5):
            await signal.receive()
    assert len(woken) == 2


async def test_a_disarmed_alarm_does_not_fire_and_a_past_time_fires_at_once() -> None:
    async with sleeper() as (alarm, woken, signal):
        alarm.set(anyio.current_time() + 0.02)
        alarm.set(None)
        with anyio.move_on_after(0.1):
            await signal.receive()
            pytest.fail("a disarmed alarm fired")
        alarm.set(anyio.current_time() - 10)
        with anyio.fail_after(5):
            await signal.receive()
    assert len(woken) == 1


async def test_an_armed_alarm_does_not_hold_up_shutdown() -> None:
    with anyio.fail_after(5):
        async with sleeper() as (alarm, _woken, _signal):
            alarm.set(anyio.current_time() + 3600)


async def test_nan_is_refused() -> None:
    async with sleeper() as (alarm, _woken, _signal):
        with pytest.raises(ValueError, match="NaN"):
            alarm.set(float("nan"))


async def test_a_later_time_does_not_wake_the_alarms_task_an_earlier_one_does() -> None:
    """An actor moves its alarm after most batches, mostly later: waking the alarm's task
    for each would cost a round of the event loop per batch. A later time is looked at
    when the task wakes for the earlier one; it still fires at the later time."""
    async with sleeper() as (alarm, woken, signal):
        now = anyio.current_time()
        alarm.set(now + 0.2)
        await anyio.wait_all_tasks_blocked()
        waiting_on = alarm._changed
        for later in (0.3, 60.0, 0.25):
            alarm.set(now + later)
            await anyio.wait_all_tasks_blocked()
            assert alarm._changed is waiting_on  # not woken
        alarm.set(None)
        await anyio.wait_all_tasks_blocked()
        assert alarm._changed is waiting_on
        alarm.set(now + 0.25)
        with anyio.fail_after(5):
            fired = await signal.receive()
        assert fired >= now + 0.25
        alarm.set(now + 3600)
        await anyio.wait_all_tasks_blocked()
        waiting_on = alarm._changed
        alarm.set(anyio.current_time() + 0.01)  # earlier: woken, and fires then
        await anyio.wait_all_tasks_blocked()
        assert alarm._changed is not waiting_on
        with anyio.fail_after(5):
            await signal.receive()
    assert len(woken) == 2


async def test_loop_clock_reads_anyio_current_time_without_its_lookup() -> None:
    """The runtime's deadlines (alarms, asks, leases) run on loop_clock(): the event
    loop's own clock, read without anyio's look-up of the backend on every call, giving
    anyio.current_time()'s readings on each loop."""
    clock = loop_clock()
    assert clock is not anyio.current_time  # the look-up is what it saves
    for _ in range(100):
        before = anyio.current_time()
        reading = clock()
        after = anyio.current_time()
        assert before <= reading <= after
    await anyio.sleep(0.01)
    assert clock() - before >= 0.009  # asyncio may wake a timer a clock tick early
