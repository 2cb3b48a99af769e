"""Which database a program opens: one file, whatever the working directory.

The path given in code (or ``--db``) wins, then ``RuntimeConfig.db_path``, then
``$HIVE_ORCHESTRATION_DB_PATH``, then ``hive/db/hive-internal.db`` relative to the
working directory. The runtime resolves the choice to an absolute path once, at open,
logs it at INFO with where it came from, and ``hive-orchestration status`` prints it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import anyio
import pytest

from hive_orchestration import (
    DEFAULT_DB_PATH,
    ConfigError,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
    SyncOrchestrationClient,
)
from hive_orchestration.cli import main
from hive_orchestration.config import DB_PATH_ENV
from hive_orchestration.errors import ActorFailedError
from hive_orchestration.inspector import Inspector
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import ReadEvents
from hive_orchestration.storage import StorageActor

pytestmark = pytest.mark.anyio


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two working directories, and no database location in the environment yet."""
    monkeypatch.delenv(DB_PATH_ENV, raising=False)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    return one, two


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_one_database_whatever_the_working_directory(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``OrchestrationClient()`` from two folders made two databases."""
    one, two = folders
    shared = tmp_path / "shared" / "hive.db"
    monkeypatch.setenv(DB_PATH_ENV, str(shared))
    monkeypatch.chdir(one)
    async with OrchestrationClient() as client:
        assert client.db_path == str(shared)
        task_id = await client.create_task("job", {"n": 1})
    monkeypatch.chdir(two)
    async with OrchestrationClient() as client:
        assert await client.get_task(task_id) is not None
    async with Runtime.open() as runtime:
        assert runtime.path == str(shared)
        assert await runtime.get_task(task_id) is not None
    async with Inspector.open() as inspector:
        assert inspector.path == str(shared)
        assert await inspector.task(task_id) is not None
    assert sorted(os.listdir(one)) == sorted(os.listdir(two)) == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the client picks its own backend
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_sync_client_finds_the_same_database(
    folders: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    one, two = folders
    shared = tmp_path / "shared.db"
    monkeypatch.setenv(DB_PATH_ENV, str(shared))

    def use() -> None:
        os.chdir(one)
        with SyncOrchestrationClient(backend=backend) as client:  # type: ignore[arg-type]
            assert client.db_path == str(shared)
            task_id = client.create_task("job", {"n": 1})
        os.chdir(two)
        with SyncOrchestrationClient(backend=backend) as client:  # type: ignore[arg-type]
            assert client.get_task(task_id) is not None

    monkeypatch.chdir(tmp_path)  # restored afterwards, whatever use() leaves
    await anyio.to_thread.run_sync(use)
    assert os.listdir(one) == os.listdir(two) == []


async def test_the_path_given_wins_then_the_config_then_the_environment(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, _ = folders
    monkeypatch.chdir(one)
    given, configured, from_env = (tmp_path / name for name in ("given.db", "cfg.db", "env.db"))
    monkeypatch.setenv(DB_PATH_ENV, str(from_env))
    config = RuntimeConfig(db_path=str(configured))
    async with Runtime.open(given, config=config) as runtime:
        assert runtime.path == str(given)
    async with Runtime.open(config=config) as runtime:
        assert runtime.path == str(configured)
    assert OrchestrationClient(config=config).db_path == str(configured)
    async with OrchestrationClient(config=config) as client:
        assert client.db_path == str(configured)
    async with Runtime.open(config=RuntimeConfig()) as runtime:
        assert runtime.path == str(from_env)
    monkeypatch.delenv(DB_PATH_ENV)
    async with Runtime.open() as runtime:
        assert runtime.path == str(one / DEFAULT_DB_PATH)
    # A relative choice is relative to the working directory at open.
    monkeypatch.setenv(DB_PATH_ENV, "rel/hive.db")
    async with Runtime.open() as runtime:
        assert runtime.path == str(one / "rel" / "hive.db")


def test_the_config_field_loads_from_toml_and_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "hive.toml"
    toml.write_text('db_path = "/srv/hive/from-toml.db"\n')
    assert RuntimeConfig.load(toml, env={}).db_path == "/srv/hive/from-toml.db"
    env = {DB_PATH_ENV: "/srv/hive/from-env.db"}
    assert RuntimeConfig.load(toml, env=env).db_path == "/srv/hive/from-env.db"
    assert RuntimeConfig.load(env={}).db_path is None
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(env={DB_PATH_ENV: ""})
    assert caught.value.field == "db_path"


@pytest.mark.parametrize("value", ["", "   "])
async def test_an_empty_location_in_the_environment_is_refused_by_name(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    one, _ = folders
    monkeypatch.chdir(one)
    monkeypatch.setenv(DB_PATH_ENV, value)
    with pytest.raises(ConfigError) as caught:
        async with Runtime.open():
            pytest.fail("opened a database without a name")
    assert caught.value.field == "db_path"
    assert os.listdir(one) == []


async def test_the_absolute_path_opened_is_logged_at_info(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    one, _ = folders
    monkeypatch.chdir(one)
    caplog.set_level(logging.INFO, logger="hive_orchestration")
    async with Runtime.open("here.db"):
        pass
    monkeypatch.setenv(DB_PATH_ENV, "from-env.db")
    async with Runtime.open():
        pass
    monkeypatch.delenv(DB_PATH_ENV)
    async with Runtime.open():
        pass
    opened = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.INFO and "runtime opening database" in record.getMessage()
    ]
    assert opened == [
        f"runtime opening database {one / 'here.db'} (from the path given)",
        f"runtime opening database {one / 'from-env.db'} (from ${DB_PATH_ENV})",
        f"runtime opening database {one / DEFAULT_DB_PATH}"
        " (from the default, relative to the working directory)",
    ]


async def test_a_relative_path_is_the_same_file_after_a_chdir_and_a_storage_restart(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage actor reconnects on a restart: to the file opened, not to the same
    relative name in whatever folder the app has moved to meanwhile."""
    one, two = folders
    original = StorageActor._read_events
    faults = [RuntimeError("transient")]

    async def flaky(self: StorageActor, read: ReadEvents) -> tuple[Event, ...]:
        if faults:
            raise faults.pop()
        return await original(self, read)

    monkeypatch.setattr(StorageActor, "_read_events", flaky)
    monkeypatch.chdir(one)
    async with Runtime.open("hive.db") as runtime:
        await runtime.publish("before")
        os.chdir(two)
        with pytest.raises(ActorFailedError):
            await runtime.read_events()  # the storage actor restarts
        await runtime.publish("after")
        types = [event.type for event in await runtime.read_events()]
    assert types == ["before", "actor.restarted", "after"]
    assert os.listdir(two) == []


def test_status_prints_the_absolute_path(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one, _ = folders
    monkeypatch.chdir(one)

    async def make() -> None:
        async with Runtime.open("rel/hive.db") as runtime:
            await runtime.publish("made")

    anyio.run(make)
    absolute = str(one / "rel" / "hive.db")
    code, out, err = cli(capsys, "status", "--db", "rel/hive.db", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["db"] == absolute
    code, out, err = cli(capsys, "status", "--db", "rel/hive.db")
    assert (code, err) == (0, "")
    assert f"database {absolute}" in out
    # Without --db: the environment's database, as an app of this environment opens it.
    monkeypatch.setenv(DB_PATH_ENV, "rel/hive.db")
    code, out, _ = cli(capsys, "status", "--json")
    assert (code, json.loads(out)["db"]) == (0, absolute)
    code, out, _ = cli(capsys, "db", "current", "--json")
    assert (code, json.loads(out)["db"]) == (0, absolute)
    monkeypatch.setenv(DB_PATH_ENV, "")
    code, out, err = cli(capsys, "status")
    assert (code, out) == (2, "")
    assert "db_path" in err
