"""Where tracing plugs into the runtime, without importing OpenTelemetry.

Tracing is off until an app turns it on (``hive_orchestration.observe.tracing.enable``,
extra ``otel``), which installs a :class:`Tracing` here. Off, the runtime pays a
context-variable read and a ``None`` test where a task is created, and a ``None`` test
where a worker runs one; nothing imports ``opentelemetry``.

On, three things happen:

- a task's creating call records the W3C trace context current there
  (``traceparent``, ``tracestate``) with the task (:func:`outgoing`);
- a call sent over a socket carries the caller's trace context in its frame, and the
  owner's server runs the call under it (:data:`CARRIED`), so a task created through
  another process's runtime holds its caller's context, not the server's;
- a worker's run of a task is a span, child of the creating call's span, in which the
  handler runs (:func:`run_span`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .messages.tasks import Task

__all__ = [
    "CARRIED",
    "RunSpan",
    "TraceContext",
    "Tracing",
    "check_trace",
    "installed",
    "outgoing",
    "run_span",
]

#: ``(traceparent, tracestate)``: the W3C trace context headers.
TraceContext = tuple[str, str | None]

#: Version 00 of the W3C ``traceparent``: version, trace id, parent id, flags (lower hex).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: The W3C limit on ``tracestate`` (32 members of at most 256 characters, in practice 512).
_TRACESTATE_MAX = 512

#: The trace context a socket call carried, while the owner's server runs that call.
CARRIED: ContextVar[TraceContext | None] = ContextVar("hive_trace_carried", default=None)


class RunSpan(Protocol):
    def ended(self, outcome: str, error: BaseException | None = None) -> None:
        """How the run ended (``completed``, ``failed``, ``timed_out``, ``lost``,
        ``released``), and the handler's exception if it raised."""


class Tracing(Protocol):
    def capture(self) -> TraceContext | None:
        """The trace context current in the caller (None: no span is recording)."""

    def run(self, task: Task, worker_id: str, run_id: str) -> AbstractContextManager[RunSpan]:
        """The span of one run of ``task``, current for the block."""


_installed: Tracing | None = None


def install(tracing: Tracing | None) -> None:
    """Turn tracing on with ``tracing``, or off with ``None`` (process-wide)."""
    global _installed
    _installed = tracing


def installed() -> Tracing | None:
    return _installed


def outgoing() -> TraceContext | None:
    """The trace context a task created now records: the one its socket call carried,
    else the caller's current one when tracing is on."""
    carried = CARRIED.get()
    if carried is not None:
        return carried
    tracing = _installed
    return None if tracing is None else tracing.capture()


class _NoSpan:
    def ended(self, outcome: str, error: BaseException | None = None) -> None:
        pass


_NO_SPAN = _NoSpan()


@contextmanager
def _untraced() -> Iterator[RunSpan]:
    yield _NO_SPAN


def run_span(task: Task, worker_id: str, run_id: str) -> AbstractContextManager[RunSpan]:
    """The run's span when tracing is on; else a block that does nothing."""
    tracing = _installed
    if tracing is None:
        return _untraced()
    return tracing.run(task, worker_id, run_id)


def check_trace(traceparent: object, tracestate: object) -> TraceContext | None:
    """A trace context from outside (a socket frame), or :class:`InvalidInputError`."""
    if traceparent is None:
        if tracestate is not None:
            raise InvalidInputError("tracestate", "is given without a traceparent")
        return None
    if not isinstance(traceparent, str) or not _TRACEPARENT.fullmatch(traceparent):
        raise InvalidInputError(
            "traceparent",
            "must be a W3C traceparent, '00-<32 hex trace id>-<16 hex span id>-<2 hex flags>'",
        )
    if tracestate is not None and (
        not isinstance(tracestate, str)
        or len(tracestate) > _TRACESTATE_MAX
        or not tracestate.isprintable()
    ):
        raise InvalidInputError(
            "tracestate", f"must be printable text of at most {_TRACESTATE_MAX} characters"
        )
    return traceparent, tracestate
