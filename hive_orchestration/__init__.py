"""hive-orchestration: an embedded, durable, actor-based orchestration runtime on SQLite.

    async with OrchestrationClient(db_path="hive.db", source_agent="ai-planner") as client:
        task_id = await client.create_task("deployment", {"env": "production"})

    async with Runtime.open("hive.db") as runtime:          # an app embedding the runtime
        deployer = runtime.client(source_agent="ai-deployer")

The names below are the public surface; everything else is an implementation detail.
"""

import logging as _logging

from .agents import (
    AgentCapability,
    AgentHealth,
    AgentRegistry,
    AgentRunner,
    TaskContext,
    auto_register_adapters,
)
from .api.client import CallbackSubscription, EventStream, OrchestrationClient
from .api.embedded import MailboxStats, Runtime, RuntimeStatistics, Subscription
from .api.sync import SyncOrchestrationClient
from .api.wire import call_json
from .config import DEFAULT_DB_PATH, FeatureFlags, RateLimit, RetentionPolicy, RuntimeConfig
from .errors import (
    AccessDeniedError,
    ActorFailedError,
    ConfigError,
    ConnectionLostError,
    EventsTrimmedError,
    HiveError,
    IllegalTransitionError,
    InvalidInputError,
    LeaseLostError,
    NewerSchemaError,
    NotFoundError,
    OutcomeUnknownError,
    RequestTimeoutError,
    RuntimeFailedError,
    RuntimeStoppedError,
    StorageError,
    SubscriberLaggedError,
    WrongEventLoopError,
)
from .events import (
    OrchestrationEvent,
    ScheduleFiredEvent,
    TaskCancelledEvent,
    TaskCompletedEvent,
    TaskCreatedEvent,
    TaskFailedEvent,
    TaskRetriedEvent,
    TaskStartedEvent,
    TopicRegistry,
    UnifiedEvent,
    UnifiedEventType,
    WorkerHeartbeatEvent,
    WorkerOfflineEvent,
    WorkerRegisteredEvent,
    create_task_event,
)
from .interfaces import EventProtocol, TaskOperations, WorkerOperations
from .messages.events import Event
from .messages.plan_data import DependencyResult, DependencyResults
from .messages.plans import (
    ExecutionPlan,
    FailurePolicy,
    PlanningRequest,
    PlanningStatus,
    PlanProgress,
    PlanStatus,
    Subtask,
    SubtaskState,
    SubtaskStatus,
)
from .messages.schedules import CatchUp, Schedule
from .messages.tasks import (
    Claim,
    Lease,
    Refusal,
    RevokedTaskType,
    Run,
    RunStatus,
    Task,
    TaskOutcome,
    TaskStatus,
)
from .messages.workers import Worker, WorkerStatus
from .remote.status import ConnectionStatus, ServerStatus
from .storage import SCHEMA_VERSION

__version__ = "0.2.0"

# A library logs but leaves output to the app: without this, Python's last-resort handler
# would print the runtime's warnings (a worker declared offline...) on the app's stderr.
_logging.getLogger("hive_orchestration").addHandler(_logging.NullHandler())

__all__ = [
    "DEFAULT_DB_PATH",
    "SCHEMA_VERSION",
    "AccessDeniedError",
    "ActorFailedError",
    "AgentCapability",
    "AgentHealth",
    "AgentRegistry",
    "AgentRunner",
    "Claim",
    "DependencyResult",
    "DependencyResults",
    "ConfigError",
    "ConnectionLostError",
    "ConnectionStatus",
    "Event",
    "SubtaskStatus",
    "SubtaskState",
    "Subtask",
    "PlanStatus",
    "PlanProgress",
    "PlanningStatus",
    "PlanningRequest",
    "FailurePolicy",
    "ExecutionPlan",
    "FeatureFlags",
    "HiveError",
    "IllegalTransitionError",
    "InvalidInputError",
    "Lease",
    "LeaseLostError",
    "MailboxStats",
    "NewerSchemaError",
    "NotFoundError",
    "OutcomeUnknownError",
    "RateLimit",
    "Refusal",
    "RequestTimeoutError",
    "Run",
    "RunStatus",
    "Runtime",
    "RuntimeConfig",
    "RetentionPolicy",
    "ServerStatus",
    "RuntimeFailedError",
    "RuntimeStatistics",
    "RuntimeStoppedError",
    "StorageError",
    "Subscription",
    "SubscriberLaggedError",
    "EventsTrimmedError",
    "Task",
    "TaskOutcome",
    "TaskContext",
    "TaskStatus",
    "Worker",
    "WorkerStatus",
    "WrongEventLoopError",
    "__version__",
    "auto_register_adapters",
    "CallbackSubscription",
    "EventProtocol",
    "EventStream",
    "OrchestrationClient",
    "OrchestrationEvent",
    "SyncOrchestrationClient",
    "TaskCancelledEvent",
    "TaskCompletedEvent",
    "TaskCreatedEvent",
    "TaskFailedEvent",
    "TaskRetriedEvent",
    "RevokedTaskType",
    "TaskOperations",
    "TaskStartedEvent",
    "TopicRegistry",
    "UnifiedEvent",
    "UnifiedEventType",
    "WorkerHeartbeatEvent",
    "WorkerOfflineEvent",
    "WorkerOperations",
    "WorkerRegisteredEvent",
    "call_json",
    "create_task_event",
    # periodic schedules (docs/SCHEDULES.md)
    "CatchUp",
    "Schedule",
    "ScheduleFiredEvent",
]
