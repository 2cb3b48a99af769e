"""Benchmark of a runtime opened on a large backlog: a million queued tasks.

Issue 21's goal: with 1,000,000 queued tasks, ``Runtime.open`` is ready in under 1 s, the
process holds under 200 MB resident after the open, and ``claim_task`` answers in under
2 ms at p99.

1. The database: ``--tasks`` queued tasks (1,000,000), built once through the runtime's own
   batch ``create_tasks`` (so the rows, events and indexes are exactly the runtime's), in
   chunks of 1,000 from 4 concurrent producers at ``synchronous=NORMAL`` (only the build;
   the measurement runs at the default FULL). Cached under ``bench/.cache/`` (gitignored),
   keyed by the task count and the schema version, so a schema change builds a new one.
   Tasks spread over 4 priorities, one task type.
2. The measurement, in a fresh process, on a copy of the cached file (the measurement
   changes it): the time from calling ``Runtime.open`` to being inside it (ready), the
   resident memory (VmRSS) right after and at the end, then ``--claims`` claims (10,000)
   one after another, each ``claim_task(start=True)`` then ``complete_task``, with the
   latency of each claim (a claim is a durable commit: at FULL its fsync is most of it;
   ``--synchronous NORMAL`` shows the rest); then a few calls on tasks deep in the
   backlog, which a bounded memory does not hold: ``get_task``, ``cancel_task``,
   ``get_runs``, and one ``create_task``.

Run from the repository root::

    python bench/scale.py                       # 1,000,000 tasks, asyncio
    python bench/scale.py --tasks 100000 --backend trio
    python bench/scale.py --json           # the table, then the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.storage.sqlite.schema import SCHEMA_VERSION

OPEN_GOAL = 1.0  # seconds
RSS_GOAL = 200.0  # MB
CLAIM_P99_GOAL = 0.002  # seconds
CACHE = Path(__file__).resolve().parent / ".cache"
CHUNK = 1000
PRODUCERS = 4
PRIORITIES = 4


@dataclass
class Result:
    backend: str
    synchronous: str
    tasks: int
    open_seconds: float
    rss_after_open_mb: float
    rss_end_mb: float
    claims: int
    claim_mean: float
    claim_p50: float
    claim_p90: float
    claim_p99: float
    claim_max: float
    slowest_claim: int  # its place in the sequence (0: the first claim after the open)
    claims_over_2ms: int
    # The ceiling: one-row commits of bare sqlite3 (WAL, the same synchronous) in the
    # same folder, 1,000 before the open and 1,000 after the claims, so the machine's
    # fsync tail is measured beside the claims it sets the floor of.
    bare_p50: float
    bare_p99: float
    bare_max: float
    # The claims that overlapped a refill of the head (from its sending to its taking
    # in): how many, and their mean and slowest latency. A refill on the write connection
    # held up the claims behind its read; on a reader of its own they go on meanwhile.
    refills: int
    claims_in_refills: int
    claim_in_refill_mean: float
    claim_in_refill_max: float
    # CPU per claim (and its completion): the process's, and the event loop thread's;
    # what load delays but does not add to.
    cpu_per_claim: float
    loop_cpu_per_claim: float
    get_task: float  # seconds, one call on a task deep in the backlog
    cancel_task: float
    get_runs: float
    create_task: float


def database(count: int) -> Path:
    """The cached database with ``count`` queued tasks, built if missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"queued-{count}-v{SCHEMA_VERSION}.db"
    if not path.exists():
        # A partial file of this process's own: two runs may build at once (the suite's
        # workers do), and the rename is atomic.
        partial = path.with_suffix(f".building-{os.getpid()}")
        for stale in CACHE.glob(f"{partial.name}*"):
            stale.unlink()
        started = time.perf_counter()
        anyio.run(_build, partial, count)
        # A clean close checkpointed the WAL: the .db file alone is the database.
        partial.replace(path)
        Path(f"{partial}.lock").unlink(missing_ok=True)
        print(f"built {path.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


async def _build(path: Path, count: int) -> None:
    config = RuntimeConfig(synchronous="NORMAL", serve_socket=False)
    async with Runtime.open(path, config=config) as rt:

        async def producer(first: int) -> None:
            for start in range(first * CHUNK, count, PRODUCERS * CHUNK):
                end = min(start + CHUNK, count)
                await rt.create_tasks(
                    [
                        {
                            "task_type": "bulk",
                            "title": f"bulk {n}",
                            "payload": {"n": n},
                            "priority": n % PRIORITIES,
                        }
                        for n in range(start, end)
                    ]
                )

        async with anyio.create_task_group() as tg:
            for p in range(PRODUCERS):
                tg.start_soon(producer, p)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bare_commits(folder: Path, synchronous: str, count: int = 1000) -> list[float]:
    """Seconds of each of ``count`` one-row commits of plain sqlite3 in ``folder``."""
    import sqlite3

    folder.mkdir(exist_ok=True)
    conn = sqlite3.connect(folder / "bare.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        took = []
        for n in range(count):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {n}",))
            conn.execute("COMMIT")
            took.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return took


def _watch_refills() -> list[tuple[float, float]]:
    """Record each refill of a head: (sent, taken in), on the perf_counter clock (the
    TaskManager's own methods, wrapped: a probe, for this bench only)."""
    from hive_orchestration.actors.task_manager import TaskManager

    windows: list[tuple[float, float]] = []
    sent: dict[int, float] = {}
    send, take = TaskManager._send_refill, TaskManager._take_refill

    async def send_refill(self: Any, queues: Any) -> Any:
        began = time.perf_counter()
        refill = await send(self, queues)
        if refill is not None:
            sent[id(refill)] = began
        return refill

    async def take_refill(self: Any, refill: Any) -> bool:
        taken = await take(self, refill)
        began = sent.pop(id(refill), None)
        if began is not None:
            windows.append((began, time.perf_counter()))
        return taken

    setattr(TaskManager, "_send_refill", send_refill)  # noqa: B010 - a probe
    setattr(TaskManager, "_take_refill", take_refill)  # noqa: B010 - a probe
    return windows


async def _measure(path: Path, count: int, claims: int, backend: str, synchronous: str) -> Result:
    windows = _watch_refills()
    bare = bare_commits(path.parent / "bare-before", synchronous)
    config = RuntimeConfig(serve_socket=False, synchronous=synchronous)  # type: ignore[arg-type]
    # A task deep in the backlog (created last, lowest priority but one): no bounded head
    # of the queue holds it.
    deep = await _deep_task_ids(path)
    started = time.perf_counter()
    async with Runtime.open(path, config=config) as rt:
        opened = time.perf_counter() - started
        rss_open = _rss_mb()
        latencies = []
        starts = []
        cpu, loop_cpu = time.process_time(), time.thread_time()
        for _ in range(claims):
            t0 = time.perf_counter()
            claim = await rt.claim_task("bench-worker", "bulk", start=True)
            latencies.append(time.perf_counter() - t0)
            starts.append(t0)
            assert claim is not None
            await rt.complete_task(claim.lease, {"ok": True})
        cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        in_refills = [
            latency
            for began, latency in zip(starts, latencies, strict=True)
            if any(sent <= began + latency and began <= taken for sent, taken in windows)
        ]
        slowest = max(range(len(latencies)), key=latencies.__getitem__)
        latencies.sort()
        t0 = time.perf_counter()
        task = await rt.get_task(deep[0])
        get_task = time.perf_counter() - t0
        assert task is not None
        assert task.status.value == "queued", task
        t0 = time.perf_counter()
        await rt.cancel_task(deep[1], reason="bench")
        cancel_task = time.perf_counter() - t0
        t0 = time.perf_counter()
        await rt.get_runs(deep[0])
        get_runs = time.perf_counter() - t0
        t0 = time.perf_counter()
        await rt.create_task("bulk", {"n": -1})
        create_task = time.perf_counter() - t0
        rss_end = _rss_mb()
    bare = sorted(bare + bare_commits(path.parent / "bare-after", synchronous))
    return Result(
        backend=backend,
        synchronous=synchronous,
        tasks=count,
        open_seconds=opened,
        rss_after_open_mb=rss_open,
        rss_end_mb=rss_end,
        claims=claims,
        claim_mean=statistics.fmean(latencies),
        claim_p50=statistics.median(latencies),
        claim_p90=latencies[int(len(latencies) * 0.90)],
        claim_p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        claim_max=latencies[-1],
        slowest_claim=slowest,
        claims_over_2ms=sum(1 for latency in latencies if latency >= CLAIM_P99_GOAL),
        refills=len(windows),
        claims_in_refills=len(in_refills),
        claim_in_refill_mean=statistics.fmean(in_refills) if in_refills else 0.0,
        claim_in_refill_max=max(in_refills, default=0.0),
        cpu_per_claim=cpu / claims,
        loop_cpu_per_claim=loop_cpu / claims,
        bare_p50=statistics.median(bare),
        bare_p99=bare[int(len(bare) * 0.99)],
        bare_max=bare[-1],
        get_task=get_task,
        cancel_task=cancel_task,
        get_runs=get_runs,
        create_task=create_task,
    )


async def _deep_task_ids(path: Path) -> list[str]:
    """Two of the last tasks created at the lowest priority, read with plain sqlite3
    before the runtime opens (not counted)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT id FROM tasks WHERE status = 'queued' AND priority = 0"
            " ORDER BY created_at DESC LIMIT 2"
        ).fetchall()
    finally:
        conn.close()
    return [row[0] for row in rows]


def measure_in_child(path: Path, count: int, claims: int, backend: str, synchronous: str) -> Result:
    """Run the measurement in a fresh process, on a copy of the cached database."""
    with tempfile.TemporaryDirectory(prefix="hive-scale-", dir=CACHE) as folder:
        copy = Path(folder) / "copy.db"
        shutil.copyfile(path, copy)
        # On disk before the runtime opens it: else the first fsync of the file (the
        # first checkpoint's) writes the whole copy out, 250-400 ms inside a claim.
        with open(copy, "rb+") as written:
            os.fsync(written.fileno())
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(copy),
                "--tasks",
                str(count),
                "--claims",
                str(claims),
                "--backend",
                backend,
                "--synchronous",
                synchronous,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    return Result(**json.loads(out.stdout.strip().splitlines()[-1]))


def report(result: Result) -> str:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    excess = result.claims_in_refills * (result.claim_in_refill_mean - result.claim_mean)

    return "\n".join(
        [
            f"{result.tasks:,} queued tasks, {result.backend}, synchronous={result.synchronous}:",
            f"  open to ready      {result.open_seconds:8.3f} s    goal < {OPEN_GOAL:g} s"
            f"    {mark(result.open_seconds < OPEN_GOAL)}",
            f"  RSS after open     {result.rss_after_open_mb:8.1f} MB   goal < {RSS_GOAL:g} MB"
            f"  {mark(result.rss_after_open_mb < RSS_GOAL)}",
            f"  RSS at the end     {result.rss_end_mb:8.1f} MB",
            f"  claim p50          {result.claim_p50 * 1e3:8.3f} ms   ({result.claims:,}"
            " claims, each then completed)",
            f"  claim p90          {result.claim_p90 * 1e3:8.3f} ms",
            f"  claim p99          {result.claim_p99 * 1e3:8.3f} ms   goal < 2 ms"
            f"    {mark(result.claim_p99 < CLAIM_P99_GOAL)}",
            f"  claim max          {result.claim_max * 1e3:8.3f} ms   (claim"
            f" #{result.slowest_claim}; {result.claims_over_2ms:,} took 2 ms or more)",
            f"  bare sqlite3 commit p50 {result.bare_p50 * 1e3:.3f} ms, p99"
            f" {result.bare_p99 * 1e3:.3f} ms, max {result.bare_max * 1e3:.1f} ms"
            f" (the ceiling; claim p99 / bare p99 = {result.claim_p99 / result.bare_p99:.2f})",
            f"  during the {result.refills} refills of the head: {result.claims_in_refills}"
            f" claims, mean {result.claim_in_refill_mean * 1e3:.2f} ms,"
            f" max {result.claim_in_refill_max * 1e3:.1f} ms; their time past the mean"
            f" claim's ({result.claim_mean * 1e3:.2f} ms), all told:"
            f" {excess * 1e3:.0f} ms",
            f"  CPU per claim      {result.cpu_per_claim * 1e6:8.0f} us   (the event loop's"
            f" thread {result.loop_cpu_per_claim * 1e6:.0f} us; each claim then completed)",
            f"  get_task (deep)    {result.get_task * 1e3:8.3f} ms",
            f"  cancel_task (deep) {result.cancel_task * 1e3:8.3f} ms",
            f"  get_runs (deep)    {result.get_runs * 1e3:8.3f} ms",
            f"  create_task        {result.create_task * 1e3:8.3f} ms",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--claims", type=int, default=10_000)
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="asyncio")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = anyio.run(
            _measure,
            Path(args.child),
            args.tasks,
            args.claims,
            args.backend,
            args.synchronous,
            backend=args.backend,
        )
        print(json.dumps(asdict(result)))
        return
    path = database(args.tasks)
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    results = []
    for _ in range(args.repeat):
        for backend in backends:
            result = measure_in_child(path, args.tasks, args.claims, backend, args.synchronous)
            results.append(result)
            print(report(result), flush=True)
    load = os.getloadavg()
    print(f"load average: {' '.join(f'{x:.2f}' for x in load)}")
    if args.json:
        figures = {
            "backend": args.backend,
            "tasks": args.tasks,
            "claims": args.claims,
            "load_average": list(load),
            "runs": [asdict(r) for r in results],
        }
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
