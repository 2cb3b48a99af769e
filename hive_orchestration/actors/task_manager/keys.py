"""Concurrency keys in the ready queue: a key's free slots go to its best ready tasks.

Within a concurrency key, priority holds across routes: a key's free slots go to its best
ready tasks (priority, then age), whatever their type, so a claimer whose types leave out
the key's best task gets none of the key's tasks while it waits; the key waits for a
claimer that can take that task. Each key keeps a heap of its ready tasks for this; a
task that is not among the best ``free`` of its key waits in the key's blocked heap, and
only the ones that come within reach go back, when a slot frees or a better task leaves
the queue without taking one. Tasks in backoff are not ready and hold nothing back.

These functions keep that rule for a :class:`~.ready.ReadyQueue`, on its per-key heaps
(``_by_key``), blocked heaps (``_blocked``) and held slots; separate from the routes and
heads the queue hands tasks out from, which call in here.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from .routes import Entry

if TYPE_CHECKING:
    from .ready import ReadyQueue

__all__ = [
    "best_of_key",
    "forget_entry",
    "key_allows",
    "key_heap",
    "release_key",
    "waits_for_storage",
]


def key_heap(rq: ReadyQueue, key: str) -> list[Entry]:
    """The key's ready entries with a valid one on top; an emptied key is forgotten
    (its blocked entries are then all stale too)."""
    heap = rq._by_key.get(key)
    if heap is None:
        return []
    while heap and not rq._valid(heap[0]):
        heapq.heappop(heap)
    if not heap:
        del rq._by_key[key]
        rq._key_limit.pop(key, None)
        rq._blocked.pop(key, None)
    return heap


def best_of_key(rq: ReadyQueue, key: str, count: int) -> list[Entry]:
    """The ``count`` best ready entries of ``key``, best first: a walk down its heap
    from the top that skips stale entries, O(count log count) when few are stale."""
    heap = key_heap(rq, key)
    if count <= 1 or len(heap) <= 1:
        return heap[:1] if count >= 1 else []
    best: list[Entry] = []
    frontier = [(heap[0], 0)]
    while frontier and len(best) < count:
        entry, index = heapq.heappop(frontier)
        if rq._valid(entry):
            best.append(entry)
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))
    return best


def key_allows(rq: ReadyQueue, entry: Entry) -> bool:
    """Whether ``entry`` may take a slot of its key now: one is free and no better
    ready task of the key is left without one."""
    assert entry.key is not None
    if entry.key in rq._paused_keys:
        return False
    free = entry.limit - rq._held_keys[entry.key]
    if free <= 0:
        return False
    best = best_of_key(rq, entry.key, free)
    return bool(best) and entry <= best[-1]


def waits_for_storage(rq: ReadyQueue, entry: Entry) -> bool:
    """Whether ``entry``, among the best held of its key, must wait because a queue
    of the key may have better tasks in storage: they are wanted, read first."""
    assert entry.key is not None
    later = {q for q in rq._bounded_keys.get(entry.key, ()) if entry.after(rq._bounds[q])}
    if not later:
        return False
    rq.wanted |= later
    if rq._waiting_for is None or entry < rq._waiting_for:
        rq._waiting_for = entry
    return True


def forget_entry(rq: ReadyQueue, key: str) -> None:
    """An entry of ``key`` went stale without taking a slot: drop it if on top (and
    an emptied key); it may have been one of the key's best, so the next ones may
    come within reach."""
    key_heap(rq, key)
    release_key(rq, key)


def release_key(rq: ReadyQueue, key: str) -> None:
    """Send back to their routes the blocked entries of ``key`` that may now take a
    slot: only those within its best ``free``, so a long wait list costs nothing."""
    blocked = rq._blocked.get(key)
    if not blocked:
        return
    free = rq._key_limit.get(key, 1) - rq._held_keys[key]
    best = best_of_key(rq, key, free) if free > 0 else []
    if not best:
        return
    bound = best[-1]
    kept: list[Entry] = []
    while blocked and blocked[0] <= bound:
        entry = heapq.heappop(blocked)
        if not rq._valid(entry):
            continue
        if key_allows(rq, entry):
            # Back in its heap even if it waits for storage: the pops that reach it
            # starve until the read (and the read is wanted from now on).
            waits_for_storage(rq, entry)
            rq._push(entry)
        else:
            kept.append(entry)  # a smaller limit of its own
    for entry in kept:
        heapq.heappush(blocked, entry)
    if not blocked:
        rq._blocked.pop(key, None)
