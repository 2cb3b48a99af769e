"""Rate limits: at most ``starts`` claims per ``per`` seconds of a task type or of a
concurrency key (``RuntimeConfig.rate_limits`` and ``key_rate_limits``; docs/TIMING.md).

A sliding window: each limited type or key keeps the monotonic times of its last
``starts`` claims (a deque, so memory is bounded by the limits, not by traffic). While
the oldest of those is less than ``per`` seconds old, the window is full: the ready
queue holds the type (or key) back exactly as it holds back one whose concurrency
limit is reached, so a claim gets the best task it may take and a parked claim waits;
the TaskManager's alarm wakes it when the oldest start leaves the window. No one polls.

Durable: the windows are built again on open from the runs the claims opened (their
``started_at``, read through ``idx_runs_started``), so a restart, even after SIGKILL,
does not grant a fresh window. A stored start time becomes a deadline once, when it is
loaded: it leaves the window at most ``per`` seconds after the start, however the wall
clock was stepped meanwhile. A claim of a batch whose commit failed stays counted (the
window is never undone): a failure can only delay starts, never let more through.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from ...messages.tasks import Task

__all__ = ["RateLimits"]


class _Window:
    __slots__ = ("per", "starts", "times")

    def __init__(self, starts: int, per: float) -> None:
        self.starts = starts
        self.per = per
        self.times: deque[float] = deque(maxlen=starts)  # the last claims, oldest first

    def full(self, now: float) -> bool:
        times = self.times
        return len(times) >= self.starts and times[0] + self.per > now

    def frees(self) -> float:
        """When a full window frees a start."""
        return self.times[0] + self.per


class RateLimits:
    """The windows of every limited task type and concurrency key."""

    def __init__(
        self,
        by_type: Mapping[str, tuple[int, float]] | None = None,
        by_key: Mapping[str, tuple[int, float]] | None = None,
    ) -> None:
        self._types = {name: _Window(n, per) for name, (n, per) in (by_type or {}).items()}
        self._keys = {name: _Window(n, per) for name, (n, per) in (by_key or {}).items()}
        # The windows now full (type or key name -> when it frees): what the ready queue
        # holds back, and what the alarm waits for.
        self.full_types: dict[str, float] = {}
        self.full_keys: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._types or self._keys)

    def limited(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The limited task types and concurrency keys."""
        return tuple(self._types), tuple(self._keys)

    def longest(self) -> float:
        """The longest window: starts older than this never count."""
        return max((w.per for w in (*self._types.values(), *self._keys.values())), default=0.0)

    def load(
        self,
        types: Mapping[str, Iterable[float]],
        keys: Mapping[str, Iterable[float]],
        now: float,
    ) -> None:
        """The starts read at open, as monotonic times (oldest first)."""
        for windows, starts, full in (
            (self._types, types, self.full_types),
            (self._keys, keys, self.full_keys),
        ):
            for name, times in starts.items():
                window = windows.get(name)
                if window is None:
                    continue
                window.times.extend(sorted(times))
                if window.full(now):
                    full[name] = window.frees()

    def started(self, task: Task, now: float) -> tuple[bool, bool]:
        """``task`` was claimed at ``now``: whether its type's and its key's windows are
        full now."""
        type_full = key_full = False
        window = self._types.get(task.task_type)
        if window is not None:
            window.times.append(now)
            if window.full(now):
                self.full_types[task.task_type] = window.frees()
                type_full = True
        key = task.concurrency_key
        window = None if key is None else self._keys.get(key)
        if window is not None:
            assert key is not None
            window.times.append(now)
            if window.full(now):
                self.full_keys[key] = window.frees()
                key_full = True
        return type_full, key_full

    def freed(self, now: float) -> tuple[list[str], list[str]]:
        """The types and keys whose window freed a start by ``now`` (no longer full)."""
        types = [name for name, at in self.full_types.items() if at <= now]
        for name in types:
            del self.full_types[name]
        keys = [name for name, at in self.full_keys.items() if at <= now]
        for name in keys:
            del self.full_keys[name]
        return types, keys

    def next_free(self) -> float | None:
        """When the first full window frees a start."""
        times = [*self.full_types.values(), *self.full_keys.values()]
        return min(times) if times else None
