"""A process that owns a database: it opens the runtime, says where it serves, and waits.

Run by the tests as ``python _owner.py DB_PATH BACKEND [CONFIG_JSON]``: it prints one JSON line,
``{"ready": ADDRESS, "pid": PID}``, once the runtime is open and serving, then waits until
its stdin closes, and stops the runtime cleanly (so a test can also kill it instead).
"""

from __future__ import annotations

import json
import os
import sys

import anyio
import msgspec

from hive_orchestration import Runtime, RuntimeConfig


async def main(path: str, config: RuntimeConfig) -> None:
    async with Runtime.open(path, config=config) as runtime:
        server = runtime._server
        address = server.address if server is not None else None
        print(json.dumps({"ready": address, "pid": os.getpid()}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    anyio.run(main, sys.argv[1], msgspec.convert(settings, RuntimeConfig), backend=sys.argv[2])
