"""How long this process waited for a CPU: a timing test's scheduling allowance.

A test of a deadline checks that the runtime acted within some allowance of it: waking up,
one batch, one commit. On a loaded machine (CI runs the suite twice side by side on 2
cores, beside other jobs: a load of 10-20) the process can be ready to act and still wait
for a CPU, for longer than any fixed allowance meant for the runtime's own work. That
waiting is not the runtime's doing, and Linux counts it: ``/proc/<pid>/task/<tid>/schedstat``
gives each thread's time on a CPU and its time *runnable but waiting for one* (the run
queue), in nanoseconds. :class:`RunQueueWait` samples the second, summed over the
process's threads, from a task on the event loop, so that a test can add to its allowance
exactly the time the process spent waiting for a CPU over an interval, and nothing more:
on an idle machine the allowance is what it always was, and a runtime that acts late by
its own doing (a timer set late, a batch that waits) is still caught, since waiting on a
timer, a lock or a socket is not run-queue time.

Where ``schedstat`` cannot be read (not Linux, or a kernel without it), the wait reads as
0: the allowance is the fixed one alone.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

_TASKS = "/proc/self/task"
#: How often the sampler reads the counters. Sampling brackets an interval from outside,
#: so the wait it reports for an interval may include up to this much time (and whatever
#: waiting delayed the sample) on each side of it: more allowance, never less.
EVERY = 0.005


def _thread_waits() -> dict[str, int] | None:
    """Each thread's run-queue wait so far, in ns (None where schedstat is not readable)."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    found: dict[str, int] = {}
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/schedstat", "rb") as stats:
                found[tid] = int(stats.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return found


@dataclass
class RunQueueWait:
    """Samples of (``clock()``, seconds this process's threads waited for a CPU since
    sampling began), taken every :data:`EVERY` seconds while :meth:`run` runs. The clock is
    the event loop's by default, the one the timing tests read."""

    clock: Callable[[], float] = anyio.current_time
    times: list[float] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)
    _last: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    def sample(self) -> None:
        now = _thread_waits()
        if now is None:
            return
        # A thread seen before adds what it waited since; a new one all it waited (it was
        # born since the last sample); an ended one's last wait is lost (less allowance).
        for tid, ns in now.items():
            self._total += ns - self._last.get(tid, 0 if self.times else ns)
        self._last = now
        self.times.append(self.clock())
        self.waited.append(self._total / 1e9)

    def between(self, start: float, end: float) -> float:
        """Seconds the process waited for a CPU from ``start`` to ``end`` (clock times),
        read from the last sample at or before ``start`` to the first at or after ``end``
        (the nearest ones inside where the sampling did not reach); 0 without samples."""
        if not self.times:
            return 0.0
        first = max(bisect.bisect_right(self.times, start) - 1, 0)
        last = min(bisect.bisect_left(self.times, end), len(self.times) - 1)
        return max(self.waited[last] - self.waited[first], 0.0)

    async def run(self) -> None:
        """Sample every :data:`EVERY` seconds until cancelled (start it in the task group
        of what it times, so that the samples bracket it)."""
        while True:
            self.sample()
            await anyio.sleep(EVERY)
