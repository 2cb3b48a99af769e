"""The package's exceptions: one root, one subclass per failure a caller can act on.

Every error the runtime raises to a caller is a :class:`HiveError`. Catch the subclass
that matches what you can do about it:

- :class:`InvalidInputError` - fix the argument named by ``field``; nothing was written.
- :class:`NotFoundError` - the id does not exist (any more).
- :class:`IllegalTransitionError` - the object is not in a state that allows the change.
- :class:`LeaseLostError` - a worker's claim on a task is over (lease expired, task
  cancelled, finished or handed to another worker): stop working on it.
- :class:`RequestTimeoutError` - no reply within the deadline; the request may still be
  applied later, so re-read before retrying a non-idempotent operation.
- :class:`ActorFailedError` - the actor handling the request crashed; it is being restarted.
- :class:`RuntimeStoppedError` - the runtime (or the actor) is stopped or stopping.
- :class:`WrongEventLoopError` - the runtime was called from a thread other than the one
  whose event loop runs it; nothing was sent, and the runtime is unharmed.
- :class:`RuntimeFailedError` - the supervisor gave up; raised from ``Runtime.open``.
- :class:`StorageError` - the database refused a write or read; ``fault`` says why (in use by
  another runtime, locked, read-only, disk full, I/O error, corrupt...).
- :class:`NewerSchemaError` - the database was written by a newer version of this package.
- :class:`SubscriberLaggedError` - an event subscriber fell too far behind; resubscribe from
  the last sequence number it saw.
- :class:`EventsTrimmedError` - a replay from a sequence number older than the oldest the
  trimmed event log keeps (docs/RETENTION.md); ``oldest_seq`` says where the log starts.
- :class:`WrongEventLoopError` - a call from a thread other than the runtime's event loop.
- :class:`ConnectionLostError` - the connection to the runtime of another process broke
  (it exited, was killed, or stopped answering); :class:`OutcomeUnknownError` for a call
  that was in flight then.
- :class:`AccessDeniedError` - the runtime served over TCP refused this connection's token,
  or this call for the token's role; nothing was done.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

__all__ = [
    "AccessDeniedError",
    "ActorFailedError",
    "ConfigError",
    "ConnectionLostError",
    "EventsTrimmedError",
    "HiveError",
    "IllegalTransitionError",
    "InvalidInputError",
    "LeaseLostError",
    "NewerSchemaError",
    "NotFoundError",
    "OutcomeUnknownError",
    "RequestTimeoutError",
    "RuntimeFailedError",
    "RuntimeStoppedError",
    "StorageError",
    "StorageFault",
    "SubscriberLaggedError",
    "WrongEventLoopError",
]

#: What went wrong with the database, for :attr:`StorageError.fault`.
StorageFault: TypeAlias = Literal[
    "in_use",
    "locked",
    "read_only",
    "disk_full",
    "io_error",
    "corrupt",
    "cannot_open",
    "needs_recovery",
    "unavailable",
]


class HiveError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidInputError(HiveError, ValueError):
    """An argument was refused at the API boundary; nothing was written.

    Raised by every public operation before it sends a message, so ``field`` names the
    argument as the caller spelled it (``"payload.items[3]"`` for nested values).
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class ConfigError(InvalidInputError):
    """A configuration value (from code, TOML or the environment) is invalid."""


class NotFoundError(HiveError, LookupError):
    """The object named by ``kind`` and ``id`` does not exist."""

    def __init__(self, kind: str, id: str) -> None:
        self.kind = kind
        self.id = id
        super().__init__(f"{kind} {id!r} not found")


class IllegalTransitionError(HiveError):
    """A state change that the object's state machine forbids; nothing was changed."""

    def __init__(self, kind: str, id: str, current: str, requested: str) -> None:
        self.kind = kind
        self.id = id
        self.current = current
        self.requested = requested
        super().__init__(f"{kind} {id!r} is {current!r} and cannot become {requested!r}")


class LeaseLostError(HiveError):
    """The lease token no longer holds its task; nothing was changed.

    The worker's claim ended (``reason`` says how) and another worker may hold the task
    now, so its work must not be reported: drop it. ``status`` is the task's status now.
    """

    def __init__(self, task_id: str, run_id: str, attempt: int, status: str, reason: str) -> None:
        self.task_id = task_id
        self.run_id = run_id
        self.attempt = attempt
        self.status = status
        self.reason = reason
        super().__init__(
            f"lease on task {task_id!r} (run {run_id!r}, attempt {attempt}) is lost: {reason};"
            f" the task is now {status!r}. Stop working on it"
        )


class RequestTimeoutError(HiveError, TimeoutError):
    """An ``ask`` got no reply within its deadline.

    The request may still be applied after this is raised (it was already queued), so
    re-read the state before retrying anything that is not idempotent.
    """

    def __init__(self, actor: str, message: str, timeout: float) -> None:
        self.actor = actor
        self.message = message
        self.timeout = timeout
        super().__init__(f"actor {actor!r} did not answer {message} within {timeout:g}s")


class ActorFailedError(HiveError):
    """The actor crashed while handling this request; its supervisor restarts it.

    ``__cause__`` is the original exception. Whether the request was applied depends on
    where the actor failed: re-read before retrying a non-idempotent operation.
    """

    def __init__(self, actor: str, cause: BaseException) -> None:
        self.actor = actor
        super().__init__(f"actor {actor!r} failed: {type(cause).__name__}: {cause}")
        self.__cause__ = cause


class RuntimeStoppedError(HiveError):
    """The runtime or the addressed actor is stopped, or stopped before answering."""


class WrongEventLoopError(HiveError, RuntimeError):
    """A runtime, or a client of it, was called from another thread than the one whose
    event loop runs it; the call was refused before anything was sent.

    Its actors, mailboxes and replies belong to that event loop: a call from another loop
    could never be woken by them. Call it from the runtime's own loop (from a plain thread
    started with ``anyio.to_thread``: ``anyio.from_thread.run(client.create_task, ...)``),
    or use a :class:`SyncOrchestrationClient`, which may be called from any thread.
    ``owner`` and ``caller`` are the names of the two threads.
    """

    def __init__(self, owner: str, caller: str) -> None:
        self.owner = owner
        self.caller = caller
        super().__init__(
            f"this runtime runs on the event loop of thread {owner!r} and was called from "
            f"thread {caller!r}; nothing was sent. Call it from that event loop (from a "
            "worker thread: anyio.from_thread.run(client.method, ...)), or use "
            "SyncOrchestrationClient, which may be called from any thread; an event loop "
            "of another thread needs a runtime of its own, on another database"
        )


class RuntimeFailedError(HiveError):
    """The supervisor gave up on a child that crashed too often, and stopped the runtime.

    Raised out of ``async with Runtime.open(...)``; ``__cause__`` is the last crash.
    """

    def __init__(self, actor: str, restarts: int, window: float, cause: BaseException) -> None:
        self.actor = actor
        self.restarts = restarts
        self.window = window
        super().__init__(
            f"actor {actor!r} crashed {restarts} times within {window:g}s, more than the "
            f"restart intensity allows; the runtime stopped. Last cause: "
            f"{type(cause).__name__}: {cause}"
        )
        self.__cause__ = cause


class StorageError(HiveError):
    """The database refused an operation (disk full, read-only file, locked, corrupt,
    a PostgreSQL server out of reach...).

    Nothing of the failed request was written: each request is applied whole or not at all.
    The message names the file, the cause and what to do; ``path`` is the file (None when
    not known) and ``fault`` the cause, for a caller that handles them apart:

    - ``"in_use"``: another runtime has the database open (``Runtime.open`` refused it).
    - ``"locked"``: another connection held SQLite's lock past ``busy_timeout``; retry.
    - ``"read_only"``: the file, its folder or its filesystem cannot be written.
    - ``"disk_full"``: no space left, or a file size limit reached; free space and retry.
    - ``"io_error"``: the operating system reported an I/O error.
    - ``"corrupt"``: the file is damaged or not a database; restore it from a backup.
    - ``"cannot_open"``: SQLite cannot open the file or create its -wal and -shm files,
      or the path is not one the runtime may use (not a regular file, a symbolic link to
      another user's file, an unsafe lock file).
    - ``"needs_recovery"``: a program was killed in the middle of a write, and a
      read-only reader cannot undo it; opening the database once for writing (the app,
      or ``hive-orchestration db upgrade``) does.
    - ``"unavailable"`` (PostgreSQL): the server could not be reached, or the connection
      was lost before the write was committed, so nothing of it was applied; the runtime
      reconnects on its next call: retry once the server is back. (A connection lost
      while the commit itself was on its way is no refusal: the write may have landed.)
    - ``None``: anything else (a missing file for a reader, a schema problem...).
    """

    def __init__(
        self, message: str, *, path: str | None = None, fault: StorageFault | None = None
    ) -> None:
        self.path = path
        self.fault: StorageFault | None = fault
        super().__init__(message)


class NewerSchemaError(StorageError):
    """The database's schema version is newer than this package knows; it was not touched."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"database {path!r} has schema version {found}, but this version of "
            f"hive-orchestration supports up to {supported}; upgrade the package to open it",
            path=path,
        )


class SubscriberLaggedError(HiveError):
    """An event subscriber's buffer overflowed, so the subscription was closed.

    Events are durable: resubscribe with replay from ``last_seq`` to catch up without a gap.
    """

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        super().__init__(
            f"subscriber fell behind and was dropped after event {last_seq}; "
            f"replay from sequence {last_seq} to catch up"
        )


class EventsTrimmedError(HiveError):
    """A read of the event log from ``after`` (a replay, a stream catching up) asked for
    events the log no longer keeps: retention trimmed every event up to ``oldest_seq - 1``.

    Nothing was read. Events after ``after`` and before ``oldest_seq`` are gone for good:
    rebuild what the reader derives from them from the current state (tasks, plans), then
    read on from ``oldest_seq - 1``.
    """

    def __init__(self, after: int, oldest_seq: int) -> None:
        self.after = after
        self.oldest_seq = oldest_seq
        super().__init__(
            f"cannot read the event log after sequence {after}: it was trimmed, its oldest"
            f" kept sequence is {oldest_seq}; rebuild from the current state, then read"
            f" after={oldest_seq - 1}"
        )


class ConnectionLostError(HiveError):
    """The connection to the runtime that owns the database, in another process, broke:
    that process exited or was killed, or sent nothing for ``remote_timeout`` seconds.

    Raised by every call made after that (and by a subscription's reader). Open a new
    client to reconnect once a runtime owns the database again.
    """


class OutcomeUnknownError(ConnectionLostError):
    """The connection broke while this call was in flight: it may or may not have been
    applied. Re-read before retrying what is not idempotent; a ``create_task`` retried
    with the same ``idempotency_key`` is safe.
    """


class AccessDeniedError(HiveError, PermissionError):
    """A runtime served over TCP refused a connection (no token, or a wrong one) or a call
    its token's role may not make (``operation``, ``reason``); nothing was done.

    An ``agent`` token acts as its own identity and for its own worker ids only; what it
    may call is listed in docs/SERVING.md. Use a token with the rights the call needs.
    """

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation} refused: {reason}")


# -- an error as plain values (the socket's Failure, a batch item's Refusal) --------------------

_SCALARS = (str, int, float, bool, type(None))


def plain_attributes(error: HiveError) -> dict[str, str | int | float | bool | None]:
    """The plain attributes of ``error`` (``field``, ``reason``, ``task_id``...): what
    :func:`rebuild_error` needs to make it again in another process."""
    return {k: v for k, v in vars(error).items() if isinstance(v, _SCALARS)}


def rebuild_error(
    name: str, message: str, attributes: dict[str, str | int | float | bool | None]
) -> HiveError:
    """The error of class ``name`` (one of this module's) with ``message`` and
    ``attributes``, as :func:`plain_attributes` gave them; a plain :class:`HiveError`
    naming ``name`` for a class this module does not have."""
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, HiveError)):
        return HiveError(f"{name}: {message}")
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    for key, value in attributes.items():
        # Only an instance's own fields: a name the class has (``args``, an OSError's
        # ``characters_written``, a method) is never one plain_attributes gives, and a
        # peer that sends one must not make this raise, nor shadow a method.
        if (
            isinstance(key, str)
            and not key.startswith("_")
            and isinstance(value, _SCALARS)
            and not hasattr(cls, key)
        ):
            setattr(error, key, value)
    return error
