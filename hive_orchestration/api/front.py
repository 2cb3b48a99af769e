"""What the API above the runtime lends it: the socket server it runs (:class:`Serving`)
and the client it hands out, given as its :class:`Front`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from ..remote.status import ServerStatus
    from ..remote.tcp import TcpSettings
    from ..storage.port import StoreClaim
    from .client import OrchestrationClient
    from .embedded import Runtime

__all__ = ["Front", "Serving"]


class Serving(Protocol):
    """The socket server a runtime runs while it is open (``hive_orchestration.remote.
    server``): this user's other processes reach the runtime through it, and, with
    ``listen``, clients over TCP."""

    #: The socket's address while it serves one, else None.
    address: str | None
    #: The TCP endpoints it listens on (``listen``).
    tcp_addresses: list[str]

    async def run(self, *, task_status: TaskStatus[str] = ...) -> None: ...

    async def run_tcp(self, *, task_status: TaskStatus[list[str]] = ...) -> None: ...

    async def stop(self, grace: float) -> None: ...

    def status(self) -> ServerStatus: ...


class Front(NamedTuple):
    """What the API above the runtime lends it: the client :meth:`Runtime.client` hands
    out, and the socket server :meth:`Runtime.open` runs. Both are built on the runtime
    (the client opens one; the server calls the client's operations), so the runtime
    cannot import them: ``hive_orchestration/api/__init__.py`` gives them, once, when the
    package is imported, before any runtime can open."""

    #: ``client(runtime, source_agent, correlation_id)``: a client bound to ``runtime``.
    client: Callable[[Runtime, str | None, str | None], OrchestrationClient]
    #: ``serve(runtime, claim, tcp)``: the server for ``runtime``, not started yet.
    serve: Callable[[Runtime, StoreClaim, TcpSettings | None], Serving]
