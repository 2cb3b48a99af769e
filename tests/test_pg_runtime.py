"""The runtime on PostgreSQL, end to end through its public API, on both event loops:
``Runtime.open("postgresql://...")`` and ``OrchestrationClient(db_path=URL)`` do what they
do on a SQLite file (tasks claimed, completed, failed and retried; the event log replayed
from a seq after a reopen; idempotency keys; listing pages; execution plans; bad input
refused with nothing written; several runtimes on one database, one reached by a client
through its socket)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    AgentRegistry,
    AgentRunner,
    HiveError,
    InvalidInputError,
    OrchestrationClient,
    PlanStatus,
    Runtime,
    StorageError,
    TaskStatus,
    auto_register_adapters,
)
from hive_orchestration.storage.port import CommitUnknownError  # noqa: E402

pytestmark = pytest.mark.anyio


def raw(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


async def test_tasks_are_claimed_completed_failed_and_retried(pg_url: str) -> None:
    async with Runtime.open(pg_url) as runtime:
        done_id = await runtime.create_task("build", payload={"n": 1}, priority=5)
        retried_id = await runtime.create_task("build", payload={"n": 2}, max_retries=1)
        claim = await runtime.claim_task("w1", "build", start=True)
        assert claim is not None
        assert claim.task.id == done_id
        finished = await runtime.complete_task(claim.lease, {"ok": True})
        assert finished.status == TaskStatus.COMPLETED
        assert finished.result == {"ok": True}

        claim = await runtime.claim_task("w1", "build", start=True)
        assert claim is not None
        assert claim.task.id == retried_id
        await runtime.fail_task(claim.lease, "flaky", retry_after=0)
        claim = await runtime.claim_task("w2", "build", start=True, wait=10)
        assert claim is not None
        assert claim.task.id == retried_id
        assert claim.task.attempts == 1
        failed = await runtime.fail_task(claim.lease, "for good", retryable=False)
        assert failed.status == TaskStatus.FAILED
        assert [run.status for run in await runtime.get_runs(retried_id)] == ["failed", "failed"]
    assert raw(pg_url, "SELECT status FROM tasks ORDER BY priority DESC") == [
        ("completed",),
        ("failed",),
    ]


async def test_the_log_replays_from_a_seq_without_gap_after_a_reopen(pg_url: str) -> None:
    async with Runtime.open(pg_url) as runtime:
        for n in range(5):
            await runtime.publish("deploy.step", {"n": n}, source="app")
        first = await runtime.read_events(after=0)
    assert [e.seq for e in first] == list(range(1, len(first) + 1))
    async with Runtime.open(pg_url) as runtime:
        event = await runtime.publish("deploy.step", {"n": 5}, source="app")
        assert event.seq == first[-1].seq + 1  # the log goes on after its last number
        replay = await runtime.read_events(after=2, pattern="deploy.*")
    assert [e.data["n"] for e in replay] == [2, 3, 4, 5]
    assert [e.seq for e in replay] == list(range(3, event.seq + 1))


async def test_an_idempotency_key_names_one_task_across_reopens(pg_url: str) -> None:
    async with Runtime.open(pg_url) as runtime:
        first = await runtime.create_task("mail", idempotency_key="order-7")
        assert await runtime.create_task("mail", idempotency_key="order-7") == first
    async with Runtime.open(pg_url) as runtime:
        assert await runtime.create_task("mail", idempotency_key="order-7") == first
    assert raw(pg_url, "SELECT count(*) FROM tasks") == [(1,)]


async def test_listing_pages_follow_priority_then_age(pg_url: str) -> None:
    async with Runtime.open(pg_url) as runtime:
        ids = [await runtime.create_task("scan", priority=n % 3) for n in range(12)]
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            page = await runtime.get_tasks_by_status("pending", limit=5, after=after)
            if not page:
                break
            pages.append([task.id for task in page])
            after = page[-1].id
    expected = [i for p in (2, 1, 0) for n, i in enumerate(ids) if n % 3 == p]
    assert [len(page) for page in pages] == [5, 5, 2]
    assert [i for page in pages for i in page] == expected


async def test_a_plan_runs_to_completion_in_plan_order(pg_url: str) -> None:
    plan_data = {
        "subtasks": [
            {"id": "zeta", "task_type": "planning"},
            {"id": "alpha", "task_type": "testing", "dependencies": ["zeta"]},
            {"id": "mid", "task_type": "review", "dependencies": ["zeta"]},
            {"id": "end", "task_type": "monitoring", "dependencies": ["alpha", "mid"]},
        ]
    }
    registry = auto_register_adapters(AgentRegistry())
    async with Runtime.open(pg_url) as runtime:
        request = await runtime.queue_planning_request("ship it", requestor="app")
        claimed = await runtime.claim_planning_request("planner")
        assert claimed is not None
        assert claimed.id == request.id
        plan_id = await runtime.create_execution_plan(plan_data, planning_task_id=claimed.id)
        await runtime.approve_plan(plan_id)
        async with AgentRunner(runtime, registry):
            await runtime.mark_plan_execution_started(plan_id)
            with anyio.fail_after(30):
                plan = await runtime.wait_for_plan(plan_id)
        assert plan.status == PlanStatus.COMPLETED
        subtasks = await runtime.get_plan_subtasks(plan_id)
    # The order the plan lists them (SQLite gives it by rowid; here it is the plan's).
    assert [s.subtask_id for s in subtasks] == ["zeta", "alpha", "mid", "end"]


async def test_bad_input_is_refused_and_nothing_is_written(pg_url: str) -> None:
    async with Runtime.open(pg_url) as runtime:
        with pytest.raises(InvalidInputError) as caught:
            await runtime.create_task("", payload={"a": 1})
        assert caught.value.field == "task_type"
        with pytest.raises(InvalidInputError):
            await runtime.get_tasks_by_status("pending", after="no-such-task")
    assert raw(pg_url, "SELECT count(*) FROM tasks") == [(0,)]


async def test_runtimes_share_a_database_and_a_client_reaches_one_through_its_socket(
    pg_url: str,
) -> None:
    async with Runtime.open(pg_url) as runtime:
        async with Runtime.open(pg_url):  # a second node, beside it (tests/test_pg_nodes.py)
            pass
        async with OrchestrationClient(db_path=pg_url) as client:
            assert client.remote
            task_id = await client.create_task("remote-made")
        assert (await runtime.get_task(task_id)) is not None


_TYPES = [
    "job.created",
    "job.completed",
    "Job.created",
    "deploy.started",
    "deploy.done",
    "teploy.x",
    "a*b",
    "a?b",
    "a[b]",
    "back\\slash",
    "pct%done",
    "under_score",
    "é.unicode",
    "job",
]
_PATTERNS = [
    "*",
    "job.*",
    "job*",
    "?ob.created",
    "back\\slash",
    "pct%*",
    "under_*",
    "*.unicode",
    "no.such.type",
    "*e*",
    "?eploy.*",
    "a?b",
    "a*b",
    "*%*",
    "*\\*",
]


async def test_event_patterns_match_as_sqlite_globs(pg_url: str, tmp_path: Any) -> None:
    """The PostgreSQL store has no GLOB: it reads by regular expression and by the type
    index. Every pattern gives the events a SQLite file gives, in the same order."""
    found: dict[str, dict[str, list[str]]] = {}
    for name, target in (("sqlite", str(tmp_path / "hive.db")), ("postgres", pg_url)):
        async with Runtime.open(target) as runtime:
            for n, kind in enumerate(_TYPES * 2):
                await runtime.publish(kind, {"n": n}, source="app")
            found[name] = {}
            for pattern in _PATTERNS:
                for after in (0, len(_TYPES)):
                    events = await runtime.read_events(after=after, pattern=pattern, limit=50)
                    found[name][f"{pattern} after {after}"] = [f"{e.seq}:{e.type}" for e in events]
    assert found["postgres"] == found["sqlite"]
    assert found["postgres"]["?eploy.* after 0"] == [
        "4:deploy.started",
        "5:deploy.done",
        "6:teploy.x",
        "18:deploy.started",
        "19:deploy.done",
        "20:teploy.x",
    ]


async def test_a_commit_whose_outcome_is_unknown_is_never_reported_as_not_applied(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost while COMMIT was on its way: here the commit landed, and the
    driver could not know. The writer must not hear "nothing was applied" (a retry
    would then make a second task), and the runtime goes on from what the database holds:
    the key names the task that landed, and the log goes on after its events."""
    from hive_orchestration.storage.pg.driver import PostgresDriver

    original = PostgresDriver.append
    armed = {"on": False}

    # A write that carries events commits through append (the events numbered last).
    async def append(self: PostgresDriver, statements: Any, numbered: Any) -> Any:
        row = await original(self, statements, numbered)
        if armed["on"] and any(sql.startswith("INSERT INTO tasks") for sql, _ in statements):
            armed["on"] = False
            raise CommitUnknownError("the connection was lost during COMMIT (injected)")
        return row

    monkeypatch.setattr(PostgresDriver, "append", append)
    async with Runtime.open(pg_url) as runtime:
        await runtime.create_task("first")
        armed["on"] = True
        with pytest.raises(HiveError) as caught:
            await runtime.create_task("second", idempotency_key="K2")
        assert not isinstance(caught.value, StorageError), caught.value
        landed = raw(pg_url, "SELECT id FROM tasks WHERE idempotency_key = 'K2'")
        assert len(landed) == 1  # it did land
        with anyio.fail_after(30):
            while True:  # the TaskManager restarts from the database
                try:
                    again = await runtime.create_task("second", idempotency_key="K2")
                    break
                except HiveError:
                    await anyio.sleep(0.05)
        assert again == landed[0][0]
        event = await runtime.publish("app.after", {}, source="test")
        seqs = [e.seq for e in await runtime.read_events()]
    assert seqs == list(range(1, event.seq + 1))
    assert raw(pg_url, "SELECT count(*) FROM tasks") == [(2,)]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_text_with_a_nul_character_is_refused_on_every_store(
    store: str, pg_url: str, tmp_path: Any
) -> None:
    """PostgreSQL's text cannot hold NUL (psycopg refuses to send it): the write failed
    as a StorageError there, while SQLite stored it. Refused on both alike, as bad input
    naming its field, with nothing written."""
    target = pg_url if store == "postgres" else str(tmp_path / "hive.db")
    async with Runtime.open(target) as runtime:
        with pytest.raises(InvalidInputError) as caught:
            await runtime.revoke_task_type("mail", reason="spam\x00")
        assert caught.value.field == "reason"
        with pytest.raises(InvalidInputError) as caught:
            await runtime.create_task("mail", title="a\x00b")
        assert caught.value.field == "title"
        task_id = await runtime.create_task("mail")
        claim = await runtime.claim_task("w", "mail", start=True)
        assert claim is not None
        with pytest.raises(InvalidInputError) as caught:
            await runtime.fail_task(claim.lease, "boom\x00")
        assert caught.value.field == "error"
        assert await runtime.get_revoked_task_types() == []
        task = await runtime.get_task(task_id)
        assert task is not None
        assert task.title != "a\x00b"


async def test_serve_on_a_postgresql_url_is_found_by_a_client_given_the_url(
    pg_url: str, anyio_backend: str
) -> None:
    """``hive-orchestration serve --db URL`` owns the database and records its socket in
    it; a client given only the URL connects to it there (it does not open the database)."""
    command = [sys.executable, "-m", "hive_orchestration", "serve", "--db", pg_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_ORCHESTRATION_")}
    process = await anyio.open_process(
        [*command, "--backend", anyio_backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(60):
            ready = json.loads(await lines.receive_until(b"\n", 1 << 16))
        assert ready["serving"] == pg_url
        async with OrchestrationClient(db_path=pg_url, source_agent="app") as client:
            assert client.remote
            status = await client.server_status()
            assert status.pid == process.pid
            task_id = await client.create_task("served")
        assert raw(pg_url, "SELECT id FROM tasks") == [(task_id,)]
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            assert await process.wait() == 0
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
    # Stopped: it let the database go, and no owner is named any more.
    assert raw(pg_url, "SELECT count(*) FROM hive_nodes") == [(0,)]
