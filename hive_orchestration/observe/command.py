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

from ..errors import HiveError, InvalidInputError
from .dashboard import TOKEN_ENV, create_app, is_loopback, serve_app
from .metrics import Metrics
from .source import Source

if TYPE_CHECKING:
    from ..embedded import Runtime

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
    serves it; else the file, read-only) or of the runtime at ``--url``."""
    token = dashboard_token(args.host)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            Source.open(args, "hive-orchestration dashboard") as source,
            anyio.create_task_group() as group,
        ):
            metrics = Metrics(source)
            followed = anyio.Event()

            async def follow() -> None:
                try:
                    await metrics.run(task_status=_Started(followed))
                except HiveError as exc:  # the runtime went away
                    raise HiveError(
                        f"the runtime serving {source.reader.path} stopped ({exc}):"
                        " start the dashboard again"
                    ) from exc
                raise HiveError(
                    f"the runtime serving {source.reader.path} stopped: start the dashboard"
                    " again (it reads the file when no runtime serves it)"
                )

            group.start_soon(follow)
            await followed.wait()
            closing = anyio.Event()
            app = create_app(metrics, token=token, closing=closing)
            url = await group.start(partial(serve_app, closing=closing), app, args.host, args.port)
            _announce(dashboard=url, db=source.reader.path, pid=os.getpid())
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
