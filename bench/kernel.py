"""Benchmark of the actor kernel and the storage actor against their bare ceilings.

What is measured, all in one run on one backend (compare ratios, not absolute figures):

1. Ask round trips per second: one asker, sequential ``await ref.ask(Ping(n=i))`` to an
   echo actor under a :class:`Supervisor`, against a bare server task that reads
   ``(request, slot)`` pairs from an anyio memory stream and answers through an
   ``anyio.Event`` and a result slot (the fast request/reply pattern of MEASURED.md).
   Two bare ceilings are shown: ``await send`` (yields on every message) and ``send_nowait``
   (what ``ActorRef.ask`` itself uses to enqueue); the goal is judged against the faster.
2. Durable single-row writes per second through ``Runtime.publish`` (one INSERT into
   ``events``, answered after COMMIT) with 1, 10 and 100 concurrent writers, on a file
   database at ``synchronous=FULL``, against raw stdlib sqlite3 on the same table shape:
   (a) one commit per row and (b) 1000 rows per transaction, both WAL + synchronous=FULL
   (100 rows per transaction is shown for reference: 100 writers cannot batch more).
   On asyncio both storage drivers are measured (aiosqlite and thread); on trio, thread.

Goals (PASS/FAIL columns): with 100 writers the storage actor reaches >= 5x raw
one-commit-per-row and >= 25% of raw batched; ask reaches >= 0.5x the bare channel.

Run from the repository root::

    python bench/kernel.py                  # asyncio
    python bench/kernel.py --backend trio
    python bench/kernel.py --json           # the figures as JSON as well
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.runtime import Actor, ActorRef, ChildSpec, Request, Supervisor

ASK_GOAL = 0.5  # ask >= 0.5x the bare channel
ROW_GOAL = 5.0  # 100 writers >= 5x raw one-commit-per-row
BATCH_GOAL = 0.25  # 100 writers >= 25% of raw batched
WRITERS = {1: 3_000, 10: 10_000, 100: 20_000}  # concurrent writers -> total writes

EVENTS_TABLE = (
    "CREATE TABLE events (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, timestamp REAL NOT NULL,"
    " source TEXT NOT NULL, correlation_id TEXT, task_id TEXT, plan_id TEXT, worker_id TEXT,"
    " data TEXT NOT NULL DEFAULT '{}')"
)
INSERT = (
    "INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id, plan_id,"
    " worker_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class Row:
    """One line of the table."""

    name: str
    rate: float
    ratio: str = ""
    transactions: int | None = None
    writes: int | None = None
    largest_batch: int | None = None
    goal: str = ""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- 1. ask round trips ---------------------------------------------------------------------


class Ping(Request[int], frozen=True):
    n: int


class EchoActor(Actor[Ping]):
    async def receive(self, message: Ping) -> object:
        return message.n + 1


class Slot:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value = 0


async def bare_server(receive: ObjectReceiveStream[tuple[int, Slot]]) -> None:
    async with receive:
        async for n, slot in receive:
            slot.value = n + 1
            slot.event.set()


async def ask_ceiling(n: int, *, nowait: bool) -> float:
    """Bare request/reply; ``nowait`` enqueues with ``send_nowait`` as ``ActorRef.ask`` does."""
    send, receive = anyio.create_memory_object_stream[tuple[int, Slot]](1024)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bare_server, receive)
        async with send:
            start = time.perf_counter()
            for i in range(n):
                slot = Slot()
                if nowait:
                    send.send_nowait((i, slot))
                else:
                    await send.send((i, slot))
                await slot.event.wait()
                assert slot.value == i + 1
            elapsed = time.perf_counter() - start
    return n / elapsed


async def ask_kernel(n: int) -> float:
    ref: ActorRef[Ping] = ActorRef("echo", mailbox_size=1024, ask_timeout=30.0)
    sup = Supervisor(
        [ChildSpec(ref, EchoActor)], max_restarts=3, restart_window=10, shutdown_timeout=5
    )
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        start = time.perf_counter()
        for i in range(n):
            assert await ref.ask(Ping(n=i)) == i + 1
        elapsed = time.perf_counter() - start
        await sup.stop()
    return n / elapsed


# -- 2. durable writes --------------------------------------------------------------------


def raw_rows(start: int, count: int) -> list[tuple[object, ...]]:
    now = time.time()
    return [
        (start + i, "bench.write", now, "runtime", None, None, None, None, f'{{"i":{i}}}')
        for i in range(count)
    ]


def raw_sqlite(total: int, per_txn: int) -> float:
    """Raw sqlite3 inserts per second, WAL + synchronous=FULL, ``per_txn`` rows per commit."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(EVENTS_TABLE)
        rows = raw_rows(1, total)
        start = time.perf_counter()
        if per_txn == 1:
            for row in rows:
                conn.execute(INSERT, row)  # autocommit: one transaction, one fsync per row
        else:
            for lo in range(0, total, per_txn):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(INSERT, rows[lo : lo + per_txn])
                conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == total
        conn.close()
    return total / elapsed


async def runtime_writes(writers: int, total: int, driver: str) -> Row:
    """Durable single-row publishes per second through the storage actor."""
    per_writer = total // writers
    config = RuntimeConfig(synchronous="FULL", storage_driver=driver)  # type: ignore[arg-type]

    async def writer() -> None:
        for i in range(per_writer):
            await rt.publish("bench.write", {"i": i})

    with tempfile.TemporaryDirectory() as tmp:
        async with Runtime.open(Path(tmp) / "hive.db", config=config) as rt:
            await rt.publish("bench.warmup")
            before = (await rt.statistics()).storage
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(writers):
                    tg.start_soon(writer)
            elapsed = time.perf_counter() - start
            after = (await rt.statistics()).storage
    return Row(
        name=f"storage actor [{driver}] {writers:>3} writers",
        rate=per_writer * writers / elapsed,
        transactions=after.transactions - before.transactions,
        writes=after.writes - before.writes,
        largest_batch=after.largest_batch,
    )


# -- the run ------------------------------------------------------------------------------


async def run(backend: str, asks: int, repeat: int, scale: float = 1.0) -> list[Row]:
    """Every figure is the median of ``repeat`` runs; the ask variants are interleaved.
    ``scale`` multiplies every count of writes (the raw ones and the runtime's)."""
    samples: dict[str, list[float]] = {"awaited": [], "nowait": [], "kernel": []}
    for _ in range(repeat):
        samples["awaited"].append(await ask_ceiling(asks, nowait=False))
        samples["nowait"].append(await ask_ceiling(asks, nowait=True))
        samples["kernel"].append(await ask_kernel(asks))
    awaited, nowait, kernel = (statistics.median(samples[k]) for k in samples)
    ratio = kernel / max(awaited, nowait)  # the goal is judged against the faster ceiling
    rows = [
        Row("ask: bare, await send + Event", awaited),
        Row("ask: bare, send_nowait + Event", nowait),
        Row(
            "ask: kernel ActorRef.ask",
            kernel,
            f"{kernel / nowait:.3f}x nowait, {kernel / awaited:.3f}x send",
            goal=f">=0.5x {verdict(ratio >= ASK_GOAL)}",
        ),
    ]

    def scaled(total: int, step: int) -> int:
        """``total`` times ``scale``, a whole number of ``step``s (at least one)."""
        return max(step, round(total * scale / step) * step)

    def raw(total: int, per_txn: int) -> float:
        count = scaled(total, per_txn)
        return statistics.median(raw_sqlite(count, per_txn) for _ in range(repeat))

    per_row, per_100, batched = raw(5_000, 1), raw(50_000, 100), raw(200_000, 1000)
    rows.append(Row("raw sqlite3: 1 row per commit", per_row))
    rows.append(Row("raw sqlite3: 100 rows per commit", per_100))
    rows.append(Row("raw sqlite3: 1000 rows per commit", batched))

    drivers = ["aiosqlite", "thread"] if backend == "asyncio" else ["thread"]
    for driver in drivers:
        for writers, total in WRITERS.items():
            count = scaled(total, writers)
            runs = [await runtime_writes(writers, count, driver) for _ in range(repeat)]
            row = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]  # the median run
            row.ratio = (
                f"{row.rate / per_row:.1f}x row, {row.rate / batched:.1%} of 1000-batch, "
                f"{row.rate / per_100:.1%} of 100-batch"
            )
            if writers == 100:
                row.goal = (
                    f">=5x {verdict(row.rate >= ROW_GOAL * per_row)}, "
                    f">=25% {verdict(row.rate >= BATCH_GOAL * batched)}"
                )
            rows.append(row)
    return rows


def render(rows: list[Row], backend: str) -> str:
    header = ["measurement", "ops/s", "ratio", "txns", "writes/txn", "max batch", "goal"]
    table = [header]
    for row in rows:
        per_txn = ""
        if row.transactions and row.writes is not None:
            per_txn = f"{row.writes / row.transactions:.1f}"
        table.append(
            [
                row.name,
                f"{row.rate:,.0f}",
                row.ratio,
                "" if row.transactions is None else str(row.transactions),
                per_txn,
                "" if row.largest_batch is None else str(row.largest_batch),
                row.goal,
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {1, 3, 4, 5}  # numeric columns

    def fmt(line: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [
        f"backend: {backend}  (synchronous=FULL, file database, WAL; medians)",
        fmt(header),
        rule,
    ]
    lines += [fmt(line) for line in table[1:]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--asks", type=int, default=50_000, help="ask round trips per side")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the default counts of writes (the suite runs it small; at 1 a"
        " one-commit-per-row run alone is 5,000 fsyncs)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if not 0 < args.scale <= 1_000:
        parser.error("--scale: must be over 0 and at most 1000")

    rows: list[Row] = anyio.run(
        run, args.backend, args.asks, args.repeat, args.scale, backend=args.backend
    )
    print(render(rows, args.backend))
    if args.json:
        payload: dict[str, Any] = {"backend": args.backend, "rows": [asdict(r) for r in rows]}
        print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
