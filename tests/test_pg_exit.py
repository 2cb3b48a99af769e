"""No psycopg connection is left open at a process's exit.

CI printed, after the last test of each run, ``Exception ignored in: BaseConnection.__del__
... ResourceWarning: <psycopg.Connection ...> was deleted while still open``: a connection
collected at interpreter exit, under pytest's ``filterwarnings = error``. It was the test
helper's admin connection (tests/_pg.py, which creates each test's database), kept for the
session and never closed; it is now closed at exit. The runtime's own connections (the
node's claim, the log tailer's reader and listener, the leader's) are checked here too,
in a child process that opens a node, uses it and exits with ResourceWarning an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

pytest.importorskip("psycopg")

import _pg

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import anyio
import _pg
from hive_orchestration import Runtime

async def main() -> None:
    url = _pg.new_database()
    async with Runtime.open(url) as first, Runtime.open(url) as second:
        task_id = await first.create_task("job")
        claim = await second.claim_task("w", "job", wait=5)
        assert claim is not None and claim.task.id == task_id
        await second.complete_task(claim.lease, {{}})

anyio.run(main, backend={backend!r})
print("done")
"""


async def test_no_connection_is_left_open_at_exit(anyio_backend: str) -> None:
    tests = str(Path(__file__).parent)
    code = _CHILD.format(tests=tests, backend=anyio_backend)
    env = {"HIVE_TEST_PG": _pg.server_url(), "PATH": "/usr/bin:/bin"}
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-W", "error::ResourceWarning", "-c", code],
            cwd=str(Path(tests).parent),
            env=env,
            check=False,
        )
    out, err = done.stdout.decode(), done.stderr.decode(errors="replace")
    assert done.returncode == 0, err[-4000:]
    assert out.strip() == "done", (out, err[-4000:])
    assert "deleted while still open" not in err, err[-4000:]
    assert "Exception ignored" not in err, err[-4000:]
