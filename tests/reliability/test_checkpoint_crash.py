"""A process killed while its checkpoint thread copies the WAL loses nothing it
acknowledged (storage/sqlite/checkpoints.py).

A child (``_db_child.py checkpoints``) owns the database and creates tasks one after
another, printing each once durable, with its checkpoint thread checkpointing after
every commit (one page, no gap), so that a kill lands in a checkpoint as often as not.
Each round kills it with SIGKILL after a seeded random number of acknowledgements, and
the next round's child opens the file the kill left. At the end every acknowledged task
is there, the file passes ``PRAGMA integrity_check``, and the thread had checkpointed in
every round.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from pathlib import Path

import anyio
import pytest

from hive_orchestration import Runtime, RuntimeConfig

from ._children import child

pytestmark = pytest.mark.anyio

ROUNDS = 6


async def test_a_kill_during_checkpoints_loses_nothing_acknowledged(
    anyio_backend: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("HIVE_RELIABILITY_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    path = str(tmp_path / "ckpt.db")
    acked: list[str] = []
    for round_ in range(ROUNDS):
        async with child(
            "checkpoints", anyio_backend, path, stderr_path=tmp_path / f"err{round_}"
        ) as owner:
            await owner.expect("ready")
            checkpoints = 0
            for _ in range(rng.randrange(20, 120)):
                line = await owner.expect("ack")
                acked.append(line["ack"])
                checkpoints = line.get("checkpoints", 0)
            os.kill(owner.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                assert await owner.process.wait() == -signal.SIGKILL
            while (line := await owner.line()) is not None:  # acknowledged before it died
                acked.append(line["ack"])
            assert checkpoints > 0, f"round {round_}: the thread never checkpointed"

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    async with Runtime.open(path, config=RuntimeConfig(serve_socket=False)) as runtime:
        missing = [task_id for task_id in acked if await runtime.get_task(task_id) is None]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged tasks lost (seed {seed})"
