"""Moved to :mod:`hive_orchestration.api.embedded`; kept so that ``from
hive_orchestration.embedded import ...`` still works. Import from ``hive_orchestration``."""

from .api.embedded import MailboxStats, Runtime, RuntimeStatistics, Subscription

__all__ = ["MailboxStats", "Runtime", "RuntimeStatistics", "Subscription"]
