"""How long the server's count of what a frame decodes into takes
(hive_orchestration/api/msgpack_cost.py, ``walk``), for hostile frames of the largest
size (16 MiB) of the shapes that cost it most: many small values, each a step of the
walk. The count runs on the server's event loop, before a call's arguments are decoded
(any call of more than 671 KB of arguments), so its time is time no other client is
served.

Each shape is walked with the budget a call of its size gets (64 MiB + 8 x its size):
the walk stops once over it. Prints, per shape: the frame's size, the cost counted (and
whether it is over the budget, so refused), the best of ``--repeat`` times (best, as
the machine's load only ever adds) of the walk in one go and of the server's paced walk
(``decoded_cost_paced``, which lets other tasks run every 64 KiB walked) alone, and the
longest the event loop went without a turn while the paced walk counted it, beside a
task that takes a turn as often as it can. Compare
two versions by running this at each, in turns, in the same period: on a loaded machine
the times drift by 2x.

Run from the repository root::

    python bench/msgpack_walk.py
    python bench/msgpack_walk.py --size 4194304 --repeat 5 --json

(``--backend``: the event loop of the paced walk.)
"""

from __future__ import annotations

import argparse
import json
import time

import anyio
import msgspec

from hive_orchestration.api.msgpack_cost import decoded_budget, decoded_cost_paced, walk


def shapes(size: int) -> dict[str, bytes]:
    """Values of about ``size`` bytes once encoded, each many small values."""
    n = size
    return {
        "small ints [0, 0, ...]": msgspec.msgpack.encode([0] * (n - 8)),
        "nil/true/false": msgspec.msgpack.encode([None, True, False] * ((n - 8) // 3)),
        "negative ints [-1, ...]": msgspec.msgpack.encode([-1] * (n - 8)),
        "arrays of 15 ints": msgspec.msgpack.encode([[1] * 15] * ((n - 8) // 16)),
        "arrays of 3 ints": msgspec.msgpack.encode([[1, 2, 3]] * ((n - 8) // 4)),
        "one-entry maps {0: 0}": msgspec.msgpack.encode([{0: 0}] * ((n - 8) // 3)),
        "a map of int keys": msgspec.msgpack.encode(
            dict.fromkeys(range(1 << 16, (1 << 16) + n // 6), 0)
        ),
        "empty maps [{}, ...]": msgspec.msgpack.encode([{}] * (n - 8)),
        # A run broken at once (found again in the paced walk's next slice), and no run.
        "[1000, None, None, ...]": msgspec.msgpack.encode([1000] + [None] * (n - 11)),
        "[1000, None, 1000, ...]": msgspec.msgpack.encode([1000, None] * ((n - 8) // 4)),
        "empty strings": msgspec.msgpack.encode([""] * (n - 8)),
        "uint8 [200, ...]": msgspec.msgpack.encode([200] * ((n - 8) // 2)),
        "floats": msgspec.msgpack.encode([1.5] * ((n - 8) // 9)),
        "one string": msgspec.msgpack.encode("x" * (n - 8)),
    }


async def longest_stall(data: bytes, budget: int) -> float:
    """The longest time between two turns of a task beside the paced walk of ``data``."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await anyio.lowlevel.checkpoint()
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        await decoded_cost_paced(data, budget)
        done = True
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024, help="bytes a frame")
    parser.add_argument("--repeat", type=int, default=3, help="walks a shape, best kept")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--json", action="store_true", help="the figures as JSON too")
    args = parser.parse_args()
    figures: dict[str, object] = {"backend": args.backend, "size": args.size, "shapes": {}}
    print(
        f"{'shape':28} {'bytes':>10} {'counted':>12} {'over':>5} {'best s':>8}"
        f" {'paced s':>8} {'paced: stall s':>14}"
    )
    for name, data in shapes(args.size).items():
        budget = decoded_budget(len(data))
        best = float("inf")
        counted = 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            counted = walk(data, budget)
            best = min(best, time.perf_counter() - start)
        over = "yes" if counted > budget else "no"
        paced = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            anyio.run(decoded_cost_paced, data, budget, backend=args.backend)
            paced = min(paced, time.perf_counter() - start)
        stall = anyio.run(longest_stall, data, budget, backend=args.backend)
        print(
            f"{name:28} {len(data):>10} {counted:>12} {over:>5} {best:>8.3f} {paced:>8.3f}"
            f" {stall:>14.4f}"
        )
        figures["shapes"][name] = {  # type: ignore[index]
            "bytes": len(data),
            "counted": counted,
            "over": counted > budget,
            "seconds": best,
            "paced_seconds": paced,
            "paced_stall_seconds": stall,
        }
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
