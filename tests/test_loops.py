"""The runtime and the event loop it runs on: what a callback, an app task or another
thread's event loop can and cannot do to it.

- A callback that raises a cancellation of its own (not one of the runtime's cancel
  scopes) is an error like any other: counted, and delivery goes on; the app's block is
  never cancelled by it.
- ``KeyboardInterrupt`` and ``SystemExit`` raised in a callback or in an app task inside
  the block end the process promptly with that exception (real processes, both backends).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, NoReturn

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


# -- KeyboardInterrupt and SystemExit end the process ----------------------------------------

_APP = """
import sys
import anyio
from hive_orchestration import Runtime

backend, where, kind, path = sys.argv[1:5]


def fatal() -> None:
    print("raising", flush=True)
    if kind == "SystemExit":
        raise SystemExit(3)
    raise KeyboardInterrupt


async def main() -> None:
    try:
        async with Runtime.open(path) as runtime:
            client = runtime.client()
            if where == "callback":
                await client.on_event("app.*", lambda event: fatal())
                await client.create_task("work", {})
                await client.publish("app.go")
                await anyio.sleep(60)
            else:
                async def app_task() -> None:
                    await client.create_task("work", {})
                    fatal()

                async with anyio.create_task_group() as group:
                    group.start_soon(app_task)
                    await anyio.sleep(60)
    except BaseException as exc:
        print("block raised", type(exc).__name__, flush=True)
        raise
    print("block ended normally", flush=True)


anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("where", ["callback", "app task"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_fatal_exception_in_a_callback_or_an_app_task_ends_the_process(
    tmp_path: Path, backend: str, where: str, kind: str
) -> None:
    script = tmp_path / "app.py"
    script.write_text(_APP)
    db = tmp_path / "data" / "hive.db"
    command = [sys.executable, str(script), backend, where.split()[-1], kind, str(db)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout = _Output(process.stdout)
    stderr = _Output(process.stderr)
    try:
        # Opening the runtime takes under a second; 60 s covers a loaded 2-core machine.
        assert stdout.wait_for("raising", 60.0), stdout.text() + stderr.text()
        raised = time.monotonic()
        # Exiting takes about 0.2 s; before the fix, asyncio never exited. 20 s of margin
        # for a loaded machine, then the process is killed so the test cannot hang.
        process.wait(timeout=20.0)
        exited = time.monotonic() - raised
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process did not exit after {kind} in a {where} ({backend})")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    out, err = stdout.text(), stderr.text()
    assert exited < 20.0
    assert "block ended normally" not in out
    if where == "callback":
        # The callback's exception is raised by the app's block, in the app's own task.
        assert f"block raised {kind}" in out, out + err
    if kind == "SystemExit":
        assert process.returncode == 3, err
    else:
        # An uncaught KeyboardInterrupt ends Python as SIGINT would.
        assert process.returncode == -signal.SIGINT, err
        assert "KeyboardInterrupt" in err


class _Output:
    """A child's output stream, read to its end by a thread of its own (so that the pipe
    never fills and nothing read is lost)."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, line: str, timeout: float) -> bool:
        """Whether ``line`` came within ``timeout`` seconds (False once the stream ended)."""
        with self._changed:
            return (
                self._changed.wait_for(lambda: f"{line}\n" in self._lines or self._done, timeout)
                and f"{line}\n" in self._lines
            )

    def text(self) -> str:
        """Everything, once the stream has ended (the process has exited)."""
        self._reader.join(SOON)
        with self._changed:
            return "".join(self._lines)
