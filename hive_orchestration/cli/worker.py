"""``hive-orchestration worker MODULE:HANDLER``: an agent's workers in a process of their own.

The command imports the handler (an ``async def handler(context: TaskContext)``, the very
handlers :class:`~hive_orchestration.AgentRunner` runs), opens an
:class:`~hive_orchestration.OrchestrationClient` on the database (which connects to the
runtime that owns it in another process, through its socket, or opens it if none does),
and runs ``--concurrency`` copies of the agent under an ``AgentRunner`` on that one
client: they register, heartbeat, claim, run and report over the one connection, so the
owner declares them offline, and requeues what they held, the moment it breaks.

SIGTERM or SIGINT stops it: no new claim, in-flight handlers get ``--drain-timeout``
seconds to finish and report, the rest are cancelled and their tasks handed back to the
queue (not counted as attempts), the workers unregister, and the process exits 0. A second
signal ends the grace period at once. If the runtime goes away (its owner stops or dies),
the workers stop and the process exits 1, saying why, for a supervisor to restart it.

``--retry-on`` and ``--fail-on`` name exception classes (``package.module:Class``, or a
builtin's bare name) whose raising by the handler is retried, or fails the task at once
(:mod:`hive_orchestration.agents.retry`); a name that does not import is refused (exit
2) before anything is opened.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import cast

import anyio

from .._groups import raise_cause
from ..agents.registry import AgentCapability, AgentRegistry, Handler
from ..agents.retry import RetryPolicy, load_exception_type
from ..agents.runner import AgentRunner
from ..api.client import OrchestrationClient
from ..errors import HiveError, InvalidInputError
from ..remote.client import RemoteRuntime

__all__ = ["load_handler", "retry_policy", "run_worker"]

#: Copies one worker process may run (each is a worker of the runtime).
MAX_CONCURRENCY = 1000
_FIELD = "MODULE:HANDLER"
#: The registry's names of the options it checks.
_OPTIONS = {
    "agent_type": "--agent-type",
    "capabilities": "--task-types",
    "worker_prefix": "--worker-id",
    "lease": "--lease",
}
_SHAPE = "an async function of a TaskContext: `async def handler(context) -> dict | None`"


def load_handler(target: str) -> Handler:
    """The handler ``target`` names (``package.module:function``), imported as ``python
    -m`` would import it (the current directory first, then ``PYTHONPATH``). Anything
    that does not lead to an async function is an :class:`InvalidInputError` saying what
    went wrong, before a byte is written anywhere."""
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise InvalidInputError(
            _FIELD,
            f"must name a module and a handler in it, as 'package.module:handler', got {target!r}",
        )
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            raise InvalidInputError(
                _FIELD,
                f"no module named {missing!r} (modules are found from the current directory"
                " and PYTHONPATH)",
            ) from None
        raise InvalidInputError(_FIELD, f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the module's own code failed: say so, not a traceback
        raise InvalidInputError(
            _FIELD, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    handler: object = module
    for part in attribute.split("."):
        try:
            handler = getattr(handler, part)
        except AttributeError:
            raise InvalidInputError(
                _FIELD, f"module {module_name!r} has no {attribute!r}"
            ) from None
    call = getattr(handler, "__call__", None)  # noqa: B004 - an instance with async __call__
    if not (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)):
        kind = type(handler).__name__
        raise InvalidInputError(_FIELD, f"{target} is not {_SHAPE} (it is a {kind})")
    return cast(Handler, handler)


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    """The ``--retry-on`` and ``--fail-on`` classes, imported (each name that does not
    lead to an exception class is an :class:`InvalidInputError` naming its option)."""
    retry_on = getattr(args, "retry_on", None)
    fail_on = getattr(args, "fail_on", None) or ()
    return RetryPolicy(
        None
        if retry_on is None
        else tuple(load_exception_type(name, "--retry-on") for name in retry_on),
        tuple(load_exception_type(name, "--fail-on") for name in fail_on),
    )


async def run_worker(args: argparse.Namespace) -> None:
    """The ``worker`` command (``args`` as :func:`~.main.build_parser` parses them)."""
    if getattr(args, "trace", False):
        _enable_tracing()
    handler = load_handler(args.handler)
    policy = retry_policy(args)
    agent_type = args.agent_type or args.handler.rpartition(":")[2].rpartition(".")[2]
    prefix = args.worker_id or f"{agent_type}-{socket.gethostname()}-{os.getpid()}"
    registry = AgentRegistry()
    try:
        spec = registry.register(
            agent_type,
            handler,
            capabilities=[AgentCapability(name) for name in args.task_types or ()],
            copies=args.concurrency,
            description=f"{args.handler} (hive-orchestration worker, pid {os.getpid()})",
            lease=args.lease,
            worker_prefix=prefix,
        )
    except InvalidInputError as exc:  # named as the command line spells it
        option = _OPTIONS.get(exc.field.partition("[")[0], exc.field)
        raise InvalidInputError(option, exc.reason) from None
    stop = anyio.Event()
    running = anyio.CancelScope()  # cancelled by a second signal: no more grace
    signalled = False

    async def on_signals(signals: AsyncIterator[int]) -> None:
        nonlocal signalled
        async for signum in signals:
            if not signalled:
                signalled = True
                name = signal.Signals(signum).name
                _say(f"{name}: draining (at most {args.drain_timeout:g}s)")
                stop.set()
            else:
                _say("a second signal: handing back what is still running")
                running.cancel()

    with (
        _logging(args.log_level),
        anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(on_signals, signals)
                runner = await _serve(
                    args, registry, spec.handles, agent_type, running, stop, policy
                )
                group.cancel_scope.cancel()
        except BaseExceptionGroup as failed:
            raise_cause(failed)
    if runner.stopped_by is not None and not signalled:
        # The runtime went away (it stopped, or the connection to it broke): exit 1, for
        # whatever supervises this process to start it again once a runtime owns the file.
        raise HiveError(f"the workers stopped: {runner.stopped_by}")


def _enable_tracing() -> None:
    try:
        from ..observe.tracing import enable
    except ImportError as exc:
        raise InvalidInputError(
            "--trace",
            f"needs OpenTelemetry ({exc.name} is missing): pip install 'hive-orchestration[otel]'",
        ) from None
    enable()


async def _serve(
    args: argparse.Namespace,
    registry: AgentRegistry,
    handles: tuple[str, ...],
    agent_type: str,
    running: anyio.CancelScope,
    stop: anyio.Event,
    policy: RetryPolicy,
) -> AgentRunner:
    """Run the agent's copies on one client until ``stop`` (a signal, or the copies
    stopped on their own); returns the runner, stopped."""
    async with OrchestrationClient(db_path=args.db, source_agent=agent_type) as client:
        runner = AgentRunner(
            client,
            registry,
            stop_timeout=args.drain_timeout,
            retry_on=policy.retry_on,
            fail_on=policy.fail_on,
        )
        with running:
            async with runner, anyio.create_task_group() as watch:

                async def on_stopped() -> None:
                    await runner.wait()  # the copies stopped on their own
                    stop.set()

                watch.start_soon(on_stopped)
                _say(f"{_workers(runner, handles)} on {_where(client)}; ready")
                await stop.wait()
                watch.cancel_scope.cancel()
        _say(
            f"stopped: {runner.completed} completed, {runner.failed} failed,"
            f" {runner.released} handed back"
        )
    return runner


def _workers(runner: AgentRunner, handles: tuple[str, ...]) -> str:
    ids = runner.worker_ids
    named = ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
    return f"{len(ids)} worker(s) {named} taking {', '.join(handles)}"


def _where(client: OrchestrationClient) -> str:
    backend = client._backend()
    if isinstance(backend, RemoteRuntime):
        return f"{client.db_path}, owned by process {backend.owner_pid}"
    return f"{client.db_path}, owned by this process (others connect to it)"


def _say(text: str) -> None:
    print(f"worker: {text}", flush=True)


@contextmanager
def _logging(level: str) -> Iterator[None]:
    """The package's warnings (a lease renewal that failed, a lost connection) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("hive_orchestration")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
