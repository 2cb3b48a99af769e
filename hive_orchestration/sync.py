"""Moved to :mod:`hive_orchestration.api.sync`; kept so that ``from hive_orchestration.sync
import ...`` (the path the docs name) still works. Import from ``hive_orchestration``."""

from .api.sync import BlockingEvents, SyncCallbackSubscription, SyncOrchestrationClient

__all__ = ["BlockingEvents", "SyncCallbackSubscription", "SyncOrchestrationClient"]
