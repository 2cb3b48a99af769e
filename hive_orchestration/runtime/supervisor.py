"""The supervisor: starts actors from child specs in order, restarts them, stops them.

Strategy: one_for_one. A child that crashes is replaced by a fresh instance from its
factory, on the same mailbox, so messages sent during the restart wait for it instead of
being lost. Restart intensity bounds the retries: more than ``max_restarts`` crashes of
one child within ``restart_window`` seconds stops the whole runtime with
:class:`RuntimeFailedError`, whose ``__cause__`` is the last crash.

Shutdown is an escalation ladder: close each mailbox in reverse start order and wait for
the actor to drain it, all within one deadline; past the deadline, cancel. Whatever is
still queued after that is failed with :class:`RuntimeStoppedError`, so no asker hangs.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..errors import RuntimeFailedError, RuntimeStoppedError
from .actor import Actor, ActorRef, Envelope, run_actor

__all__ = ["ChildRestart", "ChildSpec", "Supervisor"]

log = logging.getLogger("hive_orchestration.runtime")


def _log_crash(name: str, exc: BaseException) -> None:
    """Log an actor's crash with its traceback, as text any handler can write.

    An exception's text may hold a lone surrogate (bytes decoded with surrogateescape,
    say): a handler writing UTF-8 would fail on it and lose the record. Such a crash is
    logged with its traceback escaped into the message instead of attached."""
    trace = "".join(traceback.format_exception(exc))
    try:
        trace.encode("utf-8")
    except UnicodeEncodeError:
        safe = trace.encode("utf-8", "backslashreplace").decode("utf-8")
        log.warning("%s crashed; restarting\n%s", name, safe.rstrip())
        return
    log.warning("%s crashed (%s: %s); restarting", name, type(exc).__name__, exc, exc_info=exc)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to (re)start one child: the reference it serves and a factory of fresh actors.

    ``services`` run beside the child for the supervisor's whole life, across restarts
    (an :class:`~hive_orchestration.runtime.alarm.Alarm`'s ``run``, for example).
    """

    ref: ActorRef[Any]
    factory: Callable[[], Actor[Any]]
    services: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = ()


@dataclass(frozen=True, slots=True)
class ChildRestart:
    """What the supervisor reports after restarting a child."""

    actor: str
    restarts: int
    error_type: str
    error: BaseException


class Supervisor:
    """Owns the task group every child runs in; the runtime owns the supervisor."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        max_restarts: int,
        restart_window: float,
        shutdown_timeout: float,
        on_restart: Callable[[ChildRestart], None] | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        names = [spec.ref.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        self._children = list(children)
        self._max_restarts = max_restarts
        self._window = restart_window
        self._shutdown_timeout = shutdown_timeout
        self._on_restart = on_restart
        self._clock = clock
        self._done = {name: anyio.Event() for name in names}
        self._restarts = dict.fromkeys(names, 0)
        self._task_group: anyio.abc.TaskGroup | None = None
        # The first child that gave up. Its stop fails what others asked of it, and they
        # may crash on that: consequences, neither restarted nor reported as the cause.
        self._failed: RuntimeFailedError | None = None

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, by child name."""
        return dict(self._restarts)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every child in order, report ready, and supervise until stopped.

        A child whose start-up fails makes this raise before ready is reported, so the
        error reaches whoever started the supervisor (``Runtime.open``).
        """
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                for spec in self._children:
                    tg.start_soon(spec.ref.deadlines.run)
                    for service in spec.services:
                        tg.start_soon(service)
                    await tg.start(self._supervise, spec)
                task_status.started()
        finally:
            # Children after one whose start-up failed never ran: close their mailboxes too.
            for spec in self._children:
                spec.ref.mailbox.discard(RuntimeStoppedError(f"actor {spec.ref.name!r} is stopped"))
            # Every child and service has ended, so no ask still open will be answered:
            # one an actor handed on (a pooled read whose reader was cancelled before it
            # ran it) would otherwise wait forever, its deadline's watchdog gone too.
            for spec in self._children:
                spec.ref.deadlines.close(
                    RuntimeStoppedError(f"actor {spec.ref.name!r} stopped before answering")
                )

    async def stop(self) -> None:
        """Drain every child in reverse start order within the deadline, then cancel."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._shutdown_timeout) as scope:
                for spec in reversed(self._children):
                    spec.ref.mailbox.close()
                    await self._done[spec.ref.name].wait()
            if scope.cancelled_caught:
                pending = [name for name, done in self._done.items() if not done.is_set()]
                log.warning(
                    "shutdown deadline of %gs passed; cancelling %s",
                    self._shutdown_timeout,
                    ", ".join(pending),
                )
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()

    async def _supervise(
        self, spec: ChildSpec, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        name = spec.ref.name
        carry: deque[Envelope[Any]] = deque()
        crashes: deque[float] = deque()
        ready = False
        recorded: BaseException | None = None  # the crash already counted by on_crash

        def on_ready() -> None:
            nonlocal ready
            if not ready:
                ready = True
                task_status.started()

        def on_crash(exc: BaseException) -> None:
            # Counted and reported at the moment of the crash, so that the restart event
            # is queued before anything the failed askers do next.
            nonlocal recorded
            recorded = exc
            if self._failed is not None:
                return
            now = self._clock()
            crashes.append(now)
            while crashes and crashes[0] < now - self._window:
                crashes.popleft()
            if len(crashes) > self._max_restarts:
                return
            self._restarts[name] += 1
            if self._on_restart is not None:
                restart = ChildRestart(name, self._restarts[name], type(exc).__name__, exc)
                try:
                    self._on_restart(restart)
                except Exception:
                    # Reporting a restart must never take the runtime down.
                    log.exception("reporting the restart of %s failed", name)

        try:
            while True:
                try:
                    await run_actor(
                        spec.factory(),
                        spec.ref.mailbox,
                        carry,
                        on_ready=on_ready,
                        on_crash=on_crash,
                    )
                    return  # mailbox closed and drained: a clean stop
                except Exception as exc:
                    if not ready:
                        raise  # start-up failure: reaches the starter through tg.start
                    if self._failed is not None:
                        log.info("%s stopped after %s gave up: %r", name, self._failed.actor, exc)
                        return
                    if recorded is not exc:
                        on_crash(exc)  # crashed outside a handler (in started or stopped)
                    recorded = None
                    if len(crashes) > self._max_restarts:
                        log.error("%s crashed %d times; giving up", name, len(crashes))
                        self._failed = RuntimeFailedError(name, len(crashes), self._window, exc)
                        raise self._failed from exc
                    _log_crash(name, exc)
        finally:
            self._done[name].set()
            stopped = RuntimeStoppedError(f"actor {name!r} stopped before answering")
            for envelope in carry:
                envelope.fail(stopped)
            carry.clear()
            spec.ref.mailbox.discard(RuntimeStoppedError(f"actor {name!r} is stopped"))
