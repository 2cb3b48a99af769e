"""mkdocs hooks.

- The docstrings are written for pydoc and Sphinx alike, with roles such as
  ``:class:`Task``` that Markdown leaves as text; the API reference shows the name alone.
- The guarantees table (docs/delivery.md) names the tests that prove each row. The site
  has no repository to link into, so it carries the tests themselves: a page generated at
  build time (``proofs.md``, and a page per test file under ``proofs/``) shows each named
  test's source under an anchor of its own, and each name in the table links there. The
  build fails on a row whose test is gone, as ``tests/test_docs.py`` does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the page functions import without mkdocs (tests/test_docs.py uses them)
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):(?=<code>)")

ROOT = Path(__file__).resolve().parent
TABLE = "docs/delivery.md"
PROOFS = "proofs.md"
PROOFS_DIR = "proofs/"
_START = "## Guarantees and the tests that prove them"
_END = "What these do not promise"
_SPAN = re.compile(r"`([^`]+)`")


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub("", html)


def page_of(file: str) -> str:
    """The generated page that shows the tests of ``file`` (tests/x/test_y.py ->
    proofs/x-test_y.md)."""
    return PROOFS_DIR + file.removeprefix("tests/").removesuffix(".py").replace("/", "-") + ".md"


def target(file: str, name: str = "") -> str:
    """Where a test (or, with no name or a ``prefix...``, a file) is shown, relative to docs/."""
    return page_of(file) + ("" if not name or name.endswith("...") else f"#{name}")


def _rows(page: str) -> tuple[int, int, list[str]]:
    start = page.index(_START)
    end = page.index(_END, start)
    return start, end, page[start:end].splitlines(keepends=True)


def _proof(row: str) -> tuple[str, str] | None:
    """A table row split into its guarantee and its proof column, or None."""
    if not row.startswith("| ") or "`tests/" not in row:
        return None
    body = row.rstrip().rstrip("|").rstrip()
    guarantee, _, proof = body.rpartition(" | ")
    return guarantee + " | ", proof


def references(page: str) -> list[tuple[str, str]]:
    """Each test the table names, as (file, name); name "" for a whole file and
    ``prefix...`` for every test whose name starts so."""
    found: list[tuple[str, str]] = []
    for row in _rows(page)[2]:
        split = _proof(row)
        if split is None:
            continue
        current = ""
        for span in _SPAN.findall(split[1]):
            file, _, name = span.partition("::")
            if file.startswith("tests/"):
                current = file
            elif file.startswith("test_") and not file.endswith(".py"):
                name = file
            if current:
                found.append((current, name.split("[")[0]))
    return found


def _link_row(row: str) -> str:
    split = _proof(row)
    if split is None:
        return row
    guarantee, proof = split
    current = ""

    def link(match: re.Match[str]) -> str:
        nonlocal current
        span = match.group(1)
        file, _, name = span.partition("::")
        if file.startswith("tests/"):
            current = file
        elif file.startswith("test_") and not file.endswith(".py"):
            name = file
        if not current:
            return match.group(0)
        return f"[`{span}`]({target(current, name.split('[')[0])})"

    return guarantee + _SPAN.sub(link, proof) + " |\n"


def link_table(page: str) -> str:
    """docs/delivery.md with each test its table names linked to the proofs page."""
    start, end, rows = _rows(page)
    return page[:start] + "".join(_link_row(row) for row in rows) + page[end:]


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The module's test functions and its classes' test methods, in the order of the
    file. Function bodies are not entered (pytest collects no test from inside a
    function): walking every node of every file took two thirds of the proofs pages'
    time (1.9 s of 3.0 s, load ~10)."""
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    bodies = [tree.body]
    while bodies:
        for node in bodies.pop(0):
            if isinstance(node, ast.ClassDef):
                bodies.append(node.body)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test_"
            ):
                found.append(node)
    return found


def _source(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    assert node.end_lineno is not None
    return "".join(lines[first - 1 : node.end_lineno]).rstrip()


def proofs_pages(page: str, root: Path = ROOT) -> dict[str, str]:
    """The generated pages by path: an index, and for each file the table names its
    docstring and the source of each test named in it (a file named alone: all of it)."""
    by_file: dict[str, list[str]] = {}
    for file, name in references(page):
        names = by_file.setdefault(file, [])
        if name and name not in names:
            names.append(name)
    index = [
        "# The tests behind the guarantees\n\n",
        "Generated from the [guarantees table](delivery.md#guarantees-and-the-tests-that-"
        "prove-them) when the site is built: the tests it names, as the repository has "
        "them, one page per file. Run one with `python -m pytest 'tests/FILE.py::TEST'` "
        "(it runs on both event loops).\n\n",
    ]
    pages: dict[str, str] = {}
    for file, names in by_file.items():
        text = (root / file).read_text()
        lines = text.splitlines(keepends=True)
        tree = ast.parse(text)
        tests = _functions(tree)
        index.append(f"- [`{file}`]({page_of(file)})\n")
        out = [
            f"# `{file}`\n\n",
            "[Back to the guarantees](../delivery.md#guarantees-and-the-tests-that-prove-them)\n\n",
        ]
        doc = ast.get_docstring(tree)
        if doc:
            out.append("```text\n" + doc + "\n```\n")
        if not names:  # the file as a whole is the proof: all of it
            out.append("\n```python\n" + text.rstrip() + "\n```\n")
        for name in names:
            if name.endswith("..."):
                chosen = [node for node in tests if node.name.startswith(name[:-3])]
            else:
                chosen = [node for node in tests if node.name == name][:1]
            if not chosen:
                raise ValueError(f"{TABLE} names {file}::{name}, which is not there")
            for node in chosen:
                out.append(f"\n## `{node.name}` {{ #{node.name} }}\n\n")
                out.append("```python\n" + _source(lines, node) + "\n```\n")
        pages[page_of(file)] = "".join(out)
    pages[PROOFS] = "".join(index)
    return pages


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    from mkdocs.structure.files import File

    page = (ROOT / TABLE).read_text()
    for path, content in proofs_pages(page).items():
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    if page.file.src_uri == "delivery.md":
        return link_table(markdown)
    return markdown
