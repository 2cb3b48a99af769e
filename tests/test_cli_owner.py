"""The command line and the runtime that owns a database: ``status`` lists who is
connected to it (``OrchestrationClient.server_status``), and ``events --follow`` takes new
events from it through its socket (pushed), going back to reading the file while no
runtime serves it. Real owner processes, on both backends."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import anyio
import pytest
from reliability._remote import DEADLINE, eventually, owner

from hive_orchestration import ConnectionStatus, OrchestrationClient, Runtime, RuntimeConfig
from hive_orchestration.cli import main
from hive_orchestration.storage.port import store_kind

pytestmark = pytest.mark.anyio

FOLLOW = [sys.executable, "-m", "hive_orchestration", "events", "--follow"]


def _main_quiet(argv: list[str]) -> tuple[int, str, str]:
    """main() with its output captured, for a worker thread (capsys is the test's own)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


async def _run(*argv: str) -> tuple[int, str, str]:
    return await anyio.to_thread.run_sync(_main_quiet, list(argv))


# -- server_status -------------------------------------------------------------------------


async def test_server_status_says_who_is_connected(db_path: str, anyio_backend: str) -> None:
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path, source_agent="planner") as planner,
        OrchestrationClient(db_path=db_path, source_agent="deployer") as deployer,
    ):
        async with planner.subscribe("task.*"), anyio.create_task_group() as group:
            group.start_soon(_claim, planner)
            await eventually(lambda: _calls_of(deployer, "planner", 1))
            status = await deployer.server_status()
            group.cancel_scope.cancel()
        assert (status.pid, status.db_path, status.address) == (
            process.pid,
            _real(db_path),
            process.address,
        )
        by_name = {connection.name: connection for connection in status.connections}
        assert set(by_name) == {"planner", "deployer"}
        assert all(isinstance(c, ConnectionStatus) for c in status.connections)
        assert {c.pid for c in status.connections} == {os.getpid()}
        assert (by_name["planner"].calls_in_flight, by_name["planner"].subscriptions) == (1, 1)
        # The asking call itself is in flight as it is answered.
        assert (by_name["deployer"].calls_in_flight, by_name["deployer"].subscriptions) == (1, 0)
        assert by_name["planner"].id < by_name["deployer"].id
        assert by_name["planner"].connected_at <= by_name["deployer"].connected_at


async def test_server_status_in_process(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        status = await runtime.client().server_status()
        assert (status.pid, status.connections) == (os.getpid(), [])
        assert status.address is not None
    async with Runtime.open(db_path, config=RuntimeConfig(serve_socket=False)) as runtime:
        status = await runtime.client().server_status()
        assert (status.address, status.connections) == (None, [])


def _real(path: str) -> str:
    """The database as the owner reports it: a file by its real path, a URL as given."""
    return path if store_kind(path) == "postgres" else os.path.realpath(path)


async def _claim(client: OrchestrationClient) -> None:
    await client.claim_task("w1", ["nothing-yet"], wait=30)


async def _calls_of(client: OrchestrationClient, name: str, calls: int) -> bool:
    status = await client.server_status()
    return any(c.name == name and c.calls_in_flight >= calls for c in status.connections)


# -- status --------------------------------------------------------------------------------


async def test_status_shows_the_owner_and_its_connected_clients(
    db_path: str, anyio_backend: str
) -> None:
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path, source_agent="ai-planner") as client:
            await client.register_worker("w-1", "builder", ["build"])
            async with client.subscribe("*"):
                code, out, err = await _run("status", "--db", db_path, "--json")
                assert (code, err) == (0, "")
                report = json.loads(out)
                code, table, _ = await _run("status", "--db", db_path)
        assert report["owner"]["pid"] == process.pid
        assert report["owner"]["address"] == process.address
        (seen,) = report["owner"]["clients"]  # the command's own connection is left out
        assert (seen["name"], seen["pid"], seen["subscriptions"]) == ("ai-planner", os.getpid(), 1)
        assert [worker["id"] for worker in report["workers"]] == ["w-1"]
        assert code == 0
        assert f"owned by process {process.pid}" in table
        assert "Connected clients (1)" in table
        assert "ai-planner" in table
        assert "Active workers (1)" in table
        await process.stop()
    # No runtime serves it now: the file alone.
    code, out, _ = await _run("status", "--db", db_path, "--json")
    assert code == 0
    assert json.loads(out)["owner"] is None
    code, table, _ = await _run("status", "--db", db_path)
    assert "no runtime serves this database now" in table


# -- events --follow -----------------------------------------------------------------------


async def test_follow_is_pushed_by_the_owner_and_outlives_it(
    db_path: str, anyio_backend: str
) -> None:
    command = [
        sys.executable,
        "-m",
        "hive_orchestration",
        "events",
        "--follow",
        "--json",
        "--pattern",
        "app.*",
        "--correlation",
        "c-1",
        "--limit",
        "0",
        "--max-events",
        "3",
        "--for",
        "60",
        "--db",
        db_path,
    ]
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            await client.publish("app.before", {}, correlation_id="c-1")
        with anyio.fail_after(DEADLINE):
            async with await anyio.open_process(command) as follower:
                assert follower.stderr is not None
                assert follower.stdout is not None
                err = b""
                while b"following" not in err:
                    err += await follower.stderr.receive()
                async with OrchestrationClient(db_path=db_path) as client:
                    # It follows through the owner's socket: the owner lists it.
                    await eventually(lambda: _follower_connected(client))
                    first = await client.publish("app.one", {"n": 1}, correlation_id="c-1")
                    await client.publish("app.other", {}, correlation_id="c-2")  # filtered out
                process.kill()
                # The owner is gone: this process opens the file (recovery runs) and serves
                # it; the follower reads the file meanwhile, then finds the new owner.
                async with OrchestrationClient(db_path=db_path) as client:
                    assert not client.remote
                    second = await client.publish("app.two", {"n": 2}, correlation_id="c-1")
                    await eventually(lambda: _follower_connected(client))
                    third = await client.publish("app.three", {"n": 3}, correlation_id="c-1")
                    out = b""
                    async for chunk in follower.stdout:
                        out += chunk
                    assert await follower.wait() == 0
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["seq"], e["type"]) for e in lines] == [
        (first.seq, "app.one"),
        (second.seq, "app.two"),
        (third.seq, "app.three"),
    ]


async def _follower_connected(client: OrchestrationClient) -> bool:
    status = await client.server_status()
    return any(c.name == "hive-orchestration events --follow" for c in status.connections)


def test_follow_of_a_file_no_runtime_serves_reads_the_file(db_path: str) -> None:
    async def fill() -> None:
        async with Runtime.open(db_path) as runtime:
            await runtime.publish("app.one", {})

    anyio.run(fill)
    result = subprocess.run(
        [*FOLLOW, "--after", "0", "--max-events", "1", "--json", "--db", db_path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["type"] == "app.one"
