"""Benchmark: what the Prometheus metrics cost the task path.

The task life cycle end to end (as ``bench/tasks.py`` shape 1 and 2: ``--tasks`` tasks
created, claimed, started and completed by 8 in-process workers on a file database at
``synchronous=FULL``, while one subscriber receives every ``task.*`` event), once with
the metrics off and once with them on
(``observe.metrics.watch``: a subscription folding every event into counters and
histograms) and a scraper reading ``/metrics`` every ``--scrape`` seconds (its reads:
``count_tasks``, a page of queued tasks, the workers, the plans, the runtime's
statistics). Off and on alternate, their order swapped each round, each on a fresh file;
the cost is 1 - (rate on / rate off), its median over the rounds.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.observe.metrics import watch

WORKERS = 8
#: (slots per worker, concurrent creators)
SHAPES = [(1, 8), (16, 128)]
COST_GOAL = 0.05


@dataclass
class Round:
    off: float  # tasks/s
    on: float
    scrapes: int


@dataclass
class Shape:
    slots: int
    producers: int
    rounds: list[Round]
    cost: float  # median of 1 - on/off


@dataclass
class Result:
    backend: str
    tasks: int
    scrape_every: float
    shapes: list[Shape]


async def lifecycle(
    path: Path, count: int, slots: int, producers: int, scrape: float | None
) -> tuple[float, int]:
    """Tasks per second from the first create to the last completion; scrapes made."""
    config = RuntimeConfig(lease_timeout=60.0)
    async with Runtime.open(path, config=config) as rt:
        completed = 0
        last = 0.0
        scrapes = 0

        async def producer(first: int) -> None:
            for n in range(first, count, producers):
                await rt.create_task("bench", {"n": n})

        async def worker(name: str) -> None:
            nonlocal completed, last
            while completed < count:
                claim = await rt.claim_task(name, "bench", wait=1.0, start=True)
                if claim is None:
                    continue
                await rt.complete_task(claim.lease, {"ok": True})
                completed += 1
                if completed == count:
                    last = time.perf_counter()
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

        async def go() -> float:
            outer.start_soon(subscriber)
            await subscribed.wait()
            start = time.perf_counter()
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
            return count / (last - start)

        work: anyio.abc.TaskGroup
        subscribed = anyio.Event()
        async with anyio.create_task_group() as outer:
            if scrape is None:
                rate = await go()
            else:
                async with watch(rt) as metrics:
                    rate = await go()
                    # One more, after the clock stopped: a short run still scrapes once.
                    await metrics.exposition()
                    scrapes += 1
                    assert metrics.last_seq > 0
            outer.cancel_scope.cancel()
        return rate, scrapes


async def run(backend: str, count: int, repeat: int, scrape: float) -> Result:
    shapes = []
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
        n = 0
        for slots, producers in SHAPES:
            rounds = []
            for r in range(repeat):
                rates: dict[bool, tuple[float, int]] = {}
                for on in (False, True) if r % 2 == 0 else (True, False):
                    n += 1
                    path = Path(folder) / f"metrics-{n}.db"
                    rates[on] = await lifecycle(
                        path, count, slots, producers, scrape if on else None
                    )
                rounds.append(Round(off=rates[False][0], on=rates[True][0], scrapes=rates[True][1]))
            cost = statistics.median(1 - r.on / r.off for r in rounds)
            shapes.append(Shape(slots, producers, rounds, cost))
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
