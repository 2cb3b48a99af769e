"""Deadlines: a min-heap with at most one entry per key, that can move or drop an entry.

An actor that keeps many deadlines (one per claim, one per parked request) needs the
earliest at any time, and must be able to move or forget one when it changes (a lease
renewed, a claim over). A plain heap cannot remove from the middle, so forgotten entries
pile up until they come up: a claim with a long lease that ended at once would stay
there for the whole lease. Here each key has one entry, found through an index, so the
heap holds exactly the live deadlines. Every operation is O(log n), ``first`` is O(1).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Keys, each with a time; earliest first (ties: first set, first out)."""

    __slots__ = ("_heap", "_index", "_order")

    def __init__(self) -> None:
        # Entries (time, order, key); order breaks ties, so keys need not be comparable:
        # no two entries have the same order, so comparing two entries as tuples decides
        # by (time, order) and never reaches their keys (and builds no tuple to compare).
        self._heap: list[tuple[float, int, K]] = []
        self._index: dict[K, int] = {}  # key -> its entry's position in the heap
        self._order = 0

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def get(self, key: K) -> float | None:
        """``key``'s time, or ``None`` when it has none."""
        position = self._index.get(key)
        return None if position is None else self._heap[position][0]

    def first(self) -> tuple[float, K] | None:
        """The earliest time and its key, or ``None`` when empty."""
        if not self._heap:
            return None
        at, _, key = self._heap[0]
        return at, key

    def set(self, key: K, at: float) -> None:
        """Give ``key`` the time ``at`` (added, or moved if it had one)."""
        self._order += 1
        entry = (at, self._order, key)
        position = self._index.get(key)
        if position is None:
            self._heap.append(entry)
            self._index[key] = len(self._heap) - 1
            self._up(len(self._heap) - 1)
            return
        earlier = at < self._heap[position][0]
        self._heap[position] = entry
        if earlier:
            self._up(position)
        else:
            self._down(position)

    def discard(self, key: K) -> None:
        """Forget ``key``'s time, if it has one."""
        position = self._index.pop(key, None)
        if position is None:
            return
        last = self._heap.pop()
        if position == len(self._heap):
            return  # it was the last entry
        self._heap[position] = last
        self._index[last[2]] = position
        self._down(self._up(position))

    def pop_due(self, now: float) -> K | None:
        """Remove and return the earliest key whose time is at or before ``now``."""
        if not self._heap or self._heap[0][0] > now:
            return None
        key = self._heap[0][2]
        self.discard(key)
        return key

    def clear(self) -> None:
        self._heap.clear()
        self._index.clear()

    # -- sifting ---------------------------------------------------------------------------

    def _up(self, position: int) -> int:
        heap, index = self._heap, self._index
        entry = heap[position]
        while position > 0:
            parent = (position - 1) >> 1
            above = heap[parent]
            if above < entry:  # by (time, order): orders differ, so keys are never compared
                break
            heap[position] = above
            index[above[2]] = position
            position = parent
        heap[position] = entry
        index[entry[2]] = position
        return position

    def _down(self, position: int) -> int:
        heap, index = self._heap, self._index
        size = len(heap)
        entry = heap[position]
        while True:
            child = 2 * position + 1
            if child >= size:
                break
            right = child + 1
            below = heap[child]
            if right < size and heap[right] < below:
                child = right
                below = heap[right]
            if entry < below:
                break
            heap[position] = below
            index[below[2]] = position
            position = child
        heap[position] = entry
        index[entry[2]] = position
        return position
