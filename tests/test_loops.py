"""The runtime and the event loop it runs on: what a callback, an app task or another
thread's event loop can and cannot do to it.

- A callback that raises a cancellation of its own (not one of the runtime's cancel
  scopes) is an error like any other: counted, and delivery goes on; the app's block is
  never cancelled by it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn

import anyio
import pytest
import trio
import trio.lowlevel

from hive_orchestration import (
    Event,
    Runtime,
    TopicRegistry,
)

pytestmark = pytest.mark.anyio

SOON = 10.0


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(SOON):
        while not predicate():  # noqa: ASYNC110 - polls state the callbacks fill
            await anyio.sleep(0.005)


# -- a callback's own cancellation -----------------------------------------------------------


async def foreign_cancellation(backend: str, cancel_from: list[Callable[[], object]]) -> NoReturn:
    """Raise the backend's cancellation exception without any cancel scope of the caller
    being cancelled, as a callback that awaited something someone else cancelled does.

    asyncio: wait on a future that another task (the one polling ``cancel_from``) cancels.
    trio: a ``Cancelled`` caught inside a scope of its own and raised outside it.
    """
    if backend == "asyncio":
        future = asyncio.get_running_loop().create_future()
        cancel_from.append(future.cancel)
        await future
        raise AssertionError("the future was cancelled")
    caught: BaseException | None = None
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            caught = cancelled
    assert caught is not None
    raise caught


@pytest.mark.parametrize("api", ["on_event", "subscribe_to_task_events", "attach"])
async def test_a_callback_raising_a_cancellation_of_its_own_is_counted_and_delivery_goes_on(
    db_path: str, anyio_backend: str, api: str
) -> None:
    pending: list[Callable[[], object]] = []
    seen: list[int] = []
    body_finished = False

    async def callback(event: Event) -> None:
        seen.append(event.seq)
        if len(seen) <= 2:
            await foreign_cancellation(anyio_backend, pending)

    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        if api == "on_event":
            handle = await client.on_event("*", callback)
        elif api == "subscribe_to_task_events":
            handle = await client.subscribe_to_task_events("*", callback, pattern="*")
        else:
            registry = TopicRegistry()
            registry.register("*", callback)
            handle = await client.attach(registry)
        for i in range(3):
            await client.publish("job.step", {"i": i}, task_id="t1")
            if anyio_backend == "asyncio" and i < 2:
                await wait_until(lambda: bool(pending))
                pending.pop()()  # this task cancels what the callback awaits
        await wait_until(lambda: handle.delivered == 3)
        assert (handle.delivered, handle.errors, handle.active) == (3, 2, True)
        assert seen == [1, 2, 3]
        assert handle.error is None
        body_finished = True
    # Before the fix, the app's block ended at the first event, silently (both backends).
    assert body_finished


async def test_the_runtimes_own_cancellation_of_a_waiting_callback_is_not_an_error(
    db_path: str,
) -> None:
    """The other side: cancelling the handle, and leaving the block, cancel a callback
    that waits, without counting an error."""
    calls: list[int] = []

    async def waits(event: Event) -> None:
        calls.append(event.seq)
        await anyio.sleep_forever()

    with anyio.fail_after(SOON):
        async with Runtime.open(db_path) as runtime:
            client = runtime.client()
            handle = await client.on_event("*", waits)
            await client.publish("job.step")
            await wait_until(lambda: len(calls) == 1)
            await handle.aclose()
            assert (handle.active, handle.errors, handle.error) == (False, 0, None)
            kept = await client.on_event("*", waits)
            await client.publish("job.step")
            await wait_until(lambda: calls == [1, 2])  # the second event, to the new handle
        assert (kept.active, kept.errors, kept.error) == (False, 0, None)


async def test_a_callbacks_own_cancellation_as_its_handle_is_cancelled_ends_only_it(
    db_path: str, anyio_backend: str
) -> None:
    """The callback's own cancellation arrives just as its handle is cancelled, so the
    handle's scope does not recognise it as its own: it ends the subscription (as asked),
    and does not reach the app's block."""
    pending: list[Callable[[], object]] = []
    inside = anyio.Event()
    handle_cancelled = anyio.Event()

    async def callback(event: Event) -> None:
        inside.set()
        if anyio_backend == "trio":
            with anyio.CancelScope(shield=True):
                await handle_cancelled.wait()
        await foreign_cancellation(anyio_backend, pending)

    body_finished = False
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        handle = await client.on_event("*", callback)
        await client.publish("job.step")
        await inside.wait()
        if anyio_backend == "asyncio":
            await wait_until(lambda: bool(pending))
            pending.pop()()  # the future is cancelled first, then in the same step:
        handle.cancel()
        handle_cancelled.set()
        await wait_until(lambda: not handle.active)
        assert (handle.errors, handle.error) == (0, None)
        await client.publish("job.step")  # the app goes on
        body_finished = True
    assert body_finished
