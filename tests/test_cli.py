"""The command line: each command for a person and as JSON, its exit codes, following the
event log, and reading a database that a runtime (in this or another process) holds."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from contextlib import closing, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import anyio
import pytest
from _populate import PLAN, WORKER, Populated, populate

from hive_orchestration import SCHEMA_VERSION, Runtime
from hive_orchestration.cli import main
from hive_orchestration.storage.sqlite.database import DatabaseClaim
from hive_orchestration.storage.sqlite.schema import MIGRATIONS


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Populated]:
    """One database for the read-only commands (they write nothing, so they can share it)."""
    db = str(tmp_path_factory.mktemp("cli") / "hive.db")

    async def fill() -> Populated:
        async with Runtime.open(db) as runtime:
            return await populate(runtime)

    return db, anyio.run(fill)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, ""), err
    assert out.count("\n") == 1, "one JSON document on one line"
    return json.loads(out)


# -- status ------------------------------------------------------------------------------


def test_status(capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]) -> None:
    db, made = populated
    report = run_json(capsys, "status", "--db", db)
    assert report["db"] == db
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["last_seq"] == made.note_seq
    assert report["total_tasks"] == 7
    assert report["tasks"]["queued"] == 2
    assert report["tasks"]["running"] == 1
    assert report["tasks"]["failed"] == 0  # every status is listed
    assert [worker["id"] for worker in report["workers"]] == [WORKER]
    (plan,) = report["plans"]
    assert (plan["id"], plan["status"], plan["title"]) == (made.plan_id, "executing", "Ship it")
    assert plan["progress"] == {
        "total": 4,
        "done": 0,
        "percent": 0.0,
        "counts": {"pending": 3, "queued": 1},
    }

    code, out, err = run(capsys, "status", "--db", db)
    assert (code, err) == (0, "")
    assert f"database {db}" in out
    assert "Tasks (7)" in out
    assert "Active workers (1)" in out
    assert WORKER in out
    assert made.plan_id in out
    assert "0/4 (0%)" in out


# -- tasks and runs ----------------------------------------------------------------------


def test_tasks(capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]) -> None:
    db, made = populated
    everything = run_json(capsys, "tasks", "--db", db)
    assert len(everything) == 7
    assert {made.queued, made.running, made.completed} <= {task["id"] for task in everything}
    queued = run_json(capsys, "tasks", "--db", db, "--status", "queued")
    assert {task["task_type"] for task in queued} == {"deploy", "build"}
    deploys = run_json(capsys, "tasks", "--db", db, "--status", "queued", "--type", "deploy")
    assert [(t["id"], t["priority"], t["payload"]) for t in deploys] == [
        (made.queued, 5, {"env": "prod"})
    ]
    newest = run_json(capsys, "tasks", "--db", db, "--type", "compile", "--limit", "1")
    assert [(task["id"], task["status"]) for task in newest] == [(made.running, "running")]
    assert run_json(capsys, "tasks", "--db", db, "--status", "failed") == []

    code, out, _ = run(capsys, "tasks", "--db", db, "--type", "compile")
    assert code == 0
    assert made.running in out
    assert made.completed in out
    assert made.queued not in out
    code, out, _ = run(capsys, "tasks", "--db", db, "--status", "timed_out")
    assert code == 0
    assert "none" in out


def test_task_with_runs_and_events(
    capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]
) -> None:
    db, made = populated
    report = run_json(capsys, "task", made.running, "--db", db)
    assert (report["task"]["id"], report["task"]["status"]) == (made.running, "running")
    assert [(run["id"], run["status"], run["worker_id"]) for run in report["runs"]] == [
        (made.run_id, "running", WORKER)
    ]
    types = [event["type"] for event in report["events"]]
    assert types[0] == "task.created"
    assert "task.started" in types
    assert all(event["task_id"] == made.running for event in report["events"])

    report = run_json(capsys, "task", made.queued, "--db", db, "--events", "1")
    assert [event["seq"] for event in report["events"]] == [made.note_seq]  # the newest
    assert report["runs"] == []

    code, out, _ = run(capsys, "task", made.completed, "--db", db)
    assert code == 0
    assert made.completed in out
    assert "completed" in out
    assert '{"ok":true}' in out  # its result
    assert "Runs (1)" in out
    assert "task.completed" in out


def test_unknown_task_or_plan_exits_1(
    capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]
) -> None:
    db, _ = populated
    for argv in (["task", "no-such-task"], ["task", "no-such-task", "--json"]):
        code, out, err = run(capsys, *argv, "--db", db)
        assert (code, out) == (1, "")
        assert err == "error: task 'no-such-task' not found\n"
    code, out, err = run(capsys, "plan", "no-such-plan", "--db", db)
    assert (code, out, err) == (1, "", "error: plan 'no-such-plan' not found\n")


# -- workers and plans -------------------------------------------------------------------


def test_workers(capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]) -> None:
    db, made = populated
    (worker,) = run_json(capsys, "workers", "--db", db)
    assert (worker["id"], worker["role"], worker["capabilities"]) == (
        WORKER,
        "compiler",
        ["compile"],
    )
    assert worker["current_task_id"] in (made.running, None)
    assert run_json(capsys, "workers", "--db", db, "--status", "offline") == []
    code, out, _ = run(capsys, "workers", "--db", db)
    assert code == 0
    assert WORKER in out
    assert "compiler" in out


def test_plans_and_plan(
    capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]
) -> None:
    db, made = populated
    (plan,) = run_json(capsys, "plans", "--db", db)
    assert (plan["id"], plan["status"], plan["subtask_count"]) == (made.plan_id, "executing", 4)
    assert plan["progress"]["counts"] == {"pending": 3, "queued": 1}
    assert run_json(capsys, "plans", "--db", db, "--status", "completed") == []

    report = run_json(capsys, "plan", made.plan_id, "--db", db)
    assert report["plan"]["id"] == made.plan_id
    assert report["plan"]["plan_data"]["title"] == PLAN["title"]
    assert (report["progress"]["total"], report["progress"]["done"]) == (4, 0)
    layers = [
        [(s["id"], s["status"], s["task_status"]) for s in layer] for layer in report["layers"]
    ]
    assert layers == [
        [("build", "ready", "queued")],
        [("test", "pending", "blocked"), ("review", "pending", "blocked")],
        [("ship", "pending", "blocked")],
    ]
    assert report["layers"][2][0]["dependencies"] == ["test", "review"]
    assert all(s["task_id"] for layer in report["layers"] for s in layer)

    code, out, _ = run(capsys, "plan", made.plan_id, "--db", db)
    assert code == 0
    assert "Ship it" in out
    assert "executing" in out
    assert "0/4 (0%)" in out
    assert "dependency layer" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[:2] for row in rows] == [
        ["1", "build"],
        ["2", "test"],
        ["2", "review"],
        ["3", "ship"],
    ]
    assert "test, review" in out

    code, out, _ = run(capsys, "plans", "--db", db)
    assert code == 0
    assert made.plan_id in out
    assert "Ship it" in out


# -- events ------------------------------------------------------------------------------


def test_events(capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]) -> None:
    db, made = populated
    newest = run_json(capsys, "events", "--db", db, "--limit", "2")
    assert [event["seq"] for event in newest] == [made.note_seq - 1, made.note_seq]
    first = run_json(capsys, "events", "--db", db, "--after", "0", "--limit", "3")
    assert [event["seq"] for event in first] == [1, 2, 3]
    notes = run_json(capsys, "events", "--db", db, "--pattern", "app.*")
    assert [(e["type"], e["data"]) for e in notes] == [("app.note", {"text": "hello"})]
    of_task = run_json(capsys, "events", "--db", db, "--task", made.queued, "--limit", "500")
    assert {event["task_id"] for event in of_task} == {made.queued}
    assert of_task[-1]["seq"] == made.note_seq
    of_plan = run_json(capsys, "events", "--db", db, "--plan", made.plan_id, "--pattern", "plan.*")
    assert [event["type"] for event in of_plan][:2] == ["plan.created", "plan.started"]
    assert {event["plan_id"] for event in of_plan} == {made.plan_id}
    correlated = run_json(capsys, "events", "--db", db, "--correlation", "corr-1")
    assert [event["seq"] for event in correlated] == [made.note_seq]

    code, out, _ = run(capsys, "events", "--db", db, "--pattern", "worker.*")
    assert code == 0
    assert "worker.registered" in out
    assert "task.created" not in out


def test_follow_stops_at_its_bounds(
    capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated]
) -> None:
    db, made = populated
    # --max-events: the backlog after a seq counts; the command ends once they are out.
    code, out, err = run(
        capsys, "events", "--db", db, "-f", "--after", "2", "--max-events", "3", "--json"
    )
    assert code == 0
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [3, 4, 5]
    assert "following" in err
    # Without --after: the newest --limit events, then new ones until --for runs out.
    code, out, _ = run(capsys, "events", "--db", db, "-f", "--limit", "1", "--for", "0.3")
    assert code == 0
    assert f"{made.note_seq} " in out
    assert "app.note" in out
    assert len(out.splitlines()) == 1
    code, out, _ = run(
        capsys, "events", "--db", db, "--follow", "--limit", "0", "--for", "0.3", "--json"
    )
    assert (code, out) == (0, "")


@pytest.mark.anyio
async def test_reads_while_a_runtime_holds_the_database(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
        later = await runtime.publish("app.later", {"n": 1})

        # main() runs its own event loop: here in a worker thread, beside this one.
        argv = ["status", "--db", db_path, "--json"]
        code, out, err = await anyio.to_thread.run_sync(_main_quiet, argv)
        assert (code, err) == (0, "")
        assert json.loads(out)["last_seq"] == later.seq
        after = str(made.note_seq)
        argv = ["events", "-f", "--after", after, "--max-events", "1", "--db", db_path, "--json"]
        code, out, _ = await anyio.to_thread.run_sync(_main_quiet, argv)
        assert code == 0
        assert json.loads(out)["type"] == "app.later"


# -- exit codes, rich or not, the schema -------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["tasks", "--status", "sleeping"],
        ["tasks", "--limit", "0"],
        ["tasks", "--limit", "many"],
        ["plans", "--status", "napping"],
        ["workers", "--status", "lazy"],
        ["task"],
        ["events", "--after", "-1"],
        ["events", "--max-events", "3"],  # a bound of --follow, without --follow
        ["events", "--for", "1"],
        ["events", "--follow", "--for", "0"],
        ["events", "--pattern", ""],
        ["db"],
        ["db", "downgrade"],
    ],
)
def test_bad_usage_exits_2(
    capsys: pytest.CaptureFixture[str], populated: tuple[str, Populated], argv: list[str]
) -> None:
    db, _ = populated
    code, out, err = run(capsys, *argv, *(["--db", db] if len(argv) > 1 else []))
    assert code == 2, err
    assert out == ""
    assert "error" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("demo", "status", "tasks", "task", "workers", "plans", "plan", "events", "db"):
        assert command in out


def test_missing_database_is_an_error_not_a_new_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nothing-here.db"
    for argv in (["status"], ["status", "--json"], ["db", "current"], ["db", "upgrade"]):
        code, out, err = run(capsys, *argv, "--db", str(missing))
        assert (code, out) == (1, "")
        assert err.startswith("error: no database at")
    assert list(tmp_path.iterdir()) == []


def test_without_rich_tables_exit_2_and_json_still_works(
    capsys: pytest.CaptureFixture[str],
    populated: tuple[str, Populated],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, _ = populated
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` now fails
    monkeypatch.delitem(sys.modules, "hive_orchestration.cli.views", raising=False)
    for command in ("status", "tasks", "workers", "plans", "events"):
        code, out, err = run(capsys, command, "--db", db)
        assert (code, out) == (2, "")
        assert "pip install 'hive-orchestration[cli]'" in err
        assert isinstance(run_json(capsys, command, "--db", db), dict | list)
    code, out, _ = run(capsys, "db", "current", "--db", db)
    assert code == 0
    assert "up to date" in out
    assert "hive_orchestration.cli.views" not in sys.modules


def _old_database(path: Path, version: int) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        for migration in MIGRATIONS[:version]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")


def test_db_current_and_upgrade(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old = SCHEMA_VERSION - 1
    _old_database(db, old)
    code, out, _ = run(capsys, "db", "current", "--db", str(db))
    assert code == 0
    assert f"schema version {old}" in out
    assert "db upgrade" in out
    assert run_json(capsys, "db", "current", "--db", str(db)) == {
        "db": str(db),
        "schema_version": old,
        "package_schema_version": SCHEMA_VERSION,
        "state": "older",
    }
    # The read-only commands refuse it, and say how to migrate it.
    code, _, err = run(capsys, "status", "--db", str(db), "--json")
    assert code == 1
    assert "hive-orchestration db upgrade" in err

    code, out, _ = run(capsys, "db", "upgrade", "--db", str(db))
    assert code == 0
    assert f"migrated from schema version {old} to {SCHEMA_VERSION}" in out
    assert run_json(capsys, "db", "current", "--db", str(db))["state"] == "current"
    assert run_json(capsys, "db", "upgrade", "--db", str(db)) == {
        "db": str(db),
        "from_version": SCHEMA_VERSION,
        "to_version": SCHEMA_VERSION,
        "migrated": False,
        "recovered": False,
    }
    assert run_json(capsys, "status", "--db", str(db))["total_tasks"] == 0


def test_db_upgrade_refuses_a_database_in_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "busy.db"
    _old_database(db, SCHEMA_VERSION - 1)
    claim = DatabaseClaim(str(db))  # what a runtime holds for its whole life
    claim.acquire()
    try:
        code, out, err = run(capsys, "db", "upgrade", "--db", str(db))
    finally:
        claim.release()
    assert (code, out) == (1, "")
    assert "already open in another runtime" in err
    assert run_json(capsys, "db", "current", "--db", str(db))["state"] == "older"


def test_newer_database_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    assert run_json(capsys, "db", "current", "--db", str(db))["state"] == "newer"
    for argv in (["db", "upgrade"], ["status", "--json"]):
        code, _, err = run(capsys, *argv, "--db", str(db))
        assert code == 1
        assert "upgrade the package" in err


# -- in other processes ------------------------------------------------------------------


def test_status_json_in_a_fresh_process(populated: tuple[str, Populated]) -> None:
    db, made = populated
    result = subprocess.run(
        [sys.executable, "-m", "hive_orchestration", "status", "--json", "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    report = json.loads(result.stdout)
    assert report["total_tasks"] == 7
    assert report["plans"][0]["id"] == made.plan_id


@pytest.mark.anyio
async def test_follow_sees_an_event_another_process_writes(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        start = await runtime.publish("app.before", {})
        command = [
            sys.executable,
            "-m",
            "hive_orchestration",
            "events",
            "--follow",
            "--json",
            "--pattern",
            "app.*",
            "--limit",
            "0",
            "--max-events",
            "1",
            "--for",
            "30",
            "--db",
            db_path,
        ]
        with anyio.fail_after(30):
            async with await anyio.open_process(command) as process:
                assert process.stderr is not None
                assert process.stdout is not None
                err = b""
                while b"following" not in err:
                    err += await process.stderr.receive()
                assert f"after seq {start.seq}".encode() in err
                # The follower is polling: this event is written while it follows.
                event = await runtime.publish("app.followed", {"n": 1}, correlation_id="c-9")
                out = b""
                async for chunk in process.stdout:
                    out += chunk
                assert await process.wait() == 0
    (line,) = out.decode().splitlines()
    seen = json.loads(line)
    assert (seen["seq"], seen["type"], seen["data"]) == (event.seq, "app.followed", {"n": 1})


# -- helpers -----------------------------------------------------------------------------


def _main_quiet(argv: list[str]) -> tuple[int, str, str]:
    """main() with its output captured, for a worker thread (capsys is the test's own)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
