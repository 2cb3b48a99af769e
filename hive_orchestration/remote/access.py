"""Who a connection is, and what it may call: tokens, roles, and the rules of each role.

A connection on the Unix socket comes from the owner's own user (the kernel says so):
it is ``admin``. A connection on TCP presents a token in its hello; the tokens file
(``RuntimeConfig.tokens_file``, docs/SERVING.md) maps each token to an identity, a role
and the worker ids it may act for:

- ``admin`` may call everything, as anyone.
- ``agent`` acts as its identity alone: the server makes it the ``source_agent`` of every
  call (a call that names another, in its defaults or its arguments, is refused) and the
  worker ids it names must be its own. :data:`AGENT_RULES` says, operation by operation,
  what else it may do; an operation not in it is refused.

Tokens are kept as their SHA-256 and compared in constant time with every known one, so
how long a refusal takes says nothing about how close a guess was.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from .._validate import check_identifier
from ..errors import AccessDeniedError, ConfigError, InvalidInputError

if TYPE_CHECKING:
    from ..api.client import OrchestrationClient
    from ..messages.plans import ExecutionPlan
    from ..messages.tasks import Task

__all__ = ["AGENT_RULES", "OWNER", "Authorizer", "Identity", "Rule", "Tokens", "load_tokens"]

Role = Literal["admin", "agent"]
#: Shortest token kept in plain in a tokens file (a hashed one is 256 bits anyway).
MIN_TOKEN = 16


class Identity(msgspec.Struct, frozen=True):
    """Who a connection is: ``name`` (None: the owner's own user, on the Unix socket),
    its role, and the worker ids it may act for."""

    name: str | None
    role: Role
    workers: frozenset[str] = frozenset()


#: A peer of the owner's own user on the Unix socket.
OWNER = Identity(None, "admin")


class Rule(enum.Enum):
    """What an ``agent`` token must satisfy to call an operation."""

    #: A read: tasks, runs, workers, plans, planning requests, events.
    READ = "read"
    #: A write recorded as the caller's (``source_agent``, ``requestor``: its identity).
    AS_ITSELF = "as itself"
    #: A claimed task's lease: its secret, handed to the claimer alone, is the proof.
    LEASE = "with the lease"
    #: ``worker_id`` (``agent_id``) must be one of the token's worker ids.
    ITS_WORKER = "for its own worker ids"
    #: A task it created, or a subtask of a plan of its own.
    ITS_TASK = "on its own tasks"
    #: A plan it created, or one answering a planning request it queued.
    ITS_PLAN = "on its own plans"
    #: A planning request it queued.
    ITS_REQUEST = "on its own planning requests"
    #: A planning request one of its worker ids (or its identity) holds.
    HELD_REQUEST = "on planning requests it holds"
    #: A periodic schedule it created.
    ITS_SCHEDULE = "on its own schedules"
    #: Refused: an admin token's business.
    ADMIN = "admin only"


_R = Rule
#: Every operation and what an ``agent`` token needs to call it (the test suite checks
#: that each operation of the wire is here). Subscriptions (events) are reads.
AGENT_RULES: Mapping[str, Rule] = MappingProxyType(
    {
        # reads
        "check_subtask_dependencies": _R.READ,
        "check_subtask_dependencies_batch": _R.READ,
        "count_tasks": _R.READ,
        "get_active_workers": _R.READ,
        "get_execution_plan": _R.READ,
        "get_execution_plan_status": _R.READ,
        "get_execution_plan_status_cached": _R.READ,
        "get_execution_plans": _R.READ,
        "get_next_planned_subtask": _R.READ,
        "get_dependency_results": _R.READ,
        "get_pending_tasks": _R.READ,
        "get_plan_progress": _R.READ,
        "get_plan_subtasks": _R.READ,
        "get_planning_queue": _R.READ,
        "get_planning_request": _R.READ,
        "get_queued_tasks": _R.READ,
        "get_run": _R.READ,
        "get_runs": _R.READ,
        "get_task": _R.READ,
        "get_tasks_by_status": _R.READ,
        "get_unroutable_tasks": _R.READ,
        "get_worker": _R.READ,
        "last_seq": _R.READ,
        "list_tasks": _R.READ,
        "list_workers": _R.READ,
        "queue_depths": _R.READ,
        # Who is connected (names, pids): what an operator sees, and nothing of the work.
        "server_status": _R.READ,
        # The runtime's own counters (mailbox depths, restarts, commits and writes, their
        # histograms, deliveries and lags) and its file's path and schema version, which
        # server_status already shows: figures of load, nothing of any task's content.
        "statistics": _R.READ,
        "read_events": _R.READ,
        "wait_for_plan": _R.READ,
        "wait_for_task": _R.READ,
        "get_task_counts": _R.READ,
        "get_revoked_task_types": _R.READ,
        # what it starts, as itself
        "create_task": _R.AS_ITSELF,
        "create_tasks": _R.AS_ITSELF,
        "create_execution_plan": _R.AS_ITSELF,  # for a request it holds or queued
        "queue_planning_request": _R.AS_ITSELF,
        "publish": _R.AS_ITSELF,  # worker_id, if given, one of its own
        # a claimed task, with its lease
        "start_task": _R.LEASE,
        "heartbeat": _R.LEASE,
        "report_progress": _R.LEASE,
        "complete_task": _R.LEASE,
        "complete_tasks": _R.LEASE,  # each item by its own lease
        "fail_task": _R.LEASE,
        "fail_tasks": _R.LEASE,
        "release_task": _R.LEASE,
        # its own workers
        "register_worker": _R.ITS_WORKER,
        "update_worker_heartbeat": _R.ITS_WORKER,
        "unregister_worker": _R.ITS_WORKER,
        "release_worker_tasks": _R.ITS_WORKER,
        "claim_task": _R.ITS_WORKER,
        "claim_tasks": _R.ITS_WORKER,
        "claim_planning_request": _R.ITS_WORKER,  # agent_id: a worker id or its identity
        # what it made or asked for
        "cancel_task": _R.ITS_TASK,
        "retry_task": _R.ITS_TASK,
        "update_task_status": _R.ITS_TASK,  # assigned_worker, if set, one of its own
        "approve_plan": _R.ITS_PLAN,
        "mark_plan_execution_started": _R.ITS_PLAN,
        "cancel_plan": _R.ITS_PLAN,
        "create_planned_subtasks_from_plan": _R.ITS_PLAN,
        "cancel_planning_request": _R.ITS_REQUEST,
        "fail_planning_request": _R.HELD_REQUEST,
        # periodic schedules (docs/SCHEDULES.md): an agent's tasks come from its own
        "get_schedule": _R.READ,
        "list_schedules": _R.READ,
        "create_schedule": _R.AS_ITSELF,  # replace=True: of a schedule of its own only
        "pause_schedule": _R.ITS_SCHEDULE,
        "resume_schedule": _R.ITS_SCHEDULE,
        "delete_schedule": _R.ITS_SCHEDULE,
        # by hand, on anyone's: admin tokens only
        "delete_task": _R.ADMIN,
        "purge_tasks": _R.ADMIN,
        "trim_events": _R.ADMIN,
        "create_run": _R.ADMIN,
        "update_run_status": _R.ADMIN,
        # control by hand (docs/CONTROL.md): an operator's, on anyone's tasks
        "revoke_task_type": _R.ADMIN,
        "restore_task_type": _R.ADMIN,
        "flush_queue": _R.ADMIN,
    }
)

#: Arguments that say who is acting: an agent may give only its own identity there.
_WHO = ("source_agent", "requestor")


class Authorizer:
    """Decides, before it runs, whether a call of an ``agent`` connection may run, and as
    whom. ``reader`` is an in-process client the decisions read tasks and plans with:
    what they read (who created a task, who asked for a plan) never changes once
    written, so nothing can change between the check and the call."""

    def __init__(self, identity: Identity, reader: OrchestrationClient) -> None:
        assert identity.name is not None
        self._name = identity.name
        self._identity = identity
        self._reader = reader
        # A worker id, or the identity itself (a planner's agent_id is often its name).
        self._actors = identity.workers | {identity.name}

    async def check(self, op: str, args: Mapping[str, Any], agent: str | None) -> str:
        """The source agent the call runs as (the token's identity), or
        :class:`AccessDeniedError` saying why it may not run; nothing was done then."""
        name = self._name
        if agent is not None and agent != name:
            self._deny(op, f"calls as source_agent {_show(agent)}")
        rule = AGENT_RULES.get(op, Rule.ADMIN)
        if rule is Rule.ADMIN:
            raise AccessDeniedError(op, f"{op} is for admin tokens; agent {name!r} may not call it")
        for field in _WHO:
            value = args.get(field)
            if value is not None and value != name:
                self._deny(op, f"names {field}={_show(value)}")
        match op:
            case "create_tasks":
                self._check_items(op, args.get("tasks"))
            case "publish":
                self._check_worker(op, "worker_id", args.get("worker_id"), optional=True)
            case "update_task_status":
                metadata = args.get("metadata")
                if isinstance(metadata, Mapping):
                    worker = metadata.get("assigned_worker")
                    self._check_worker(op, "metadata.assigned_worker", worker, optional=True)
            case "create_execution_plan":
                await self._check_answers(op, args.get("planning_task_id"))
            case "claim_planning_request":
                self._check_worker(op, "agent_id", args.get("agent_id"))
            case "create_schedule" if args.get("replace") is True:
                await self._check_schedule(op, args.get("name"))
        match rule:
            case Rule.ITS_WORKER if op != "claim_planning_request":
                self._check_worker(op, "worker_id", args.get("worker_id"))
            case Rule.ITS_TASK:
                task = await self._reader.get_task(args["task_id"])
                if task is not None and not await self._owns_task(task):
                    self._deny(op, f"task {task.id!r} is not one it created")
            case Rule.ITS_PLAN:
                plan = await self._reader.get_execution_plan(args["plan_id"])
                if plan is not None and not await self._owns_plan(plan):
                    self._deny(op, f"plan {plan.id!r} is not one it created or asked for")
            case Rule.ITS_REQUEST:
                request = await self._reader.get_planning_request(args["request_id"])
                if request is not None and request.requestor != name:
                    self._deny(op, f"planning request {request.id!r} is not one it queued")
            case Rule.ITS_SCHEDULE:
                await self._check_schedule(op, args.get("name"))
            case Rule.HELD_REQUEST:
                request = await self._reader.get_planning_request(args["request_id"])
                if request is not None and request.assigned_agent not in self._actors:
                    self._deny(op, f"planning request {request.id!r} is not held by it")
        return name

    def _deny(self, op: str, what: str) -> None:
        identity = self._identity
        workers = ", ".join(sorted(identity.workers)) or "none"
        raise AccessDeniedError(
            op,
            f"the token of agent {self._name!r} {what}; it acts as {self._name!r} only, for"
            f" its worker ids ({workers}), and on what it made (an admin token may do more)",
        )

    def _check_worker(self, op: str, field: str, value: object, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        allowed = self._actors if field == "agent_id" else self._identity.workers
        if not isinstance(value, str) or value not in allowed:
            self._deny(op, f"names {field}={_show(value)}, not one of its worker ids")

    def _check_items(self, op: str, items: object) -> None:
        if not isinstance(items, Iterable) or isinstance(items, str | bytes | Mapping):
            return  # the operation refuses it, as it would anyone's
        for index, item in enumerate(items):
            if isinstance(item, Mapping):
                value = item.get("source_agent")
                if value is not None and value != self._name:
                    self._deny(op, f"names tasks[{index}].source_agent={_show(value)}")

    async def _check_answers(self, op: str, request_id: object) -> None:
        """A plan may answer a planning request it holds (or queued itself)."""
        if not isinstance(request_id, str):
            return  # none (a plan of its own), or refused by the operation
        request = await self._reader.get_planning_request(request_id)
        if request is None:
            return  # the operation says it is not found
        if request.assigned_agent not in self._actors and request.requestor != self._name:
            self._deny(op, f"answers planning request {request.id!r}, which it does not hold")

    async def _check_schedule(self, op: str, name: object) -> None:
        """A schedule it created (an unknown one: the operation answers as for anyone)."""
        if not isinstance(name, str):
            return  # refused by the operation
        schedule = await self._reader.get_schedule(name)
        if schedule is not None and schedule.source_agent != self._name:
            self._deny(op, f"schedule {schedule.name!r} is not one it created")

    async def _owns_plan(self, plan: ExecutionPlan) -> bool:
        if plan.source_agent == self._name:
            return True
        request = await self._reader.get_planning_request(plan.planning_task_id)
        return request is not None and request.requestor == self._name

    async def _owns_task(self, task: Task) -> bool:
        if task.source_agent == self._name:
            return True
        if task.plan_id is None:
            return False
        plan = await self._reader.get_execution_plan(task.plan_id)
        return plan is not None and await self._owns_plan(plan)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


# -- the tokens file ----------------------------------------------------------------------


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    identity: str
    role: Role = "agent"
    #: The worker ids an agent acts for; default: its identity alone.
    workers: list[str] | None = None
    #: The token's SHA-256, in hex (what to keep in the file), or the token in plain.
    sha256: str | None = None
    token: str | None = None


class _File(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tokens: list[_Entry]


class Tokens:
    """The known tokens, by their SHA-256."""

    def __init__(self, entries: Iterable[tuple[bytes, Identity]]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, token: object) -> Identity | None:
        """The identity of ``token``, or None. Compared with every known token, each in
        constant time, whatever matches."""
        if not isinstance(token, str) or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, identity in self._entries:
            if hmac.compare_digest(known, digest) and found is None:
                found = identity
        return found


def load_tokens(path: str | os.PathLike[str]) -> Tokens:
    """Read a tokens file (TOML, or JSON for a ``.json`` file); :class:`ConfigError` on
    ``tokens_file`` naming the entry and what is wrong with it."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            raw = f.read()
            mode = os.fstat(f.fileno()).st_mode
        data = json.loads(raw) if where.endswith(".json") else tomllib.loads(raw.decode())
        parsed = msgspec.convert(data, _File)
    except OSError as exc:
        raise ConfigError("tokens_file", f"cannot read {where!r}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # JSON, TOML, text
        raise ConfigError("tokens_file", f"{where!r} cannot be read: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(
            "tokens_file",
            f"{where!r} is not a tokens file: {exc} (expected [[tokens]] entries with"
            " identity, role, workers and sha256; docs/SERVING.md)",
        ) from None
    entries: list[tuple[bytes, Identity]] = []
    seen: set[bytes] = set()
    plain = False
    for index, entry in enumerate(parsed.tokens):
        at = f"{where!r}, tokens[{index}]"
        try:
            name = check_identifier(entry.identity, "identity")
            workers = frozenset(
                check_identifier(worker, f"workers[{i}]")
                for i, worker in enumerate(entry.workers if entry.workers is not None else [name])
            )
        except InvalidInputError as exc:
            raise ConfigError("tokens_file", f"{at}: {exc}") from None
        if (entry.sha256 is None) == (entry.token is None):
            raise ConfigError("tokens_file", f"{at}: give sha256 (or token), exactly one")
        if entry.token is not None:
            plain = True
            if len(entry.token) < MIN_TOKEN:
                raise ConfigError(
                    "tokens_file", f"{at}: a token must be at least {MIN_TOKEN} characters"
                )
            digest = hashlib.sha256(entry.token.encode("utf-8", "surrogatepass")).digest()
        else:
            assert entry.sha256 is not None
            try:
                digest = bytes.fromhex(entry.sha256)
            except ValueError:
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise ConfigError("tokens_file", f"{at}: sha256 must be 64 hex digits")
        if digest in seen:
            raise ConfigError("tokens_file", f"{at}: the same token is given twice")
        seen.add(digest)
        entries.append((digest, Identity(name, entry.role, workers)))
    if plain and stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            "tokens_file",
            f"{where!r} holds tokens in plain and other users may read it: chmod 600 it, or"
            " keep each token's sha256 instead",
        )
    if not entries:
        raise ConfigError("tokens_file", f"{where!r} holds no token: no client could connect")
    return Tokens(entries)
