"""How much a process's memory grew at its peak over a stretch of a test.

The process's peak resident size (``VmHWM``) reset at the start (writing ``5`` to
``/proc/self/clear_refs``), after the collector ran and the C heap gave back what it holds
free (``malloc_trim``), so that memory a decoder takes shows as growth and is not hidden
in pages freed earlier. It costs nothing while the code under test runs, where
``tracemalloc`` (the fallback, where ``/proc`` cannot be written) traces every allocation:
walking a 2 MiB frame of one-byte values took 8-9 s under it against 0.5 s without
(test_remote_frames.py). Process-wide, so other threads' allocations count too: bounds
meant for it leave room for a few MB besides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE_KB = 1024


@dataclass
class Growth:
    """The peak growth in bytes, known once the ``with`` block has ended."""

    peak: int = 0
    how: str = ""


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * _PAGE_KB
    raise LookupError(field)


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status("VmHWM:")
    except OSError:
        return False
    except LookupError:
        return False
    return True


def _trim() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


@contextmanager
def peak_growth() -> Iterator[Growth]:
    """``with peak_growth() as grown: ...`` then ``grown.peak``: bytes at the peak over
    what the process held when the block began."""
    growth = Growth()
    if _can_reset_peak():
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS:")
        growth.how = "VmHWM"
        try:
            yield growth
        finally:
            growth.peak = _status("VmHWM:") - base
        return
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        growth.how = "tracemalloc"
        yield growth
        growth.peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def resident() -> int:
    """The process's resident size now, in bytes, after the collector ran and the C heap
    gave back what it holds free: what is still held, not what was held at a peak."""
    _trim()
    return _status("VmRSS:")
