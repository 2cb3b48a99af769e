"""Runtime configuration: one frozen msgspec Struct, read once, from code, TOML or environment.

Precedence, lowest first: the defaults below, a TOML file, then environment variables
``HIVE_ORCHESTRATION_<FIELD>`` (``HIVE_ORCHESTRATION_FEATURES__<FLAG>`` for feature flags).
Every value is validated when loaded; a bad one raises :class:`ConfigError` naming it.

The database's location is the one setting also read without :meth:`RuntimeConfig.load`
(see :func:`choose_db_path`): ``Runtime.open``, both clients, the inspector and the
command line all take the path given in code, else ``config.db_path``, else
``$HIVE_ORCHESTRATION_DB_PATH``, else :data:`DEFAULT_DB_PATH`, so that every program of
a deployment finds one database whatever its working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ._validate import DAY, MIN_DEADLINE, MIN_DELAY, MIN_LEASE
from .errors import ConfigError, InvalidInputError

__all__ = [
    "DB_PATH_ENV",
    "DEFAULT_DB_PATH",
    "ENV_PREFIX",
    "TLS_CA_ENV",
    "TOKEN_ENV",
    "URL_ENV",
    "FeatureFlags",
    "RateLimit",
    "RetentionPolicy",
    "RuntimeConfig",
    "choose_db_path",
    "resolve_db_path",
]

#: Where ``Runtime.open()`` keeps its database when no path is given anywhere (the seeds'
#: default). Relative to the working directory at open; its folders are created when
#: missing. The runtime resolves it to an absolute path once, at open.
DEFAULT_DB_PATH = Path("hive") / "db" / "hive-internal.db"

ENV_PREFIX = "HIVE_ORCHESTRATION_"
#: The environment variable that names the database (the ``db_path`` field's).
DB_PATH_ENV = f"{ENV_PREFIX}DB_PATH"
#: A client's settings, not the runtime's: where the runtime is served (``hive://`` or
#: ``hives://HOST:PORT``), the token to present there, and the CA file that signed its
#: certificate. Read by the clients (see OrchestrationClient), skipped by ``load``.
URL_ENV = f"{ENV_PREFIX}URL"
TOKEN_ENV = f"{ENV_PREFIX}TOKEN"
TLS_CA_ENV = f"{ENV_PREFIX}TLS_CA"
_CLIENT_ENV = frozenset({URL_ENV, TOKEN_ENV, TLS_CA_ENV})

Positive = Annotated[int, msgspec.Meta(ge=1)]
# Durations, in seconds, bounded as the API's own (hive_orchestration._validate says why):
# NaN, an infinity or 1e-300 is a mistake in a config, not a setting.
#: What takes a task away from a live worker (a lease, a worker's silence).
LeaseSeconds = Annotated[float, msgspec.Meta(ge=MIN_LEASE, le=DAY)]
#: A deadline something waits for (a reply, a lock, a shutdown).
DeadlineSeconds = Annotated[float, msgspec.Meta(ge=MIN_DEADLINE, le=DAY)]
#: A delay before a retry.
DelaySeconds = Annotated[float, msgspec.Meta(ge=MIN_DELAY, le=DAY)]


class FeatureFlags(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The follow-up seed's rollout flags, kept so that existing configs load unchanged.

    They are validated and carried by the config; the runtime does not act on them yet:
    ``enable_unified_events`` and ``enable_agent_adapters`` are for the client and agent
    APIs (unified event model, example agent adapters) that build on this runtime.
    ``enable_dual_write`` has no legacy schema to write to here and will stay inert.
    """

    enable_unified_events: bool = False
    enable_dual_write: bool = False
    enable_agent_adapters: bool = False


class RateLimit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most ``starts`` claims every ``per`` seconds (a sliding window; docs/TIMING.md)."""

    starts: Positive
    per: Annotated[float, msgspec.Meta(ge=MIN_DELAY, le=DAY)]


#: An age something is kept for: a second at least (a shorter one is a mistake), at most
#: a hundred years.
AgeSeconds = Annotated[float, msgspec.Meta(ge=1.0, le=100 * 365 * DAY)]


class RetentionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the runtime deletes by itself (docs/RETENTION.md): every limit is off unless
    set. It runs on its own, woken when the oldest finished task or event reaches its age
    (never more often than every ``interval`` seconds; the size limits are looked at that
    often), in chunks of ``chunk`` tasks, one transaction each, so that writers go between.
    """

    #: Purge finished tasks (completed, failed, cancelled, timed out) last changed longer
    #: ago than this, with their runs and events.
    finished_max_age: AgeSeconds | None = None
    #: Purge the finished tasks that hold an idempotency key too (their keys are freed).
    include_keyed: bool = False
    #: Trim events older than this from the event log.
    events_max_age: AgeSeconds | None = None
    #: Keep at most this many events (the newest).
    events_max_count: Positive | None = None
    #: Keep at most this many bytes of events (the newest; see docs/RETENTION.md).
    events_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] | None = None
    #: Least time between two passes, in seconds.
    interval: AgeSeconds = 60.0
    #: Tasks purged per transaction (events trimmed per transaction: four times this).
    chunk: Annotated[int, msgspec.Meta(ge=1, le=25_000)] = 250


class RuntimeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything a runtime can be tuned with. All fields have safe defaults."""

    #: The database file (or ``":memory:"``) when ``Runtime.open`` and the clients are
    #: given no path; ``None``: ``$HIVE_ORCHESTRATION_DB_PATH``, else
    #: ``hive/db/hive-internal.db``. A relative path is relative to the working directory
    #: at open: give an absolute one to share one database across working directories.
    db_path: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    #: ``FULL`` fsyncs the WAL on every commit: a reply survives power loss. ``NORMAL``
    #: survives a process crash (SIGKILL) but may lose the last commits on power loss.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: ``auto`` uses aiosqlite on asyncio and a worker thread under trio (SQLite only: a
    #: PostgreSQL database ignores it).
    storage_driver: Literal["auto", "aiosqlite", "thread"] = "auto"
    #: How long SQLite waits for another process's lock before a write fails.
    busy_timeout: DeadlineSeconds = 5.0
    #: Read-only connections that serve the large reads (listings, counts, the event log)
    #: beside the write connection, so that a long read never holds up a commit; 0 runs
    #: every read on the write connection. A ``:memory:`` database has one connection.
    read_connections: Annotated[int, msgspec.Meta(ge=0, le=16)] = 2
    #: Capacity of every actor's mailbox; senders wait when it is full (backpressure).
    mailbox_size: Positive = 4096
    #: Most requests the storage actor commits in one transaction.
    max_batch: Positive = 1024
    #: Default deadline of a request/reply (``ask``).
    ask_timeout: DeadlineSeconds = 30.0
    #: How long leaving ``Runtime.open`` may spend draining mailboxes before cancelling.
    shutdown_timeout: DeadlineSeconds = 10.0
    #: Restart intensity: more than ``max_restarts`` crashes of one child within
    #: ``restart_window`` seconds stops the runtime with the cause.
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window: DeadlineSeconds = 10.0
    #: How many events a subscriber may have unread when a commit comes, beyond what is
    #: left of the last commit it was given (a commit is handed over whole), before the
    #: overflow policy applies.
    subscriber_buffer: Positive = 1000
    #: ``error``: a subscriber that overflows gets SubscriberLaggedError and is closed (it
    #: can replay from the durable log). ``drop``: it silently misses that commit's events.
    subscriber_overflow: Literal["error", "drop"] = "error"
    #: Largest accepted JSON payload, in bytes once encoded.
    max_payload_bytes: Positive = 1024 * 1024
    #: Deepest accepted nesting of a JSON payload.
    max_payload_depth: Positive = 32
    #: Largest plan data (all its subtasks) once encoded as JSON, in bytes.
    max_plan_bytes: Positive = 64 * 1024 * 1024
    #: Largest request ``call_json`` takes, in bytes as received: a larger one is refused
    #: before it is decoded. A payload sent as JSON text may be larger than its encoding
    #: here (escaped, indented), hence room for 4 times a payload at the limit.
    max_request_bytes: Positive = 4 * 1024 * 1024
    #: Default lease of a claim: a worker that sends no heartbeat for this long loses
    #: the task, which goes back to the queue.
    lease_timeout: LeaseSeconds = 30.0
    #: Retry backoff after a failed or timed-out run: ``retry_backoff * 2**(attempt-1)``
    #: seconds, at most ``retry_backoff_max``, with jitter (between half and all of it).
    retry_backoff: DelaySeconds = 1.0
    retry_backoff_max: DelaySeconds = 300.0
    #: How many of each ready queue's best tasks the TaskManager holds in memory (a
    #: queue: the queued tasks of one task type, requirement list and concurrency key).
    #: The rest of the backlog stays in SQLite and is read back, by an index, when fewer
    #: than half are left; so memory is this times the number of queues, not the backlog.
    ready_queue_head: Positive = 1024
    #: At most N tasks of a task type assigned or running at once (``{"deploy": 1}``).
    concurrency_limits: dict[str, Positive] = msgspec.field(default_factory=dict)
    #: At most N claims per interval of a task type (``{"send_email": {"starts": 10,
    #: "per": 60}}``); claims beyond it wait. Kept across restarts (docs/TIMING.md).
    rate_limits: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    #: The same per concurrency key (a task's ``concurrency_key``).
    key_rate_limits: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    #: A worker that sends no heartbeat for this long is declared offline and what it
    #: holds goes back to the queue.
    worker_timeout: LeaseSeconds = 30.0
    #: Publish a ``worker.heartbeat`` event for every heartbeat (off: they are frequent).
    publish_heartbeats: bool = False
    #: The longest the scheduler's alarm sleeps before it reads the wall clock again: a
    #: wall clock stepped meanwhile is seen within this (docs/SCHEDULES.md, "Clocks").
    schedule_clock_check: DeadlineSeconds = 60.0
    #: Serve the message API to this user's other processes on a Unix socket beside the
    #: database (a file database only), so that their clients reach this runtime.
    serve_socket: bool = True
    #: A connection to another process's runtime that carries nothing (not even the
    #: keepalive pings, sent every quarter of this, at most 5 s) for this long is dead:
    #: its calls fail with ConnectionLostError. The server drops a client silent for three
    #: times this (clients are told, and ping often enough), and one that takes no frame
    #: within this.
    remote_timeout: Annotated[float, msgspec.Meta(ge=1.0, le=DAY)] = 10.0
    #: Largest frame the socket server reads (a call's arguments, once encoded).
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 16 * 1024 * 1024
    #: Calls one connection may have in flight; past that the server stops reading it.
    max_calls_in_flight: Positive = 256
    #: Bytes the socket server may hold at once for all its connections' requests: a
    #: call is counted its frame and the most it may decode into (up to 101 times a
    #: small frame; 208 MiB for one of 16 MiB), from before its body is read until it
    #: ends (a call that waits for other clients, a claim with ``wait`` say, not while it
    #: waits). Past it the server stops reading the connections that want more until
    #: others' calls end, first come first served; calls running are never failed for
    #: it. At least what one call of ``max_frame_bytes`` may hold (docs/SERVING.md).
    max_held_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 512 * 1024 * 1024
    #: Bytes of answers and events the socket server may have queued for one connection
    #: of its own (a frame alone always goes, however large). Past it what is queued is
    #: taken from max_held_bytes while the client has a second to take the queue back
    #: under it; one that does not (or whose excess finds no room) is closed: a client
    #: that asks for more than it reads cannot make the owner queue without bound, and
    #: one that reads at full speed is not cut for a burst (docs/PROTOCOL.md, "Limits").
    max_queued_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    #: The most one frame from another process's runtime (an answer, a batch of events)
    #: may make this process's client hold: its bytes and what its values take once
    #: decoded, counted before any is (a frame over half of it is refused at its
    #: header). Past it the connection is dropped: its calls in flight fail with
    #: OutcomeUnknownError naming this (docs/PROTOCOL.md, "Limits"). A server, or
    #: whatever answers at its address, cannot make a client take more.
    max_answer_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 512 * 1024 * 1024
    #: Where else to serve the message API: ``tcp://HOST:PORT`` addresses (port 0: any
    #: free port), beside the Unix socket. Off loopback only with ``tls_cert``; every TCP
    #: connection needs a token of ``tokens_file`` (docs/SERVING.md).
    listen: tuple[str, ...] = ()
    #: The server's certificate chain and private key (PEM files): TCP connections are
    #: then TLS (clients use ``hives://``).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The tokens TCP clients authenticate with: their identity, role and worker ids
    #: (TOML, or JSON for a ``.json`` file; docs/SERVING.md).
    tokens_file: str | None = None
    #: Connections served at once (Unix socket and TCP together); one more is refused
    #: with a ConnectionLostError that names this limit, and closed.
    max_connections: Positive = 1024
    #: A client of another process's runtime (reached through its socket) takes the
    #: database over when that runtime goes away: it opens it itself (recovery runs) and
    #: goes on, or connects to the client that took it first (the file's lock decides).
    #: Off: its calls fail with ConnectionLostError once the owner is gone.
    take_over: bool = False
    #: Task types whose tasks are deleted (with their runs) as they complete, like Huey's
    #: and procrastinate's delete-on-success; ``"*"``: every type. Their events stay (the
    #: event log has its own retention); a plan's task or one with an idempotency key is
    #: kept (docs/RETENTION.md).
    delete_on_success: tuple[str, ...] = ()
    #: Automatic retention of finished tasks and of the event log (None: none).
    retention: RetentionPolicy | None = None
    features: FeatureFlags = FeatureFlags()

    @classmethod
    def load(
        cls,
        toml_path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> RuntimeConfig:
        """Build a config from a TOML file, the environment and keyword overrides.

        ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
        """
        raw: dict[str, Any] = {}
        if toml_path is not None:
            try:
                with open(toml_path, "rb") as f:
                    raw.update(tomllib.load(f))
            except OSError as exc:
                raise ConfigError("toml_path", f"cannot read {str(toml_path)!r}: {exc}") from exc
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError("toml_path", f"{str(toml_path)!r} is not TOML: {exc}") from exc
        environ = os.environ if env is None else env
        for key, value in environ.items():
            if not key.startswith(ENV_PREFIX) or key in _CLIENT_ENV:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name.startswith("features__"):
                features = raw.setdefault("features", {})
                if not isinstance(features, dict):
                    raise ConfigError("features", "must be a table of flags")
                features[name[len("features__") :]] = value
            elif value.lstrip().startswith(("{", "[")):
                # A table (concurrency_limits) or a list (listen) comes as JSON.
                try:
                    raw[name] = msgspec.json.decode(value)
                except msgspec.DecodeError as exc:
                    raise ConfigError(name, f"is not JSON: {exc}") from None
            else:
                raw[name] = value
        raw.update(overrides)
        return cls.from_mapping(raw)

    @classmethod
    def checked(cls, config: object) -> RuntimeConfig:
        """``config`` validated, or the defaults for ``None`` (what ``open`` accepts)."""
        if config is None:
            return cls()
        if not isinstance(config, RuntimeConfig):
            raise ConfigError("config", f"must be a RuntimeConfig, got {type(config).__name__}")
        return config.validated()

    def validated(self) -> RuntimeConfig:
        """This config, checked: msgspec checks constraints only when decoding, so a
        ``RuntimeConfig(...)`` built in code is validated here (``Runtime.open`` does)."""
        return self.from_mapping(msgspec.to_builtins(self))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RuntimeConfig:
        """Validate a plain mapping (strings are converted: ``"10"`` becomes ``10``)."""
        try:
            return msgspec.convert(dict(raw), cls, strict=False)
        except msgspec.ValidationError as exc:
            field, reason = _split_validation_error(exc)
            if field in _SECONDS_BOUNDS and (">=" in reason or "<=" in reason):
                low, high = _SECONDS_BOUNDS[field]
                reason = f"must be from {low:g} to {high:g} seconds ({reason})"
            raise ConfigError(field, reason) from None


def choose_db_path(
    path: str | os.PathLike[str] | None,
    config: RuntimeConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> tuple[str | os.PathLike[str], str]:
    """Which database to open, and where that choice came from (for the log).

    The first of: ``path`` (given in code or on the command line), ``config.db_path``,
    ``$HIVE_ORCHESTRATION_DB_PATH`` (read from ``env``, default ``os.environ``, even
    when ``config`` did not come from :meth:`RuntimeConfig.load`), and
    :data:`DEFAULT_DB_PATH`. The path is not checked here (``Runtime.open`` does).
    """
    if path is not None:
        return path, "the path given"
    if isinstance(config, RuntimeConfig) and config.db_path is not None:
        return config.db_path, "RuntimeConfig.db_path"
    value = (os.environ if env is None else env).get(DB_PATH_ENV)
    if value is not None:
        if not value.strip():
            raise ConfigError("db_path", f"${DB_PATH_ENV} is empty: unset it or name a file")
        return value, f"${DB_PATH_ENV}"
    return str(DEFAULT_DB_PATH), "the default, relative to the working directory"


def resolve_db_path(
    path: str | os.PathLike[str] | None, config: RuntimeConfig | None = None
) -> tuple[str, str]:
    """The database to open, absolute (or ``":memory:"``, or a server's URL as given), and
    where the choice came from
    (:func:`choose_db_path`). Refuses a path that is not one, naming ``path`` when it was
    given, else ``db_path``.

    Absolute once, at open: a restarted storage actor reconnects to the same file even if
    the app changed its working directory meanwhile.
    """
    chosen, source = choose_db_path(path, config)
    error = InvalidInputError if path is not None else ConfigError
    field = "path" if path is not None else "db_path"
    if not isinstance(chosen, str | os.PathLike):
        raise error(field, f"must be a path or ':memory:', got {type(chosen).__name__}")
    text = os.fspath(chosen)
    if not isinstance(text, str) or not text.strip():
        raise error(field, "must be a non-empty path or ':memory:'")
    if text == ":memory:" or text.lower().startswith(SERVER_SCHEMES):
        return text, source  # a server's URL is no file to anchor to the working directory
    return str(Path(text).absolute()), source


#: Database names that are a server's URL, not a file (``storage/port.py``'s
#: POSTGRES_SCHEMES: the storage layer decides which store they open).
SERVER_SCHEMES = ("postgresql://", "postgres://")


def _seconds_bounds() -> dict[str, tuple[float, float]]:
    """The bounds of each duration field, from its annotation (to say them in an error)."""
    hints = typing.get_type_hints(RuntimeConfig, include_extras=True)
    bounds = {}
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            if isinstance(meta, msgspec.Meta) and isinstance(meta.le, float):
                bounds[name] = (float(meta.ge or 0.0), meta.le)
    return bounds


def _split_validation_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Turn msgspec's "Expected `int`, got `str` - at `$.mailbox_size`" into parts."""
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `")
    path = where.rstrip("`").removeprefix("$").lstrip(".") if sep else ""
    # msgspec names an unknown or missing field in the text: "unknown field `x`".
    named = re.search(r"field `([^`]+)`", reason if sep else text)
    if named is not None:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    if not sep:
        return path or "config", text
    return path or "config", reason


_SECONDS_BOUNDS = _seconds_bounds()
