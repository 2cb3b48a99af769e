"""The command line's way to the runtime that owns a database, through its socket.

The read-only commands ask it (:mod:`.reader`) rather than the file when it serves one:
its answers, who is connected (``status``), and new events as it commits them
(``events --follow``, pushed, no polling). Nothing here opens the database: a file no
runtime serves is left to the file reader.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.to_thread

from ..api.client import OrchestrationClient
from ..errors import HiveError
from ..remote.client import RemoteRuntime
from ..storage import open_store
from ..storage.port import STARTING, STOPPING

__all__ = ["connected", "serving"]


async def serving(path: str) -> str | None:
    """Where the runtime that owns ``path`` serves, as its lock file says (None: no
    runtime serves it now)."""
    _, address = await anyio.to_thread.run_sync(open_store(path).read_owner)
    return None if address in (None, STARTING, STOPPING) else address


@asynccontextmanager
async def connected(path: str, name: str) -> AsyncIterator[OrchestrationClient | None]:
    """A client of the runtime that owns ``path``, through its socket, for the block; None
    if no runtime serves it (or it went away, or refused this command, as it came)."""
    address = await serving(path)
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
