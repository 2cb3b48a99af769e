"""Durability across SIGKILL: every acknowledged publish survives a killed process.

A child process (``tests/_writer.py``) publishes events from several concurrent tasks and
prints each acknowledged ``seq`` as soon as ``publish`` returns. The parent kills it with
SIGKILL while writes are in flight, reopens the database in-process, and checks that every
acknowledged event is there, unchanged, under the same ``seq``; that the log is contiguous;
and that no row is torn. Several rounds append to the same file, so each round also proves
that a reopened database continues its sequence right after the last durable event.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from _raw import is_postgres
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import Event, Runtime, RuntimeConfig

pytestmark = pytest.mark.anyio

WRITER = Path(__file__).with_name("_writer.py")
EVENT_TYPE = "durability.tick"
WRITERS = 6
#: Acknowledgements to see before each SIGKILL: one round per entry, on the same file.
KILL_AFTER = (250, 1, 600)
#: Generous bound on one round, so that a hung child fails the test instead of CI.
ROUND_DEADLINE = 60.0
ID_RE = re.compile(r"r(\d+)-w(\d+)-(\d+)")


@dataclass
class Round:
    ready_seq: int
    #: seq -> id of every event the child acknowledged, in the order it printed them.
    acks: dict[int, str] = field(default_factory=dict)


async def _read_line(stream: BufferedByteReceiveStream) -> str | None:
    """The next complete line, or None at end of output (a torn last line is dropped)."""
    try:
        return (await stream.receive_until(b"\n", 4096)).decode()
    except (anyio.EndOfStream, anyio.IncompleteRead):
        return None


def _child_output(message: str, stderr_path: Path) -> str:
    return f"{message}; child stderr:\n{stderr_path.read_text(errors='replace')}"


def _parse_ack(line: str) -> tuple[int, str]:
    seq_text, uid = line.split(" ")
    return int(seq_text), uid


async def _run_and_kill(
    db: str, synchronous: str, round_: int, kill_after: int, backend: str, stderr_path: Path
) -> Round:
    """Run one writer child, SIGKILL it after ``kill_after`` acks, return what it printed."""
    command = [
        sys.executable,
        str(WRITER),
        backend,
        db,
        synchronous,
        str(round_),
        str(WRITERS),
    ]
    with stderr_path.open("wb") as stderr:
        process: Process = await anyio.open_process(command, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        stream = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(ROUND_DEADLINE):
            first = await _read_line(stream)
            assert first is not None, _child_output("child exited before ready", stderr_path)
            assert first.startswith("ready "), _child_output(repr(first), stderr_path)
            result = Round(ready_seq=int(first.split(" ")[1]))
            while len(result.acks) < kill_after:
                line = await _read_line(stream)
                assert line is not None, _child_output(
                    f"child exited after {len(result.acks)} acks", stderr_path
                )
                seq, uid = _parse_ack(line)
                assert seq not in result.acks, f"seq {seq} acknowledged twice"
                result.acks[seq] = uid
            # Writers are still publishing: kill the child in the middle of their writes.
            os.kill(process.pid, signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            # Whatever it printed before dying was acknowledged too.
            while (line := await _read_line(stream)) is not None:
                seq, uid = _parse_ack(line)
                assert seq not in result.acks, f"seq {seq} acknowledged twice"
                result.acks[seq] = uid
        return result
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def _read_all(runtime: Runtime) -> list[Event]:
    events: list[Event] = []
    while True:
        page = await runtime.read_events(after=events[-1].seq if events else 0, limit=1000)
        if not page:
            return events
        events.extend(page)


def _check_event(event: Event) -> tuple[int, int, int]:
    """Check that a stored event is whole; returns its (round, writer, n)."""
    assert event.type == EVENT_TYPE
    data = event.data
    assert isinstance(data, dict)
    uid = data["id"]
    assert isinstance(uid, str)
    match = ID_RE.fullmatch(uid)
    assert match is not None, uid
    round_, writer, n = (int(part) for part in match.groups())
    assert (data["round"], data["writer"], data["n"]) == (round_, writer, n)
    assert event.correlation_id == uid
    assert event.source == f"writer-{writer}"
    assert event.task_id == f"task-{writer}"
    blob = data["blob"]
    assert isinstance(blob, str)
    assert len(blob) == 16 + (n * 977) % 9000
    assert hashlib.sha256(blob.encode()).hexdigest() == data["digest"], f"torn row {uid}"
    return round_, writer, n


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_acknowledged_events_survive_sigkill(
    anyio_backend: str, synchronous: str, db_path: str, tmp_path: Path
) -> None:
    durable_seq = 0
    acked: dict[int, str] = {}
    for round_, kill_after in enumerate(KILL_AFTER):
        result = await _run_and_kill(
            db_path,
            synchronous,
            round_,
            kill_after,
            anyio_backend,
            tmp_path / f"writer-{round_}.stderr",
        )
        # The reopened database continued right after the last durable event.
        assert result.ready_seq == durable_seq
        assert min(result.acks) > durable_seq
        acked.update(result.acks)

        if not is_postgres(db_path):  # PostgreSQL checks its own pages as it reads them
            with closing(sqlite3.connect(db_path)) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

        config = RuntimeConfig(synchronous=synchronous)  # type: ignore[arg-type]
        async with Runtime.open(db_path, config=config) as runtime:
            events = await _read_all(runtime)
            stats = await runtime.statistics()

        seqs = [event.seq for event in events]
        # Contiguous 1..max: nothing lost in the middle, nothing duplicated.
        assert seqs == list(range(1, len(seqs) + 1))
        assert stats.storage.last_seq == len(seqs)
        # Every acknowledged event is there, under the same seq.
        by_seq = {event.seq: event for event in events}
        missing = sorted(seq for seq in acked if seq not in by_seq)
        assert not missing, f"acknowledged events lost: {missing[:10]}"
        for seq, uid in acked.items():
            assert by_seq[seq].correlation_id == uid

        # Every stored row is whole, and each writer's events form a gap-free prefix in
        # seq order: a writer only publishes after its previous event was acknowledged.
        per_writer: dict[tuple[int, int], list[int]] = {}
        unacked: dict[tuple[int, int], list[int]] = {}
        for event in events:
            round_of, writer, n = _check_event(event)
            per_writer.setdefault((round_of, writer), []).append(n)
            if event.seq not in acked:
                unacked.setdefault((round_of, writer), []).append(n)
        for ns in per_writer.values():
            assert ns == list(range(len(ns)))
        # Committed but killed before its ack: only each writer's one in-flight event.
        for key, ns in unacked.items():
            assert ns == [per_writer[key][-1]], (key, ns)
        durable_seq = len(seqs)

    assert len(acked) >= sum(KILL_AFTER)
