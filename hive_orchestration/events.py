"""The event vocabulary agents use: the seeds' typed events and the unified event model.

Two kinds of events go through the runtime:

- **Lifecycle events** (``task.*``, ``run.*``, ``worker.*``, ``plan.*``, ``planning.*``,
  ``actor.*``) are the runtime's own: it logs one when the change it describes is committed,
  and only then. An app cannot publish one by hand, since a log saying ``task.completed`` for
  a task that is still running would mislead every subscriber (and the plan executor).
  Handing :meth:`OrchestrationClient.publish_task_event` a lifecycle event such as
  :class:`TaskCompletedEvent` makes the change happen instead, through the state machine,
  and the runtime logs the event.
- **App events** (``review.completed``, ``deployment.started``, anything outside those
  namespaces) are published as they are: appended to the durable log, then fanned out.

:class:`UnifiedEventType` has one member per event type the runtime publishes, plus the
agents' common app events; :class:`TopicRegistry` routes events to handlers by glob.
"""

from __future__ import annotations

import enum
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, ClassVar, TypeAlias

import msgspec

from ._validate import _show
from .errors import InvalidInputError
from .messages.events import Event, compile_pattern

__all__ = [
    "RUNTIME_EVENT_TYPES",
    "RUNTIME_NAMESPACES",
    "EventHandler",
    "EventsTrimmed",
    "OrchestrationEvent",
    "ScheduleFiredEvent",
    "TaskCancelledEvent",
    "TaskCompletedEvent",
    "TaskCreatedEvent",
    "TaskFailedEvent",
    "TaskRetriedEvent",
    "TaskStartedEvent",
    "TasksPurged",
    "TopicRegistry",
    "UnifiedEvent",
    "UnifiedEventType",
    "WorkerHeartbeatEvent",
    "WorkerOfflineEvent",
    "WorkerRegisteredEvent",
    "create_task_event",
    "is_runtime_event",
]


class UnifiedEventType(enum.StrEnum):
    """Every event type the runtime publishes, and the agents' common app events.

    A member is its string (``UnifiedEventType.TASK_CREATED == "task.created"``), so it can
    be passed wherever an event type or a subscription pattern is expected.
    """

    # Tasks (the TaskManager).
    TASK_CREATED = "task.created"
    TASK_ASSIGNED = "task.assigned"
    TASK_STARTED = "task.started"
    TASK_PROGRESS = "task.progress"
    TASK_RETRYING = "task.retrying"
    TASK_COMPLETED = "task.completed"
    TASK_FAILED = "task.failed"
    TASK_TIMED_OUT = "task.timed_out"
    TASK_CANCELLED = "task.cancelled"
    TASK_DELETED = "task.deleted"
    # Control by hand (docs/CONTROL.md): who did it is in data.by.
    TASK_RETRIED = "task.retried"
    TASK_TYPE_REVOKED = "task.type_revoked"
    TASK_TYPE_RESTORED = "task.type_restored"
    TASK_QUEUE_FLUSHED = "task.queue_flushed"
    # Workers (the WorkerRegistry).
    WORKER_REGISTERED = "worker.registered"
    WORKER_HEARTBEAT = "worker.heartbeat"
    WORKER_STATUS_CHANGED = "worker.status_changed"
    WORKER_OFFLINE = "worker.offline"
    WORKER_UNREGISTERED = "worker.unregistered"
    # Plans and the planning queue (the PlanExecutor).
    PLAN_CREATED = "plan.created"
    PLAN_APPROVED = "plan.approved"
    PLAN_STARTED = "plan.started"
    PLAN_SUBTASK_READY = "plan.subtask_ready"
    PLAN_COMPLETED = "plan.completed"
    PLAN_FAILED = "plan.failed"
    PLAN_CANCELLED = "plan.cancelled"
    # Several nodes: a call about a plan forwarded to the node that drives it, its answer.
    PLAN_CALL = "plan.call"
    PLAN_CALL_ANSWERED = "plan.call_answered"
    PLANNING_REQUESTED = "planning.requested"
    PLANNING_ASSIGNED = "planning.assigned"
    PLANNING_PLANNED = "planning.planned"
    PLANNING_FAILED = "planning.failed"
    PLANNING_CANCELLED = "planning.cancelled"
    PLANNING_RELEASED = "planning.released"
    # The supervisor.
    ACTOR_RESTARTED = "actor.restarted"
    # Retention (docs/RETENTION.md): a purge's chunk, a trim's chunk.
    RETENTION_PURGED = "retention.purged"
    RETENTION_TRIMMED = "retention.trimmed"
    # Periodic schedules (docs/SCHEDULES.md).
    SCHEDULE_CREATED = "schedule.created"
    SCHEDULE_UPDATED = "schedule.updated"
    SCHEDULE_PAUSED = "schedule.paused"
    SCHEDULE_RESUMED = "schedule.resumed"
    SCHEDULE_DELETED = "schedule.deleted"
    SCHEDULE_FIRED = "schedule.fired"
    SCHEDULE_SKIPPED = "schedule.skipped"
    # App events: published by agents, never by the runtime.
    REVIEW_REQUESTED = "review.requested"
    REVIEW_COMPLETED = "review.completed"
    REVIEW_FAILED = "review.failed"
    DEPLOYMENT_STARTED = "deployment.started"
    DEPLOYMENT_COMPLETED = "deployment.completed"
    DEPLOYMENT_FAILED = "deployment.failed"
    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_COMPLETED = "workflow.completed"
    WORKFLOW_FAILED = "workflow.failed"
    AGENT_STARTED = "agent.started"
    AGENT_STOPPED = "agent.stopped"
    AGENT_ERROR = "agent.error"


#: The namespaces the runtime publishes in; nobody else may.
RUNTIME_NAMESPACES = (
    "task", "run", "worker", "plan", "planning", "actor", "retention", "schedule",
)  # fmt: skip
#: The event types the runtime publishes.
RUNTIME_EVENT_TYPES = frozenset(
    member.value for member in UnifiedEventType if member.value.split(".")[0] in RUNTIME_NAMESPACES
)


def is_runtime_event(event_type: str) -> bool:
    """Whether ``event_type`` is in one of the runtime's own namespaces, or in a name that
    reads as one (see :func:`reserved_namespace`): ``publish`` refuses those."""
    return reserved_namespace(event_type) is not None


def reserved_namespace(event_type: str) -> str | None:
    """The runtime namespace ``event_type`` is in or reads as, or ``None``.

    The namespace (the text before the first ``.``) is compared as a reader sees it: in
    Unicode compatibility form (fullwidth letters, U+FF54 for ``t``, are plain ones),
    case-folded (``Task``, ``TASK``), without accents, invisible format characters (a
    zero-width space, a soft hyphen) or white space around it, and singular (``tasks``:
    an event named ``tasks.completed`` would pass for the runtime's ``task.completed``
    with every reader, human or agent, and with a consumer matching by prefix). Letters
    of other scripts that merely look alike (a Cyrillic U+0430 for the ``a`` of ``task``)
    are not compared: that needs Unicode's confusables data, which the standard library
    does not have.
    """
    namespace = event_type.split(".", 1)[0]
    if namespace in RUNTIME_NAMESPACES:
        return namespace
    if namespace.isascii():
        folded = namespace.lower()
    else:
        decomposed = unicodedata.normalize("NFKD", namespace)
        folded = "".join(
            char for char in decomposed if unicodedata.category(char) not in _INVISIBLE
        )
        folded = unicodedata.normalize("NFKC", folded.casefold())
    folded = folded.strip()
    for candidate in (folded, folded.removesuffix("s")):
        if candidate in RUNTIME_NAMESPACES:
            return candidate
    return None


def check_pattern(pattern: str, field: str = "pattern") -> str:
    """Refuse a subscription pattern whose namespace reads as one of the runtime's without
    being it (``Task.*``, ``tasks.completed``): no such event can be published, so it
    could never match; the error names the pattern meant (``task.*``). A namespace with a
    glob in it (``task*``) is left as it is."""
    namespace = pattern.split(".", 1)[0]
    if any(char in namespace for char in "*?["):
        return pattern
    reserved = reserved_namespace(pattern)
    if reserved is not None and namespace != reserved:
        meant = reserved + pattern[len(namespace) :]
        raise InvalidInputError(
            field,
            f"{_show(pattern)} can match no event: its namespace reads as the runtime's "
            f"{reserved!r}, and events named so are refused (see publish). Subscribe to "
            f"{_show(meant)} for the runtime's own events",
        )
    return pattern


# Combining marks (accents) and format characters (zero-width spaces and joiners, soft
# hyphens, direction marks): a reader does not see them as letters of a name.
_INVISIBLE = frozenset({"Mn", "Me", "Cf"})


class UnifiedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as an agent builds it to publish (the follow-up seed's model).

    ``payload`` becomes the logged event's ``data``; ``task_id`` (or ``payload["task_id"]``)
    and ``correlation_id`` become its fields. Publishing it returns the logged :class:`Event`,
    whose ``event_type``, ``payload``, ``source_agent`` and ``correlation_id`` read the same.
    """

    event_type: str
    payload: dict[str, Any] = {}
    correlation_id: str | None = None
    source_agent: str | None = None
    task_id: str | None = None
    plan_id: str | None = None
    worker_id: str | None = None
    timestamp: float = msgspec.field(default_factory=time.time)

    @property
    def subject(self) -> str | None:
        """The task this event is about: ``task_id``, else ``payload["task_id"]``."""
        if self.task_id is not None:
            return self.task_id
        value = self.payload.get("task_id")
        return value if isinstance(value, str) else None


def create_task_event(
    event_type: UnifiedEventType | str,
    task_id: str,
    *,
    correlation_id: str | None = None,
    source_agent: str | None = None,
    additional_data: Mapping[str, Any] | None = None,
) -> UnifiedEvent:
    """A :class:`UnifiedEvent` about one task (the follow-up seed's helper)."""
    if not isinstance(task_id, str) or not task_id:
        raise InvalidInputError("task_id", "must be a non-empty task id")
    payload: dict[str, Any] = {"task_id": task_id, **(additional_data or {})}
    return UnifiedEvent(
        event_type=str(event_type),
        payload=payload,
        correlation_id=correlation_id,
        source_agent=source_agent,
        task_id=task_id,
    )


class OrchestrationEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The base of the seeds' typed events; ``event_type`` is fixed per class."""

    event_type: ClassVar[str]


class TaskCreatedEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """``task.created``: logged by ``create_task``; it cannot be published by hand."""

    event_type: ClassVar[str] = "task.created"
    task_id: str
    task_type: str
    payload: dict[str, Any] = {}


class TaskStartedEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it moves the task to ``running`` (and records ``worker_id``)."""

    event_type: ClassVar[str] = "task.started"
    task_id: str
    worker_id: str | None = None


class TaskCompletedEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it completes the task with ``result``."""

    event_type: ClassVar[str] = "task.completed"
    task_id: str
    result: dict[str, Any] = {}


class TaskFailedEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it fails the task with ``error``."""

    event_type: ClassVar[str] = "task.failed"
    task_id: str
    error: str


class TaskCancelledEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it cancels the task."""

    event_type: ClassVar[str] = "task.cancelled"
    task_id: str
    reason: str | None = None


class TaskRetriedEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it sends the failed, timed-out or cancelled task back to the queue with
    a fresh attempt budget (``retry_task``); the runtime logs ``task.retried`` with
    ``data.by`` (who) and ``data.note`` (``reason``)."""

    event_type: ClassVar[str] = "task.retried"
    task_id: str
    reason: str | None = None


class WorkerRegisteredEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it registers the worker."""

    event_type: ClassVar[str] = "worker.registered"
    worker_id: str
    role: str = "worker"
    capabilities: tuple[str, ...] = ()


class WorkerHeartbeatEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it records a heartbeat of the worker (and its new status, if given)."""

    event_type: ClassVar[str] = "worker.heartbeat"
    worker_id: str
    status: str | None = None


class WorkerOfflineEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """Publishing it takes the worker offline: the tasks it held go back to the queue."""

    event_type: ClassVar[str] = "worker.offline"
    worker_id: str


class TasksPurged(msgspec.Struct, frozen=True, kw_only=True):
    """The data of a ``retention.purged`` event: one chunk of a purge deleted ``count``
    finished tasks (with their runs and events) last changed before ``before``; the
    event's ``source`` says who purged (the caller's source agent, or ``retention`` for
    the automatic policy), ``reason`` why. ``TasksPurged.of(event)`` reads it."""

    event_type: ClassVar[str] = "retention.purged"
    count: int
    before: str
    statuses: list[str]
    reason: str
    task_type: str | None = None

    @classmethod
    def of(cls, event: Event) -> TasksPurged:
        return msgspec.convert(event.data, cls)


class EventsTrimmed(msgspec.Struct, frozen=True, kw_only=True):
    """The data of a ``retention.trimmed`` event: the event log was trimmed through
    ``through`` (every event up to it is gone; a replay from before it gets
    :class:`~hive_orchestration.errors.EventsTrimmedError`); ``reason`` says which limit
    (``older_than``, ``max_events``, ``max_bytes``, or several) asked for it."""

    event_type: ClassVar[str] = "retention.trimmed"
    through: int
    reason: str

    @classmethod
    def of(cls, event: Event) -> EventsTrimmed:
        return msgspec.convert(event.data, cls)


class ScheduleFiredEvent(OrchestrationEvent, frozen=True, kw_only=True):
    """``schedule.fired``: a schedule's slot created its task (committed together); it
    cannot be published by hand. Read one from the log with :meth:`from_event`."""

    event_type: ClassVar[str] = "schedule.fired"
    schedule: str
    schedule_id: str
    #: The slot fired: the instant the schedule named, not when the task was created.
    slot: datetime
    task_id: str
    task_type: str
    #: Seconds between the slot and its firing.
    late: float = 0.0
    #: Fired more than the schedule's ``grace`` late (catch_up="once").
    catch_up: bool = False
    #: Earlier due slots passed over for this one: they never fire.
    missed: int = 0

    @classmethod
    def from_event(cls, event: Event) -> ScheduleFiredEvent:
        if event.type != cls.event_type:
            raise InvalidInputError("event", f"is a {event.type!r} event, not {cls.event_type!r}")
        return msgspec.convert(event.data, cls)


#: A callback for events: a plain or an async function of one :class:`Event`.
EventHandler: TypeAlias = Callable[[Event], "Awaitable[object] | object"]


class TopicRegistry:
    """Handlers by topic pattern (``"*"``, ``"task.*"``, ``"review.completed"``).

    A plain registry: :meth:`handlers_for` says who wants an event type and :meth:`dispatch`
    calls them. To feed it the runtime's events, pass it to
    :meth:`OrchestrationClient.attach`, which calls it for every event, in log order.
    """

    def __init__(self) -> None:
        self._routes: list[tuple[str, Callable[[str], bool], EventHandler]] = []

    def register(self, pattern: str, handler: EventHandler) -> None:
        """Call ``handler`` for every event whose type matches ``pattern``."""
        if not isinstance(pattern, str) or not pattern:
            raise InvalidInputError("pattern", "must be a non-empty glob such as 'task.*'")
        check_pattern(pattern)
        if not callable(handler):
            raise InvalidInputError("handler", f"must be callable, got {type(handler).__name__}")
        self._routes.append((pattern, compile_pattern(pattern), handler))

    def unregister(self, pattern: str, handler: EventHandler | None = None) -> int:
        """Remove ``handler`` (or every handler) of ``pattern``; returns how many."""
        kept = [
            route
            for route in self._routes
            if not (route[0] == pattern and (handler is None or route[2] == handler))
        ]
        removed = len(self._routes) - len(kept)
        self._routes = kept
        return removed

    @property
    def patterns(self) -> list[str]:
        """The registered patterns, in registration order, without repeats."""
        return list(dict.fromkeys(pattern for pattern, _, _ in self._routes))

    def handlers_for(self, event_type: str) -> list[EventHandler]:
        """The handlers that want ``event_type``, in registration order."""
        return [handler for _, matches, handler in self._routes if matches(event_type)]

    async def dispatch(self, event: Event) -> int:
        """Call every handler that wants ``event`` (awaiting the async ones), in order;
        returns how many were called. A handler's exception propagates."""
        handlers = self.handlers_for(event.type)
        for handler in handlers:
            outcome = handler(event)
            if isinstance(outcome, Awaitable):
                await outcome
        return len(handlers)

    def __len__(self) -> int:
        return len(self._routes)
