"""A soak: the runtime under a steady, mixed load for minutes, its resident memory sampled.

What runs at once, in one process, on a file database at the default ``synchronous=FULL``:

- 4 creators create tasks (a few hundred bytes of payload each, 3 task types, varied
  priorities, an idempotency key on one in four, a concurrency key on one in ten) and cancel
  one in fifty while it is queued. At most ``--backlog`` (1 000) of their tasks are
  unfinished at a time, so the backlog is steady and memory has no reason to grow with it.
- 8 workers claim (waiting, no polling), start, and complete 85% of their tasks, fail 12%
  (retried: a fresh attempt later) and fail 3% for good.
- A planner creates a plan of 12 subtasks in 3 layers, starts it, waits for it, and
  starts the next: every subtask goes through the same workers.
- Subscribers come and go: every 0.2 s one subscribes to ``task.*``, reads up to 50
  events (or for 0.1 s) and leaves; one subscriber that never reads is opened every 20 s
  (it lags and is dropped), and one that filters on a task id that never occurs.
- A reader follows the log with ``read_events(after=...)`` in pages of 500.

Resident memory (``VmRSS``) is sampled every ``--sample`` seconds. The first
``--warmup`` seconds (60) are warm-up; growth is the largest sample after warm-up less the
first one after it, and the slope a least-squares fit of the samples after warm-up. Goal
(issue 21): growth under 20 MB over 10 minutes.

Run from the repository root::

    python bench/soak.py                          # asyncio, 10 minutes
    python bench/soak.py --backend trio
    python bench/soak.py --minutes 2 --sample 10  # a quick one
    python bench/soak.py --json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from hive_orchestration import Runtime
from hive_orchestration.errors import SubscriberLaggedError
from hive_orchestration.messages.tasks import TaskStatus

GROWTH_GOAL = 20 * 2**20  # bytes over the run, after warm-up
TYPES = ("build", "test", "deploy")
CREATORS = 4
WORKERS = 8
PAYLOAD = "x" * 300
FINISHED = {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Counts:
    created: int = 0
    cancelled: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    plans: int = 0
    subscriptions: int = 0
    events_read: int = 0
    lagged: int = 0


@dataclass
class Sample:
    seconds: float
    rss: int
    counts: Counts


@dataclass
class Result:
    backend: str
    minutes: float
    warmup: float
    samples: list[Sample] = field(default_factory=list)

    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.seconds >= self.warmup]

    @property
    def growth(self) -> int:
        kept = self.after_warmup()
        return max(s.rss for s in kept) - kept[0].rss if kept else 0

    @property
    def slope(self) -> float:
        """Bytes per minute, least squares over the samples after warm-up."""
        kept = self.after_warmup()
        if len(kept) < 2:
            return 0.0
        xs = [s.seconds / 60 for s in kept]
        ys = [float(s.rss) for s in kept]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


class Load:
    def __init__(self, rt: Runtime, backlog: int, seed: int) -> None:
        self.rt = rt
        self.counts = Counts()
        self.room = anyio.Semaphore(backlog)  # a permit per unfinished task of the creators
        self.ours: set[str] = set()  # the creators' unfinished tasks
        self.random = random.Random(seed)

    def finished(self, task_id: str) -> None:
        if task_id in self.ours:
            self.ours.discard(task_id)
            self.room.release()

    async def creator(self, number: int) -> None:
        rt, rnd = self.rt, self.random
        n = 0
        while True:
            await self.room.acquire()
            n += 1
            key = f"c{number}-{n}" if n % 4 == 0 else None
            task_id = await rt.create_task(
                rnd.choice(TYPES),
                {"n": n, "blob": PAYLOAD},
                priority=rnd.randint(0, 5),
                idempotency_key=key,
                concurrency_key=f"k{n % 7}" if n % 10 == 0 else None,
                tags=["soak"],
            )
            self.ours.add(task_id)
            self.counts.created += 1
            if n % 50 == 0:
                task = await rt.get_task(task_id)
                if task is not None and task.status is TaskStatus.QUEUED:
                    await rt.cancel_task(task_id, reason="soak")
                    self.counts.cancelled += 1
                    self.finished(task_id)

    async def worker(self, number: int) -> None:
        rt, rnd = self.rt, self.random
        name = f"worker-{number}"
        while True:
            claim = await rt.claim_task(name, TYPES, lease=60, wait=5.0)
            if claim is None:
                continue
            try:
                await rt.start_task(claim.lease)
                roll = rnd.random()
                if roll < 0.85:
                    await rt.complete_task(claim.lease, {"ok": True})
                    self.counts.completed += 1
                    self.finished(claim.task.id)
                    continue
                task = await rt.fail_task(claim.lease, "soak failure", retryable=roll < 0.97)
            except Exception as exc:  # cancelled while claimed: its end is someone else's
                if type(exc).__name__ not in ("LeaseLostError", "IllegalTransitionError"):
                    raise
                self.finished(claim.task.id)
                continue
            if task.status in FINISHED:
                self.counts.failed += 1
                self.finished(task.id)
            else:
                self.counts.retried += 1

    async def planner(self) -> None:
        rt = self.rt
        while True:
            subtasks = []
            for layer in range(3):
                for i in range(4):
                    subtask: dict[str, object] = {"id": f"s{layer}-{i}", "task_type": "build"}
                    if layer:
                        subtask["dependencies"] = [
                            f"s{layer - 1}-{i}",
                            f"s{layer - 1}-{(i + 1) % 4}",
                        ]
                    subtasks.append(subtask)
            plan_id = await rt.create_execution_plan({"title": "soak", "subtasks": subtasks})
            await rt.mark_plan_execution_started(plan_id)
            await rt.wait_for_plan(plan_id)
            self.counts.plans += 1

    async def visitors(self) -> None:
        """A subscriber every 0.2 s that reads a little and leaves."""
        while True:
            async with self.rt.subscribe("task.*") as subscription:
                self.counts.subscriptions += 1
                with anyio.move_on_after(0.1):
                    for _ in range(50):
                        await subscription.receive()
                        self.counts.events_read += 1
            await anyio.sleep(0.2)

    async def laggard(self, tg: TaskGroup) -> None:
        """A subscriber that never reads, every 20 s (each is dropped when it overflows),
        and one whose filter nothing matches, held for the same time."""
        while True:
            async with (
                self.rt.subscribe("*", buffer=100, overflow="error") as stuck,
                self.rt.subscribe("task.*", task_id="no-such-task"),
            ):
                self.counts.subscriptions += 2
                await anyio.sleep(20)
                try:
                    with anyio.move_on_after(1):
                        while True:  # what it holds, then the lag it was dropped for
                            await stuck.receive()
                except SubscriberLaggedError:
                    self.counts.lagged += 1

    async def follower(self) -> None:
        cursor = await self.rt.last_seq()
        while True:
            page = await self.rt.read_events(cursor, limit=500)
            self.counts.events_read += len(page)
            if page:
                cursor = page[-1].seq
            else:
                await anyio.sleep(0.5)


async def soak(backend: str, minutes: float, sample: float, warmup: float, backlog: int) -> Result:
    result = Result(backend, minutes, warmup)
    with tempfile.TemporaryDirectory(prefix="hive-soak-") as folder:
        async with Runtime.open(Path(folder) / "soak.db") as rt:
            load = Load(rt, backlog, seed=7)
            async with anyio.create_task_group() as tg:
                for c in range(CREATORS):
                    tg.start_soon(load.creator, c)
                for w in range(WORKERS):
                    tg.start_soon(load.worker, w)
                tg.start_soon(load.planner)
                tg.start_soon(load.visitors)
                tg.start_soon(load.laggard, tg)
                tg.start_soon(load.follower)
                began = time.monotonic()
                end = began + minutes * 60
                while True:
                    now = time.monotonic()
                    result.samples.append(Sample(now - began, rss(), Counts(**asdict(load.counts))))
                    print(render_sample(result.samples[-1]), flush=True)
                    if now >= end:
                        break
                    await anyio.sleep(min(sample, end - now))
                tg.cancel_scope.cancel()
    return result


def render_sample(s: Sample) -> str:
    c = s.counts
    return (
        f"{s.seconds:7.0f} s  RSS {s.rss / 2**20:7.1f} MiB  created {c.created:,}  "
        f"completed {c.completed:,}  retried {c.retried:,}  failed {c.failed:,}  "
        f"cancelled {c.cancelled:,}  plans {c.plans:,}  subscriptions {c.subscriptions:,}  "
        f"lagged {c.lagged:,}"
    )


def render(r: Result) -> str:
    ok = r.growth < GROWTH_GOAL
    last = r.samples[-1]
    rate = last.counts.created / last.seconds if last.seconds else 0.0
    return "\n".join(
        [
            f"soak, {r.backend}: {r.minutes:g} minutes, {rate:,.0f} tasks/s created",
            f"RSS after warm-up ({r.warmup:g} s): {r.after_warmup()[0].rss / 2**20:.1f} MiB,"
            f" at the end {last.rss / 2**20:.1f} MiB",
            f"growth after warm-up: {r.growth / 2**20:.1f} MiB (goal < 20 MiB: "
            f"{'met' if ok else 'NOT met'}), slope {r.slope / 2**20:+.2f} MiB/minute",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of warm-up")
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.warmup >= args.minutes * 60:
        parser.error("--warmup must be shorter than the run")
    result = anyio.run(
        soak,
        args.backend,
        args.minutes,
        args.sample,
        args.warmup,
        args.backlog,
        backend=args.backend,
    )
    print(render(result))
    if args.json:  # the same figures, for a machine
        print(json.dumps({**asdict(result), "growth": result.growth, "slope": result.slope}))


if __name__ == "__main__":
    main()
