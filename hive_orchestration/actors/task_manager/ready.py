"""Which queued task to hand out next, in O(log n), with routing, limits and backoff.

The TaskManager owns one :class:`ReadyQueue`. Queued tasks sit in heaps, best first
(priority, then age), one per *route*: a task without ``requires`` is routed by its type,
one with ``requires`` by that set of capabilities. A claim that can do a set of things
looks at the heads of the heaps of the types in the set and of the requirement sets
included in it. A task whose retry backoff has not elapsed waits in a heap ordered by time
and joins its route when due. A task whose concurrency group (or whose type, in a mixed
requirement heap) is full leaves its heap to wait aside for its group and comes back when
a task of the group stops holding a slot, so a blocked group never costs a scan.

Within a concurrency key, priority holds across routes (:mod:`.keys`).

Entries are never removed from the middle of a heap: each carries the generation of the
task's entry, and an entry whose task left the queue (claimed, cancelled, deleted) or was
queued again since is skipped when it reaches the top.

Heads of a backlog. The queue may hold only the best tasks of a *queue* (the tasks of one
task type, requirement list and concurrency key: what storage indexes), the rest staying
in storage: such a queue has a *bound*, the claim-order key of the last task held, and
every task of the queue that is not held comes after it. A task queued after its queue's
bound is not taken (:meth:`add` says so: the caller leaves it to storage), and a task is
only handed out if no queue it competes with could have a better one in storage: a
claim whose routes include a queue with nothing held and a bound before the best task
held (*starved*), or a concurrency key whose tasks in storage may come before a task,
waits for that queue's next tasks (:attr:`wanted`; the TaskManager reads them with
:meth:`bounds` and adds them with :meth:`add` and :meth:`extend`). The TaskManager keeps
each head between :meth:`low` and twice its size (:meth:`trim`).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Mapping
from datetime import UTC, datetime

from ...messages.tasks import Task
from .keys import forget_entry, key_allows, key_heap, release_key, waits_for_storage
from .routes import Bound, Entry, QueueId, Route, bound_of, can_take, queue_of, route_of

__all__ = ["Bound", "QueueId", "ReadyQueue", "bound_of", "can_take", "queue_of"]


class ReadyQueue:
    """The queued tasks, as far as handing them out is concerned."""

    def __init__(
        self,
        type_limits: Mapping[str, int] | None = None,
        bounds: Mapping[QueueId, Bound] | None = None,
        revoked: Collection[str] = frozenset(),
    ) -> None:
        self._type_limits = dict(type_limits or {})
        # Task types whose tasks are not handed out (revoke_task_type): the owner's set,
        # read here, so a type is held back as if its concurrency limit were reached.
        self._revoked = revoked
        self._heaps: dict[Route, list[Entry]] = {}
        self._delayed: list[tuple[float, Entry]] = []
        self._blocked: dict[str, list[Entry]] = {}  # concurrency key -> heap of entries
        # concurrency key -> heap of its ready entries (wherever they wait), best first, and
        # the largest limit any of them has had (the most slots the key may free).
        self._by_key: dict[str, list[Entry]] = {}
        self._key_limit: dict[str, int] = {}
        self._key_of: dict[str, str] = {}  # queued task id -> its concurrency key
        self._type_blocked: dict[str, list[Entry]] = {}  # task type -> entries
        self._generation: dict[str, int] = {}  # task id -> its valid entry; absent: not queued
        self._next_generation = 0
        self._held_types: Counter[str] = Counter()
        self._held_keys: Counter[str] = Counter()
        # Task types and concurrency keys whose rate limit is used up for now (limits.py):
        # held back like a type or key whose concurrency limit is reached.
        self._paused_types: set[str] = set()
        self._paused_keys: set[str] = set()
        #: Set when a task may have become claimable; the TaskManager clears it.
        self.changed = False
        # The ready entries held of each queue (task id -> entry), wherever they wait.
        self._members: dict[QueueId, dict[str, Entry]] = {}
        self._member_of: dict[str, QueueId] = {}
        # Queues with tasks in storage: their bounds, and by route and by concurrency key;
        # those of them with no ready entry held, by route (what starves a claim).
        self._bounds: dict[QueueId, Bound] = {}
        self._bounded_keys: dict[str, set[QueueId]] = {}
        self._empty: dict[Route, set[QueueId]] = {}
        #: Queues whose next tasks a claim or a concurrency key is waiting for.
        self.wanted: set[QueueId] = set()
        # Queues that lost a ready task or got a bound since low() last looked: only
        # they can have run low, so a batch's look costs nothing for the other queues.
        self._maybe_low: set[QueueId] = set()
        #: Set by :meth:`pop` when it found nothing because a queue starved it.
        self.starved = False
        # The best entry a concurrency key held back in this pop until storage is read.
        self._waiting_for: Entry | None = None
        for queue, bound in (bounds or {}).items():
            self.set_bound(queue, bound)

    def __len__(self) -> int:
        """Queued tasks (ready, delayed or blocked)."""
        return len(self._generation)

    # -- queued tasks -------------------------------------------------------------------

    def add(self, task: Task, now: float, available: float | None = None) -> bool:
        """``task`` is queued: hand it out when it is the best ready one, not before
        ``available`` (the end of its backoff). ``now``, ``available`` and the times given
        to :meth:`promote` are on the caller's monotonic clock, not ``task.available_at``'s
        wall clock: a wall clock stepped back must not hold a task back for the step.

        Returns ``False``, holding nothing of it, for a task after its queue's bound: its
        turn comes when storage hands it back with the queue's next tasks."""
        queue = queue_of(task)
        bound = self._bounds.get(queue)
        if bound is not None and bound_of(task)[:3] > bound[:3]:
            self.discard(task.id)
            return False
        self._next_generation += 1
        generation = self._next_generation
        self._generation[task.id] = generation
        previous = self._key_of.pop(task.id, None)  # added again while queued
        if task.concurrency_key is not None:
            self._key_of[task.id] = task.concurrency_key
        entry = Entry(
            -task.priority,
            task.created_at.timestamp(),
            task.id,
            generation,
            task.task_type,
            frozenset(task.requires) if task.requires else task.task_type,
            task.concurrency_key,
            task.concurrency_limit or 1,
            queue,
        )
        self._leave(task.id)  # added again while queued: its old entry is stale
        if available is not None and available > now:
            heapq.heappush(self._delayed, (available, entry))
        else:
            self._ready(entry)
        if previous is not None:
            forget_entry(self, previous)  # its old entry is stale now
        return True

    def discard(self, task_id: str) -> None:
        """``task_id`` left the queue (its entries are skipped from now on)."""
        self._generation.pop(task_id, None)
        self._leave(task_id)
        key = self._key_of.pop(task_id, None)
        if key is not None:
            forget_entry(self, key)

    def promote(self, now: float) -> float | None:
        """Move tasks whose backoff is over into their heaps; when the next one is due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, entry = heapq.heappop(delayed)
            if self._valid(entry):
                self._ready(entry)
        return self.next_delayed()

    def next_delayed(self) -> float | None:
        """When the next task in backoff becomes ready, if any."""
        delayed = self._delayed
        while delayed and not self._valid(delayed[0][1]):
            heapq.heappop(delayed)
        return delayed[0][0] if delayed else None

    def pop(self, capabilities: Collection[str] | None) -> str | None:
        """Take the best ready task a claim that can do ``capabilities`` (``None``:
        anything) may take, within the concurrency limits; its id, or ``None``."""
        best: Entry | None = None
        self._waiting_for = None
        for route in self._routes(capabilities):
            entry = self._head(route)
            if entry is not None and (best is None or entry < best):
                best = entry
        starving = self._starving(capabilities, best)
        waiting = self._held_back_for_storage()
        self.starved = bool(starving) or (waiting is not None and (best is None or waiting < best))
        if self.starved:
            self.wanted |= starving
            return None
        if best is None:
            return None
        heap = self._heaps[best.route]
        heapq.heappop(heap)
        if not heap:
            del self._heaps[best.route]
        del self._generation[best.task_id]
        self._leave(best.task_id)
        if best.key is not None:
            del self._key_of[best.task_id]
            key_heap(self, best.key)  # let go of its entry (and of an emptied key)
        return best.task_id

    def _held_back_for_storage(self) -> Entry | None:
        waiting, self._waiting_for = self._waiting_for, None
        return waiting

    def _starving(self, capabilities: Collection[str] | None, best: Entry | None) -> set[QueueId]:
        """The queues, among the routes of a claim that can do ``capabilities``, with no
        ready task held whose tasks in storage may come before ``best`` (its best
        choice among those held, if any) and could be handed out."""
        starving: set[QueueId] = set()
        for route, queues in self._empty.items():
            if capabilities is not None and not (
                route in capabilities
                if isinstance(route, str)
                else all(need in capabilities for need in route)
            ):
                continue
            for queue in queues:
                if self._type_full(queue[0]):
                    continue
                # A full key: nothing of it goes now. (With no ready task of the key held,
                # its limit is unknown here: reading the queue tells.)
                key = queue[2]
                limit = None if key is None else self._key_limit.get(key)
                if key is not None and limit is not None and self._held_keys[key] >= limit:
                    continue
                if key is not None and key in self._paused_keys:
                    continue
                if best is None or best.after(self._bounds[queue]):
                    starving.add(queue)
        return starving

    def _routes(self, capabilities: Collection[str] | None) -> list[Route]:
        if capabilities is None:
            return list(self._heaps)
        routes: list[Route] = [c for c in capabilities if c in self._heaps]
        for route in self._heaps:
            if isinstance(route, frozenset) and all(need in capabilities for need in route):
                routes.append(route)
        return routes

    def _head(self, route: Route) -> Entry | None:
        heap = self._heaps.get(route)
        if not heap:
            return None
        if isinstance(route, str) and self._type_full(route):
            return None  # a whole heap of one type waits for a slot: leave it be
        while heap:
            entry = heap[0]
            if not self._valid(entry):
                heapq.heappop(heap)
            elif entry.key is not None and not key_allows(self, entry):
                heapq.heappop(heap)
                heapq.heappush(self._blocked.setdefault(entry.key, []), entry)
            elif self._type_full(entry.task_type):  # in a mixed heap of requirements
                heapq.heappop(heap)
                self._type_blocked.setdefault(entry.task_type, []).append(entry)
            elif entry.key is not None and waits_for_storage(self, entry):
                # It stays on top, so every pop that reaches its route starves until the
                # key's queues are read: set aside, a later pop would not see it and
                # answer "nothing" while it may be the best eligible task. What lies
                # under it in this heap comes after it, so nothing here goes meanwhile.
                return None
            else:
                return entry
        del self._heaps[route]
        return None

    def _type_full(self, task_type: str) -> bool:
        if task_type in self._revoked or task_type in self._paused_types:
            return True
        limit = self._type_limits.get(task_type)
        return limit is not None and self._held_types[task_type] >= limit

    def _valid(self, entry: Entry) -> bool:
        return self._generation.get(entry.task_id) == entry.generation

    def _push(self, entry: Entry) -> None:
        heapq.heappush(self._heaps.setdefault(entry.route, []), entry)
        self.changed = True

    def _ready(self, entry: Entry) -> None:
        """``entry`` is ready (queued, past any backoff): into its route and its key."""
        queue = entry.queue
        members = self._members.get(queue)
        if members is None:
            members = self._members[queue] = {}
            if queue in self._bounds:
                self._unempty(queue)
        members[entry.task_id] = entry
        self._member_of[entry.task_id] = queue
        key = entry.key
        if key is not None:
            heapq.heappush(self._by_key.setdefault(key, []), entry)
            self._key_limit[key] = max(self._key_limit.get(key, 0), entry.limit)
        self._push(entry)

    # -- heads of a backlog ---------------------------------------------------------------

    def _leave(self, task_id: str) -> None:
        """``task_id``'s ready entry is no longer held (taken, discarded, replaced)."""
        queue = self._member_of.pop(task_id, None)
        if queue is None:
            return
        members = self._members[queue]
        del members[task_id]
        if queue in self._bounds:
            self._maybe_low.add(queue)
        if not members:
            del self._members[queue]
            if queue in self._bounds:
                self._empty.setdefault(route_of(queue), set()).add(queue)

    def _unempty(self, queue: QueueId) -> None:
        route = route_of(queue)
        empty = self._empty.get(route)
        if empty is not None:
            empty.discard(queue)
            if not empty:
                del self._empty[route]

    def members(self, queue: QueueId) -> list[str]:
        """The ready tasks held of ``queue`` (ids), in no particular order."""
        return list(self._members.get(queue, ()))

    def member_entries(self, queue: QueueId) -> list[Entry]:
        """The ready tasks held of ``queue`` as their entries (whose first three fields
        compare as a :class:`Bound`'s), in no particular order."""
        return list(self._members.get(queue, {}).values())

    def queues_for(
        self, capabilities: Collection[str] | None, also: Collection[QueueId] = ()
    ) -> set[QueueId]:
        """The queues a claim that can do ``capabilities`` takes from, among those with
        ready tasks held or tasks in storage, and among ``also``."""

        def takes(route: Route) -> bool:
            if capabilities is None:
                return True
            if isinstance(route, str):
                return route in capabilities
            return all(need in capabilities for need in route)

        found = {queue for queue in self._members if takes(route_of(queue))}
        for route, queues in self._empty.items():
            if takes(route):
                found |= queues
        found.update(queue for queue in also if takes(route_of(queue)))
        return found

    def held_in(self, queue: QueueId) -> int:
        """Ready tasks held of ``queue`` (not counting those in backoff)."""
        return len(self._members.get(queue, ()))

    def holds(self, task_id: str) -> bool:
        """Whether ``task_id`` is queued here (ready, blocked or in backoff)."""
        return task_id in self._generation

    def bounds(self) -> dict[QueueId, Bound]:
        """The queues with tasks in storage, and where what is held of each ends."""
        return dict(self._bounds)

    def set_bound(self, queue: QueueId, bound: Bound | None) -> None:
        """``queue``'s tasks after ``bound`` are in storage (``None``: none are)."""
        key = queue[2]
        if bound is None:
            if self._bounds.pop(queue, None) is not None:
                self._unempty(queue)
                if key is not None:
                    keyed = self._bounded_keys[key]
                    keyed.discard(queue)
                    if not keyed:
                        del self._bounded_keys[key]
            self.wanted.discard(queue)
            return
        self._bounds[queue] = bound
        self._maybe_low.add(queue)
        if key is not None:
            self._bounded_keys.setdefault(key, set()).add(queue)
        if queue not in self._members:
            self._empty.setdefault(route_of(queue), set()).add(queue)

    def low(self, least: int) -> set[QueueId]:
        """The queues to read more of: those with tasks in storage and fewer than
        ``least`` ready tasks held, and those a claim or a key waits for."""
        wanted = set(self.wanted)
        for queue in self._maybe_low:
            if queue in self._bounds and len(self._members.get(queue, ())) < least:
                wanted.add(queue)
        self._maybe_low.clear()
        return wanted

    def extended(self, queues: Collection[QueueId]) -> None:
        """More of ``queues`` was added: the tasks their keys held back may go now."""
        self.wanted.difference_update(queues)
        for key in {queue[2] for queue in queues}:
            if key is not None:
                release_key(self, key)
        self.changed = True

    def over(self, most: int) -> list[QueueId]:
        """The queues with more than ``most`` ready tasks held."""
        return [queue for queue, members in self._members.items() if len(members) > most]

    def trim(self, queue: QueueId, keep: int) -> list[str]:
        """Let go of all but the best ``keep`` ready tasks held of ``queue`` (its bound
        moves to the last one kept), and of its tasks in backoff after that; returns the
        ids let go of (now storage's only)."""
        members = sorted(self._members.get(queue, {}).values())
        if len(members) <= keep or keep < 1:
            return []
        last = members[keep - 1]
        # A datetime's float timestamp is exact to well under a microsecond at today's
        # epoch, so the datetime (and the text storage compares with) comes back exactly.
        created_at = datetime.fromtimestamp(last.created, UTC)
        bound = Bound(last.neg_priority, last.created, last.task_id, created_at)
        dropped = [entry.task_id for entry in members[keep:]]
        # The tasks of the queue in backoff after the bound go too: held, one would join
        # the head when due and go before the tasks of storage that come before it. A
        # scan of the backoff heap, as a trim comes once per ``keep`` tasks added at most.
        dropped += [
            entry.task_id
            for _, entry in self._delayed
            if entry.queue == queue and self._valid(entry) and entry.after(bound)
        ]
        for task_id in dropped:
            self.discard(task_id)
        self.set_bound(queue, bound)
        return dropped

    # -- concurrency slots ----------------------------------------------------------------

    def hold(self, task: Task) -> None:
        """``task`` is assigned or running: it takes a slot of its type and group."""
        self._held_types[task.task_type] += 1
        if task.concurrency_key is not None:
            self._held_keys[task.concurrency_key] += 1

    def unhold(self, task: Task) -> None:
        """``task`` stopped holding its slots; tasks waiting for them may go."""
        task_type = task.task_type
        self._held_types[task_type] -= 1
        if self._held_types[task_type] <= 0:
            del self._held_types[task_type]
        if task_type in self._type_limits:
            if self._heaps.get(task_type):
                self.changed = True
            for entry in self._type_blocked.pop(task_type, ()):
                if self._valid(entry):
                    self._push(entry)
        key = task.concurrency_key
        if key is not None:
            self._held_keys[key] -= 1
            if self._held_keys[key] <= 0:
                del self._held_keys[key]
            release_key(self, key)

    def restored(self, task_type: str) -> None:
        """``task_type`` is no longer revoked: its tasks set aside may go again."""
        if self._heaps.get(task_type):
            self.changed = True
        if self._type_full(task_type):
            return  # held back still (its rate or concurrency limit): they go when it frees
        for entry in self._type_blocked.pop(task_type, ()):
            if self._valid(entry):
                self._push(entry)

    def held(self, task_type: str) -> int:
        return self._held_types[task_type]

    # -- rate limits ----------------------------------------------------------------------

    def pause(self, task_types: Collection[str] = (), keys: Collection[str] = ()) -> None:
        """Hand out no task of ``task_types`` nor of ``keys`` until :meth:`resume`."""
        self._paused_types.update(task_types)
        self._paused_keys.update(keys)

    def resume(self, task_types: Collection[str] = (), keys: Collection[str] = ()) -> None:
        """The tasks of ``task_types`` and ``keys`` may go again (as far as the rate
        limits go): those set aside for them go back to their heaps."""
        for task_type in task_types:
            self._paused_types.discard(task_type)
            if self._heaps.get(task_type):
                self.changed = True
            if not self._type_full(task_type):
                for entry in self._type_blocked.pop(task_type, ()):
                    if self._valid(entry):
                        self._push(entry)
        for key in keys:
            self._paused_keys.discard(key)
            release_key(self, key)
