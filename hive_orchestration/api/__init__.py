"""The API surface: what an app or an agent holds to talk to the runtime.

The rooms, bottom up (``[tool.importlinter]`` keeps this order):

- ``subscription.py``: :class:`Subscription`, live events as one subscriber in this
  process gets them.
- ``ops/``: the operations of the seeds, one family per module (tasks, claims, plans,
  planning, workers, control, reads, retention, schedules), each a mixin that turns a
  call into a typed message to an actor. Both front doors carry them.
- ``runtime_events.py``: the runtime's event APIs (publish, subscribe, tap, read the
  log), and ``front.py``: what the API above lends the runtime (see below).
- ``embedded.py``: :class:`Runtime`, the front door in this process: the composition root
  that starts the actors under their supervisor; it carries the operations and the event
  APIs.
- ``keeper.py``: how a client reaches its runtime (opens it, or connects to the process
  that owns the database), and takes the database over when that process goes away.
- ``streams.py``: a client's event streams (:class:`EventStream`, the log then live
  events) and callbacks (:class:`CallbackSubscription`).
- ``client.py``: :class:`OrchestrationClient`, the front door for agents: the same
  operations on a runtime in this process or another, with who is calling, event streams
  and callbacks. ``carried.py`` says which of its operations travel to another process.
  Its rooms: ``client_events.py`` (subscriptions, streams, reads of the log, callbacks),
  ``client_publish.py`` (publishing, and the seeds' events made true) and
  ``client_remote.py`` (its operations sent to a runtime of another process).
- ``sync.py`` (:class:`SyncOrchestrationClient`, for code without an event loop) and
  ``wire.py`` (:func:`call_json`, the operations as JSON bytes), on top of the client.

The public names are re-exported from ``hive_orchestration``; import them from there.

The runtime cannot import the client it hands out (:meth:`Runtime.client`) nor the socket
server it runs, since both are built on it: they are given to it here, once, as its
:class:`~hive_orchestration.api.front.Front`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import OrchestrationClient
from .embedded import Runtime
from .front import Front

if TYPE_CHECKING:
    from ..remote.tcp import TcpSettings
    from ..storage.port import StoreClaim
    from .front import Serving


def _client(runtime: Runtime, agent: str | None, correlation: str | None) -> OrchestrationClient:
    return OrchestrationClient._bound(runtime, source_agent=agent, correlation_id=correlation)


def _serve(runtime: Runtime, claim: StoreClaim, tcp: TcpSettings | None) -> Serving:
    # Only a runtime that serves loads the socket server (and its TLS).
    from ..remote.server import Server

    return Server(runtime, claim, tcp)


Runtime._front = Front(client=_client, serve=_serve)
