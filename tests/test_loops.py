"""The runtime and the event loop it runs on: what a callback, an app task or another
thread's event loop can and cannot do to it.

- A callback that raises a cancellation of its own (not one of the runtime's cancel
  scopes) is an error like any other: counted, and delivery goes on; the app's block is
  never cancelled by it.
- ``KeyboardInterrupt`` and ``SystemExit`` raised in a callback or in an app task inside
  the block end the process promptly with that exception (real processes, both backends).
- A client called from another thread's event loop is refused at the call with
  ``WrongEventLoopError``, and the runtime goes on serving its own loop.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, NoReturn

import anyio
import pytest
import trio
import trio.lowlevel

from hive_orchestration import (
    Event,
    HiveError,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
    SyncOrchestrationClient,
    TopicRegistry,
    WrongEventLoopError,
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


# -- another thread's event loop ----------------------------------------------------------


def _in_another_thread(backend: str, call: Callable[[], Awaitable[object]]) -> BaseException:
    """Run ``call`` on an event loop of a new thread; return what it raised."""
    outcome: list[BaseException] = []

    async def attempt() -> None:
        # A bound on the attempt only, so that the old hang fails the test instead of
        # hanging it (it is refused in microseconds).
        with anyio.fail_after(SOON):
            try:
                await call()
            except Exception as exc:
                outcome.append(exc)
                return
        outcome.append(AssertionError("the call from another thread's loop was not refused"))

    def run() -> None:
        try:
            anyio.run(attempt, backend=backend)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="other-loop", daemon=True)
    thread.start()
    thread.join(SOON * 2)
    assert not thread.is_alive(), "the other thread's loop hung"
    return outcome[0]


@asynccontextmanager
async def _entry_points(
    runtime: Runtime, client: OrchestrationClient, task_id: str
) -> AsyncIterator[dict[str, Callable[[], Awaitable[object]]]]:
    """Calls of every kind, prepared on the runtime's own loop, to make from another one."""

    async def enter_subscription() -> None:
        async with client.subscribe("*"):
            pass

    async with client.subscribe("*") as subscription, client.events(after=0) as stream:
        handle = await client.on_event("never.*", lambda event: None)

        async def cancel_handle() -> None:
            handle.cancel()

        yield {
            "create_task": lambda: client.create_task("work", {}),
            "get_task": lambda: client.get_task(task_id),
            "claim_task": lambda: client.claim_task("w1", ["work"]),
            "register_worker": lambda: client.register_worker("w2", "worker", ["work"]),
            "queue_planning_request": lambda: client.queue_planning_request("plan it"),
            "runtime.create_task": lambda: runtime.create_task("work", {}),
            "publish": lambda: client.publish("app.step"),
            "read_events": lambda: client.read_events(),
            "last_seq": lambda: client.last_seq(),
            "statistics": lambda: runtime.statistics(),
            "subscribe": enter_subscription,
            "subscription.receive": subscription.receive,
            "events.receive": stream.receive,
            "on_event": lambda: client.on_event("*", lambda event: None),
            "handle.aclose": handle.aclose,
            "handle.cancel": cancel_handle,
            "wait_for_plan": lambda: client.wait_for_plan("p1", timeout=1.0),
        }
        assert handle.active  # its aclose from the other loop was refused
        await handle.aclose()


@pytest.mark.parametrize("other", ["asyncio", "trio"])
async def test_a_client_used_from_another_threads_loop_is_refused_and_the_runtime_goes_on(
    db_path: str, other: str
) -> None:
    config = RuntimeConfig(ask_timeout=2.0)
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client(source_agent="app")
        task_id = await client.create_task("work", {"n": 0})
        async with _entry_points(runtime, client, task_id) as calls:
            for name, call in calls.items():
                error = await anyio.to_thread.run_sync(_in_another_thread, other, call)
                assert isinstance(error, WrongEventLoopError), (name, repr(error))
                assert isinstance(error, HiveError)
                assert isinstance(error, RuntimeError)
                assert "other-loop" in str(error)
                assert "SyncOrchestrationClient" in str(error)
                assert error.caller == "other-loop"
                assert error.owner == threading.current_thread().name

        # The runtime is unharmed: the same client serves its own loop, the TaskManager
        # included (on trio it was wedged for good, every later call timing out).
        with anyio.fail_after(SOON):
            second = await client.create_task("work", {"n": 1})
            assert (await client.get_task(second)) is not None
            claim = await client.claim_task("w1", ["work"])
            assert claim is not None
            await client.complete_task(claim.lease, {"ok": True})
            event = await client.publish("app.after")
            assert event.seq == await client.last_seq()
        # Nothing the other thread asked for was sent.
        created = await client.read_events(pattern="task.created")
        assert [event.task_id for event in created] == [task_id, second]
        assert await client.read_events(pattern="planning.*") == []
        assert [event.type for event in await client.read_events(pattern="app.*")] == ["app.after"]
        assert await client.get_worker("w2") is None


async def test_the_check_lets_the_owning_loop_and_its_worker_threads_through(
    db_path: str,
) -> None:
    """The way into the runtime's loop from a worker thread that the message names
    (anyio.from_thread) keeps working, and building a client in a thread is allowed."""
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()

        def from_worker_thread() -> str:
            return anyio.from_thread.run(client.create_task, "work", {})

        task_id = await anyio.to_thread.run_sync(from_worker_thread)
        assert (await client.get_task(task_id)) is not None
        # Building a client or a stream in another thread is not a call: it is allowed.
        other = await anyio.to_thread.run_sync(lambda: runtime.client(source_agent="x"))
        assert (await other.get_task(task_id)) is not None


def test_the_sync_client_may_be_called_from_any_thread(db_path: str) -> None:
    with SyncOrchestrationClient(db_path) as client:
        ids: list[str] = []
        threads = [
            threading.Thread(target=lambda: ids.append(client.create_task("work", {})))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SOON)
        assert len(ids) == 4
        with client.events(after=0, pattern="task.created") as events:
            logged = [events.get(SOON) for _ in ids]
        assert sorted(event.task_id for event in logged if event is not None) == sorted(ids)
