"""The workers a connection carries: a worker is alive only as long as the connection
that carries its work.

A worker that registered, heartbeat or claimed through a connection, and did not
unregister, is dead with it: when the connection closes its tasks go back to the queue
at once and it is declared offline (see :func:`note_worker`, :func:`workers_gone`).
Separate from the connection's frames and calls: this is the liveness rule alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import HiveError
from ..messages.workers import WorkerStatus

if TYPE_CHECKING:
    from .connection import _Connection


log = logging.getLogger("hive_orchestration.remote")

#: The operations by which a connection acts for the worker named by their ``worker_id``.
_WORKER_OPS = frozenset(
    {"register_worker", "update_worker_heartbeat", "claim_task", "claim_tasks", "unregister_worker"}
)
#: Most worker ids one connection is held to account for (a process runs a few workers;
#: past this, more are not tracked and are left to the heartbeat timeout).
MAX_WORKERS_PER_CONNECTION = 10_000


def note_worker(conn: _Connection, op: str, args: dict[str, Any], value: object) -> None:
    """After a worker operation succeeded: this connection now carries that worker.

    A worker is alive only as long as the connection that carries its work: once it
    registered, heartbeat or claimed here, the end of this connection is its death
    (unless it unregistered, or said it is offline, or another connection acted for it
    since: a worker restarted in a new process owns its id from then on)."""
    worker_id = args.get("worker_id")
    if not isinstance(worker_id, str):
        return
    owners = conn._server.worker_connections
    if op == "unregister_worker" or (
        op == "update_worker_heartbeat"
        and (not value or args.get("status") == WorkerStatus.OFFLINE)
    ):
        if op == "unregister_worker" or owners.get(worker_id) is conn:
            owners.pop(worker_id, None)
        conn._workers.discard(worker_id)
        return
    if worker_id not in conn._workers:
        if len(conn._workers) >= MAX_WORKERS_PER_CONNECTION:
            return
        conn._workers.add(worker_id)
    owners[worker_id] = conn


async def workers_gone(conn: _Connection) -> None:
    """The connection ended: each worker it carried is dead. Its tasks go back to the
    queue now (runs lost, an attempt counted, as when a silent worker is declared
    offline) rather than when their leases run out, and it is declared offline.

    Through the runtime's public operations (``release_worker_tasks``, then
    ``update_worker_heartbeat(..., "offline")``), so it is the very change an operator
    would make, logged and committed as such. Not when the runtime is stopping: its
    workers are not dead, and the next open requeues what they held."""
    owners = conn._server.worker_connections
    gone = [worker_id for worker_id in conn._workers if owners.get(worker_id) is conn]
    conn._workers.clear()
    for worker_id in gone:
        del owners[worker_id]
    if not gone or conn.stopping:
        return
    client = conn._server.client(None, None)
    reason = f"the connection of worker {{}} to the runtime closed ({conn.name or 'a client'})"
    with anyio.move_on_after(conn._server.timeout):
        for worker_id in gone:
            try:
                released = await client.release_worker_tasks(
                    worker_id, reason=reason.format(worker_id)
                )
                if owners.get(worker_id) is None:  # not back on another connection
                    await client.update_worker_heartbeat(worker_id, WorkerStatus.OFFLINE)
            except HiveError as error:  # stopping: recovery at the next open requeues
                log.info("connection %d: worker %s: %s", conn.number, worker_id, error)
                return
            log.info(
                "connection %d (%s) closed: worker %s offline, %d task(s) requeued",
                conn.number,
                conn.name,
                worker_id,
                released,
            )
