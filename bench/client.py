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
4. Many subscribers: the same 16 publishers publishing ``--fanout-events`` events with
   10, 100 and 1 000 plain subscriptions (``--subscribers``), 4 in 5 of them read by a
   task of their own and 1 in 5 never read (``overflow="drop"``: they stay subscribed),
   timed until every reader has its last event, against the same publishers with no
   subscriber, measured just before in the same run. Ratio: publish-only time / time
   with subscribers. Two shapes:

   - ``spread``: each subscription watches one topic of its own, as an agent watches its
     own work (a third by exact type ``fan.<i>.step``, a third by prefix ``fan.<i>.*``, a
     third by ``*`` with ``correlation_id="c<i>"``); the events go round the topics, so
     each goes to one subscription. This is what matching costs: with every subscription
     tested per event it falls with the number of subscriptions.
   - ``all``: every subscription is ``*``, so every reader takes every event: the cost of
     waking that many tasks, which no index removes.

Run from the repository root::

    python bench/client.py                  # asyncio
    python bench/client.py --backend trio
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from hive_orchestration import Event, Runtime, RuntimeConfig
from hive_orchestration.api.embedded import Subscription

PUBLISHERS = 16


async def _publish(runtime: Runtime, count: int, topics: int = 0) -> None:
    """``count`` events from 16 publishers; with ``topics``, event i is of topic i % topics."""

    async def publisher(start: int) -> None:
        for i in range(start, count, PUBLISHERS):
            if topics:
                topic = i % topics
                await runtime.publish(f"fan.{topic}.step", {"i": i}, correlation_id=f"c{topic}")
            else:
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


async def _fan_out(path: str, count: int, subscribers: int, shape: str) -> float:
    """Seconds from the first publish until every reader has its last event
    (``subscribers=0``: until the last publish returns)."""
    async with Runtime.open(path, config=RuntimeConfig(synchronous="NORMAL")) as runtime:
        topics = max(subscribers, 1)
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            readers: list[tuple[Subscription, int]] = []
            for i in range(subscribers):
                reads = i % 5 != 4
                overflow = None if reads else "drop"
                if shape == "all":
                    subscribe = runtime.subscribe("*", overflow=overflow)
                    wanted = count
                else:
                    pattern, filters = [
                        (f"fan.{i}.step", {}),
                        (f"fan.{i}.*", {}),
                        ("*", {"correlation_id": f"c{i}"}),
                    ][i % 3]
                    subscribe = runtime.subscribe(pattern, overflow=overflow, **filters)
                    wanted = len(range(i, count, topics))
                subscription = await stack.enter_async_context(subscribe)
                if reads and wanted:
                    readers.append((subscription, wanted))
            done = anyio.Event()
            remaining = len(readers)

            async def read(subscription: Subscription, wanted: int) -> None:
                nonlocal remaining
                for _ in range(wanted):
                    await subscription.receive()
                remaining -= 1
                if not remaining:
                    done.set()

            for subscription, wanted in readers:
                tg.start_soon(read, subscription, wanted)
            started = time.perf_counter()
            await _publish(runtime, count, topics if shape == "spread" else 0)
            if readers:
                await done.wait()
            elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()
        return elapsed


async def main(count: int, fanout_events: int, subscriber_counts: list[int], repeat: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        raw, replay = await _replay(str(Path(folder) / "replay.db"), count)
        bare = await _live(str(Path(folder) / "bare.db"), count, with_callback=False)
        with_callback = await _live(str(Path(folder) / "callback.db"), count, True)
        fan_out: list[tuple[int, float, float, float]] = []
        runs = 0
        for subscribers in subscriber_counts:
            # Interleaved and best of ``repeat``: on a shared machine, the drift between
            # two runs is larger than many of the differences measured.
            times: dict[str, list[float]] = {"none": [], "spread": [], "all": []}
            for _ in range(repeat):
                for shape in times:
                    runs += 1
                    path = str(Path(folder) / f"fan{runs}.db")
                    n = 0 if shape == "none" else subscribers
                    times[shape].append(await _fan_out(path, fanout_events, n, shape))
            best = {shape: min(values) for shape, values in times.items()}
            fan_out.append((subscribers, best["none"], best["spread"], best["all"]))
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
    print(
        f"subscribers ({fanout_events} events, 4 in 5 read, best of {repeat};"
        " ratio to no subscriber):"
    )
    for subscribers, ceiling, spread, everyone in fan_out:
        rate = fanout_events / ceiling
        print(
            f"{subscribers:>6} subscribers   spread: {fanout_events / spread:>8,.0f} events/s"
            f" ratio {ceiling / spread:.2f}   all: {fanout_events / everyone:>8,.0f} events/s"
            f" ratio {ceiling / everyone:.2f}   no subscriber: {rate:>8,.0f} events/s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--fanout-events", type=int, default=2_000)
    parser.add_argument("--subscribers", default="10,100,1000", help="comma-separated counts")
    parser.add_argument("--repeat", type=int, default=3, help="fan-out runs of each shape")
    args = parser.parse_args()
    counts = [int(n) for n in args.subscribers.split(",")]
    anyio.run(main, args.events, args.fanout_events, counts, args.repeat, backend=args.backend)
