"""The ReadyQueue on its own: which queued task comes out next, and when none may.

Plain synchronous tests on hand-built :class:`Task` structs: order (priority, then age),
task types, discards and stale entries, retry backoff (``available_at`` / ``promote``),
concurrency keys and per-type limits. A hypothesis property test then runs random
sequences of operations against a simple model of what may come out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hive_orchestration.actors.task_manager.ready import ReadyQueue, bound_of, queue_of
from hive_orchestration.messages.tasks import Task, TaskStatus

T0 = datetime(2024, 1, 1, tzinfo=UTC)
#: The time every add happens at, unless a test says otherwise (well after all creations).
NOW = (T0 + timedelta(seconds=1000)).timestamp()


def make_task(
    task_id: str,
    task_type: str = "a",
    *,
    priority: int = 1,
    created: float = 0.0,
    key: str | None = None,
    limit: int | None = None,
    available: float | None = None,
) -> Task:
    """A queued task created ``created`` seconds after T0, not handed out before the
    timestamp ``available`` (if given)."""
    created_at = T0 + timedelta(seconds=created)
    return Task(
        id=task_id,
        title=task_id,
        task_type=task_type,
        status=TaskStatus.QUEUED,
        priority=priority,
        created_at=created_at,
        updated_at=created_at,
        concurrency_key=key,
        concurrency_limit=limit,
        available_at=None if available is None else datetime.fromtimestamp(available, UTC),
    )


def available_of(task: Task) -> float | None:
    """The end of ``task``'s backoff as the TaskManager gives it to ``add``: a time on its
    monotonic clock, for which the tasks' timestamps stand here."""
    return None if task.available_at is None else task.available_at.timestamp()


def add_delayed(queue: ReadyQueue, task: Task, now: float) -> None:
    queue.add(task, now, available_of(task))


def changed(queue: ReadyQueue) -> bool:
    """``queue.changed`` (read through a call, so that a type checker does not narrow it)."""
    return queue.changed


def drain(queue: ReadyQueue, task_types: list[str] | None = None) -> list[str]:
    """Pop until nothing comes out (without holding anything)."""
    out: list[str] = []
    while (task_id := queue.pop(task_types)) is not None:
        out.append(task_id)
        assert len(out) < 10_000, "pop never returned None"
    return out


# -- order and task types -------------------------------------------------------------------


def test_pop_order_is_priority_then_age_across_types() -> None:
    queue = ReadyQueue()
    tasks = [
        make_task("a-p1-old", "a", priority=1, created=1),
        make_task("b-p3-new", "b", priority=3, created=9),
        make_task("c-p2-mid", "c", priority=2, created=5),
        make_task("a-p3-old", "a", priority=3, created=2),
        make_task("c-p1-new", "c", priority=1, created=8),
        make_task("b-p2-old", "b", priority=2, created=0),
        make_task("a-p0", "a", priority=0, created=0),
        make_task("c-p3-mid", "c", priority=3, created=4),
    ]
    for task in tasks:
        queue.add(task, NOW)
    assert len(queue) == len(tasks)
    expected = [
        task.id for task in sorted(tasks, key=lambda task: (-task.priority, task.created_at))
    ]
    assert expected == [
        "a-p3-old",
        "c-p3-mid",
        "b-p3-new",
        "b-p2-old",
        "c-p2-mid",
        "a-p1-old",
        "c-p1-new",
        "a-p0",
    ]
    assert drain(queue) == expected
    assert len(queue) == 0


def test_pop_filters_by_type() -> None:
    queue = ReadyQueue()
    queue.add(make_task("a1", "a", priority=1, created=1), NOW)
    queue.add(make_task("b1", "b", priority=9, created=0), NOW)
    queue.add(make_task("a2", "a", priority=2, created=2), NOW)
    queue.add(make_task("c1", "c", priority=5, created=0), NOW)

    assert queue.pop(["a"]) == "a2"
    assert queue.pop(["a"]) == "a1"
    assert queue.pop(["a"]) is None  # b and c are still there, but not for this claim
    assert queue.pop(["zzz"]) is None
    assert queue.pop([]) is None
    assert len(queue) == 2
    assert queue.pop(["c", "a"]) == "c1"
    assert queue.pop(None) == "b1"  # None: any type
    assert queue.pop(None) is None


def test_pop_on_empty_queue_is_none() -> None:
    queue = ReadyQueue()
    assert queue.pop(None) is None
    assert queue.pop(["a"]) is None
    assert len(queue) == 0
    assert queue.next_delayed() is None


# -- discards and stale entries ---------------------------------------------------------------


def test_discarded_task_never_comes_out() -> None:
    queue = ReadyQueue()
    queue.add(make_task("best", priority=9), NOW)
    queue.add(make_task("other", "b", priority=1), NOW)
    queue.add(make_task("mid", priority=5), NOW)
    queue.discard("best")
    queue.discard("best")  # twice is harmless
    queue.discard("never-queued")
    assert len(queue) == 2
    assert drain(queue) == ["mid", "other"]


def test_readd_after_discard_comes_out_once() -> None:
    queue = ReadyQueue()
    task = make_task("t", priority=3)
    queue.add(task, NOW)
    queue.discard(task.id)
    queue.add(task, NOW)
    assert len(queue) == 1
    assert drain(queue) == ["t"]  # the stale entry stays skipped

    # Several rounds leave several stale entries in the heap: still one task out.
    for _ in range(5):
        queue.add(task, NOW)
        queue.discard(task.id)
    queue.add(task, NOW)
    queue.add(make_task("u", priority=1), NOW)
    assert drain(queue) == ["t", "u"]
    assert len(queue) == 0


def test_readd_with_new_priority_uses_the_new_entry() -> None:
    queue = ReadyQueue()
    queue.add(make_task("t", priority=9), NOW)
    queue.add(make_task("u", priority=5), NOW)
    queue.discard("t")
    queue.add(make_task("t", priority=1), NOW)  # queued again, lower priority now
    assert drain(queue) == ["u", "t"]


# -- backoff: available_at and promote -------------------------------------------------------


def test_available_at_in_the_future_waits_for_promote() -> None:
    queue = ReadyQueue()
    due = NOW + 100
    add_delayed(queue, make_task("later", priority=9, available=due), NOW)
    queue.changed = False
    add_delayed(queue, make_task("late-too", priority=9, available=due + 50), NOW)
    assert not queue.changed  # nothing claimable was added
    assert len(queue) == 2
    assert queue.next_delayed() == due
    assert queue.pop(None) is None

    assert queue.promote(NOW + 99) == due  # not yet
    assert not queue.changed
    assert queue.pop(None) is None

    assert queue.promote(due) == due + 50  # due exactly: ready; the next one reported
    assert changed(queue)
    assert queue.pop(None) == "later"
    assert queue.pop(None) is None

    assert queue.promote(due + 1000) is None
    assert queue.pop(None) == "late-too"
    assert queue.next_delayed() is None


def test_available_at_in_the_past_is_ready_at_once() -> None:
    queue = ReadyQueue()
    queue.changed = False
    add_delayed(queue, make_task("past", available=NOW - 5), NOW)
    add_delayed(queue, make_task("now", available=NOW), NOW)
    assert queue.changed
    assert queue.next_delayed() is None
    assert sorted(drain(queue)) == ["now", "past"]


def test_next_delayed_skips_discarded_tasks() -> None:
    queue = ReadyQueue()
    add_delayed(queue, make_task("soon", available=NOW + 10), NOW)
    add_delayed(queue, make_task("later", available=NOW + 20), NOW)
    assert queue.next_delayed() == NOW + 10
    queue.discard("soon")
    assert queue.next_delayed() == NOW + 20
    queue.discard("later")
    assert queue.next_delayed() is None
    assert queue.promote(NOW + 100) is None
    assert queue.pop(None) is None
    assert len(queue) == 0


def test_delayed_task_readded_ready_comes_out_once() -> None:
    queue = ReadyQueue()
    add_delayed(queue, make_task("t", available=NOW + 10), NOW)
    queue.discard("t")
    queue.add(make_task("t"), NOW)  # queued again without a backoff
    assert queue.next_delayed() is None  # the old delayed entry is stale
    assert drain(queue) == ["t"]
    queue.promote(NOW + 100)  # the stale delayed entry must not come back
    assert queue.pop(None) is None


# -- concurrency keys --------------------------------------------------------------------------


def test_concurrency_key_limit_one() -> None:
    queue = ReadyQueue()
    first = make_task("k-first", priority=5, created=0, key="k", limit=1)
    second = make_task("k-second", priority=5, created=1, key="k", limit=1)
    other = make_task("other-key", priority=1, created=2, key="j", limit=1)
    for task in (first, second, other):
        queue.add(task, NOW)

    assert queue.pop(None) == "k-first"
    queue.hold(first)
    # k-second is better than other-key, but its group is full.
    assert queue.pop(None) == "other-key"
    queue.hold(other)
    assert queue.pop(None) is None
    assert queue.pop(["a"]) is None
    assert len(queue) == 1  # still queued, just blocked

    queue.changed = False
    queue.unhold(other)  # another group's slot: k-second still waits
    assert queue.pop(None) is None

    queue.changed = False
    queue.unhold(first)
    assert queue.changed
    assert queue.pop(None) == "k-second"
    assert len(queue) == 0


def test_concurrency_key_default_limit_is_one() -> None:
    queue = ReadyQueue()
    first = make_task("first", key="k", created=0)
    queue.add(first, NOW)
    queue.add(make_task("second", key="k", created=1), NOW)
    assert queue.pop(None) == "first"
    queue.hold(first)
    assert queue.pop(None) is None
    queue.unhold(first)
    assert queue.pop(None) == "second"


def test_concurrency_key_limit_two() -> None:
    queue = ReadyQueue()
    tasks = [make_task(f"k{i}", created=i, key="k", limit=2) for i in range(4)]
    for task in tasks:
        queue.add(task, NOW)
    assert queue.pop(None) == "k0"
    queue.hold(tasks[0])
    assert queue.pop(None) == "k1"
    queue.hold(tasks[1])
    assert queue.pop(None) is None
    queue.unhold(tasks[0])
    assert queue.pop(None) == "k2"
    queue.hold(tasks[2])
    assert queue.pop(None) is None
    queue.unhold(tasks[1])
    queue.unhold(tasks[2])
    assert queue.pop(None) == "k3"


def test_held_key_blocks_task_added_later() -> None:
    queue = ReadyQueue()
    running = make_task("running", key="k")
    queue.hold(running)  # e.g. held when the queue was rebuilt
    queue.add(make_task("waiting", key="k", priority=9), NOW)
    queue.add(make_task("free", priority=0), NOW)
    assert queue.pop(None) == "free"
    assert queue.pop(None) is None
    queue.changed = False
    queue.unhold(running)
    assert queue.changed
    assert queue.pop(None) == "waiting"


def test_blocked_task_discarded_does_not_come_back() -> None:
    queue = ReadyQueue()
    first = make_task("first", key="k")
    queue.add(first, NOW)
    queue.add(make_task("blocked", key="k", created=1), NOW)
    assert queue.pop(None) == "first"
    queue.hold(first)
    assert queue.pop(None) is None  # "blocked" now waits for its group
    queue.discard("blocked")  # e.g. cancelled
    assert len(queue) == 0
    queue.unhold(first)
    assert queue.pop(None) is None


def test_a_freed_key_goes_to_its_best_task_whatever_the_claimers_type() -> None:
    queue = ReadyQueue()
    holder = make_task("holder", "tc", key="k")
    queue.hold(holder)
    queue.add(make_task("tb-low", "tb", priority=1, created=0, key="k"), NOW)
    queue.add(make_task("ta-high", "ta", priority=9, created=1, key="k"), NOW)
    queue.add(make_task("tb-free", "tb", priority=0, created=2), NOW)
    assert queue.pop(["tb"]) == "tb-free"  # the key is held: its tasks wait
    queue.unhold(holder)
    # The key is free, but its best task is a ta: a tb claimer gets nothing of it.
    assert queue.pop(["tb"]) is None
    assert queue.pop(["ta", "tb"]) == "ta-high"
    queue.hold(make_task("ta-high", "ta", priority=9, created=1, key="k"))
    assert queue.pop(["tb"]) is None
    queue.unhold(make_task("ta-high", "ta", priority=9, created=1, key="k"))
    assert queue.pop(["tb"]) == "tb-low"


def test_a_key_with_two_slots_gives_them_to_its_two_best() -> None:
    queue = ReadyQueue()
    queue.add(make_task("ta-1", "ta", priority=9, created=0, key="k", limit=2), NOW)
    queue.add(make_task("ta-2", "ta", priority=8, created=1, key="k", limit=2), NOW)
    low = make_task("tb-low", "tb", priority=1, created=2, key="k", limit=2)
    queue.add(low, NOW)
    assert queue.pop(["tb"]) is None  # third best of two free slots
    assert queue.pop(["ta"]) == "ta-1"
    queue.hold(make_task("ta-1", "ta", key="k", limit=2))
    assert queue.pop(["tb"]) is None  # second best of one free slot
    queue.discard("ta-2")  # e.g. cancelled: tb-low is now the best
    assert queue.pop(["tb"]) == "tb-low"


def test_a_key_with_two_slots_lets_its_second_best_go_first() -> None:
    queue = ReadyQueue()
    queue.add(make_task("ta-high", "ta", priority=9, key="k", limit=2), NOW)
    queue.add(make_task("tb-low", "tb", priority=1, key="k", limit=2), NOW)
    assert queue.pop(["tb"]) == "tb-low"  # a slot is still left for ta-high
    queue.hold(make_task("tb-low", "tb", priority=1, key="k", limit=2))
    assert queue.pop(["ta"]) == "ta-high"


def test_a_discarded_best_task_lets_the_next_of_its_key_go() -> None:
    queue = ReadyQueue()
    queue.add(make_task("ta-high", "ta", priority=9, key="k"), NOW)
    queue.add(make_task("tb-low", "tb", priority=1, key="k"), NOW)
    assert queue.pop(["tb"]) is None
    queue.changed = False
    queue.discard("ta-high")
    assert changed(queue)  # a waiting tb claimer is worth asking again
    assert queue.pop(["tb"]) == "tb-low"


def test_a_task_in_backoff_holds_its_key_for_nobody_until_it_is_due() -> None:
    queue = ReadyQueue()
    add_delayed(queue, make_task("ta-high", "ta", priority=9, key="k", available=NOW + 10), NOW)
    queue.add(make_task("tb-low", "tb", priority=1, key="k"), NOW)
    queue.add(make_task("tb-low-2", "tb", priority=1, created=1, key="k"), NOW)
    assert queue.pop(["tb"]) == "tb-low"
    queue.unhold(make_task("tb-low", "tb", priority=1, key="k"))  # it finished
    queue.promote(NOW + 10)  # ta-high is ready now, and better
    assert queue.pop(["tb"]) is None
    assert queue.pop(["ta"]) == "ta-high"


def test_a_freed_key_sends_back_only_the_tasks_within_reach() -> None:
    """A long wait list on a key costs nothing when a slot frees: only its best task goes
    back to its heap; the others stay in the key's blocked heap."""
    queue = ReadyQueue()
    holder = make_task("holder", key="k")
    queue.hold(holder)
    for i in range(1000):
        queue.add(make_task(f"t{i}", "tb" if i % 2 else "ta", created=i, key="k"), NOW)
    assert queue.pop(None) is None  # every head met the held key
    for n in range(3):
        queue.unhold(holder)
        assert sum(len(heap) for heap in queue._heaps.values()) <= 2
        mine, other = ("tb", "ta") if n % 2 else ("ta", "tb")
        assert queue.pop([other]) is None  # t{n}, of type ``mine``, is the key's best
        assert queue.pop([mine]) == f"t{n}"
        holder = make_task(f"t{n}", mine, key="k")
        queue.hold(holder)
    assert len(queue) == 997


def test_a_task_held_back_for_storage_starves_every_pop_until_its_queue_is_read() -> None:
    """A pop that hands out a better task may set aside one of a key whose queue has
    better tasks in storage; the next pop must not answer "nothing" (a claim that does not
    wait would go empty-handed while that task may be eligible): it starves until the
    queue is read, then hands it out. (Found by the heads-against-whole property test.)"""
    queue = ReadyQueue({"a": 1})
    t1 = make_task("t1", "b", priority=0, key="k1", limit=2)
    t2 = make_task("t2", "a", priority=0, key="k1")
    t3 = make_task("t3", "a", priority=1, key="k1")
    stored = queue_of(t3)
    queue.set_bound(stored, bound_of(t3))  # t2 is in storage, after t3
    queue.add(t1, NOW)
    assert queue.add(t3, NOW)
    assert queue.pop(None) == "t3"  # t1 waits: storage may hold better tasks of k1
    queue.hold(t3)
    assert stored in queue.low(1)
    # The read is in flight (the TaskManager reads in the background): no answer yet.
    assert queue.pop(None) is None
    assert queue.starved
    assert queue.pop(["b"]) is None
    assert queue.starved
    queue.set_bound(stored, None)
    assert queue.add(t2, NOW)
    queue.extended([stored])
    assert queue.pop(None) == "t1"  # the best of k1 now (t2 comes after it, by id)
    assert not queue.starved


def test_a_trim_lets_go_of_the_tasks_in_backoff_after_its_new_bound() -> None:
    """Every task held of a queue comes before its bound, those in backoff too: one left
    held after a trim's bound would join the head when due and go before the tasks of
    storage that come before it. (Found by the heads-against-whole property test.)"""
    queue = ReadyQueue()
    t0 = make_task("t0", priority=0)
    t1 = make_task("t1", priority=1)
    t2 = make_task("t2", priority=0, available=NOW + 1)  # in backoff
    t3 = make_task("t3", priority=2, available=NOW + 1)  # in backoff, before the bound
    for task in (t0, t2, t3, t1):
        add_delayed(queue, task, NOW)
    assert sorted(queue.trim(queue_of(t1), 1)) == ["t0", "t2"]
    assert not queue.holds("t2")
    assert queue.holds("t3")
    assert queue.pop(None) == "t1"
    queue.promote(NOW + 1)
    assert queue.pop(None) == "t3"
    assert queue.pop(None) is None
    assert queue.starved  # t0 and t2 are storage's: read them first
    assert queue_of(t0) in queue.low(1)


# -- per-type limits ---------------------------------------------------------------------------


def test_type_limit() -> None:
    queue = ReadyQueue({"deploy": 1})
    d1 = make_task("d1", "deploy", priority=5, created=0)
    d2 = make_task("d2", "deploy", priority=5, created=1)
    build = make_task("build", "build", priority=1)
    for task in (d1, d2, build):
        queue.add(task, NOW)

    assert queue.pop(None) == "d1"
    queue.hold(d1)
    assert queue.held("deploy") == 1
    assert queue.pop(["deploy"]) is None
    assert queue.pop(None) == "build"  # the limit is per type
    queue.hold(build)
    assert queue.pop(None) is None

    queue.changed = False
    queue.unhold(build)  # unlimited type: d2 still waits
    assert queue.pop(["deploy"]) is None

    queue.changed = False
    queue.unhold(d1)
    assert queue.changed
    assert queue.held("deploy") == 0
    assert queue.pop(["deploy"]) == "d2"


def test_type_limit_two_with_unlimited_types() -> None:
    queue = ReadyQueue({"x": 2})
    xs = [make_task(f"x{i}", "x", created=i) for i in range(3)]
    for task in xs:
        queue.add(task, NOW)
    for task in xs[:2]:
        assert queue.pop(["x"]) == task.id
        queue.hold(task)
    assert queue.pop(["x"]) is None
    queue.unhold(xs[0])
    assert queue.pop(["x"]) == "x2"


def test_len_counts_ready_delayed_and_blocked_tasks() -> None:
    queue = ReadyQueue()
    holder = make_task("holder", key="k")
    queue.hold(holder)
    queue.add(make_task("ready"), NOW)
    add_delayed(queue, make_task("delayed", available=NOW + 60), NOW)
    queue.add(make_task("blocked", key="k"), NOW)
    assert len(queue) == 3
    assert queue.pop(None) == "ready"  # and "blocked" moved aside on the way
    assert len(queue) == 2
    queue.discard("delayed")
    assert len(queue) == 1
    queue.unhold(holder)
    assert queue.pop(None) == "blocked"
    assert len(queue) == 0


# -- property: random operations against a model ------------------------------------------------

TYPES = ("a", "b", "c")
#: Mostly one shared key, so that groups fill up often.
KEYS = (None, "k1", "k1", "k1", "k2")
TYPE_LIMITS = {"a": 1, "b": 2}  # c is unlimited


@dataclass
class Model:
    """What may come out: every task's last added version, its state and the slots."""

    now: float = NOW
    tasks: dict[str, Task] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)  # queued and past its backoff
    held: set[str] = field(default_factory=set)
    popped_since_add: set[str] = field(default_factory=set)
    discarded: set[str] = field(default_factory=set)  # discarded and not added since

    def choose(self, among: set[str], which: int | str) -> str:
        """The task id an operation is about (see ``pick``)."""
        if isinstance(which, str) or not among:
            return which if isinstance(which, str) else TASK_IDS[which % len(TASK_IDS)]
        return sorted(among)[which % len(among)]

    def held_type(self, task_type: str) -> int:
        return sum(1 for task_id in self.held if self.tasks[task_id].task_type == task_type)

    def held_key(self, key: str) -> int:
        return sum(1 for task_id in self.held if self.tasks[task_id].concurrency_key == key)

    def eligible(self, task_types: list[str] | None) -> list[Task]:
        out = []
        for task_id in self.ready:
            task = self.tasks[task_id]
            if task_types is not None and task.task_type not in task_types:
                continue
            type_limit = TYPE_LIMITS.get(task.task_type)
            if type_limit is not None and self.held_type(task.task_type) >= type_limit:
                continue
            key = task.concurrency_key
            if key is not None:
                # A key's free slots go to its best ready tasks, whatever their type.
                free = (task.concurrency_limit or 1) - self.held_key(key)
                better = sum(
                    1
                    for other_id in self.ready
                    if self.tasks[other_id].concurrency_key == key
                    and self.rank(other_id) < self.rank(task_id)
                )
                if better >= free:
                    continue
            out.append(task)
        return out

    def rank(self, task_id: str) -> tuple[int, datetime, str]:
        task = self.tasks[task_id]
        return (-task.priority, task.created_at, task_id)


task_specs = st.fixed_dictionaries(
    {
        "task_type": st.sampled_from(TYPES),
        "priority": st.integers(0, 3),
        "created": st.integers(0, 5),  # few values: many ties
        "key": st.sampled_from(KEYS),
        "limit": st.sampled_from([None, 1, 1, 2]),
        # seconds from the current time (None: no backoff)
        "delay": st.one_of(st.none(), st.integers(-2, 5)),
    }
)
TASK_IDS = [f"t{i}" for i in range(10)]
#: Which task an operation is about: a queued (or held) one, by its rank in the model
#: (so that most operations act on something), or any id (maybe not queued at all).
pick = st.one_of(st.integers(0, 9), st.sampled_from(TASK_IDS))
add = st.tuples(st.just("add"), st.sampled_from(TASK_IDS), task_specs)
pop = st.tuples(st.just("pop"), st.one_of(st.none(), st.lists(st.sampled_from(TYPES), max_size=3)))
# a held task lets go of its slots (and may be queued again by a later add)
unhold = st.tuples(st.just("unhold"), pick)
operations = st.lists(
    st.one_of(
        add,
        add,
        add,
        pop,
        pop,
        pop,
        unhold,
        unhold,
        st.tuples(st.just("discard"), pick),
        # a queued task taken without a pop (e.g. set running directly): discard + hold
        st.tuples(st.just("take"), pick),
        st.tuples(st.just("promote"), st.integers(0, 4)),
    ),
    min_size=30,
    max_size=120,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_random_operations_match_the_model(ops: list[tuple[Any, ...]]) -> None:
    queue = ReadyQueue(TYPE_LIMITS)
    model = Model()
    for op in ops:
        match op:
            case ("add", str(task_id), dict(spec)):
                if task_id in model.held:
                    continue  # a held task is unheld before it is queued again
                delay = spec["delay"]
                task = make_task(
                    task_id,
                    spec["task_type"],
                    priority=spec["priority"],
                    created=spec["created"],
                    key=spec["key"],
                    limit=spec["limit"] if spec["key"] is not None else None,
                    available=None if delay is None else model.now + delay,
                )
                queue.add(task, model.now, available_of(task))
                model.tasks[task_id] = task
                model.queued.add(task_id)
                model.discarded.discard(task_id)
                model.popped_since_add.discard(task_id)
                if delay is None or model.now + delay <= model.now:
                    model.ready.add(task_id)
                else:
                    model.ready.discard(task_id)
            case ("discard", which):
                task_id = model.choose(model.queued, which)
                queue.discard(task_id)
                if task_id in model.queued:
                    model.discarded.add(task_id)
                model.queued.discard(task_id)
                model.ready.discard(task_id)
            case ("take", which):
                task_id = model.choose(model.queued, which)
                if task_id not in model.queued:
                    continue
                queue.discard(task_id)
                queue.hold(model.tasks[task_id])
                model.queued.discard(task_id)
                model.ready.discard(task_id)
                model.held.add(task_id)
            case ("unhold", which):
                task_id = model.choose(model.held, which)
                if task_id not in model.held:
                    continue
                queue.unhold(model.tasks[task_id])
                model.held.discard(task_id)
            case ("promote", int(step)):
                model.now += step
                next_due = queue.promote(model.now)
                for task_id in model.queued - model.ready:
                    available = model.tasks[task_id].available_at
                    assert available is not None
                    if available.timestamp() <= model.now:
                        model.ready.add(task_id)
                waiting = [
                    model.tasks[task_id].available_at for task_id in model.queued - model.ready
                ]
                expected_due = min((when.timestamp() for when in waiting if when), default=None)
                assert next_due == expected_due
            case ("pop", task_types):
                types = None if task_types is None else list(task_types)
                eligible = model.eligible(types)
                got = queue.pop(types)
                if got is None:
                    assert not eligible, f"pop({types}) gave nothing; eligible: {eligible}"
                    continue
                assert got not in model.discarded, f"popped discarded task {got}"
                assert got not in model.popped_since_add, f"popped {got} twice"
                assert got in {task.id for task in eligible}, f"popped ineligible task {got}"
                task = model.tasks[got]
                best = min((-t.priority, t.created_at) for t in eligible)
                assert (-task.priority, task.created_at) == best, f"popped {got} out of order"
                # The claim holds it: check the limits are kept, counting this one.
                queue.hold(task)
                model.queued.discard(got)
                model.ready.discard(got)
                model.held.add(got)
                model.popped_since_add.add(got)
                if task.concurrency_key is not None:
                    assert model.held_key(task.concurrency_key) <= (task.concurrency_limit or 1)
                type_limit = TYPE_LIMITS.get(task.task_type)
                if type_limit is not None:
                    assert model.held_type(task.task_type) <= type_limit
            case _:  # pragma: no cover
                pytest.fail(f"unknown operation {op!r}")
        assert len(queue) == len(model.queued)


class Backlogged:
    """A :class:`ReadyQueue` that holds ``head`` ready tasks of each queue, over a
    simulated storage (the backlog), driven as the TaskManager drives it: a task it does
    not take stays in storage, a starved pop reads the wanted queues' next tasks after
    their bounds, and a head past its size is trimmed after every operation (the
    TaskManager lets a head grow to twice its size first: the same, less often)."""

    def __init__(self, head: int) -> None:
        self.queue = ReadyQueue(TYPE_LIMITS)
        self.head = head
        self.stored: dict[str, tuple[Task, float | None]] = {}
        self.reads = 0

    def add(self, task: Task, now: float, available: float | None) -> None:
        self.stored.pop(task.id, None)
        if not self.queue.add(task, now, available):
            self.stored[task.id] = (task, available)

    def discard(self, task_id: str) -> None:
        self.queue.discard(task_id)
        self.stored.pop(task_id, None)

    def pop(self, types: list[str] | None, now: float) -> str | None:
        for _ in range(1000):
            got = self.queue.pop(types)
            if got is not None or not self.queue.starved:
                return got
            self.read(self.queue.low(1), now)
        raise AssertionError("a pop starved 1000 times in a row")

    def read(self, queues: set[Any], now: float) -> None:
        self.reads += 1
        bounds = self.queue.bounds()
        for queue in queues:
            if queue not in bounds:
                continue
            after = sorted(
                (task for task, _ in self.stored.values() if queue_of(task) == queue),
                key=lambda task: bound_of(task)[:3],
            )
            assert all(bound_of(task)[:3] > bounds[queue][:3] for task in after), (
                "a task of the backlog before its queue's bound"
            )
            taken = after[: self.head]
            bound = bound_of(taken[-1]) if len(taken) >= self.head else None
            self.queue.set_bound(queue, bound)
            for task in taken:
                _, available = self.stored.pop(task.id)
                assert self.queue.add(task, now, available)
        self.queue.extended(list(queues))

    def trim(self, tasks: dict[str, Task], available: dict[str, float | None]) -> None:
        for queue in self.queue.over(self.head):
            for task_id in self.queue.trim(queue, self.head):
                self.stored[task_id] = (tasks[task_id], available[task_id])


# Few queues, so that heads fill, are trimmed and run dry often.
crowded_specs = st.fixed_dictionaries(
    {
        "task_type": st.sampled_from(["a", "a", "a", "b"]),
        "priority": st.integers(0, 3),
        "created": st.integers(0, 5),
        "key": st.sampled_from([None, None, "k1"]),
        "limit": st.sampled_from([None, 1, 2, 3]),
        "delay": st.one_of(st.none(), st.none(), st.none(), st.integers(-2, 5)),
    }
)
crowded = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(TASK_IDS), crowded_specs),
        st.tuples(st.just("add"), st.sampled_from(TASK_IDS), crowded_specs),
        pop,
        pop,
        unhold,
        st.tuples(st.just("discard"), pick),
        st.tuples(st.just("take"), pick),
        st.tuples(st.just("promote"), st.integers(0, 4)),
    ),
    min_size=30,
    max_size=120,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crowded, st.integers(1, 3))
def test_a_queue_holding_only_heads_hands_out_what_one_holding_all_does(
    ops: list[tuple[Any, ...]], head: int
) -> None:
    """The same operations on a queue that holds every task and on one that holds only
    the heads (the backlog in a simulated storage): every pop gives the same task."""
    whole = ReadyQueue(TYPE_LIMITS)
    heads = Backlogged(head)
    model = Model()  # only to pick tasks by rank and to know what is queued or held
    available: dict[str, float | None] = {}
    for op in ops:
        match op:
            case ("add", str(task_id), dict(spec)):
                # As the TaskManager adds: a task that changes while queued is discarded
                # first (``_index``), one that is held is unheld first, and a task keeps
                # its type, priority, creation time and key for life; a task queued again
                # (a retry, say) differs only in its backoff.
                if task_id in model.queued or task_id in model.held:
                    continue
                # One limit per key: see the xfail test below for a key whose tasks
                # carry different limits.
                same_key = [t for t in model.tasks.values() if t.concurrency_key == spec["key"]]
                if spec["key"] is not None and same_key:
                    spec = {**spec, "limit": same_key[0].concurrency_limit}
                first = model.tasks.get(task_id)
                if first is not None:
                    spec = {
                        **spec,
                        "task_type": first.task_type,
                        "priority": first.priority,
                        "created": (first.created_at - T0).total_seconds(),
                        "key": first.concurrency_key,
                        "limit": first.concurrency_limit,
                    }
                delay = spec["delay"]
                task = make_task(
                    task_id,
                    spec["task_type"],
                    priority=spec["priority"],
                    created=spec["created"],
                    key=spec["key"],
                    limit=spec["limit"] if spec["key"] is not None else None,
                    available=None if delay is None else model.now + delay,
                )
                available[task_id] = available_of(task)
                whole.add(task, model.now, available[task_id])
                heads.add(task, model.now, available[task_id])
                model.tasks[task_id] = task
                model.queued.add(task_id)
            case ("discard", which):
                task_id = model.choose(model.queued, which)
                whole.discard(task_id)
                heads.discard(task_id)
                model.queued.discard(task_id)
            case ("take", which):
                task_id = model.choose(model.queued, which)
                if task_id not in model.queued:
                    continue
                for queue in (whole, heads.queue):
                    queue.discard(task_id)
                    queue.hold(model.tasks[task_id])
                heads.stored.pop(task_id, None)
                model.queued.discard(task_id)
                model.held.add(task_id)
            case ("unhold", which):
                task_id = model.choose(model.held, which)
                if task_id not in model.held:
                    continue
                whole.unhold(model.tasks[task_id])
                heads.queue.unhold(model.tasks[task_id])
                model.held.discard(task_id)
            case ("promote", int(step)):
                model.now += step
                whole.promote(model.now)
                heads.queue.promote(model.now)
            case ("pop", task_types):
                types = None if task_types is None else list(task_types)
                expected = whole.pop(types)
                got = heads.pop(types, model.now)
                assert got == expected, f"pop({types}): {got}, holding all: {expected}"
                if got is not None:
                    whole.hold(model.tasks[got])
                    heads.queue.hold(model.tasks[got])
                    model.queued.discard(got)
                    model.held.add(got)
        heads.trim(model.tasks, available)


@pytest.mark.xfail(
    strict=True,
    reason="known: a head cannot tell that its backlog holds a task of the same key with a"
    " larger concurrency_limit than the tasks it holds (storage would have to say)",
)
def test_a_key_whose_tasks_in_storage_have_a_larger_limit_than_those_held() -> None:
    """Tasks of one key with different limits, across a head's bound: the whole queue
    hands out t2 (its limit 3 leaves it a slot), the heads hold only t1 (limit 1, full)
    and do not read t2. Found by the heads-against-whole property test (seed 22, 5000
    examples), which now gives every task of a key the same limit."""
    whole = ReadyQueue(TYPE_LIMITS)
    heads = Backlogged(1)
    t0 = make_task("t0", "b", priority=0, key="k1")
    t2 = make_task("t2", "a", priority=0, key="k1", limit=3)
    t1 = make_task("t1", "a", priority=0, key="k1")
    tasks = {task.id: task for task in (t0, t1, t2)}
    available: dict[str, float | None] = dict.fromkeys(tasks)
    for task in (t0, t2):
        whole.add(task, NOW)
        heads.add(task, NOW, None)
        heads.trim(tasks, available)
    assert whole.pop(None) == heads.pop(None, NOW) == "t0"
    whole.hold(t0)
    heads.queue.hold(t0)
    whole.add(t1, NOW)
    heads.add(t1, NOW, None)
    heads.trim(tasks, available)
    assert "t2" in heads.stored
    assert whole.pop(None) == "t2"
    assert heads.pop(None, NOW) == "t2"
