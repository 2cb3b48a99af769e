"""The parent's side of ``_db_child.py``: start a child, read its JSON lines, stop it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

CHILD = Path(__file__).with_name("_db_child.py")
#: Generous: only turns a hung child into a failure instead of a hung test run.
DEADLINE = 30.0


class Child:
    def __init__(self, process: Process, stderr_path: Path) -> None:
        assert process.stdout is not None
        self.process = process
        self.pid = process.pid
        self._stdout = BufferedByteReceiveStream(process.stdout)
        self._stderr_path = stderr_path

    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    async def line(self) -> dict[str, Any] | None:
        """The child's next JSON line, or None once it has closed its stdout."""
        with anyio.fail_after(DEADLINE):
            try:
                raw = await self._stdout.receive_until(b"\n", 1 << 20)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return None
        value = json.loads(raw)
        assert isinstance(value, dict)
        return value

    async def expect(self, key: str) -> dict[str, Any]:
        """The next line, which must carry ``key``."""
        line = await self.line()
        context = f"expected {key!r} from child {self.pid}, got {line!r}; stderr:\n{self.stderr()}"
        assert line is not None, context
        assert key in line, context
        return line

    async def finish(self) -> int:
        """Close the child's stdin (its signal to stop) and wait for it to exit."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(DEADLINE):
            return await self.process.wait()


@asynccontextmanager
async def child(*args: str, stderr_path: Path) -> AsyncIterator[Child]:
    """Run ``_db_child.py`` with ``args``; killed on the way out if still running."""
    command = [sys.executable, str(CHILD), *args]
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        yield Child(process, stderr_path)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
