"""The event loop for the entry points that own theirs (the command line's long runners).

uvloop makes the runtime's asyncio loop about 10% faster (bench/peers.py). It is optional
(the ``uvloop`` extra), so it is used when it is installed, and never asked for on trio.
An app that embeds the runtime owns its loop and chooses for itself (docs/performance.md).
"""

from __future__ import annotations

import importlib.util

__all__ = ["backend_options"]


def backend_options(backend: str) -> dict[str, object]:
    """What ``anyio.run(..., backend=backend, backend_options=...)`` is given."""
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        return {"use_uvloop": True}
    return {}
