"""Every benchmark runs, on both backends, at a size small enough for the suite.

The figures are not judged here (speed is for ``bench/`` runs on a quiet machine): these
tests only keep the scripts working as the package under them changes, since they reach
into its internals (statement builders, the storage driver) to build their ceilings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def _tasks(figures: dict[str, Any]) -> None:
    count = figures["tasks"]
    for shape in figures["shapes"]:
        assert shape["rate"] > 0
        # One subscriber saw every event: created, assigned, started, completed.
        assert shape["events_seen"] == 4 * count
        # CPU per task: the loop's thread is part of the process.
        assert 0 < shape["loop_cpu"] <= shape["process_cpu"]
        assert len(shape["collections"]) == 3
    assert figures["raw_batched"] > 0
    assert figures["handoffs"] == 10
    assert 0 < figures["p50"] <= figures["p99"]
    assert figures["floor_p50"] > 0


def _agents(figures: dict[str, Any]) -> None:
    assert [shape["copies"] for shape in figures["shapes"]] == [2]
    for shape in figures["shapes"]:
        assert shape["bare"]["rate"] > 0
        assert shape["runner"]["rate"] > 0


def _plans(figures: dict[str, Any]) -> None:
    assert figures["subtasks"] == 3 * 4
    for shape in figures["shapes"]:
        assert shape["plan"]["items"] == figures["subtasks"]
        assert shape["overhead"] > 0


def _workers(figures: dict[str, Any]) -> None:
    assert figures["beats"] == 1_000  # 1 500 asked: rounded down to one beat per worker
    assert figures["runtime"] > 0
    assert figures["raw_per_commit"] > 0


def _kernel(figures: dict[str, Any]) -> None:
    # Three ask rows, three raw sqlite3 rows, three writer counts per storage driver
    # (both drivers on asyncio, the thread one on trio).
    assert len(figures["rows"]) == (12 if figures["backend"] == "asyncio" else 9)
    assert all(row["rate"] > 0 for row in figures["rows"])


def _inputs(figures: dict[str, Any]) -> None:
    assert figures["size_mib"] == 2
    assert len(figures["rows"]) == 6  # five payload shapes and a call_json request
    assert all(row["refusal_ms"] > 0 and row["stall_ms"] > 0 for row in figures["rows"])
    assert set(figures["at_the_limit_ms"]) == {"numbers", "one-item lists", "one-member objects"}


def _remote(figures: dict[str, Any]) -> None:
    assert (figures["tasks"], figures["clients"], figures["calls"]) == (80, 2, 20)
    assert [shape["slots"] for shape in figures["shapes"]] == [1, 16]
    for shape in figures["shapes"]:
        assert shape["local_rate"] > 0
        assert shape["remote_rate"] > 0
        assert shape["local_commits"] > 0
        assert shape["remote_commits"] > 0
    assert [found["op"] for found in figures["latencies"]] == ["get_task", "create_task"]
    for found in figures["latencies"]:
        assert 0 < found["local_p50"] <= found["local_p99"]
        assert 0 < found["remote_p50"] <= found["remote_p99"]
    assert 0 < figures["echo_p50"] <= figures["echo_p99"]
    assert figures["connections"] == 20


def _soak(figures: dict[str, Any]) -> None:
    samples = figures["samples"]
    assert len(samples) >= 3  # at 0 s, every second, and at the end
    assert all(sample["rss"] > 0 for sample in samples)
    last = samples[-1]["counts"]
    assert last["created"] > 0
    assert last["completed"] > 0
    assert figures["growth"] >= 0


def _peers(figures: dict[str, Any]) -> None:
    assert (figures["tasks"], figures["handoffs"]) == (100, 10)
    [one_round] = figures["rounds"]
    assert one_round["huey_sequential"] > 0
    assert one_round["huey_concurrent"] > 0
    [hive] = one_round["hive"]
    for rate in ("sequential", "concurrent", "batched", "batched_each"):
        assert hive[rate] > 0
    assert hive["commits_per_task"] > 0
    assert 0 < hive["handoff_p50"] <= hive["handoff_p99"]
    assert hive["floor_p50"] > 0


def _reads(figures: dict[str, Any]) -> None:
    assert figures["tasks"] == 300
    assert figures["events"] >= 4 * 300
    assert figures["read_rows"] >= 300
    assert figures["alone"]["calls"] > 0
    assert set(figures["empty_reads"]) == {
        "pattern nothing.*",
        "exact nothing.here",
        "pattern *.nothing",
        "unknown task_id",
    }


#: Where reads.py keeps its small database between the suite's runs.
_READS_CACHE = str(Path(tempfile.gettempdir()) / "hive-bench-reads-suite")


def _retention(figures: dict[str, Any]) -> None:
    assert figures["tasks"] == 300
    assert figures["purged"] == 300  # every bench task, not the writer's own
    assert figures["alone"]["calls"] > 0
    assert figures["trimmed_through"] > 0
    assert figures["free_pages"] > 0  # freed, kept for reuse: the runtime does not vacuum


def _metrics(figures: dict[str, Any]) -> None:
    assert figures["tasks"] == 100
    for shape in figures["shapes"]:
        assert [r["off"] > 0 and r["on"] > 0 and r["scrapes"] >= 1 for r in shape["rounds"]] == [
            True
        ]


def _scale(figures: dict[str, Any]) -> None:
    assert (figures["tasks"], figures["claims"]) == (300, 50)
    for run in figures["runs"]:
        assert run["open_seconds"] > 0
        assert run["rss_after_open_mb"] > 0
        assert 0 < run["claim_p50"] <= run["claim_p99"] <= run["claim_max"]


def _handoff(figures: dict[str, Any]) -> None:
    assert figures["handoffs"] == 10
    stages = figures["stages_p50_us"]
    # Every stage of the hand-off was stamped (each p50 is taken on its own, so under
    # load two neighbours may come out of order).
    assert set(stages) == {
        *("tm_batch", "commit", "driver", "tx_start", "tx_end", "back", "answered"),
        *("tm_done", "producer", "claimer"),
    }
    assert all(value > 0 for value in stages.values())
    assert figures["floor_p50_us"] > 0


def _msgpack_walk(figures: dict[str, Any]) -> None:
    shapes = figures["shapes"]
    assert len(shapes) >= 10
    # Of about 64 KiB each: many small values, a single string.
    assert all(0.9 * 65536 < shape["bytes"] <= 65536 for shape in shapes.values())
    assert all(shape["seconds"] >= 0 for shape in shapes.values())
    assert all(shape["paced_seconds"] >= 0 for shape in shapes.values())
    assert shapes["small ints [0, 0, ...]"]["counted"] > 16 * 65000  # its place and itself
    assert not shapes["one string"]["over"]


RUNS: dict[str, tuple[list[str], Callable[[dict[str, Any]], None] | None]] = {
    "handoff.py": (["--handoffs", "10", "--json"], _handoff),
    "tasks.py": (["--tasks", "100", "--handoffs", "10", "--json"], _tasks),
    "agents.py": (["--tasks", "100", "--copies", "2", "--json"], _agents),
    "plans.py": (["--layers", "3", "--width", "4", "--json"], _plans),
    "workers.py": (["--beats", "1500", "--json"], _workers),
    "kernel.py": (["--asks", "300", "--repeat", "1", "--scale", "0.02", "--json"], _kernel),
    "client.py": (
        ["--events", "200", "--fanout-events", "100", "--subscribers", "5,10", "--repeat", "1"],
        None,
    ),
    "inputs.py": (["--size", "2", "--repeat", "1", "--json"], _inputs),
    "msgpack_walk.py": (["--size", "65536", "--repeat", "1", "--json"], _msgpack_walk),
    "metrics.py": (["--tasks", "100", "--repeat", "1", "--json"], _metrics),
    "soak.py": (["--minutes", "0.05", "--sample", "1", "--warmup", "1", "--json"], _soak),
    "peers.py": (["--tasks", "100", "--handoffs", "10", "--repeat", "1", "--json"], _peers),
    "reads.py": (
        ["--tasks", "300", "--seconds", "0.3", "--repeat", "1", "--cache", _READS_CACHE, "--json"],
        _reads,
    ),
    "scale.py": (["--tasks", "300", "--claims", "50", "--json"], _scale),
    "retention.py": (
        ["--tasks", "300", "--seconds", "0.3", "--cache", _READS_CACHE, "--json"],
        _retention,
    ),
    "remote.py": (
        # Two client processes, not eight: each is a Python start and import (~0.35 s of
        # CPU), the most of the script's cost at this size (measured at load ~9: 6.7 s of
        # CPU with eight, each of the two shapes starting eight).
        [
            *("--tasks", "80", "--clients", "2", "--calls", "20", "--connections", "20"),
            *("--repeat", "1", "--json"),
        ],
        _remote,
    ),
}


def test_every_bench_is_covered() -> None:
    assert {path.name for path in BENCH.glob("*.py")} == {
        *RUNS,
        "nodes.py",
        "plan_nodes.py",
        "pg_writes.py",
        "pg_sweep.py",
    }


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("script", sorted(RUNS))
def test_bench_runs(script: str, backend: str) -> None:
    args, check = RUNS[script]
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--backend", backend, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if check is None:  # client.py prints a table only
        assert [line.split()[0] for line in result.stdout.splitlines()] == [
            "events:",
            "replay",
            "live",
            "fan-out",
            "subscribers",
            "5",
            "10",
        ]
        return
    # The human-readable table, then the same figures as JSON.
    figures = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert figures["backend"] == backend
    check(figures)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_tasks_bench_runs_the_batch_calls_alone(backend: str) -> None:
    args = ["--backend", backend, "--tasks", "200", "--batch-only", "--json"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "tasks.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    each, batch = figures["shapes"]
    assert each["batched"]
    assert batch["batched"]
    assert (each["batch_completions"], batch["batch_completions"]) == (False, True)
    for shape in (each, batch):
        assert shape["events_seen"] == 4 * 200
        assert 0 < shape["loop_cpu"] <= shape["process_cpu"]
    assert figures["raw_batched"] is None
    assert figures["p50"] is None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nodes_bench_runs(backend: str, pg_url: str) -> None:
    """bench/nodes.py on the session's PostgreSQL server (it makes its databases there).
    A second node on one database is refused until several nodes may share one: that
    shape is then reported as not available, and the run goes on. What does not depend
    on the event loop (the second node, the peers: asyncio libraries) runs with asyncio
    only; a peer not installed is reported, not failed."""
    first = backend == "asyncio"
    peers = "1x10" if first else ""
    args = ["--tasks", "100", "--nodes", "1,2" if first else "1", "--workers", "2"]
    args += ["--pgqueuer", peers, "--procrastinate", peers, "--keep-databases", "--json"]
    args += ["--waits"] if first else []
    result = subprocess.run(
        [sys.executable, str(BENCH / "nodes.py"), "--backend", backend, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HIVE_BENCH_PG": pg_url},
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert (figures["backend"], figures["tasks"]) == (backend, 100)
    shapes = {(shape["system"], shape["name"]): shape for shape in figures["shapes"]}
    one = shapes["hive", "1 node"]
    assert one["rate"] > 0
    assert one["error"] is None
    assert one["runs_per_node"] == {"node0": 100}  # one run per task: none twice, none lost
    assert one["commits"] > 0
    assert one["cpu"]["node0"] > 0
    assert one["cpu"]["postgres"] > 0  # the server's processes were found and read
    if first:  # --waits: pg_stat_activity was read while the shape ran
        assert one["wait_samples"] > 0
        for key, mean in one["waits"].items():
            kind, state = key.split(" ")
            assert kind, key
            assert state == "CPU" or ":" in state, key
            assert 0 < mean <= 64, (key, mean)
    else:
        assert (one["wait_samples"], one["waits"]) == (0, {})
    if first:
        two = shapes["hive", "2 nodes"]
        if two["rate"] is None:  # one runtime per database: the second node is refused
            assert "node 2 of 2 refused" in two["error"]
        else:
            assert sum(two["runs_per_node"].values()) == 100
    peer_shapes = [shape for shape in figures["shapes"] if shape["system"] != "hive"]
    assert [shape["system"] for shape in peer_shapes] == (
        ["pgqueuer", "procrastinate"] if first else []
    )
    for shape in peer_shapes:
        if shape["rate"] is None:
            assert "not installed" in shape["error"]
        else:
            assert shape["rate"] > 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_plan_nodes_bench_runs(backend: str, pg_url: str) -> None:
    """bench/plan_nodes.py, tiny, once without the cache of plans driven elsewhere and
    once with it (it makes a database per run beside the session's)."""
    args = ["--backend", backend, "--url", pg_url, "--plans", "2", "--width", "3"]
    args += ["--depth", "2", "--workers", "1", "--compare"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "plan_nodes.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [run["cache"] for run in runs] == [False, True]
    for run in runs:
        assert run["subtasks"] == 12
        assert run["subtasks_per_s"] > 0
    # Without the cache each end of a subtask is asked about by the two other nodes, at
    # most (a node that has already seen the plan end does not ask: CI saw 23 once).
    assert 12 <= runs[0]["take_plan_requests"] <= 2 * 12
    assert runs[1]["take_plan_requests"] <= runs[0]["take_plan_requests"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pg_writes_bench_runs(backend: str, pg_url: str) -> None:
    """bench/pg_writes.py, tiny, on the session's PostgreSQL server (it makes and drops a
    database there): every task done, its CPU split printed."""
    result = subprocess.run(
        [sys.executable, str(BENCH / "pg_writes.py"), "--backend", backend, "--tasks", "150"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HIVE_BENCH_PG": pg_url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"150 tasks, 6 workers, {backend}:")
    assert "event loop" in result.stdout
    assert "writer backend" in result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pg_sweep_bench_runs(backend: str, pg_url: str) -> None:
    """bench/pg_sweep.py, tiny, on the session's PostgreSQL server: the sweep takes the
    tasks moved by SQL as read and keeps every queued task held."""
    result = subprocess.run(
        [
            *(sys.executable, str(BENCH / "pg_sweep.py"), "--backend", backend),
            *("--queues", "2", "--tasks", "40", "--sweeps", "3", "--changed", "5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HIVE_BENCH_PG": pg_url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 queues x 40 tasks (80 held), 5 changed a sweep:")
    assert "loop CPU median" in result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_tasks_bench_runs_the_batch_completions_alone(backend: str) -> None:
    # The shape a count of instructions runs (under valgrind, with claims waiting long).
    args = ["--backend", backend, "--tasks", "200", "--completions-only", "--claim-wait", "30"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "tasks.py"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    (shape,) = figures["shapes"]
    assert (shape["batched"], shape["batch_completions"]) == (True, True)
    assert shape["events_seen"] == 4 * 200
    assert figures["raw_batched"] is None
