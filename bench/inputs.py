"""Benchmark of the input checks: how long an oversized request holds the event loop.

For each shape of an oversized payload (``--size`` MiB, 40 by default, against the default
1 MiB ``max_payload_bytes``), ``publish`` is called and refused while a ticker task sleeps
1 ms at a time: the refusal's time and the longest gap the ticker saw (the loop stall,
every actor included) are reported, best of ``--repeat``. Then the same for a ``call_json``
request of that size, and, for scale, the time to check a payload *at* the limit made of
the costliest values (what a refusal may cost at most: it reads no more than that).

Run from the repository root::

    python bench/inputs.py                  # asyncio
    python bench/inputs.py --backend trio
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec

from hive_orchestration import InvalidInputError, OrchestrationClient, Runtime
from hive_orchestration._validate import check_json_object, encode_json_object
from hive_orchestration.api.wire import call_json

MiB = 1024 * 1024


@dataclass
class Row:
    shape: str
    refusal_ms: float
    stall_ms: float


def shapes(size: int) -> dict[str, Callable[[], dict[str, object]]]:
    """Payloads of at least ``size`` bytes once encoded (shared values keep them cheap)."""
    return {
        "one huge string": lambda: {"blob": "x" * size},
        "one huge non-ASCII text": lambda: {"blob": "é" * (size // 2)},
        "huge list of small items": lambda: {"items": ["abcdef"] * (size // 9 + 1)},
        "wide object": lambda: {f"key-{i:07d}": "v" * 100 for i in range(size // 117 + 1)},
        "many lists, each under the limit": lambda: {"rows": [[0] * 10_000] * (size // 20_001 + 1)},
    }


async def ticker(gaps: list[float], started: anyio.Event) -> None:
    """Sleep 1 ms at a time, noting how long each sleep really took."""
    last = time.perf_counter()
    started.set()
    while True:
        await anyio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def stall_of(call: Callable[[], Awaitable[object]], repeat: int) -> tuple[float, float]:
    """Best time of ``call`` (which must be refused) and the longest gap a 1 ms ticker saw
    meanwhile, in milliseconds."""
    best_time = best_stall = float("inf")
    for _ in range(repeat):
        gaps: list[float] = []
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker, gaps, started)
            await started.wait()
            await anyio.sleep(0.01)
            gaps.clear()
            start = time.perf_counter()
            try:
                await call()
            except InvalidInputError:
                pass
            else:
                raise AssertionError("the oversized input was accepted")
            took = time.perf_counter() - start
            await anyio.sleep(0.01)  # the ticker's next wake-up measures the stall
            tg.cancel_scope.cancel()
        best_time = min(best_time, took)
        best_stall = min(best_stall, max(gaps))
    return best_time * 1000, best_stall * 1000


def at_the_limit() -> dict[str, dict[str, float]]:
    """Milliseconds to check a 1 MiB payload of the costliest values (``check``: the most
    a refusal may read), and to check, encode and copy it (``accept``: what taking it
    costs, the copy being msgspec's decoding)."""
    payloads = {
        "numbers": {"i": [7] * (MiB // 2 - 8)},
        "one-item lists": {"i": [[0] for _ in range(MiB // 4 - 8)]},
        "one-member objects": {"i": [{"a": 1} for _ in range(MiB // 8 - 8)]},
    }
    figures = {}
    for name, payload in payloads.items():
        assert len(msgspec.json.encode(payload)) <= MiB
        check = accept = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            check_json_object(
                payload, "data", max_bytes=MiB, max_depth=32, setting="max_payload_bytes"
            )
            check = min(check, time.perf_counter() - start)
            start = time.perf_counter()
            encode_json_object(payload, "data", max_bytes=MiB, max_depth=32)
            accept = min(accept, time.perf_counter() - start)
        figures[name] = {"check_ms": check * 1000, "accept_ms": accept * 1000}
    return figures


async def main(backend: str, size_mib: int, repeat: int, as_json: bool) -> None:
    size = size_mib * MiB
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        async with Runtime.open(Path(folder) / "inputs.db") as rt:
            for name, make in shapes(size).items():
                refusal, stall = await stall_of(partial(rt.publish, "big", make()), repeat)
                rows.append(Row(name, refusal, stall))
        async with OrchestrationClient(Path(folder) / "wire.db") as client:
            head = b'{"op": "create_task", "args": {"task_type": "t", "payload": {"i": ['
            raw = head + b"0," * (size // 2) + b"0]}}}"
            refusal, stall = await stall_of(partial(call_json, client, raw), repeat)
            rows.append(Row("call_json request of small values", refusal, stall))
    limit = at_the_limit()
    print(f"oversized payloads of {size_mib} MiB, refused against 1 MiB ({backend}):")
    for row in rows:
        refused = f"refused in {row.refusal_ms:8.3f} ms"
        print(f"  {row.shape:36} {refused}, loop stall {row.stall_ms:7.2f} ms")
    print("a 1 MiB payload at the limit: checked, and checked, encoded and copied:")
    for name, ms in limit.items():
        print(f"  {name:36} {ms['check_ms']:8.1f} ms {ms['accept_ms']:8.1f} ms")
    if as_json:
        figures: dict[str, Any] = {
            "backend": backend,
            "size_mib": size_mib,
            "rows": [asdict(row) for row in rows],
            "at_the_limit_ms": limit,
        }
        print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--size", type=int, default=40, help="MiB per oversized payload")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    anyio.run(main, args.backend, args.size, args.repeat, args.json, backend=args.backend)
