"""``hive-orchestration dashboard``, and the dashboard ``serve --dashboard`` runs beside
its runtime.

Once serving, each prints one JSON line with the url (a port 0 replaced by the one bound),
and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING

import anyio

from ..errors import ConnectionLostError, HiveError, InvalidInputError
from .dashboard import TOKEN_ENV, create_app, is_loopback, serve_app
from .metrics import Metrics
from .source import Source

if TYPE_CHECKING:
    from ..api.embedded import Runtime

__all__ = ["dashboard_token", "parse_address", "run_dashboard", "serve_beside"]


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[V6]:PORT`` as a host and a port."""
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInputError("--dashboard", f"{text!r} is not HOST:PORT")
    return host, int(port)


def dashboard_token(host: str) -> str | None:
    """The pages' token (``$HIVE_ORCHESTRATION_DASHBOARD_TOKEN``); required off
    loopback."""
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host.strip("[]")):
        raise InvalidInputError(
            "--host",
            f"{host} is not loopback: set ${TOKEN_ENV} to a long random token (the"
            " dashboard shows every task's payload), and open it once with ?token=TOKEN",
        )
    return token


def _announce(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def run_dashboard(args: argparse.Namespace) -> None:
    """The dashboard of the database ``--db`` (its runtime, through its socket, if one
    serves it; else the file, read-only) or of the runtime at ``--url``. When the runtime
    of ``--db`` stops, it goes on from the file (or the next runtime to serve it) where
    it was; a runtime at ``--url`` that stops ends it, with the reason."""
    token = dashboard_token(args.host)
    name = "hive-orchestration dashboard"
    url = None
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as group:
            found: list[Metrics] = []
            following = anyio.Event()

            async def follow() -> None:
                while True:
                    async with Source.open(args, name) as opened:
                        if not found:
                            found.append(Metrics(opened))
                            after = None
                        else:  # the pages read through the same Source: give it the new reader
                            found[0].source.reader = opened.reader
                            after = found[0].last_seq
                        try:
                            await found[0].run(after=after, task_status=_Started(following))
                        except ConnectionLostError:
                            if args.url is not None:
                                raise
                    if args.url is not None:
                        raise HiveError(f"the runtime at {args.url} stopped")
                    print(
                        f"the runtime serving {found[0].source.reader.path} stopped: reading"
                        " the file",
                        file=sys.stderr,
                        flush=True,
                    )

            group.start_soon(follow)
            await following.wait()
            metrics = found[0]
            closing = anyio.Event()
            app = create_app(metrics, token=token, closing=closing)
            url = await group.start(partial(serve_app, closing=closing), app, args.host, args.port)
            _announce(dashboard=url, db=metrics.source.reader.path, pid=os.getpid())
            async for signum in signals:
                print(
                    f"{signal.Signals(signum).name}: stopping the dashboard",
                    file=sys.stderr,
                    flush=True,
                )
                break
            group.cancel_scope.cancel()
    _announce(stopped=url)


class _Started:
    """A task status that sets an event (``Metrics.run`` started in a task of ours, so
    that its end can be turned into the command's error)."""

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


async def serve_beside(
    runtime: Runtime,
    address: str,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The dashboard (and ``/metrics``) of ``runtime``, this process's, at ``address``,
    until cancelled; started with its url."""
    from .dashboard import DEFAULT_PORT

    host, port = parse_address(address, DEFAULT_PORT)
    token = dashboard_token(host)
    metrics = Metrics(Source.of_runtime(runtime, "hive-orchestration serve --dashboard"))
    async with anyio.create_task_group() as group:
        await group.start(metrics.run)
        closing = anyio.Event()
        app = create_app(metrics, token=token, closing=closing)
        url = await group.start(partial(serve_app, closing=closing), app, host, port)
        task_status.started(url)
