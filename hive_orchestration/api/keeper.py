"""How a client reaches its runtime, and how it takes the database over when the runtime
of another process it reached goes away (``RuntimeConfig.take_over``).

:func:`reach` opens the runtime on the database or connects to the process that owns it:
the file's lock decides. :class:`Keeper` holds what a ``take_over`` client reached in a
task of its own, so that it can be replaced while the app's block runs: when the owner
goes away (killed, exited, stopped), the keeper reaches the database again, and the lock
decides again, so that of several clients racing, exactly one opens it (recovery runs,
and it serves the others) and the others connect to that one.

What the client promises across the change: a call in flight when the owner went away
gets :class:`OutcomeUnknownError` (killed) or :class:`RuntimeStoppedError` (stopped), as
without take-over; a call made after waits for the new owner and runs there; an
``events(after=)`` stream and a callback go on from the last event they gave, with no gap
and no duplicate (the log is durable: the new owner has every event the old one
committed); a plain subscription ends as it does without take-over (it has no replay).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeAlias

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._groups import raise_cause
from ..config import RuntimeConfig, resolve_db_path
from ..errors import ConnectionLostError, HiveError, RuntimeStoppedError, StorageError
from ..remote.client import RemoteRuntime
from ..storage import open_store
from ..storage.port import STARTING, STOPPING
from .embedded import Runtime

__all__ = ["Backend", "Keeper", "reach"]

log = logging.getLogger("hive_orchestration.client")

#: What a client talks to: the runtime in this process, or the one that owns the database
#: in another process, through its socket.
Backend: TypeAlias = Runtime | RemoteRuntime


async def reach(
    stack: AsyncExitStack,
    db_path: str | os.PathLike[str] | None,
    config: RuntimeConfig | None,
    name: str | None,
) -> Backend:
    """Open the runtime on the database in ``stack``, or connect to the runtime of the
    process that owns it: the file's lock decides. An owner that is opening or closing
    (its lock file says so, or its socket refuses) is waited for, up to
    ``remote_timeout``, trying both again: then it serves, or the file is free."""
    checked = RuntimeConfig.checked(config)
    deadline = anyio.current_time() + checked.remote_timeout
    pause = 0.01
    target, _ = resolve_db_path(db_path, checked)
    store = open_store(target, checked)
    while store.kind == "postgres":
        # Several runtimes (nodes) may open one server's database: a client connects to
        # one that serves, if any does (waiting for one that is opening or closing, up to
        # remote_timeout), and opens a node of its own only if none lives.
        pid, address = await anyio.to_thread.run_sync(store.read_owner)
        if address is None:
            break
        if address not in (STARTING, STOPPING):
            with contextlib.suppress(ConnectionLostError):
                return await stack.enter_async_context(
                    RemoteRuntime.connect(
                        address,
                        name=name,
                        silence=checked.remote_timeout,
                        held=checked.max_answer_bytes,
                    )
                )
        if anyio.current_time() + pause > deadline:
            break
        log.info("the runtime of pid %s on %r is %s: trying again", pid, store.display, address)
        await anyio.sleep(pause)
        pause = min(2 * pause, 0.25)
    while True:
        try:
            return await stack.enter_async_context(Runtime.open(db_path, config=config))
        except StorageError as error:
            if error.fault != "in_use" or error.path is None:
                raise
            # The store of what Runtime.open opened (error.path is only what it shows:
            # a server's URL without its password).
            target, _ = resolve_db_path(db_path, checked)
            owner = open_store(target, checked).read_owner
            pid, address = await anyio.to_thread.run_sync(owner)
            if pid is None:
                # Neither pid nor address, yet the lock is held: its owner is letting it
                # go (it clears both first), or took it a moment ago.
                address = STOPPING
            elif address is None:
                raise StorageError(
                    f"{error} (that runtime serves no socket to connect to: it was"
                    " opened with serve_socket=False, or is of an older version)",
                    path=error.path,
                    fault="in_use",
                ) from None
            if address in (STARTING, STOPPING):
                why = f"the runtime of pid {pid} that owns {error.path!r} is {address}"
                failure: HiveError = ConnectionLostError(
                    f"{why} and did not serve within {checked.remote_timeout:g}s"
                    " (remote_timeout): try again once it is open"
                )
            else:
                try:
                    return await stack.enter_async_context(
                        RemoteRuntime.connect(
                            address,
                            name=name,
                            silence=checked.remote_timeout,
                            held=checked.max_answer_bytes,
                        )
                    )
                except ConnectionLostError as exc:
                    why = f"the runtime of pid {pid} is going away or coming ({exc})"
                    failure = exc
        if anyio.current_time() + pause > deadline:
            raise failure
        log.info("%s: trying again", why)
        await anyio.sleep(pause)
        pause = min(2 * pause, 0.25)


def usable(backend: Backend) -> bool:
    """Whether calls can still be made on ``backend`` (a remote one whose owner went away
    or said goodbye cannot)."""
    if isinstance(backend, RemoteRuntime):
        return backend._lost is None and backend._goodbye is None and not backend._closed
    return not backend._closed


class Keeper:
    """The backend of a ``take_over`` client, in a task of its own (see the module)."""

    def __init__(
        self, db_path: str | os.PathLike[str] | None, config: RuntimeConfig | None, name: str | None
    ) -> None:
        self._db_path = db_path
        self._config = config
        self._name = name
        #: What the client talks to now (a remote one may have gone away meanwhile).
        self.current: Backend | None = None
        #: Why no backend will come any more (the take-over failed).
        self.error: HiveError | None = None
        #: Set, then replaced, on every change: a waiter reads the state again.
        self._changed = anyio.Event()
        self._closing = False
        self._waiting: anyio.CancelScope | None = None
        #: The client's callbacks run here: they outlive a change of backend.
        self.group: TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Backend]:
        """Reach the database for the block (raising as :func:`reach` does), and keep it
        reached; the block is cancelled if the runtime the keeper opened fails."""
        try:
            async with anyio.create_task_group() as group:
                self.group = group
                first: Backend = await group.start(self._keep)
                try:
                    yield first
                finally:
                    self.close()
        except BaseExceptionGroup as failed:
            raise_cause(failed)

    def close(self) -> None:
        """The client is closing: the runtime the keeper opened stops, a connection closes."""
        self._closing = True
        if self._waiting is not None:
            self._waiting.cancel()
        self._notify()

    async def _keep(self, *, task_status: TaskStatus[Backend]) -> None:
        started = False
        while not self._closing:
            # Cancelled when the client closes: what was reached is left as an app's
            # cancelled block leaves it (a runtime stops cleanly, its shutdown shielded).
            with anyio.CancelScope() as self._waiting:
                async with AsyncExitStack() as stack:
                    try:
                        backend = await reach(stack, self._db_path, self._config, self._name)
                    except HiveError as error:
                        if not started:
                            raise
                        self._fail(error)
                        return
                    self.current = backend
                    self._notify()
                    if started:
                        log.warning("%s", _describe(backend))
                    else:
                        started = True
                        task_status.started(backend)
                    if isinstance(backend, RemoteRuntime):
                        await backend.gone.wait()
                    else:
                        await anyio.sleep_forever()  # the owner now: until the client closes
            self._waiting = None
            self._notify()  # gone: callers wait for the next one

    def _fail(self, error: HiveError) -> None:
        self.error = ConnectionLostError(
            f"the runtime this client reached went away, and taking {self._where()} over"
            f" failed: {error}. Open a new client"
        )
        log.error("%s", self.error)
        self._notify()

    def _where(self) -> str:
        return repr(self.current.path) if self.current is not None else "the database"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def check(self) -> None:
        """Raise if no backend will come any more: the client closed, or taking over failed."""
        if self._closing:
            raise RuntimeStoppedError("this client was closed; create a new one")
        if self.error is not None:
            raise type(self.error)(str(self.error))

    async def live(self) -> Backend:
        """The backend to call now, once there is a usable one (waits while the database
        is being taken over)."""
        return await self.replaced(None)

    async def replaced(self, old: Backend | None) -> Backend:
        """A usable backend other than ``old`` (the one a caller found gone)."""
        while True:
            changed = self._changed
            self.check()
            current = self.current
            if current is not None and current is not old and usable(current):
                return current
            await changed.wait()


def _describe(backend: Backend) -> str:
    if isinstance(backend, RemoteRuntime):
        return (
            f"the runtime this client reached went away: connected to the runtime of process"
            f" {backend.owner_pid} that owns {backend.path!r} now"
        )
    return f"the runtime this client reached went away: took over {backend.path!r} (recovery ran)"
