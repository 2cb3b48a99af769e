"""Benchmark: what the Prometheus metrics cost the task path.

The task life cycle end to end (as ``bench/tasks.py`` shape 1 and 2: ``--tasks`` tasks
created, claimed, started and completed by 8 in-process workers on a file database at
``synchronous=FULL``, while one subscriber receives every ``task.*`` event), once with
the metrics off and once with them on
(``observe.metrics.watch``: a subscription folding every event into counters and
histograms) and a scraper reading ``/metrics`` every ``--scrape`` seconds (its reads:
``count_tasks``, a page of queued tasks, the workers, the plans, the runtime's
statistics). Off and on alternate, their order swapped each round, each on a fresh file;
the cost is 1 - (rate on / rate off), its median over the rounds. The process's CPU
time per task (every thread: the SQLite driver's too) is given beside it, on/off - 1:
other processes on a shared machine move it far less than the rate, so it shows what
the metrics cost when the rates are too noisy to. And, in the "on" rounds, the CPU the
metrics' own code took, as a share of the run's: the fold of each commit's events,
timed on its thread as it runs, and the scrapes made in the clock's span, each counted
at the CPU one scrape takes once the run is over (timed alone: a scrape's awaits let the
workers run, whose CPU a timer across them would count). The least noisy figure of the
three, since it is measured within one run.

Goal: cost under 5%.

Run from the repository root::

    python bench/metrics.py --backend asyncio --repeat 5
    python bench/metrics.py --backend trio --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.messages.events import Entry
from hive_orchestration.observe.metrics import Metrics, watch

WORKERS = 8
#: (slots per worker, concurrent creators)
SHAPES = [(1, 8), (16, 128)]
COST_GOAL = 0.05


@dataclass
class Round:
    off: float  # tasks/s
    on: float
    scrapes: int
    off_cpu: float = 0.0  # CPU seconds per task (the process, every thread)
    on_cpu: float = 0.0
    own: float = 0.0  # the metrics' own CPU, as a share of the "on" run's CPU


@dataclass
class Shape:
    slots: int
    producers: int
    rounds: list[Round]
    cost: float  # median of 1 - on/off
    cpu_cost: float = 0.0  # median of on_cpu/off_cpu - 1
    own: float = 0.0  # median of Round.own


@dataclass
class Result:
    backend: str
    tasks: int
    scrape_every: float
    shapes: list[Shape]


class _Own:
    """CPU seconds the metrics' code took in the clock's span."""

    counting = False
    seconds = 0.0


_fold = Metrics._fold


def _timed_fold(self: Metrics, entries: Sequence[Entry]) -> None:
    began = time.thread_time()
    _fold(self, entries)
    if _Own.counting:
        _Own.seconds += time.thread_time() - began


Metrics._fold = _timed_fold  # type: ignore[method-assign]


async def lifecycle(
    path: Path, count: int, slots: int, producers: int, scrape: float | None
) -> tuple[float, int, float, float]:
    """Tasks per second from the first create to the last completion; scrapes made;
    CPU seconds per task over the same span; the metrics' own share of that CPU."""
    config = RuntimeConfig(lease_timeout=60.0)
    async with Runtime.open(path, config=config) as rt:
        completed = 0
        last = 0.0
        last_cpu = 0.0
        scrapes = 0

        async def producer(first: int) -> None:
            for n in range(first, count, producers):
                await rt.create_task("bench", {"n": n})

        async def worker(name: str) -> None:
            nonlocal completed, last, last_cpu
            while completed < count:
                claim = await rt.claim_task(name, "bench", wait=1.0, start=True)
                if claim is None:
                    continue
                await rt.complete_task(claim.lease, {"ok": True})
                completed += 1
                if completed == count:
                    last = time.perf_counter()
                    last_cpu = time.process_time()
                    work.cancel_scope.cancel()

        async def scraper() -> None:
            nonlocal scrapes
            while True:
                await metrics.exposition()
                scrapes += 1
                await anyio.sleep(scrape or 1.0)

        async def subscriber() -> None:
            async with rt.subscribe("task.*", buffer=4 * count + 10) as events:
                subscribed.set()
                async for _ in events:
                    pass

        async def go() -> tuple[float, float, float]:
            outer.start_soon(subscriber)
            await subscribed.wait()
            start = time.perf_counter()
            start_cpu = time.process_time()
            _Own.seconds, _Own.counting = 0.0, True
            async with anyio.create_task_group() as group:
                nonlocal work
                work = group
                for w in range(WORKERS):
                    for _ in range(slots):
                        group.start_soon(worker, f"worker-{w}")
                for p in range(producers):
                    group.start_soon(producer, p)
                if scrape is not None:
                    group.start_soon(scraper)
            _Own.counting = False
            return count / (last - start), (last_cpu - start_cpu) / count, _Own.seconds

        work: anyio.abc.TaskGroup
        subscribed = anyio.Event()
        async with anyio.create_task_group() as outer:
            if scrape is None:
                rate, cpu, own = await go()
                own = 0.0
            else:
                async with watch(rt) as metrics:
                    rate, cpu, fold = await go()
                    # One more, after the clock stopped (a short run still scrapes once),
                    # timed alone: what each scrape of the run cost.
                    began = time.process_time()
                    await metrics.exposition()
                    each = time.process_time() - began
                    own = (fold + scrapes * each) / (cpu * count)
                    scrapes += 1
                    assert metrics.last_seq > 0
            outer.cancel_scope.cancel()
        return rate, scrapes, cpu, own


async def run(backend: str, count: int, repeat: int, scrape: float) -> Result:
    shapes = []
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
        n = 0
        for slots, producers in SHAPES:
            rounds = []
            for r in range(repeat):
                rates: dict[bool, tuple[float, int, float, float]] = {}
                for on in (False, True) if r % 2 == 0 else (True, False):
                    n += 1
                    path = Path(folder) / f"metrics-{n}.db"
                    rates[on] = await lifecycle(
                        path, count, slots, producers, scrape if on else None
                    )
                without, with_ = rates[False], rates[True]
                rounds.append(
                    Round(
                        without[0],
                        with_[0],
                        with_[1],
                        off_cpu=without[2],
                        on_cpu=with_[2],
                        own=with_[3],
                    )
                )
            cost = statistics.median(1 - r.on / r.off for r in rounds)
            cpu_cost = statistics.median(r.on_cpu / r.off_cpu - 1 for r in rounds)
            own = statistics.median(r.own for r in rounds)
            shapes.append(Shape(slots, producers, rounds, cost, cpu_cost, own))
    return Result(backend=backend, tasks=count, scrape_every=scrape, shapes=shapes)


def render(result: Result) -> str:
    lines = [
        f"backend: {result.backend}  ({result.tasks:,} tasks, {WORKERS} workers, file database,"
        f" synchronous=FULL; metrics on: events folded, /metrics scraped every"
        f" {result.scrape_every:g} s)"
    ]
    for shape in result.shapes:
        rounds = "; ".join(f"off {r.off:,.0f} on {r.on:,.0f}" for r in shape.rounds)
        verdict = "PASS" if shape.cost < COST_GOAL else "FAIL"
        lines.append(
            f"{shape.slots:>2} slot(s)/worker, {shape.producers:>3} creators: {rounds} tasks/s;"
            f" cost {shape.cost:+.1%} (median)  goal < {COST_GOAL:.0%} {verdict}"
        )
        cpu = "; ".join(
            f"off {r.off_cpu * 1e6:,.0f} on {r.on_cpu * 1e6:,.0f}" for r in shape.rounds
        )
        lines.append(f"{'':>30}CPU per task: {cpu} µs; cost {shape.cpu_cost:+.1%} (median)")
        own = "; ".join(f"{r.own:.1%}" for r in shape.rounds)
        verdict = "PASS" if shape.own < COST_GOAL else "FAIL"
        lines.append(
            f"{'':>30}the metrics' own CPU: {own}; {shape.own:.1%} (median)"
            f"  goal < {COST_GOAL:.0%} {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    result: Result = anyio.run(
        run, args.backend, args.tasks, args.repeat, args.scrape, backend=args.backend
    )
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
