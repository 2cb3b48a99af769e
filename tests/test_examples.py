"""Every example runs, on both backends, as a user would run it: in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
#: What each example prints last when it did its job.
EXPECTED = {
    "embedded_runtime.py": "the log holds 3 event(s)",
    "agents_at_work.py": "completed 5 of 5 task(s)",
    "execution_plan.py": "plan 'Deploy to production': completed",
    "client_quickstart.py": "task deployment: completed, 1 active worker(s)",
    "task_lifecycle_events.py": "saw task.created, task.started, task.completed in order",
    "worker_management.py": "build lost by builder-1, completed by builder-2",
    "orchestrator_app.py": (
        "plan completed: 4/4 subtasks; events by agent: ai-planner=11, orchestrator-app=4, "
        "deployers=16"
    ),
    "sync_app.py": "completed 3 of 3 report(s) in a plain thread: ['report-worker-1']",
    "batch_worker.py": "completed 11 of 12 thumbnail(s), 1 failed for good",
    "control_by_hand.py": "tasks by status and type: {'completed': {'mail': 2}}",
    "plan_data_and_cleanup.py": (
        "cleanup saw fetch-asia=failed, fetch-eu=completed, fetch-us=completed,"
        " merge=completed, publish=skipped"
    ),
    "timed_tasks.py": (
        "reminder after its delay: True; offer expired; 5 emails, never more than 2 in 1 s: True"
    ),
    "retention.py": "the reader goes on with 6 event(s) from seq 21",
    "periodic_schedules.py": (
        "health-check: 3 probe(s) completed, one task per fired slot: True, paused: True;"
        " nightly-report kept: True"
    ),
    "deployment_processes.py": (
        "plan 'Deploy to production': completed, 6/6 subtasks (3 by ai-deployer, 3 by checker);"
        " 4 processes, every one exited 0"
    ),
}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, backend: str, tmp_path: Path) -> None:
    db = tmp_path / "example.db"
    result = subprocess.run(
        [sys.executable, str(example), str(db), "--backend", backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == EXPECTED[example.name]
    assert result.stderr == ""


def test_there_are_examples() -> None:
    assert EXAMPLES


def test_the_demo_keeps_its_history_across_runs(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    command = [sys.executable, "-m", "hive_orchestration", "demo", "--db", str(db)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert "opened" in first.stdout
    assert "0 event(s) already in the log" in first.stdout
    assert "the database holds 1 plan(s)" in first.stdout
    assert "0 event(s) already in the log" not in second.stdout
    assert "the database holds 2 plan(s)" in second.stdout
    for run in (first, second):
        assert "plan.completed" in run.stdout
        assert run.stdout.count(": completed") == 1
