"""The event loop's monotonic clock as a plain callable.

``anyio.current_time()`` finds the running backend on every call before it reads the
clock: on the task path it was read several times a task (each batch of the TaskManager,
each ask's deadline, each sign of a worker's life), about 2% of the event loop's time.
:func:`loop_clock` finds the backend once and returns the clock itself, which gives the
same readings.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["loop_clock"]


def loop_clock() -> Callable[[], float]:
    """The running event loop's clock: what ``anyio.current_time()`` reads, without its
    look-up of the backend. Call it from the loop whose clock is wanted; the callable it
    returns is valid on that loop only."""
    # The clock anyio's asyncio backend reads (the loop's time()); nothing else of
    # asyncio is used, so the runtime still runs on both loops alike.
    import asyncio  # noqa: TID251

    try:
        return asyncio.get_running_loop().time
    except RuntimeError:  # not on asyncio
        pass
    try:
        import trio

        trio.current_time()  # RuntimeError outside trio's run
    except (ImportError, RuntimeError):
        return anyio.current_time
    return trio.current_time
