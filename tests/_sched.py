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

On PostgreSQL a batch's commit is the server's work, done by the backend process that
serves the runtime's write connection: when that backend waits for a CPU, the commit waits
with it, while the runtime's own process sleeps on its socket (not run-queue time). A test
adds that backend (:meth:`RunQueueWait.watch`, :func:`pg_writer_pids`): its wait is load,
as the process's own is (measured at load ~10: requeues 0.38 s and 1.07 s late, over spans
in which the process waited 0.13 s and 0.19 s for a CPU and the writer's backend 0.43 s and
1.05 s). Only a backend on this machine can be read, and only its wait is added: the
server's other sessions (the leader's, a reader's) are not on the commit's path.

Where ``schedstat`` cannot be read (not Linux, or a kernel without it), the wait reads as
0: the allowance is the fixed one alone.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import anyio

_TASKS = "/proc/self/task"
#: How often the sampler reads the counters. Sampling brackets an interval from outside,
#: so the wait it reports for an interval may include up to this much time (and whatever
#: waiting delayed the sample) on each side of it: more allowance, never less.
EVERY = 0.005


def _thread_waits(others: Collection[int] = ()) -> dict[str, int] | None:
    """Each thread's run-queue wait so far, in ns, of this process and of the processes
    ``others`` (None where schedstat is not readable)."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    found: dict[str, int] = {}
    places = [(_TASKS, tid) for tid in tids]
    for pid in others:
        try:
            places += [(f"/proc/{pid}/task", tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # it ended
    for folder, tid in places:
        try:
            with open(f"{folder}/{tid}/schedstat", "rb") as stats:
                found[f"{folder}/{tid}"] = int(stats.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return found


def pg_writer_pids(url: str) -> list[int]:
    """The pids of the backends serving the write connections of the runtimes open on the
    database ``url`` (application_name ``hive-orchestration:writer``, storage/pg/store.py),
    when they are processes of this machine (a server elsewhere: none)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'hive-orchestration:writer'"
        ).fetchall()
    return [int(pid) for (pid,) in rows if _is_postgres_process(int(pid))]


def _is_postgres_process(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL process here (a pid the server reports from another
    machine may name some other process of this one)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read().strip() == b"postgres"
    except OSError:
        return False


@dataclass
class RunQueueWait:
    """Samples of (``clock()``, seconds this process's threads, and those of the processes
    it was told to :meth:`watch`, waited for a CPU since sampling began), taken every
    :data:`EVERY` seconds while :meth:`run` runs. The clock is the event loop's by default,
    the one the timing tests read."""

    clock: Callable[[], float] = anyio.current_time
    times: list[float] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)
    _last: dict[str, int] = field(default_factory=dict)
    _total: int = 0
    _others: list[int] = field(default_factory=list)

    def watch(self, pids: Collection[int]) -> None:
        """Add the run-queue waits of the processes ``pids`` from the next sample on (the
        PostgreSQL backend whose work the runtime's commits wait for: the module's
        docstring). Counted from now: what they waited before is not this span's."""
        new = [pid for pid in pids if pid not in self._others]
        self._others += new
        for key, ns in (_thread_waits(new) or {}).items():
            if not key.startswith(_TASKS):
                self._last.setdefault(key, ns)

    def sample(self) -> None:
        now = _thread_waits(self._others)
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
