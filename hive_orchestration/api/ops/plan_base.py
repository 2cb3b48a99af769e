"""The base the plan operations and the planning queue's operations share: the actors
they send to, the config, and what they need of the runtime they are mixed into."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal

from ...config import RuntimeConfig
from ...messages.plans import PlanExecutorMessage
from ...messages.storage import StorageMessage
from ...runtime import ActorRef
from .caller import Caller

if TYPE_CHECKING:
    from ..subscription import Subscription

__all__ = ["PlanCalls"]


class PlanCalls(Caller):
    """The base of :class:`PlanOps` and :class:`PlanningOps`, mixed into :class:`Runtime`;
    needs ``_plans``, ``_storage``, ``_config`` and ``subscribe``."""

    _plans: ActorRef[PlanExecutorMessage]
    _storage: ActorRef[StorageMessage]
    _config: RuntimeConfig

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    def subscribe(  # pragma: no cover - provided by Runtime
        self,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        overflow: Literal["error", "drop"] | None = None,
        **filters: str,
    ) -> AbstractAsyncContextManager[Subscription]:
        raise NotImplementedError
