"""The commands that run until stopped: ``demo``, ``serve`` (a runtime of its own,
serving its message API until SIGTERM or SIGINT) and ``dashboard`` (the web dashboard,
whose module needs the ``dashboard`` extra and is imported only here)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import anyio

from ..api.embedded import Runtime
from ..config import RuntimeConfig
from ..errors import InvalidInputError
from .demo import run_demo
from .output import print_json

__all__ = ["DASHBOARD_MISSING", "dashboard", "demo", "serve"]


async def demo(args: argparse.Namespace) -> None:
    await run_demo(args.db)


DASHBOARD_MISSING = (
    "the dashboard needs Starlette, Hypercorn and prometheus-client:"
    " pip install 'hive-orchestration[dashboard]'"
)


def _observe() -> Any:
    """The dashboard's module (imported only by the commands that serve it)."""
    try:
        from ..observe import command
    except ImportError as exc:
        raise InvalidInputError("dashboard", f"{DASHBOARD_MISSING} ({exc})") from exc
    return command


async def dashboard(args: argparse.Namespace) -> None:
    await _observe().run_dashboard(args)


async def serve(args: argparse.Namespace) -> None:
    observe = None if args.dashboard is None else _observe()
    if observe is not None:
        observe.dashboard_token(observe.parse_address(args.dashboard, 7734)[0])
    overrides: dict[str, Any] = {}
    if args.listen:  # else $HIVE_ORCHESTRATION_LISTEN, if set
        overrides["listen"] = tuple(address for address in args.listen if address != "unix")
    for name, value in (
        ("tls_cert", args.tls_cert),
        ("tls_key", args.tls_key),
        ("tokens_file", args.tokens),
        ("max_connections", args.max_connections),
    ):
        if value is not None:
            overrides[name] = value
    config = RuntimeConfig.load(**overrides)
    # A server's log is its only account of who connected, and who was refused.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Before the runtime opens: a signal that comes while it opens stops it once open.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Runtime.open(args.db, config=config) as runtime:
            server = runtime._server
            addresses = [] if server is None else list(server.tcp_addresses)
            if server is not None and server.address:
                addresses.insert(0, server.address)
            async with anyio.create_task_group() as beside:
                shown: dict[str, object] = {
                    "serving": runtime.path,
                    "pid": os.getpid(),
                    "addresses": addresses,
                }
                if observe is not None:
                    shown["dashboard"] = await beside.start(
                        observe.serve_beside, runtime, args.dashboard
                    )
                print_json(shown)
                async for signum in signals:
                    print(
                        f"{signal.Signals(signum).name}: stopping (clients are told; calls in"
                        " flight finish)",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                beside.cancel_scope.cancel()
    print_json({"stopped": runtime.path})
