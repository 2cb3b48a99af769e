"""Which store a database's name opens (storage/store.py): a ``postgresql://`` or
``postgres://`` URL is a PostgreSQL server, anything else a SQLite file; an installation
without PostgreSQL support refuses a URL with a ConfigError that says what to install,
at every way in (Runtime, client, inspector), before anything is written anywhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hive_orchestration import ConfigError, OrchestrationClient, Runtime
from hive_orchestration.cli.main import main
from hive_orchestration.config import resolve_db_path
from hive_orchestration.inspector import Inspector
from hive_orchestration.storage import open_store
from hive_orchestration.storage.port import store_kind

pytestmark = pytest.mark.anyio

URLS = ["postgresql://hive@127.0.0.1:1/hive", "postgres://hive@127.0.0.1:1/hive"]


@pytest.fixture
def no_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """This installation has no PostgreSQL store (None in sys.modules: its import fails
    with ModuleNotFoundError, as when the package or psycopg is not installed)."""
    monkeypatch.setitem(sys.modules, "hive_orchestration.storage.pg", None)


@pytest.mark.parametrize("url", URLS)
def test_a_url_is_kept_as_given_not_made_a_path(url: str) -> None:
    assert resolve_db_path(url) == (url, "the path given")
    assert store_kind(url) == "postgres"


@pytest.mark.parametrize("url", URLS)
@pytest.mark.usefixtures("no_postgres")
async def test_a_url_without_postgres_support_is_refused_saying_what_to_install(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"hive-orchestration\[postgres\]") as caught:
        async with Runtime.open(url):
            pass
    assert caught.value.field == "path"
    assert "PostgreSQL support is not available" in str(caught.value)
    with pytest.raises(ConfigError, match=r"hive-orchestration\[postgres\]"):
        async with OrchestrationClient(db_path=url):
            pass
    with pytest.raises(ConfigError, match=r"hive-orchestration\[postgres\]"):
        async with Inspector.open(url):
            pass
    # Nothing was created where a file path would have been made of the URL.
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    "command", [["db", "current"], ["db", "upgrade"], ["tasks"], ["status"], ["serve"]]
)
@pytest.mark.usefixtures("no_postgres")
def test_the_command_line_refuses_a_url_without_postgres_support(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--db", URLS[0]]) == 2
    _, err = capsys.readouterr()
    assert "hive-orchestration[postgres]" in err
    assert err.startswith("error: ")
    assert _entries(tmp_path) == []


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def test_a_failing_import_inside_the_postgres_store_is_not_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a missing store (or psycopg) is "not installed": any other import error in it
    is a bug to see as it is."""

    def broken(name: str, *args: object, **kwargs: object) -> object:
        error = ModuleNotFoundError("No module named 'somethingelse'")
        error.name = "somethingelse"
        raise error

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somethingelse"):
        open_store(URLS[0])


def test_anything_else_is_a_sqlite_file(tmp_path: Path) -> None:
    for target in (str(tmp_path / "a.db"), ":memory:", "file-named-postgresql"):
        store = open_store(target)
        assert store.kind == "sqlite"
        assert store.display == target
    assert open_store(":memory:").memory
    assert not open_store(":memory:").readers
    assert open_store(str(tmp_path / "a.db")).readers


def test_a_database_url_gets_a_socket_address_of_its_own_and_makes_nothing_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket's address was derived from the URL taken as a path below the working
    directory (and a folder beside that "file" tried first); a server's database has no
    folder, so nothing is made on disk. Several runtimes (nodes) may serve one database
    from one machine, so each gets a fresh name (its clients read it from the database)."""
    from hive_orchestration.remote.address import choose_address

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    url = "postgresql://hive@127.0.0.1:5432/hive"
    addresses = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        addresses.add(choose_address(url))
        assert list((tmp_path / folder).iterdir()) == []
    assert len(addresses) == 2
    assert all(address.startswith("abstract:") for address in addresses)
