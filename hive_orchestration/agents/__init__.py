"""Agents: handlers the runtime runs as workers (see :mod:`.runner`), the registry of
them (:mod:`.registry`) and the example agents (:mod:`.adapters`)."""

from .adapters import auto_register_adapters
from .registry import AgentCapability, AgentHealth, AgentRegistry, AgentSpec, Handler
from .runner import AgentRunner, TaskContext

__all__ = [
    "AgentCapability",
    "AgentHealth",
    "AgentRegistry",
    "AgentRunner",
    "AgentSpec",
    "Handler",
    "TaskContext",
    "auto_register_adapters",
]
