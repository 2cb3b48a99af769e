"""The command line's way to the runtime that owns a database, through its socket.

The read-only commands read the file (see :mod:`hive_orchestration.inspector`); what
only the owner knows comes from it: who is connected (``status``), and new events as it
commits them (``events --follow``, pushed, no polling). Nothing here opens the database:
a file no runtime serves is left to the file readers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.to_thread

from ..client import OrchestrationClient
from ..errors import HiveError
from ..remote.client import RemoteRuntime
from ..storage.database import STARTING, STOPPING, read_owner
from .report import OwnerView

__all__ = ["connected", "owner_view"]

_STATUS_NAME = "hive-orchestration status"
#: How long ``status`` waits for the owner's answer before showing the file alone.
_STATUS_DEADLINE = 5.0


async def _address(path: str) -> str | None:
    """Where the runtime that owns ``path`` serves, as its lock file says (None: no
    runtime serves it now)."""
    _, address = await anyio.to_thread.run_sync(read_owner, path)
    return None if address in (None, STARTING, STOPPING) else address


@asynccontextmanager
async def connected(path: str, name: str) -> AsyncIterator[OrchestrationClient | None]:
    """A client of the runtime that owns ``path``, through its socket, for the block; None
    if no runtime serves it (or it went away, or refused this command, as it came)."""
    address = await _address(path)
    async with AsyncExitStack() as stack:
        remote = None
        if address is not None:
            try:
                remote = await stack.enter_async_context(RemoteRuntime.connect(address, name=name))
            except HiveError:  # a killed owner's stale record, one going away...
                remote = None
        yield (
            None
            if remote is None
            else OrchestrationClient._bound(remote, source_agent=None, correlation_id=None)
        )


async def owner_view(path: str) -> OwnerView | None:
    """Who owns ``path`` and who is connected to it (this command left out), or None if
    no runtime serves it or it did not answer within 5 seconds."""
    with anyio.move_on_after(_STATUS_DEADLINE):
        async with connected(path, _STATUS_NAME) as client:
            if client is None:
                return None
            try:
                status = await client.server_status()
            except HiveError:
                return None
            here = os.getpid()
            return OwnerView(
                pid=status.pid,
                address=status.address,
                clients=[c for c in status.connections if (c.name, c.pid) != (_STATUS_NAME, here)],
            )
    return None
