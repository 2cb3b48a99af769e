"""``tests/_sched.py``: the scheduling allowance of the timing tests counts the time this
process waited for a CPU, and nothing where Linux does not say."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _sched
import anyio
import pytest
from _sched import RunQueueWait

LINUX = os.path.exists("/proc/self/task") and hasattr(os, "sched_setaffinity")


@pytest.mark.skipif(not LINUX, reason="run-queue wait is read from Linux's /proc")
def test_the_time_spent_waiting_for_a_cpu_is_counted() -> None:
    """This thread and a busy process share one CPU: for a third of a second of busy
    looping here, about half of it is spent waiting for the CPU, and counted."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\nwhile 1: pass"
    rival = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert rival.stdout is not None
        rival.stdout.readline()  # it runs on that CPU
        os.sched_setaffinity(0, {cpu})  # this thread only
        waits = RunQueueWait(clock=time.monotonic)
        waits.sample()
        start = time.monotonic()
        while time.monotonic() - start < 0.3:
            pass
        waits.sample()
        end = time.monotonic()
    finally:
        os.sched_setaffinity(0, saved)
        rival.kill()
        rival.communicate()
    waited = waits.between(start, end)
    assert 0.05 <= waited <= end - start + 0.05, (waited, end - start)
    # Outside the samples, the nearest ones: an interval before the first counts nothing.
    assert waits.between(start - 10, start - 5) == 0.0


@pytest.mark.skipif(not LINUX, reason="run-queue wait is read from Linux's /proc")
def test_a_watched_process_adds_what_it_waited_from_then_on() -> None:
    """Two busy processes share one CPU while this one sleeps: one of them, watched (as a
    PostgreSQL backend is), adds about half of the 0.2 s that follow; the 0.4 s before,
    in which it waited as much, are not counted (they would take the count past the
    interval itself)."""
    cpu = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\nwhile 1: pass"
    rivals = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)]
    rivals.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE))
    try:
        for rival in rivals:
            assert rival.stdout is not None
            rival.stdout.readline()  # it runs on that CPU
        time.sleep(0.4)
        waits = RunQueueWait(clock=time.monotonic)
        waits.sample()
        start = time.monotonic()
        waits.watch([rivals[0].pid])
        time.sleep(0.2)
        waits.sample()
        end = time.monotonic()
    finally:
        for rival in rivals:
            rival.kill()
            rival.communicate()
    waited = waits.between(start, end)
    assert 0.03 <= waited <= end - start + 0.05, (waited, end - start)


@pytest.mark.anyio
async def test_without_schedstat_nothing_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sched, "_TASKS", "/nonexistent/task")
    waits = RunQueueWait()
    with anyio.move_on_after(0.05):
        await waits.run()
    assert waits.times == []
    assert waits.between(0.0, anyio.current_time()) == 0.0
