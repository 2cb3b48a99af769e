"""Benchmark of the client's event delivery, each figure against a ceiling measured in the
same run.

1. Replay: ``client.events(after=0)`` reading ``--events`` durable events of the log
   (published beforehand) until the last one, against the ceiling of the same rows read
   with raw ``sqlite3`` (one ``SELECT`` over the ``events`` table, rows turned into
   tuples). Ratio: raw time / client time (1.0 = as fast as raw SQLite).
2. Live callbacks: a callback subscription (``client.on_event``) receiving events
   published by 16 concurrent publishers, from the first publish to the callback seeing
   the last event, against the same publishers' time with no subscriber at all: the
   delivery's share of publishing. Ratio: publish-only time / publish-with-callback time.
3. Fan-out per event, against a bare anyio memory channel: the callback's cost per event
   from 2. beside a ``send``/``receive`` pair on a memory object stream, the floor of any
   in-process delivery.

Run from the repository root::

    python bench/client.py                  # asyncio
    python bench/client.py --backend trio
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import anyio

from hive_orchestration import Event, Runtime, RuntimeConfig

PUBLISHERS = 16


async def _publish(runtime: Runtime, count: int) -> None:
    async def publisher(start: int) -> None:
        for i in range(start, count, PUBLISHERS):
            await runtime.publish("bench.step", {"i": i})

    async with anyio.create_task_group() as tg:
        for start in range(PUBLISHERS):
            tg.start_soon(publisher, start)


async def _replay(path: str, count: int) -> tuple[float, float]:
    async with Runtime.open(path, config=RuntimeConfig(synchronous="NORMAL")) as runtime:
        await _publish(runtime, count)
        client = runtime.client()
        last = await client.last_seq()
        started = time.perf_counter()
        async with client.events(after=0) as stream:
            async for event in stream:
                if event.seq == last:
                    break
        replay = time.perf_counter() - started
    started = time.perf_counter()
    connection = sqlite3.connect(path)
    rows = connection.execute(
        "SELECT seq, type, timestamp, source, correlation_id, task_id, plan_id, worker_id,"
        " data FROM events ORDER BY seq"
    ).fetchall()
    connection.close()
    raw = time.perf_counter() - started
    assert len(rows) == count
    return raw, replay


async def _live(path: str, count: int, with_callback: bool) -> float:
    async with Runtime.open(path, config=RuntimeConfig(synchronous="NORMAL")) as runtime:
        done = anyio.Event()
        seen = 0

        def callback(event: Event) -> None:
            nonlocal seen
            seen += 1
            if seen == count:
                done.set()

        if with_callback:
            await runtime.client().on_event("bench.*", callback)
        started = time.perf_counter()
        await _publish(runtime, count)
        if with_callback:
            await done.wait()
        return time.perf_counter() - started


async def _channel(count: int) -> float:
    send, receive = anyio.create_memory_object_stream[int](1000)
    started = time.perf_counter()
    async with send, receive, anyio.create_task_group() as tg:

        async def consume() -> None:
            for _ in range(count):
                await receive.receive()

        tg.start_soon(consume)
        for i in range(count):
            await send.send(i)
    return time.perf_counter() - started


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        raw, replay = await _replay(str(Path(folder) / "replay.db"), count)
        bare = await _live(str(Path(folder) / "bare.db"), count, with_callback=False)
        with_callback = await _live(str(Path(folder) / "callback.db"), count, True)
    channel = await _channel(count)
    print(f"events: {count}")
    print(
        f"replay    client.events(after=0): {count / replay:>10,.0f} events/s"
        f"   raw sqlite3: {count / raw:>10,.0f} events/s   ratio {raw / replay:.2f}"
    )
    print(
        f"live      publish + callback:     {count / with_callback:>10,.0f} events/s"
        f"   publish only: {count / bare:>8,.0f} events/s   ratio {bare / with_callback:.2f}"
    )
    extra = max(with_callback - bare, 0.0) / count * 1e6
    print(
        f"fan-out   callback cost per event: {extra:.1f} us"
        f"   bare anyio channel send+receive: {channel / count * 1e6:.1f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    anyio.run(main, args.events, backend=args.backend)
