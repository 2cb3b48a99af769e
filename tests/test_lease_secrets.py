"""Leases that cannot be forged: a claim's lease carries a secret that only its claimer
gets (in the claim's answer), and every call that holds the lease must prove it.

The ids and attempt of a claimed run are in every read of the runs (``get_runs``, the
events, the inspector), so a worker that reads them could otherwise heartbeat, complete,
fail, release or start a task another worker holds, and the event would name the other
worker. Each test here runs on both backends with real SQLite files: a forged lease
changes nothing and publishes nothing; the secret is never read back, from memory, the
events, the database or the CLI; the database keeps its SHA-256 only; the claims (and
their secrets) stand across a restart of the TaskManager; the JSON entry point carries it;
an ``Unclaimed`` give-back must prove it too; and a database of the previous schema
version opens and recovers its open runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _raw import is_postgres, raw_rows

from hive_orchestration import (
    SCHEMA_VERSION,
    ActorFailedError,
    Claim,
    InvalidInputError,
    Lease,
    LeaseLostError,
    OrchestrationClient,
    Run,
    RunStatus,
    Runtime,
    Task,
    TaskStatus,
)
from hive_orchestration._ids import new_secret
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api.wire import call_json
from hive_orchestration.messages.tasks import GetTask, Unclaimed
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

pytestmark = pytest.mark.anyio

#: The refusal's words for a lease whose secret is not its claim's.
NOT_THE_CLAIMER = "secret does not match the claim's"

Call = Callable[[Runtime, Lease], Awaitable[object]]

#: Every call that holds a lease, by name.
LEASED: dict[str, Call] = {
    "heartbeat": lambda rt, lease: rt.heartbeat(lease),
    "report_progress": lambda rt, lease: rt.report_progress(lease, {"done": 1}, phase="p"),
    "start_task": lambda rt, lease: rt.start_task(lease),
    "complete_task": lambda rt, lease: rt.complete_task(lease, {"ok": True}),
    "fail_task": lambda rt, lease: rt.fail_task(lease, "it broke"),
    "release_task": lambda rt, lease: rt.release_task(lease, reason="shutting down"),
}


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _rebuilt(run: Run, secret: str = "") -> Lease:
    """What a worker that reads ``get_runs`` can build: every field but the secret."""
    return Lease(run.task_id, run.id, run.run_number, secret)


async def _claim(rt: Runtime, task_type: str, worker: str, *, start: bool = False) -> Claim:
    got = await rt.claim_task(worker, task_type, lease=600, start=start)
    assert got is not None
    return got


async def _state(rt: Runtime, task_id: str) -> tuple[Task | None, list[Run], int]:
    """Everything a refused call must leave as it was: the task, its runs, the log's end."""
    stats = await rt.statistics()
    return await rt.get_task(task_id), await rt.get_runs(task_id), stats.storage.last_seq


# -- forged leases --------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(LEASED))
async def test_a_worker_that_reads_the_runs_cannot_act_on_anothers_claim(
    db_path: str, op: str
) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("deploy")
        # An earlier attempt by another worker, handed back: its secret is no use now.
        earlier = await _claim(rt, "deploy", "w-earlier")
        await rt.release_task(earlier.lease)
        # The claim under attack (started, except where starting it is the attack).
        owner = await _claim(rt, "deploy", "w-owner", start=op != "start_task")
        assert owner.lease.attempt == 2
        # The thief is a worker too, with a claim (and a secret) of its own.
        await rt.create_task("build")
        thief = await _claim(rt, "build", "w-thief")

        (_, run) = await rt.get_runs(task_id)
        forgeries = {
            "no secret": _rebuilt(run),
            "the thief's own secret": _rebuilt(run, thief.lease.secret),
            "the earlier attempt's secret": _rebuilt(run, earlier.lease.secret),
            "a guess": _rebuilt(run, new_secret()),
            "the secret's hash": _rebuilt(run, _hash(owner.lease.secret).hex()),
        }
        before = await _state(rt, task_id)
        for what, forged in forgeries.items():
            with pytest.raises(LeaseLostError, match=NOT_THE_CLAIMER) as refused:
                await LEASED[op](rt, forged)
            assert (refused.value.task_id, refused.value.run_id) == (task_id, run.id), what
            assert await _state(rt, task_id) == before, f"{op} with {what} changed something"

        # The claimer itself is not hindered, and the thief's own claim still holds.
        await LEASED[op](rt, owner.lease)
        assert await _state(rt, task_id) != before, f"{op} by the claimer did nothing"
        after = await rt.read_events(before[2])
        # Its events name the claimer as their source (a bare heartbeat publishes none).
        assert {e.source for e in after} == (set() if op == "heartbeat" else {"w-owner"})
        await rt.heartbeat(thief.lease)


async def test_secrets_differ_per_claim_and_per_attempt(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        for n in range(40):
            await rt.create_task("job", {"n": n})
        batch = await rt.claim_tasks("w1", "job", limit=20, lease=600, start=True)
        singles = [await _claim(rt, "job", "w2") for _ in range(20)]
        claims = [*batch, *singles]
        # Then a second and a third attempt of one task.
        attempts = [claims[0]]
        for _ in range(2):
            await rt.fail_task(attempts[-1].lease, "again", retry_after=0)
            again = await rt.claim_task("w3", "job", lease=600)
            assert again is not None
            assert again.task.id == claims[0].task.id
            attempts.append(again)
        assert [c.lease.attempt for c in attempts] == [1, 2, 3]
        secrets = [c.lease.secret for c in [*claims, *attempts[1:]]]
        assert len(set(secrets)) == len(secrets) == 42
        for secret in secrets:
            # 128 bits in URL-safe base64, no padding (as secrets.token_urlsafe(16)).
            assert len(base64.urlsafe_b64decode(secret + "==")) == 16, secret


async def test_a_lease_of_the_wrong_shape_is_refused_at_the_boundary(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        owner = await _claim(rt, "job", "w1")
        before = await _state(rt, task_id)
        for secret in (None, 5, b"bytes", "x" * 10_000, "\ud800"):
            bad = Lease(task_id, owner.lease.run_id, 1, secret)  # type: ignore[arg-type]
            with pytest.raises(InvalidInputError) as refused:
                await rt.complete_task(bad)
            assert refused.value.field == "lease.secret"
        assert await _state(rt, task_id) == before
        await rt.complete_task(owner.lease)


# -- never read back --------------------------------------------------------------------------


def _needles(secret: str) -> dict[str, bytes]:
    """The secret and its hash, in every form a read could show them in."""
    digest = _hash(secret)
    return {
        "secret": secret.encode(),
        "hash": digest,
        "hash (hex)": digest.hex().encode(),
        "hash (base64)": base64.b64encode(digest).rstrip(b"="),
        "hash (url-safe base64)": base64.urlsafe_b64encode(digest).rstrip(b"="),
    }


def _assert_hidden(where: str, shown: bytes | str, secrets: list[str]) -> None:
    data = shown.encode() if isinstance(shown, str) else shown
    for secret in secrets:
        for form, needle in _needles(secret).items():
            assert needle not in data, f"{where} shows the lease's {form}"


def _shown(value: object) -> bytes:
    """A read's answer as JSON and as its repr: what a caller, a log or a screen sees."""
    return msgspec.json.encode(value) + repr(value).encode()


async def _cli(*argv: str) -> str:
    done = await anyio.run_process([sys.executable, "-m", "hive_orchestration", *argv])
    return done.stdout.decode()


async def test_no_read_returns_the_secret_or_its_hash(db_path: str) -> None:
    async with OrchestrationClient(db_path) as client:
        rt = client.runtime
        async with rt.subscribe("*") as live:
            ids = [await rt.create_task("job", {"n": n}) for n in range(3)]
            running = await _claim(rt, "job", "w1", start=True)
            await rt.report_progress(running.lease, {"half": True}, phase="work")
            assigned = await _claim(rt, "job", "w2")
            done = await _claim(rt, "job", "w3", start=True)
            await rt.complete_task(done.lease, {"ok": True})
            seen = []
            with anyio.fail_after(10):
                while len(seen) < (await rt.statistics()).storage.last_seq:
                    seen.append(await live.receive())
        claims = [running, assigned, done]
        secrets = [c.lease.secret for c in claims]
        assert all(len(secret) == 22 for secret in secrets), "a claim without its secret"

        reads: dict[str, object] = {
            "live events": seen,
            "read_events": await rt.read_events(0, limit=1000),
            "statistics": await rt.statistics(),
            "get_tasks_by_status": [
                await rt.get_tasks_by_status(status)
                for status in (TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.COMPLETED)
            ],
        }
        for task_id in ids:
            reads[f"get_task({task_id})"] = await rt.get_task(task_id)
            reads[f"get_runs({task_id})"] = runs = await rt.get_runs(task_id)
            for run in runs:
                reads[f"get_run({run.id})"] = await rt.get_run(run.id)
        for name, value in reads.items():
            _assert_hidden(name, _shown(value), secrets)
        for op, args in [
            ("read_events", {}),
            ("get_tasks_by_status", {"status": "running"}),
            *[("get_task", {"task_id": task_id}) for task_id in ids],
            *[("get_runs", {"task_id": task_id}) for task_id in ids],
            *[("get_run", {"run_id": claim.lease.run_id}) for claim in claims],
        ]:
            answer = await call_json(client, msgspec.json.encode({"op": op, "args": args}))
            _assert_hidden(f"call_json {op} {args}", answer, secrets)
        # The inspector, in another process, while the runtime holds the claims.
        for claim in claims:
            task_id = claim.task.id
            for argv in (("task", task_id), ("task", task_id, "--json")):
                shown = await _cli(*argv, "--db", db_path)
                assert claim.lease.run_id in shown, shown  # its runs are shown, not the secret
                _assert_hidden(" ".join(argv), shown, secrets)
        shown = await _cli("events", "--db", db_path, "--json")
        assert shown.count('"seq"') == len(seen) > 0
        _assert_hidden("events", shown, secrets)
        # A claim shown in a log or a traceback does not show its secret either.
        for claim in claims:
            _assert_hidden("repr(claim)", repr(claim) + str(claim.lease), secrets)
            assert "secret=<hidden>" in repr(claim.lease)


def _assert_not_in_files(db_path: str, claims: list[Claim]) -> None:
    assert all(len(claim.lease.secret) == 22 for claim in claims), "a claim without its secret"
    if is_postgres(db_path):
        _assert_not_in_tables(db_path, claims)
        return
    files = [
        p for p in Path(db_path).parent.iterdir() if p.name.startswith("hive.db") and p.is_file()
    ]
    assert files
    for path in files:
        data = path.read_bytes()
        for claim in claims:
            # Not even most of it (a secret's last character holds 2 of its 128 bits).
            assert claim.lease.secret[:-1].encode() not in data, f"{path.name} holds a secret"


def _assert_not_in_tables(db_path: str, claims: list[Claim]) -> None:
    """On PostgreSQL there is no file to read: every row of every table, as text."""
    tables = raw_rows(
        db_path,
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    assert tables
    for (table,) in tables:
        for (row,) in raw_rows(db_path, f'SELECT CAST(t AS text) FROM "{table}" t'):
            for claim in claims:
                assert claim.lease.secret[:-1] not in row, f"{table} holds a secret"


async def test_the_database_holds_only_the_hash(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        for n in range(3):
            await rt.create_task("job", {"n": n})
        claims = [*await rt.claim_tasks("w1", "job", limit=2, lease=600, start=True)]
        claims.append(await _claim(rt, "job", "w2"))
        await rt.complete_task(claims[0].lease)
        manual = await rt.create_run(claims[2].task.id, worker_id="by-hand")
        # While open (the WAL holds the writes) and after the close (checkpointed).
        _assert_not_in_files(db_path, claims)
    _assert_not_in_files(db_path, claims)
    stored = dict(raw_rows(db_path, "SELECT id, lease_hash FROM runs"))
    assert stored == {**{c.lease.run_id: _hash(c.lease.secret) for c in claims}, manual: None}


# -- restarts ---------------------------------------------------------------------------------


async def test_a_restarted_task_manager_keeps_the_claims_and_their_secrets(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TaskManager crashes (not the process): the claims stand, so their hashes are
    loaded back from the database; the claimers go on, the forgers are still refused."""
    original = TaskManager._handle

    async def crash_on_demand(self: TaskManager, message: Any, work: Any, now: Any) -> Any:
        if isinstance(message, GetTask) and message.task_id == "crash-now":
            raise RuntimeError("injected fault")
        return await original(self, message, work, now)

    monkeypatch.setattr(TaskManager, "_handle", crash_on_demand)
    async with Runtime.open(db_path) as rt:
        for n in range(3):
            await rt.create_task("job", {"n": n})
        started = await _claim(rt, "job", "w1", start=True)
        assigned = await _claim(rt, "job", "w2")
        batch = await rt.claim_tasks("w3", "job", limit=1, lease=600)
        with pytest.raises(ActorFailedError):
            await rt.get_task("crash-now")
        assert (await rt.statistics()).restarts["tasks"] == 1
        for claim in (started, assigned, *batch):
            (run,) = await rt.get_runs(claim.task.id)
            assert run.status in (RunStatus.ASSIGNED, RunStatus.RUNNING)
            for forged in (_rebuilt(run), _rebuilt(run, new_secret())):
                with pytest.raises(LeaseLostError, match=NOT_THE_CLAIMER):
                    await rt.heartbeat(forged)
            await rt.heartbeat(claim.lease)
        await rt.start_task(assigned.lease)
        await rt.report_progress(started.lease, {"after": "the crash"})
        await rt.complete_task(started.lease, {"ok": True})
        await rt.fail_task(assigned.lease, "no", retryable=False)
        await rt.release_task(batch[0].lease)
        statuses = [(await rt.get_task(c.task.id)) for c in (started, assigned, *batch)]
        assert [t.status for t in statuses if t is not None] == [
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.QUEUED,
        ]


@pytest.mark.sqlite_only("builds a version-6 database from SQLite's migrations")
async def test_a_database_of_the_previous_version_opens_and_recovers_its_claims(
    new_db_path: str,
) -> None:
    """A file left at version 6 (before lease secrets) by a process that died holding a
    claim: it migrates (its runs have no hash), recovery requeues the held task as ever,
    and the task is claimed again with a secret."""
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn, conn:
        for migration in MIGRATIONS[:6]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO tasks (id, title, task_type, status, created_at, updated_at,"
            " assigned_worker, max_retries, attempts)"
            " VALUES ('t-held', 'held', 'job', 'running', '2024-01-01T00:00:00+00:00',"
            " '2024-01-01T00:00:00+00:00', 'w-old', 3, 0)"
        )
        conn.execute(
            "INSERT INTO runs (id, task_id, worker_id, run_number, status, started_at,"
            " lease_seconds, lease_expires_at)"
            " VALUES ('r-old', 't-held', 'w-old', 1, 'running', '2024-01-01T00:00:00+00:00',"
            " 30, '2024-01-01T00:00:30+00:00')"
        )
        conn.execute("PRAGMA user_version = 6")
    async with Runtime.open(new_db_path) as rt:
        assert (await rt.statistics()).storage.schema_version == SCHEMA_VERSION
        task = await rt.get_task("t-held")
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 1)
        (old,) = await rt.get_runs("t-held")
        assert old.status is RunStatus.LOST
        with pytest.raises(LeaseLostError):
            await rt.complete_task(Lease("t-held", "r-old", 1))
        again = await _claim(rt, "job", "w-new")
        assert (again.task.id, again.lease.attempt) == ("t-held", 2)
        with pytest.raises(LeaseLostError, match=NOT_THE_CLAIMER):
            await rt.complete_task(_rebuilt((await rt.get_runs("t-held"))[1]))
        done = await rt.complete_task(again.lease, {"ok": True})
        assert done.status is TaskStatus.COMPLETED
    with closing(sqlite3.connect(new_db_path)) as conn:
        stored = dict(conn.execute("SELECT id, lease_hash FROM runs").fetchall())
    assert stored == {"r-old": None, again.lease.run_id: _hash(again.lease.secret)}


# -- the JSON entry point ---------------------------------------------------------------------


def _request(op: str, **args: object) -> bytes:
    return msgspec.json.encode({"op": op, "args": args})


async def test_call_json_carries_the_secret_and_refuses_a_lease_without_it(db_path: str) -> None:
    async with OrchestrationClient(db_path) as client:
        task_id = await client.create_task("job")
        answer = await call_json(client, _request("claim_task", worker_id="w1", lease=600))
        lease = json.loads(answer)["lease"]
        assert set(lease) == {"task_id", "run_id", "attempt", "secret"}
        (run,) = await client.get_runs(task_id)
        assert (lease["task_id"], lease["run_id"], lease["attempt"]) == (task_id, run.id, 1)
        before = await _state(client.runtime, task_id)
        without = {k: v for k, v in lease.items() if k != "secret"}
        for forged in (without, {**lease, "secret": ""}, {**lease, "secret": new_secret()}):
            for op in ("start_task", "heartbeat", "complete_task"):
                with pytest.raises(LeaseLostError, match=NOT_THE_CLAIMER):
                    await call_json(client, _request(op, lease=forged))
        with pytest.raises(InvalidInputError) as refused:
            await call_json(client, _request("complete_task", lease={**lease, "secret": 5}))
        assert refused.value.field == "lease.secret"
        assert await _state(client.runtime, task_id) == before
        await call_json(client, _request("start_task", lease=lease))
        await call_json(client, _request("heartbeat", lease=lease, progress={"half": True}))
        done = json.loads(await call_json(client, _request("complete_task", lease=lease)))
        assert done["status"] == "completed"


# -- the give-back of a claim no one received ---------------------------------------------------


async def test_a_forged_give_back_does_not_free_the_task(db_path: str) -> None:
    """``Unclaimed`` hands back a claim whose asker left before the answer. One that
    names a held run without its claim's secret frees nothing; the real one does."""
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        owner = await _claim(rt, "job", "w-owner", start=True)
        (run,) = await rt.get_runs(task_id)
        before = await _state(rt, task_id)
        for forged in (_rebuilt(run), _rebuilt(run, new_secret())):
            await rt._tasks.tell(Unclaimed((Claim(owner.task, forged, owner.expires_at),)))
            assert await _state(rt, task_id) == before  # asked after it: handled first
        await rt.complete_task(owner.lease)

        # The give-back of the claim itself (as the TaskManager sends it) still works.
        other = await rt.create_task("job")
        real = await _claim(rt, "job", "w-gone")
        await rt._tasks.tell(Unclaimed((real,)))
        task = await rt.get_task(other)
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
        retrying = [e for e in await rt.read_events(0) if e.type == "task.retrying"]
        assert [(e.task_id, e.data["reason"]) for e in retrying] == [(other, "unclaimed")]
