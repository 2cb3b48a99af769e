"""hive-orchestration: an embedded, durable, actor-based orchestration runtime on SQLite.

    async with Runtime.open("hive.db") as runtime:
        event = await runtime.publish("deploy.requested", {"env": "production"})

The names below are the public surface; everything else is an implementation detail.
"""

from .agents import (
    AgentCapability,
    AgentHealth,
    AgentRegistry,
    AgentRunner,
    TaskContext,
    auto_register_adapters,
)
from .config import DEFAULT_DB_PATH, FeatureFlags, RuntimeConfig
from .embedded import MailboxStats, Runtime, RuntimeStatistics, Subscription
from .errors import (
    ActorFailedError,
    ConfigError,
    HiveError,
    IllegalTransitionError,
    InvalidInputError,
    LeaseLostError,
    NewerSchemaError,
    NotFoundError,
    RequestTimeoutError,
    RuntimeFailedError,
    RuntimeStoppedError,
    StorageError,
    SubscriberLaggedError,
)
from .messages.events import Event
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
from .messages.tasks import Claim, Lease, Run, RunStatus, Task, TaskStatus
from .messages.workers import Worker, WorkerStatus
from .storage.schema import SCHEMA_VERSION

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DB_PATH",
    "SCHEMA_VERSION",
    "ActorFailedError",
    "AgentCapability",
    "AgentHealth",
    "AgentRegistry",
    "AgentRunner",
    "Claim",
    "ConfigError",
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
    "RequestTimeoutError",
    "Run",
    "RunStatus",
    "Runtime",
    "RuntimeConfig",
    "RuntimeFailedError",
    "RuntimeStatistics",
    "RuntimeStoppedError",
    "StorageError",
    "Subscription",
    "SubscriberLaggedError",
    "Task",
    "TaskContext",
    "TaskStatus",
    "Worker",
    "WorkerStatus",
    "__version__",
    "auto_register_adapters",
]
