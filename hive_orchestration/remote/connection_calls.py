"""Running a connection's calls: the runner tasks (kept idle between calls, as starting a
task costs more than a call's own work), one call from its arguments to its answer frame
(or its failure, or RuntimeStoppedError when the runtime stops under it), and the
clients it runs as, one per (agent, correlation) pair.

Every call runs as the same operation of an
:class:`~hive_orchestration.OrchestrationClient` in this process, after
``_Connection._authorize`` (:mod:`.connection`), so it gets exactly the checks, answers
and errors an in-process caller gets.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from .._trace import CARRIED, check_trace
from ..api.carried import WAITING
from ..api.wire import EXCLUSIVE, msgpack_arguments_paced
from ..errors import HiveError, RuntimeStoppedError
from .connection_out import check_drained, send_frame
from .connection_workers import _WORKER_OPS, note_worker
from .protocol import Call, ResultOut, encode_error, frame

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from .connection import _Connection


log = logging.getLogger("hive_orchestration.remote")

#: Clients kept per connection for the (agent, correlation) pairs it calls as.
_CLIENTS_PER_CONNECTION = 64
#: Idle call runners a connection keeps (more run while more calls are in flight).
_IDLE_RUNNERS = 64


async def run_calls(
    conn: _Connection, message: Call, scope: anyio.CancelScope, charge: int
) -> None:
    """Run calls one after another: this one, then each handed to it while it waits
    among the idle (a few are kept; past that it ends)."""
    while True:
        await answer_call(conn, message, scope, charge)
        if len(conn._idle) >= _IDLE_RUNNERS:
            return
        runner = _Runner(conn._event_type())
        conn._idle.append(runner)
        await runner.handed.wait()
        message, scope, charge = runner.call


async def answer_call(
    conn: _Connection, message: Call, scope: anyio.CancelScope, charge: int
) -> None:
    """Run one call and send its answer; ``charge`` is what it holds of its
    connection's bound (and of the server's budget, unless it gave that back)."""
    try:
        with scope:
            try:
                # Encoded here: a value that cannot be is this call's failure.
                answer = frame(await run_call(conn, message))
            except HiveError as error:
                answer = frame(encode_error(message.id, error))
            except Exception as error:  # a bug: the caller hears of it, the server goes on
                log.exception("connection %d: %s failed", conn.number, message.op)
                answer = frame(encode_error(message.id, error))
        if scope.cancelled_caught:
            if not conn.stopping:
                return  # the caller left: nobody waits for an answer
            answer = frame(encode_error(message.id, _stopping()))
        # Outside the call's scope: a Cancel that comes now must not cut the frame.
        await send_frame(conn, answer)
    finally:
        del conn._calls[message.id]
        conn.held -= charge
        given = conn._charged.pop(message.id, 0)
        if given > 0:
            conn._server.budget.give(given)
        elif given:  # a waiting call's kept share
            conn._server.budget.unkeep(-given)
        freed, conn._slot_freed = conn._slot_freed, None
        if freed is not None:
            freed.set()
        if scope.cancel_called and message.id in conn._unacknowledged:
            # The caller left (it said so) while its claim was on its way: nobody holds it.
            with anyio.CancelScope(shield=True):
                await conn._give_back(conn._unacknowledged.pop(message.id))
        check_drained(conn)


async def run_call(conn: _Connection, message: Call) -> ResultOut:
    args = await msgpack_arguments_paced(message.op, message.args)
    # The raw arguments are views of the chunk the frame came in (up to 64 KiB, other
    # frames' bytes too): let go once decoded, nothing reads them again.
    message.args.clear()
    agent = await conn._authorize(message.op, args, message.agent)
    client = client_as(conn, agent, message.correlation)
    method: Callable[..., Awaitable[object]] = getattr(client, message.op)
    trace = check_trace(message.traceparent, message.tracestate)
    if message.op in WAITING:
        # It may wait for other clients' calls, which may need the server's budget to
        # be read: it keeps only what its arguments may hold (which its operation checks,
        # names and ids, before its first await), and only within the budget's room for
        # waiting calls (.budget). Kept, it is noted negative: given back by unkeep.
        given = conn._charged.pop(message.id, 0)
        if given:
            kept = conn._server.budget.keep(given)
            if kept:
                conn._charged[message.id] = -kept
    if trace is None:
        value = await method(**args)
    else:
        # The task this call creates continues the caller's trace, not the server's.
        carried = CARRIED.set(trace)
        try:
            value = await method(**args)
        finally:
            CARRIED.reset(carried)
    if message.op in EXCLUSIVE and value:
        conn._unacknowledged[message.id] = value
    if message.op in _WORKER_OPS:
        note_worker(conn, message.op, args, value)
    return ResultOut(message.id, value)


def client_as(conn: _Connection, agent: str | None, correlation: str | None) -> OrchestrationClient:
    key = (agent, correlation)
    client = conn._clients.get(key)
    if client is None:
        client = conn._server.client(agent, correlation)
        conn._clients[key] = client
        if len(conn._clients) > _CLIENTS_PER_CONNECTION:
            conn._clients.popitem(last=False)
    else:
        conn._clients.move_to_end(key)
    return client


class _Runner:
    """An idle call runner of a connection, waiting to be handed a call."""

    __slots__ = ("call", "handed")

    def __init__(self, handed: anyio.Event) -> None:
        self.handed = handed
        self.call: tuple[Call, anyio.CancelScope, int]

    def hand(self, message: Call, scope: anyio.CancelScope, charge: int) -> None:
        self.call = (message, scope, charge)
        self.handed.set()


def _stopping() -> RuntimeStoppedError:
    return RuntimeStoppedError(
        "the runtime stopped before answering this call (a claim it was waiting for went"
        " back to the queue)"
    )
