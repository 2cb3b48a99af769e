"""Moved to :mod:`hive_orchestration.api.client`; kept so that ``from
hive_orchestration.client import ...`` (the path the docs and the seeds' users know) still
works. Import from ``hive_orchestration``."""

from .api.client import CallbackSubscription, EventStream, OrchestrationClient

__all__ = ["CallbackSubscription", "EventStream", "OrchestrationClient"]
