"""The docs against the code: the README's example runs, the guarantees table names tests
that exist, every public name is in the API reference, the version has its changelog
entry, and the backup recipe of docs/operations/backups.md gives a database that opens.

(``mkdocs build --strict`` in .ci/run checks the links and that the reference resolves.)
"""

from __future__ import annotations

import ast
import re
import shlex
import sqlite3
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import anyio
import msgspec
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


def _pages() -> dict[str, str]:
    pages = {"README.md": README}
    pages.update({str(p.relative_to(ROOT)): p.read_text() for p in DOCS.rglob("*.md")})
    return pages


def test_every_row_of_the_guarantees_table_names_its_test() -> None:
    page = (DOCS / "delivery.md").read_text()
    table = page[
        page.index("## Guarantees and the tests that prove them") : page.index(
            "What these do not promise"
        )
    ]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    assert rows
    assert [row for row in rows if "`tests/" not in row.rsplit(" | ", 1)[-1]] == []


_TEST_REFERENCE = re.compile(r"tests/[\w/]+\.py(?:::\w+)?")


def test_every_test_the_docs_and_the_readme_name_exists() -> None:
    dangling = []
    for page, text in _pages().items():
        for reference in _TEST_REFERENCE.findall(text):
            file, _, name = reference.partition("::")
            if file == "tests/FILE.py":  # the table's own legend
                continue
            path = ROOT / file
            exists = path.is_file() and (
                not name or re.search(rf"def {name}\(", path.read_text()) is not None
            )
            if not exists:
                dangling.append((page, reference))
    assert dangling == []


def _source_files() -> list[str]:
    return [
        str(p.relative_to(ROOT))
        for top in ("hive_orchestration", "examples", "bench", "tests", "docs", ".ci")
        for p in (ROOT / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ] + [p.name for p in ROOT.iterdir() if p.is_file()]


def test_every_module_path_the_docs_and_the_readme_name_exists() -> None:
    """A module moved or split leaves no page naming its old path: a path with a folder
    (``api/ops/claims.py``, ``storage/sqlite/``) must end some file or folder of the
    repository; a bare ``name.py`` must be the name of one."""
    # Folders made by runs (gitignored), a placeholder, and a string bound of the type index.
    not_paths = {"bench/.cache/", "artefacts/", "tests/FILE.py", "task/"}
    files = _source_files()
    folders = {str(Path(f).parent) + "/" for f in files}
    names = {Path(f).name for f in files}
    missing = []
    for page, text in _pages().items():
        for span in re.findall(r"`([^`\s]+)`", text):
            path = span.split("::")[0].split(":")[0]
            if not re.fullmatch(r"[\w./]+(\.py|/)", path) or "NAME" in path or path in not_paths:
                continue
            if path.endswith("/"):
                found = any(f"/{folder}".endswith(f"/{path}") for folder in folders)
            elif "/" in path:
                found = any(f"/{file}".endswith(f"/{path}") for file in files)
            else:
                found = path in names
            if not found:
                missing.append((page, span))
    assert missing == []


def test_the_readmes_links_resolve() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert len(links) > 10
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        file, _, anchor = link.partition("#")
        assert (ROOT / file).is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / file).read_text(), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, link


#: The seeds' 18 operations (the phase-2 report: six of tasks, five of workers, seven of
#: execution plans), each of which the migration page maps to the client.
SEED_OPERATIONS = [
    "create_task",
    "get_task",
    "update_task_status",
    "get_tasks_by_status",
    "get_queued_tasks",
    "delete_task",
    "register_worker",
    "update_worker_heartbeat",
    "get_active_workers",
    "get_worker",
    "unregister_worker",
    "create_planned_subtasks_from_plan",
    "get_execution_plan_status",
    "check_subtask_dependencies",
    "get_next_planned_subtask",
    "mark_plan_execution_started",
    "check_subtask_dependencies_batch",
    "get_execution_plan_status_cached",
]


def test_the_migration_page_maps_each_of_the_seeds_operations() -> None:
    page = (DOCS / "MIGRATION.md").read_text()
    table = page[page.index("## 2. Function by function") : page.index("## 3. Events")]
    mapped: dict[str, str] = {}
    for row in table.splitlines():
        cells = row.strip("| ").split(" | ")
        if len(cells) == 3:
            for name in re.findall(r"`(\w+)\(", cells[0]):
                mapped[name] = cells[1]
    assert len(SEED_OPERATIONS) == 18
    for operation in SEED_OPERATIONS:
        assert operation in mapped, operation
        client = mapped[operation]
        assert client == "same" or f"client.{operation}(" in client, (operation, client)
        assert callable(getattr(hive_orchestration.OrchestrationClient, operation)), operation


def test_the_getting_started_examples_run(tmp_path: Path) -> None:
    page = (DOCS / "getting-started.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert len(examples) >= 3
    for number, example in enumerate(examples):
        script = tmp_path / f"example_{number}.py"
        script.write_text(example)
        run = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, (number, run.stderr)
        assert run.stdout.strip(), (number, "prints nothing: a reader cannot tell it worked")


def test_every_field_of_the_configuration_is_in_the_configuration_page() -> None:
    page = (DOCS / "operations" / "configuration.md").read_text()
    rows = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`(\w+)", " ".join(rows)))  # `features.enable_...`: features
    fields = {field.name for field in msgspec.structs.fields(hive_orchestration.RuntimeConfig)}
    assert fields - named == set()


def test_every_command_line_the_docs_show_parses() -> None:
    """A flag renamed or a command removed leaves no page showing the old one."""
    from hive_orchestration.cli.parser import build_parser

    parser = build_parser()
    shown = 0
    for page, text in _pages().items():
        for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                command = re.search(r"(?:^|\s)(?:\.venv/bin/)?hive-orchestration (.*)$", line)
                if command is None:
                    continue
                arguments = re.split(r"\s[|&]", command.group(1))[0]
                shown += 1
                try:
                    parser.parse_args(shlex.split(arguments))
                except SystemExit:
                    pytest.fail(f"{page}: {line!r} does not parse")
    assert shown > 15


def test_every_python_example_in_the_docs_parses_and_calls_methods_that_exist() -> None:
    """Fragments may await at the top level; a method renamed leaves no page calling it."""
    from hive_orchestration import OrchestrationClient, SyncOrchestrationClient

    methods = set(dir(OrchestrationClient)) | set(dir(Runtime)) | set(dir(SyncOrchestrationClient))
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | ast.PyCF_ONLY_AST
    wrong = []
    blocks = 0
    for page, text in _pages().items():
        for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
            blocks += 1
            block = textwrap.dedent(block)
            try:
                compile(block, page, "exec", flags=flags)
            except SyntaxError as error:
                wrong.append((page, str(error)))
            for method in re.findall(r"\b(?:client|runtime)\.([a-z_]+)\(", block):
                if method not in methods:
                    wrong.append((page, method))
    assert blocks > 30
    assert wrong == []


def test_every_extra_is_in_the_readmes_and_the_home_pages_tables() -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for page, text in (("README.md", README), ("index.md", (DOCS / "index.md").read_text())):
        first_cells = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
        listed = set(re.findall(r"`(\w+)`", " ".join(first_cells)))
        assert extras - listed == set(), page


def test_each_test_the_guarantees_table_names_links_to_its_source_on_the_site() -> None:
    """The site has no repository to link into: mkdocs_hooks.py generates a page per test
    file the table names, and links each name in the table to its test's section there."""
    sys.path.insert(0, str(ROOT))
    try:
        import mkdocs_hooks as hooks
    finally:
        sys.path.remove(str(ROOT))
    page = (DOCS / "delivery.md").read_text()
    pages = hooks.proofs_pages(page)
    linked = hooks.link_table(page)
    references = hooks.references(page)
    assert len(references) > 60
    for file, name in references:
        shown = pages[hooks.page_of(file)]
        if name and not name.endswith("..."):
            # The link's anchor and the test's own source are on its page.
            assert f"]({hooks.target(file, name)})" in linked, (file, name)
            assert f"{{ #{name} }}" in shown, (file, name)
            assert re.search(rf"(async )?def {name}\(", shown), (file, name)
        assert f"]({hooks.page_of(file)})" in pages[hooks.PROOFS], file
    # Outside the table, the page is unchanged.
    start = page.index("## Guarantees and the tests that prove them")
    assert linked[:start] == page[:start]
    # A row naming a test that is not there fails the build.
    broken = page.replace("::test_acknowledged_events_survive_sigkill", "::test_not_there", 1)
    with pytest.raises(ValueError, match="test_not_there"):
        hooks.proofs_pages(broken)
