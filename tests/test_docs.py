"""The docs against the code: the README's example runs, the guarantees table names tests
that exist, every public name is in the API reference, the version has its changelog
entry, and the backup recipe of docs/operations/backups.md gives a database that opens.

(``mkdocs build --strict`` in .ci/run checks the links and that the reference resolves.)
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import anyio
import pytest

import hive_orchestration
from hive_orchestration import Runtime

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def test_the_readme_is_short() -> None:
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_readme_example_runs_and_its_database_keeps_the_first_run(
    backend: str, tmp_path: Path
) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    if backend != "asyncio":
        example = example.replace("anyio.run(main)", f"anyio.run(main, backend={backend!r})")
    script = tmp_path / "example.py"
    script.write_text(example)
    runs = [
        subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        assert run.stdout.splitlines()[0] == "completed {'deployed': ['api']}"
    first = [line.split() for line in runs[0].stdout.splitlines()[1:]]
    second = [line.split() for line in runs[1].stdout.splitlines()[1:]]
    assert [event for _, event in first] == [
        "task.created",
        "task.assigned",
        "task.started",
        "task.completed",
    ]
    # The second run's events come after the first run's, which the file kept.
    assert int(second[0][0]) > int(first[-1][0])


def _guarantee_rows() -> list[str]:
    page = (DOCS / "delivery.md").read_text()
    table = page[
        page.index("## Guarantees and the tests that prove them") : page.index(
            "What these do not promise"
        )
    ]
    return [line for line in table.splitlines() if line.startswith("| ") and "`tests/" in line]


def test_every_test_the_guarantees_table_names_exists() -> None:
    rows = _guarantee_rows()
    assert len(rows) > 40
    for row in rows:
        proof = row.rstrip(" |").rsplit(" | ", 1)[1]
        current: Path | None = None
        for span in re.findall(r"`([^`]+)`", proof):
            file, _, name = span.partition("::")
            if file.startswith("tests/"):
                current = ROOT / file
                assert current.is_file(), (file, row)
            elif file.startswith("test_") and not file.endswith(".py"):
                name = file  # a test of the file named last
            if name:
                assert current is not None, (name, row)
                name = name.split("[")[0]  # a parameter set: test_example_runs[...]
                pattern = rf"def {name[:-3]}\w*\(" if name.endswith("...") else rf"def {name}\("
                assert re.search(pattern, current.read_text()), (current.name, name, row)


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = "\n".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: hive_orchestration\.(\w+)$", reference, re.MULTILINE))
    assert documented == set(hive_orchestration.__all__) - {"__version__"}


def test_the_version_is_the_packages_and_has_its_changelog_entry() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert hive_orchestration.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)


def _copy(source: Path, target: Path, how: str) -> None:
    connection = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        if how == "backup":
            copy = sqlite3.connect(target)
            connection.backup(copy)
            copy.close()
        else:
            connection.execute("VACUUM INTO ?", (str(target),))
    finally:
        connection.close()


@pytest.mark.anyio
async def test_a_copy_taken_while_the_runtime_writes_opens_whole(tmp_path: Path) -> None:
    live = tmp_path / "live.db"
    copies = {how: tmp_path / f"{how}.db" for how in ("backup", "vacuum")}
    async with Runtime.open(str(live)) as runtime:
        created = 0
        under_way = anyio.Event()

        async def write() -> None:
            nonlocal created
            while created < 2_000:
                await runtime.create_tasks([{"task_type": "t", "payload": {"i": created}}] * 10)
                created += 10
                if created == 200:
                    under_way.set()

        async with anyio.create_task_group() as group:
            group.start_soon(write)
            await under_way.wait()  # the copies are taken while commits go on
            for how, target in copies.items():
                await anyio.to_thread.run_sync(_copy, live, target, how)
        total = created
    for target in copies.values():
        async with Runtime.open(str(target)) as runtime:
            counts = await runtime.count_tasks()
            queued = counts.get("queued", 0)
            events = await runtime.read_events(pattern="task.created", limit=10_000)
            # Each commit is in the copy whole: ten tasks with their ten events, or none.
            assert 0 < queued <= total
            assert queued % 10 == 0
            assert len(events) == queued
