"""The readers of the command line (``status``, ``tasks``, ``task``, ``workers``,
``plans``, ``plan``, ``events``) ask the runtime that owns the database through its socket
when it serves one, and give the very output the file gives; with ``--url`` and a token
they ask a runtime served over TCP (``hive-orchestration serve``), and a refusal is one
line and an exit code. Real owner and server processes, on both backends."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from _populate import WORKER, Populated, populate
from _raw import never_opened
from reliability._remote import eventually, owner
from test_remote_tcp import ADMIN, DEPLOYER, serve, write_tokens

from hive_orchestration import SCHEMA_VERSION, OrchestrationClient, Runtime
from hive_orchestration.cli import main, views
from hive_orchestration.cli import owner as owner_module
from hive_orchestration.cli import reader as reader_module

pytestmark = pytest.mark.anyio

#: Every reader, with the arguments that take each path of its report.
READS = [
    ["status"],
    ["tasks"],
    ["tasks", "--status", "queued"],
    ["tasks", "--type", "compile", "--limit", "1"],
    ["task", "{queued}"],
    ["task", "{completed}", "--events", "2"],
    ["task", "no-such-task"],
    ["workers"],
    ["workers", "--status", "offline"],
    ["plans"],
    ["plans", "--status", "completed"],
    ["plan", "{plan}"],
    ["plan", "no-such-plan"],
    ["events"],
    ["events", "--limit", "3"],
    ["events", "--after", "2", "--limit", "3"],
    ["events", "--task", "{queued}"],
    ["events", "--pattern", "task.*", "--limit", "2"],
    ["events", "--correlation", "corr-1"],
    ["events", "--pattern", "app.old", "--limit", "2"],  # far back in the log
    ["events", "--pattern", "app.old", "--after", "1", "--limit", "5"],
    ["events", "--pattern", "nothing.matches"],
]
#: Published before the noise, so that the newest of them are far back in a long log.
OLD = 3
NOISE = 2500


async def _fill(db_path: str, noise: int = NOISE) -> Populated:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
        for n in range(OLD):
            await runtime.publish("app.old", {"n": n})
        for start in range(0, noise, 500):
            async with anyio.create_task_group() as group:
                for n in range(start, start + 500):
                    group.start_soon(runtime.publish, "app.noise", {"n": n})
    return made


def _argv(template: list[str], made: Populated) -> list[str]:
    names = {"queued": made.queued, "completed": made.completed, "plan": made.plan_id}
    return [part.format(**names) for part in template]


def _one_error_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def _main_quiet(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


async def _run(*argv: str) -> tuple[int, str, str]:
    return await anyio.to_thread.run_sync(_main_quiet, list(argv))


@pytest.fixture
def same_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables say how long ago a worker's heartbeat was: the same instant for every run,
    so that two runs a second apart draw the same table. The owner's section of
    ``status`` (only a runtime knows it) is compared by tests of its own."""
    now = time.time()
    frozen = SimpleNamespace(time=lambda: now, strftime=time.strftime, localtime=time.localtime)
    monkeypatch.setattr(views, "time", frozen)
    monkeypatch.setattr(views, "render_owner", lambda out, report: None)


@contextmanager
def file_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if no runtime served the database: the readers read the file."""
    with monkeypatch.context() as patch:

        async def nowhere(path: str) -> None:
            return None

        patch.setattr(owner_module, "serving", nowhere)
        yield


@contextmanager
def no_file(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The file cannot be read: a reader that answers asked the runtime."""
    with monkeypatch.context() as patch:

        class Unreadable:
            @staticmethod
            def open(*args: object, **kwargs: object) -> Any:
                raise AssertionError("the reader opened the file")

        patch.setattr(reader_module, "Inspector", Unreadable)
        yield


async def _outputs(made: Populated, target: list[str], backend: str) -> list[Any]:
    """Each reader's exit code, output and error, as JSON and as a table."""
    found: list[Any] = []
    for template in READS:
        argv = [*_argv(template, made), *target, "--backend", backend]
        code, out, err = await _run(*argv, "--json")
        value = json.loads(out) if code == 0 else out
        if template == ["status"]:
            value.pop("owner")  # who is connected: only through a runtime, tested below
        found.append((template, "json", code, value, err))
        found.append((template, "table", *await _run(*argv)))
    return found


async def _connection_number(db_path: str) -> int:
    """The number the owner gives the next connection (it counts every one it accepts)."""
    async with OrchestrationClient(db_path=db_path, source_agent="counter") as client:
        status = await client.server_status()
    return next(c.id for c in status.connections if c.name == "counter")


@pytest.mark.usefixtures("same_clock")
async def test_every_reader_answers_through_the_socket_as_from_the_file(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = await _fill(db_path)
    async with owner(db_path, anyio_backend) as process:
        with file_only(monkeypatch):
            from_file = await _outputs(made, ["--db", db_path], anyio_backend)
        before = await _connection_number(db_path)
        with no_file(monkeypatch):
            through_socket = await _outputs(made, ["--db", db_path], anyio_backend)
        after = await _connection_number(db_path)
        # Every run of a reader was one connection to the owner, and none read the file.
        assert after - before - 1 == len(through_socket)
        await process.stop()
    assert through_socket == from_file
    by_template = {(t[0][0], t[1], tuple(t[0][1:])): t for t in from_file}
    # The answers are real: what the database holds (not errors, not all empty).
    assert by_template["status", "json", ()][3]["total_tasks"] == 7
    assert by_template["task", "json", ("no-such-task",)][2:] == (
        1,
        "",
        "error: task 'no-such-task' not found\n",
    )
    old = by_template["events", "json", ("--pattern", "app.old", "--limit", "2")][3]
    assert [event["data"]["n"] for event in old] == [1, 2]
    assert by_template["events", "json", ("--pattern", "nothing.matches")][3] == []
    assert len(by_template["events", "json", ()][3]) == 50


async def test_status_through_the_socket_leaves_itself_out(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill(db_path)
    async with owner(db_path, anyio_backend) as process:
        with no_file(monkeypatch):
            code, out, err = await _run("status", "--db", db_path, "--json")
        assert (code, err) == (0, "")
        report = json.loads(out)
        assert (report["owner"]["pid"], report["owner"]["clients"]) == (process.pid, [])
        # A runtime's schema version is its package's: it migrated the file at open.
        assert report["schema_version"] == SCHEMA_VERSION
        await process.stop()


async def test_an_owner_killed_mid_answer_sends_the_question_to_the_file(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill(db_path, noise=0)
    async with owner(db_path, anyio_backend) as process:
        asked = []
        tasks = reader_module.OwnerReader.tasks

        async def killed(self: reader_module.OwnerReader, *args: Any, **kwargs: Any) -> Any:
            asked.append(self.path)
            os.kill(process.pid, signal.SIGKILL)  # it answers nothing more
            return await tasks(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(reader_module.OwnerReader, "tasks", killed)
            code, out, err = await _run("tasks", "--db", db_path, "--json")
        assert (code, err) == (0, "")
        assert len(asked) == 1  # the owner was asked first, and went away
        with anyio.fail_after(30):
            await process.process.wait()
    # What the file gives: the owner died before it could change anything.
    assert (code, out) == (await _run("tasks", "--db", db_path, "--json"))[:2]
    assert len(json.loads(out)) == 7


async def test_workers_through_the_socket_show_what_only_the_owner_knows(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's work is a sign of life the registry keeps in memory, unwritten: the
    owner shows it, the file cannot."""
    await _fill(db_path, noise=0)
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            await client.create_task("compile", {"n": 3})
            claim = await client.claim_task(WORKER, "compile")
            assert claim is not None

            beats: list[str] = []

            async def differ() -> bool:
                with file_only(monkeypatch):
                    written = await _run("workers", "--db", db_path, "--json")
                told = await _run("workers", "--db", db_path, "--json")
                (on_file,) = json.loads(written[1])
                (in_memory,) = json.loads(told[1])
                beats[:] = [on_file["last_heartbeat"], in_memory["last_heartbeat"]]
                return beats[0] != beats[1]

            await eventually(differ)  # the registry is told of the claim after it
            on_file, in_memory = beats
            assert in_memory > on_file  # ISO 8601 in UTC: compared as text
        await process.stop()


# -- --url: a runtime served over TCP ------------------------------------------------------


async def test_readers_ask_a_runtime_served_over_tcp_with_a_token(
    db_path: str, anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = await _fill(db_path)
    tokens = write_tokens(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(views, "render_owner", lambda out, report: None)
        now = time.time()
        frozen = SimpleNamespace(time=lambda: now, strftime=time.strftime, localtime=time.localtime)
        patch.setattr(views, "time", frozen)
        async with serve(
            db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
        ) as served:
            url = served.url()
            with file_only(monkeypatch):
                from_file = await _outputs(made, ["--db", db_path], anyio_backend)
            with no_file(monkeypatch):
                as_admin = await _outputs(made, ["--url", url, "--token", ADMIN], anyio_backend)
                # An agent token may read (its rules: reads are open to it).
                as_agent = await _outputs(made, ["--url", url, "--token", DEPLOYER], anyio_backend)
            assert as_admin == from_file
            assert as_agent == from_file
            # The server and its token from the environment, as OrchestrationClient takes them.
            patch.setenv("HIVE_ORCHESTRATION_URL", url)
            patch.setenv("HIVE_ORCHESTRATION_TOKEN", DEPLOYER)
            code, out, err = await _run("tasks", "--json", "--backend", anyio_backend)
            assert (code, err) == (0, "")
            assert {task["id"] for task in json.loads(out)} >= {made.queued, made.completed}
            code, out, err = await _run("status", "--json", "--backend", anyio_backend)
            assert (code, err) == (0, "")
            status = json.loads(out)
            assert status["owner"]["pid"] == served.pid
            assert status["owner"]["clients"] == []  # the command itself left out
            # --db names a file: the environment's server is not asked (none answers there).
            patch.setenv("HIVE_ORCHESTRATION_URL", "hive://127.0.0.1:1")
            code, out, err = await _run("tasks", "--db", db_path, "--json")
            assert (code, err) == (0, "")
            assert len(json.loads(out)) == 7
            patch.delenv("HIVE_ORCHESTRATION_URL")
            patch.delenv("HIVE_ORCHESTRATION_TOKEN")
            # Refusals: one line on stderr, exit 1, nothing on stdout.
            for token, reason in [
                ("wrong-" + ADMIN, "not one this runtime knows"),
                (None, "needs a token"),
            ]:
                argv = ["tasks", "--url", url, "--json", "--backend", anyio_backend]
                code, out, err = await _run(*argv, *(["--token", token] if token else []))
                assert (code, out) == (1, "")
                assert _one_error_line(err), err
                assert reason in err
                assert "Traceback" not in err
            # events --follow over TCP: pushed by the server.
            async with OrchestrationClient(url=url, token=ADMIN) as client:
                last = await client.last_seq()
                await client.publish("app.pushed", {"n": 1})
            argv = ["events", "-f", "--after", str(last), "--max-events", "1", "--json"]
            code, out, _ = await _run(*argv, "--url", url, "--token", ADMIN)
            assert code == 0
            assert json.loads(out)["type"] == "app.pushed"
            await served.stop()
        # The server is gone: a clear error, not a wait and not the file.
        code, out, err = await _run("tasks", "--url", url, "--token", ADMIN, "--json")
        assert (code, out) == (1, "")
        assert _one_error_line(err), err
        assert url in err


def test_url_refusals_before_connecting(capsys: pytest.CaptureFixture[str], db_path: str) -> None:
    # Plain TCP off loopback: refused before anything is sent, as OrchestrationClient does.
    for argv, reason in [
        (["tasks", "--url", "hive://192.0.2.1:7000", "--token", ADMIN], "hives://192.0.2.1:7000"),
        (["tasks", "--url", "hive://127.0.0.1:7000", "--db", db_path], "not both"),
        (["tasks", "--url", "http://127.0.0.1:7000"], "url"),
    ]:
        code = main(argv)
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), err
        assert _one_error_line(err), err
        assert reason in err
    assert never_opened(db_path)
    for command in ["demo", "worker", "serve", "db"]:
        assert main([command, "--url", "hive://127.0.0.1:1"]) == 2  # readers only
        capsys.readouterr()
