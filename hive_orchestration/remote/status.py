"""What the owner of a database says about its socket and who is connected to it
(``OrchestrationClient.server_status``; ``hive-orchestration status`` shows it)."""

from __future__ import annotations

from datetime import datetime

import msgspec

__all__ = ["ConnectionStatus", "ServerStatus"]


class ConnectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One client connected to the owner's socket."""

    #: The connection's number, in the order the owner accepted them.
    id: int
    #: What the client called itself (its ``source_agent``), if anything.
    name: str | None
    #: The client's process, as the kernel says (``SO_PEERCRED``); None where it does not.
    pid: int | None
    connected_at: datetime
    #: Its calls running now (a claim waiting for work is one), and its live subscriptions
    #: (an event stream or a callback holds one).
    calls_in_flight: int
    subscriptions: int
    #: What its calls in flight (and a large frame being read) are counted as holding:
    #: their frames and the most those may decode into (docs/SERVING.md, "Limits").
    held_bytes: int = 0
    #: Its next frame waits, unread, for room (its own calls' or the server's budget).
    held_back: bool = False


class ServerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The owning process, where it serves (None: nowhere; ``serve_socket`` is off or the
    socket could not be made) and its connections, oldest first."""

    pid: int
    db_path: str
    #: The database's schema version (the owner migrated it to its package's at open).
    schema_version: int
    address: str | None
    connections: list[ConnectionStatus]
    #: What all connections' requests are counted as holding now, and the server's budget
    #: for them (``max_held_bytes``; 0: an owner that predates it).
    held_bytes: int = 0
    max_held_bytes: int = 0
    #: The most held at once since the server started, and the connections waiting now
    #: for a share (their next frame unread).
    peak_held_bytes: int = 0
    held_back: int = 0
