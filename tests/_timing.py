"""When the runtime acted, read on the test's own clock.

A test of a deadline wants the moment the runtime acted on it (the batch that requeued the
task), apart from what follows on a loaded machine (the commit's fsync, the way to the
test). The runtime stamps that moment on what it writes (``updated_at``, an event's
``timestamp``) with its wall clock; :func:`loop_wall_clock`, given to
``Runtime.open(wall_clock=...)``, makes that wall clock follow the event loop's clock, and
:func:`loop_time` reads a stamp back as an ``anyio.current_time()`` value.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def loop_wall_clock() -> datetime:
    return EPOCH + timedelta(seconds=anyio.current_time())


def loop_time(stamp: datetime | float) -> float:
    """A stamp of :func:`loop_wall_clock` (a datetime, or an event's timestamp) as the
    ``anyio.current_time()`` it was taken at."""
    if isinstance(stamp, datetime):
        return (stamp - EPOCH).total_seconds()
    return stamp - EPOCH.timestamp()
