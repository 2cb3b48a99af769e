"""A dashboard process (``hive-orchestration dashboard``) for the tests: started on a free
port, its url read from the JSON line it prints, stopped with SIGTERM (killed if it does
not stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEADLINE = 30.0


@dataclass
class Dashboard:
    process: subprocess.Popen[bytes]
    url: str


@contextmanager
def dashboard(*args: str, env: dict[str, str] | None = None) -> Iterator[Dashboard]:
    process = subprocess.Popen(
        [sys.executable, "-m", "hive_orchestration", "dashboard", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            assert process.stderr is not None
            raise AssertionError(f"the dashboard did not start: {process.stderr.read()!r}")
        yield Dashboard(process, json.loads(line)["dashboard"])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
