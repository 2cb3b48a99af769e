"""The agent registry (the follow-up seed's ``AgentRegistry``): which agents this app runs.

An *agent* is a handler (an async function of a :class:`TaskContext`, returning a result
mapping or ``None``) with a type, the capabilities it declares and a number of copies.
The registry is plain in-process bookkeeping owned by the app; :class:`AgentRunner` runs
what it holds against a runtime, each copy as a registered worker.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import msgspec

from .._validate import (
    MAX_NAMES,
    check_identifier,
    check_int,
    check_lease,
    check_names,
    check_optional_text,
)
from ..errors import InvalidInputError
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .runner import TaskContext

__all__ = ["AgentCapability", "AgentHealth", "AgentRegistry", "AgentSpec", "Handler"]

Handler: TypeAlias = "Callable[[TaskContext], Awaitable[Mapping[str, object] | None]]"


class AgentCapability(msgspec.Struct, frozen=True):
    """Something an agent can do: a name, and the task types it takes for it (by default
    a task type of the same name)."""

    name: str
    task_types: tuple[str, ...] = ()
    description: str = ""

    @property
    def handles(self) -> tuple[str, ...]:
        return self.task_types or (self.name,)


class AgentHealth(enum.StrEnum):
    """How an agent is doing, as its app reports it (counted by ``get_stats``)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A registered agent. ``copies`` workers run it, named ``<worker_prefix>-<n>``
    (the prefix is the agent type unless one was given)."""

    agent_type: str
    handler: Handler
    capabilities: tuple[AgentCapability, ...]
    copies: int
    description: str
    lease: float | None
    health: AgentHealth = AgentHealth.HEALTHY
    worker_prefix: str | None = None
    #: Which of its handler's exceptions are retried; None: the runner's policy.
    retry_policy: RetryPolicy | None = None

    def worker_id(self, copy: int) -> str:
        """The id of its ``copy``-th worker (from 1)."""
        return f"{self.worker_prefix or self.agent_type}-{copy}"

    @property
    def handles(self) -> tuple[str, ...]:
        """The task types (and capability names) its workers claim."""
        names: dict[str, None] = {}
        for capability in self.capabilities:
            names.update(dict.fromkeys(capability.handles))
        return tuple(names) or (self.agent_type,)


class AgentRegistry:
    """The agents an app runs, by type."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentSpec] = {}

    def register(
        self,
        agent_type: str,
        handler: Handler,
        *,
        capabilities: Iterable[AgentCapability | str] = (),
        copies: int = 1,
        description: str = "",
        lease: float | None = None,
        worker_prefix: str | None = None,
        retry_on: Iterable[type[BaseException]] | None = None,
        fail_on: Iterable[type[BaseException]] | None = None,
    ) -> AgentSpec:
        """Add (or replace) the agent ``agent_type``. A capability given as a string is
        ``AgentCapability(name)``; with none, the agent takes tasks of its own type.

        Its workers are ``<worker_prefix>-1`` to ``-<copies>``, ``worker_prefix`` being the
        agent type unless given: give each process that runs the same agent a prefix of
        its own, since a worker that registers under an id already in use is taken for
        that worker restarted, and what the other held goes back to the queue.

        ``retry_on`` / ``fail_on`` give the agent a retry policy of its own
        (:mod:`.retry`), which replaces the runner's whole: with either given, the other
        is this agent's too (``retry_on`` None: every exception not in ``fail_on`` is
        retried)."""
        agent_type = check_identifier(agent_type, "agent_type")
        prefix = check_optional_text(worker_prefix, "worker_prefix", max_length=200)
        if not callable(handler):
            raise InvalidInputError("handler", "must be an async function of a TaskContext")
        declared: list[AgentCapability] = []
        for i, capability in enumerate(capabilities):
            if i == MAX_NAMES:
                raise InvalidInputError("capabilities", f"holds more than {MAX_NAMES} names")
            if isinstance(capability, str):
                capability = AgentCapability(check_identifier(capability, f"capabilities[{i}]"))
            elif isinstance(capability, AgentCapability):
                # Built by hand, it is not checked by msgspec: its names go to the
                # runtime as the worker's capabilities, so check them here.
                check_identifier(capability.name, f"capabilities[{i}].name")
                check_names(capability.task_types, f"capabilities[{i}].task_types")
            else:
                raise InvalidInputError(
                    f"capabilities[{i}]", "must be an AgentCapability or a capability name"
                )
            declared.append(capability)
        handles = {name for capability in declared for name in capability.handles}
        if len(handles) > MAX_NAMES:
            # Its workers register and claim with all of them: refused now, not at start.
            raise InvalidInputError(
                "capabilities", f"hand the agent {len(handles)} task types; at most {MAX_NAMES}"
            )
        policy = None
        if retry_on is not None or fail_on is not None:
            policy = RetryPolicy.of(retry_on, () if fail_on is None else fail_on)
        spec = AgentSpec(
            retry_policy=policy,
            agent_type=agent_type,
            handler=handler,
            capabilities=tuple(declared),
            copies=check_int(copies, "copies", minimum=1, maximum=1000),
            description=description,
            lease=None if lease is None else check_lease(lease, "lease"),
            worker_prefix=prefix,
        )
        self._agents[agent_type] = spec
        return spec

    def agent(
        self,
        agent_type: str,
        *,
        capabilities: Iterable[AgentCapability | str] = (),
        copies: int = 1,
        description: str = "",
        retry_on: Iterable[type[BaseException]] | None = None,
        fail_on: Iterable[type[BaseException]] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def decorate(handler: Handler) -> Handler:
            self.register(
                agent_type,
                handler,
                capabilities=capabilities,
                copies=copies,
                description=description,
                retry_on=retry_on,
                fail_on=fail_on,
            )
            return handler

        return decorate

    def unregister(self, agent_type: str) -> bool:
        return self._agents.pop(agent_type, None) is not None

    def get(self, agent_type: str) -> AgentSpec | None:
        return self._agents.get(agent_type)

    def list_agents(self) -> list[AgentSpec]:
        return list(self._agents.values())

    def find(self, task_type: str) -> list[AgentSpec]:
        """The agents whose workers take tasks of ``task_type``."""
        return [spec for spec in self._agents.values() if task_type in spec.handles]

    def set_health(self, agent_type: str, health: AgentHealth | str) -> None:
        spec = self._agents.get(agent_type)
        if spec is None:
            raise InvalidInputError("agent_type", f"no agent {agent_type!r} is registered")
        try:
            status = AgentHealth(health)
        except ValueError:
            valid = ", ".join(h.value for h in AgentHealth)
            raise InvalidInputError("health", f"must be one of {valid}, got {health!r}") from None
        self._agents[agent_type] = dataclasses.replace(spec, health=status)

    def get_stats(self) -> dict[str, int]:
        """Counts for a dashboard: agents, distinct types, distinct capabilities, workers
        (copies) and agents by health."""
        specs = list(self._agents.values())
        capabilities = {c.name for spec in specs for c in spec.capabilities}
        stats = {
            "total_agents": len(specs),
            "agent_types": len({spec.agent_type for spec in specs}),
            "capabilities": len(capabilities),
            "workers": sum(spec.copies for spec in specs),
        }
        for health in AgentHealth:
            stats[health.value] = sum(spec.health is health for spec in specs)
        return stats

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, agent_type: object) -> bool:
        return agent_type in self._agents
