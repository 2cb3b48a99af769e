"""OpenTelemetry traces of tasks (extra ``otel``: ``opentelemetry-api``).

Off until :func:`enable` is called in a process; then, in that process:

- a task created there (``create_task``, ``create_tasks``, in-process or through another
  process's runtime) keeps the W3C trace context current at its creation
  (``traceparent``, ``tracestate``), stored with it;
- each run of a task by an :class:`~hive_orchestration.AgentRunner` (the ``worker``
  command runs one) is a span ``hive.run <task_type>`` of kind CONSUMER, from the claim
  to the report, child of (and linked to) the span that created the task, with the
  task's, run's, worker's, correlation's and plan's ids as attributes; the handler runs
  inside it, so its spans and the tasks it creates continue the trace.

The API only: the app sets up the SDK, its exporter and its sampler, as for any
instrumented library (``TracerProvider``, ``BatchSpanProcessor``, ``OTLPSpanExporter``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import _trace

if TYPE_CHECKING:
    from .._trace import RunSpan, TraceContext
    from ..messages.tasks import Task

__all__ = ["disable", "enable", "enabled"]

#: The tracer's (instrumentation scope's) name.
SCOPE = "hive_orchestration"
_PROPAGATOR = TraceContextTextMapPropagator()


def enable(tracer_provider: TracerProvider | None = None) -> None:
    """Trace tasks in this process, with ``tracer_provider`` (default: the global one
    the app set up, looked up at each span, so it may be set after this call)."""
    _trace.install(_OtelTracing(tracer_provider))


def disable() -> None:
    """Stop tracing tasks in this process (tasks keep the context they recorded)."""
    _trace.install(None)


def enabled() -> bool:
    return isinstance(_trace.installed(), _OtelTracing)


class _Run:
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def ended(self, outcome: str, error: BaseException | None = None) -> None:
        span = self._span
        span.set_attribute("hive.run.outcome", outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:1000]))
        elif outcome != "completed":
            span.set_status(Status(StatusCode.ERROR, outcome))


class _OtelTracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider

    def capture(self) -> TraceContext | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        traceparent = carrier.get("traceparent")
        if traceparent is None:
            return None  # no valid span is current: nothing to continue
        return traceparent, carrier.get("tracestate")

    def run(self, task: Task, worker_id: str, run_id: str) -> AbstractContextManager[RunSpan]:
        return self._run(task, worker_id, run_id)

    @contextmanager
    def _run(self, task: Task, worker_id: str, run_id: str) -> Iterator[RunSpan]:
        tracer = trace.get_tracer(SCOPE, tracer_provider=self._provider)
        parent = None
        links: list[Link] = []
        if task.traceparent is not None:
            carrier = {"traceparent": task.traceparent}
            if task.tracestate is not None:
                carrier["tracestate"] = task.tracestate
            parent = _PROPAGATOR.extract(carrier)
            creator = trace.get_current_span(parent).get_span_context()
            if creator.is_valid:
                links.append(Link(creator, {"hive.link": "created the task"}))
            else:
                parent = None
        attributes: dict[str, str | int] = {
            "hive.task.id": task.id,
            "hive.task.type": task.task_type,
            "hive.task.attempt": task.attempts,
            "hive.run.id": run_id,
            "hive.worker.id": worker_id,
        }
        for name, value in (
            ("hive.correlation.id", task.correlation_id),
            ("hive.plan.id", task.plan_id),
            ("hive.subtask.id", task.subtask_id),
        ):
            if value is not None:
                attributes[name] = value
        with tracer.start_as_current_span(
            f"hive.run {task.task_type}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
            # The outcome sets the status (_Run.ended); a cancellation that tears the
            # block down is recorded by the SDK as it leaves.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _Run(span)
