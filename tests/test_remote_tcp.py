"""Beyond one machine: ``hive-orchestration serve`` serves the message API over TCP, and
``OrchestrationClient(url=..., token=...)`` reaches it.

Every test runs the real command (``python -m hive_orchestration serve``) as a process on
the test's backend, on a real file and real sockets, and talks to it from this process:
loopback TCP without TLS, TLS with a certificate made here by ``openssl``, tokens that
name an identity and a role, and what an agent token may not do, checked by the server
whatever frame the client sends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from _raw import is_postgres, never_opened
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import (
    AccessDeniedError,
    ConfigError,
    ConnectionLostError,
    InvalidInputError,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
    RuntimeStoppedError,
    SyncOrchestrationClient,
    TaskStatus,
)
from hive_orchestration.api.wire import OPERATIONS
from hive_orchestration.remote.access import AGENT_RULES, Rule, load_tokens
from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    Call,
    Failure,
    FrameReader,
    Hello,
    Refused,
    ServerFrame,
    Welcome,
    frame,
)

#: Only turns a hang into a failure.
DEADLINE = 30.0

ADMIN = "admin-token-" + "a" * 32
DEPLOYER = "deployer-token-" + "d" * 32
APP = "app-token-" + "p" * 32
PLANNER = "planner-token-" + "l" * 32

# -- the server process -------------------------------------------------------------------


def _environment() -> dict[str, str]:
    """This environment without the package's settings (the test sets what it needs)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HIVE_ORCHESTRATION_")}


class Served:
    def __init__(self, process: Process, lines: BufferedByteReceiveStream, ready: Any) -> None:
        self.process = process
        self.lines = lines
        self.db: str = ready["serving"]
        self.pid: int = ready["pid"]
        self.addresses: list[str] = ready["addresses"]

    def url(self, scheme: str = "hive") -> str:
        """The first address of ``scheme`` (``hive``, ``hives``) on loopback."""
        return next(a for a in self.addresses if a.startswith(f"{scheme}://127.0.0.1:"))

    def port(self, host: str) -> int:
        return next(int(a.rsplit(":", 1)[1]) for a in self.addresses if f"//{host}:" in a)

    async def stop(self) -> tuple[int, Any]:
        """SIGTERM, as a service manager stops it: its exit code and its last line."""
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE):
            line = await self.lines.receive_until(b"\n", 1 << 16)
            return await self.process.wait(), json.loads(line)


@asynccontextmanager
async def serve(db_path: str, backend: str, folder: Path, *args: str) -> AsyncIterator[Served]:
    """``hive-orchestration serve`` on ``db_path`` with ``args``, until the block ends."""
    command = [sys.executable, "-m", "hive_orchestration", "serve", "--db", db_path]
    log = folder / f"serve-{os.urandom(4).hex()}.log"
    with open(log, "wb") as errors:  # noqa: ASYNC230 - a file the process writes
        process = await anyio.open_process(
            [*command, "--backend", backend, *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            env=_environment(),
        )
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(DEADLINE):
            try:
                ready = json.loads(await lines.receive_until(b"\n", 1 << 16))
            except (anyio.EndOfStream, anyio.IncompleteRead):
                await process.wait()
                raise AssertionError(f"serve did not start: {log.read_text()}") from None
        yield Served(process, lines, ready)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def write_tokens(folder: Path) -> str:
    """A tokens file: the admin's token kept as its SHA-256, the agents' in plain (0600)."""
    admin = hashlib.sha256(ADMIN.encode()).hexdigest()
    path = folder / "tokens.toml"
    path.write_text(
        f"""
[[tokens]]
sha256 = "{admin}"
identity = "ops"
role = "admin"

[[tokens]]
token = "{DEPLOYER}"
identity = "ai-deployer"
role = "agent"
workers = ["deployer-1"]

[[tokens]]
token = "{APP}"
identity = "app"
role = "agent"

[[tokens]]
token = "{PLANNER}"
identity = "ai-planner"
role = "agent"
"""
    )
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def tokens(tmp_path: Path) -> str:
    return write_tokens(tmp_path)


def _own_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


def _certificate(folder: Path, name: str, addresses: list[str]) -> tuple[str, str]:
    """A self-signed certificate (and its key) for ``localhost`` and ``addresses``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: it makes the test's certificates")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    names = ",".join(["DNS:localhost", *(f"IP:{a}" for a in addresses)])
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={names}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


# -- loopback TCP, no TLS -----------------------------------------------------------------


@pytest.mark.anyio
async def test_serve_on_loopback_tcp_works_as_in_process(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        assert served.db == (
            db_path if is_postgres(db_path) else str(Path(db_path).absolute())  # noqa: ASYNC240
        )
        assert served.addresses[0].startswith(("unix:", "abstract:"))  # the socket, beside TCP
        url = served.url("hive")
        async with OrchestrationClient(url=url, token=DEPLOYER) as deployer:
            assert deployer.remote
            assert deployer.db_path == served.db
            assert deployer.source_agent == "ai-deployer"  # the token's identity
            async with deployer.subscribe("task.*") as events:
                await deployer.register_worker("deployer-1", "deployer", ["deploy"])
                task_id = await deployer.create_task("deploy", {"service": "api"})
                claim = await deployer.claim_task("deployer-1")
                assert claim is not None
                assert claim.task.id == task_id
                await deployer.start_task(claim.lease)
                await deployer.complete_task(claim.lease, {"ok": True})
                seen = []
                with anyio.fail_after(DEADLINE):
                    while not seen or seen[-1].type != "task.completed":
                        seen.append(await events.receive())
            task = await deployer.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.COMPLETED
            assert task.source_agent == "ai-deployer"
            assert [e.type for e in seen] == [
                "task.created",
                "task.assigned",
                "task.started",
                "task.completed",
            ]
            # A batch of claims ended in one call, each by its lease (an agent's token).
            ids = await deployer.create_tasks([{"task_type": "deploy"} for _ in range(2)])
            claims = await deployer.claim_tasks("deployer-1", limit=2, start=True)
            outcomes = await deployer.complete_tasks([{"lease": c.lease} for c in claims])
            assert sorted(o.result().id for o in outcomes) == sorted(ids)

        # The sync client, from a plain thread.
        def sync_calls() -> str | None:
            with SyncOrchestrationClient(url=url, token=APP, backend=anyio_backend) as app:
                assert app.remote
                assert app.source_agent == "app"
                created = app.create_task("report")
                task = app.get_task(created)
                return None if task is None else task.source_agent

        assert await anyio.to_thread.run_sync(sync_calls) == "app"

        # From the environment: the url and token, before any database setting; a
        # client with a url never opens a database (that one is not even created).
        elsewhere = tmp_path / "elsewhere" / "other.db"
        monkeypatch.setenv("HIVE_ORCHESTRATION_DB_PATH", str(elsewhere))
        monkeypatch.setenv("HIVE_ORCHESTRATION_URL", url)
        monkeypatch.setenv("HIVE_ORCHESTRATION_TOKEN", ADMIN)
        async with OrchestrationClient() as client:
            assert client.remote
            assert client.db_path == served.db
            assert len(await client.get_tasks_by_status("completed")) == 3  # 1 + the batch
        assert not elsewhere.exists()
        # A path given in code wins over the url of the environment (the owner's socket).
        async with OrchestrationClient(db_path=db_path) as local:
            assert local.remote
            assert local._backend().address.startswith(("unix:", "abstract:"))

        # SIGTERM: a clean stop; a connected client is told (RuntimeStoppedError, not a
        # lost connection), its stream ends.
        async with OrchestrationClient(url=url, token=ADMIN) as client:
            async with client.subscribe("*") as stream:
                code, last = await served.stop()
                assert (code, last) == (0, {"stopped": served.db})
                with anyio.fail_after(DEADLINE):
                    async for _ in stream:
                        pass
            with pytest.raises(RuntimeStoppedError):
                await client.last_seq()


# -- TLS ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tls_with_a_self_signed_certificate(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    own = _own_address()
    cert, key = _certificate(tmp_path, "server", ["127.0.0.1", *([own] if own else [])])
    other_ca, _ = _certificate(tmp_path, "stranger", ["127.0.0.1"])
    listen = ["--listen", "tcp://127.0.0.1:0", "--listen", "tcp://0.0.0.0:0"]
    async with serve(
        db_path,
        anyio_backend,
        tmp_path,
        *listen,
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tokens",
        tokens,
    ) as served:
        url = served.url("hives")
        async with OrchestrationClient(url=url, token=DEPLOYER, tls_ca=cert) as client:
            task_id = await client.create_task("deploy")
            assert (await client.get_task(task_id)) is not None
        # Off loopback, through the machine's own address: TLS, the certificate checked.
        if own is not None:
            remote_url = f"hives://{own}:{served.port('0.0.0.0')}"
            async with OrchestrationClient(url=remote_url, token=ADMIN, tls_ca=cert) as client:
                assert (await client.get_task(task_id)) is not None
        # A certificate no authority the client trusts signed: refused, and it says why.
        with pytest.raises(ConnectionLostError, match=r"not trusted.*tls_ca"):
            async with OrchestrationClient(url=url, token=DEPLOYER, tls_ca=other_ca):
                pass
        # The system's authorities do not know a self-signed one either.
        with pytest.raises(ConnectionLostError, match="not trusted"):
            async with OrchestrationClient(url=url, token=DEPLOYER):
                pass
        # Plain TCP to a TLS server: cut off at the handshake, with the hint.
        with pytest.raises(ConnectionLostError, match="hives://"):
            async with OrchestrationClient(url=url.replace("hives", "hive"), token=DEPLOYER):
                pass
        async with OrchestrationClient(url=url, token=ADMIN, tls_ca=cert) as client:
            assert len(await client.get_tasks_by_status("queued")) == 1  # one, once


@pytest.mark.anyio
async def test_no_tls_off_loopback_is_refused_before_anything_is_bound(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    own = _own_address()
    for host in ["0.0.0.0", *([own] if own else [])]:
        with anyio.fail_after(DEADLINE):  # a server that starts instead would never end
            result = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "hive_orchestration",
                    "serve",
                    "--db",
                    db_path,
                    "--backend",
                    anyio_backend,
                    "--listen",
                    f"tcp://{host}:0",
                    "--tokens",
                    tokens,
                ],
                check=False,
                env=_environment(),
            )
        assert result.returncode == 2
        error = result.stderr.decode()
        assert f"tcp://{host}:0 is not this machine's loopback" in error
        assert "--tls-cert" in error
        assert not result.stdout  # never served
        # Refused before the database was even opened, so before any socket was bound.
        assert never_opened(db_path)
    # The same check in-process, and for a TCP address without a tokens file.
    refused = [
        (RuntimeConfig(listen=("tcp://0.0.0.0:0",), tokens_file=tokens), "listen"),
        (RuntimeConfig(listen=("tcp://127.0.0.1:0",)), "tokens_file"),
        (RuntimeConfig(listen=("tcp://127.0.0.1",), tokens_file=tokens), "listen"),
        (RuntimeConfig(listen=("http://127.0.0.1:80",), tokens_file=tokens), "listen"),
    ]
    for config, field in refused:
        with pytest.raises(ConfigError) as caught:
            async with Runtime.open(db_path, config=config):
                pass
        assert caught.value.field == field
        assert never_opened(db_path)
    # A client refuses plain TCP to another machine before connecting to anything.
    with pytest.raises(InvalidInputError, match=r"hives://192\.0\.2\.1:7000") as caught:
        OrchestrationClient(url="hive://192.0.2.1:7000", token=ADMIN)
    assert caught.value.field == "url"
    os.environ["HIVE_ORCHESTRATION_URL"] = "hive://example.com:7000"
    try:
        with pytest.raises(InvalidInputError, match="not this machine's loopback"):
            async with OrchestrationClient():
                pass
    finally:
        del os.environ["HIVE_ORCHESTRATION_URL"]


@pytest.mark.anyio
async def test_an_address_that_cannot_be_bound_fails_the_open(
    db_path: str, anyio_backend: str, tokens: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = RuntimeConfig(listen=(f"tcp://127.0.0.1:{port}",), tokens_file=tokens)
        with pytest.raises(ConfigError, match="Address already in use") as caught:
            async with Runtime.open(db_path, config=config):
                pass
        assert caught.value.field == "listen"
    # Nothing is left behind: the file opens at once, its socket served.
    async with Runtime.open(db_path) as runtime:
        assert runtime._server is not None
        assert runtime._server.address


# -- tokens -------------------------------------------------------------------------------


async def _raw_exchange(url: str, *frames: Any) -> list[Any]:
    """Send ``frames`` at once on a plain TCP connection, and read every frame the
    server sends until it closes it (a hostile client, not the package's)."""
    host, port = url.removeprefix("hive://").rsplit(":", 1)
    answers = []
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(b"".join(frame(f) for f in frames))
        reader = FrameReader(stream, ServerFrame, 1 << 24)
        with anyio.fail_after(DEADLINE):
            while True:
                try:
                    answers.append(await reader.read())
                except anyio.EndOfStream:
                    return answers
                if isinstance(answers[-1], Failure | Refused):
                    return answers


def _raw(value: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


@pytest.mark.anyio
async def test_a_wrong_or_missing_token_is_refused_and_nothing_is_done(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        url = served.url()
        with pytest.raises(AccessDeniedError, match="not one this runtime knows") as caught:
            async with OrchestrationClient(url=url, token="wrong-" + DEPLOYER):
                pass
        assert caught.value.operation == "connect"
        with pytest.raises(AccessDeniedError, match="needs a token"):
            async with OrchestrationClient(url=url):
                pass
        # A client that sends its calls right behind a wrong hello: refused, closed,
        # and not one of them runs.
        create = Call(1, "create_task", {"task_type": _raw("deploy")})
        for token in ("wrong-" + ADMIN, None, ADMIN[:-1], ""):
            answers = await _raw_exchange(url, Hello(PROTOCOL_VERSION, token=token), create)
            assert len(answers) == 1
            assert isinstance(answers[0], Refused)
            assert answers[0].error.type == "AccessDeniedError"
        async with OrchestrationClient(url=url, token=ADMIN) as admin:
            assert await admin.last_seq() == 0
            assert await admin.get_tasks_by_status("queued") == []


@pytest.mark.anyio
async def test_an_agent_acts_as_itself_for_its_own_workers_only(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        url = served.url()
        async with (
            OrchestrationClient(url=url, token=ADMIN, source_agent="ops") as admin,
            OrchestrationClient(url=url, token=DEPLOYER) as deployer,
        ):
            # Another worker holds a task the admin created.
            await admin.register_worker("w-other", "deployer", ["deploy"])
            held_id = await admin.create_task("deploy", {"service": "db"})
            held = await admin.claim_task("w-other")
            assert held is not None
            assert held.task.id == held_id
            before = await admin.last_seq()

            as_other = deployer.bind(source_agent="ops")
            refusals = [
                lambda: as_other.create_task("deploy"),  # calls as another (the call's default)
                lambda: deployer.create_task("deploy", source_agent="ops"),  # ...or its argument
                lambda: deployer.create_tasks([{"task_type": "deploy", "source_agent": "ops"}]),
                lambda: deployer.queue_planning_request("plan it", requestor="ops"),
                lambda: deployer.register_worker("w-other"),  # would hand back what w-other holds
                lambda: deployer.claim_task("w-other"),
                lambda: deployer.update_worker_heartbeat("w-other", "offline"),
                lambda: deployer.release_worker_tasks("w-other"),
                lambda: deployer.unregister_worker("w-other"),
                lambda: deployer.publish("review.done", worker_id="w-other"),
                lambda: deployer.cancel_task(held_id),  # not a task it created
                lambda: deployer.update_task_status(held_id, "queued"),
                lambda: deployer.delete_task(held_id),  # admin only
                lambda: deployer.update_run_status(held.lease.run_id, "failed"),
                lambda: deployer.create_run(held_id, "deployer-1"),
            ]
            for refused in refusals:
                with pytest.raises(AccessDeniedError):
                    await refused()
            # What the client library would not send, the server refuses all the same.
            hostile = [
                Call(1, "create_task", {"task_type": _raw("deploy")}, agent="ops"),
                Call(1, "release_worker_tasks", {"worker_id": _raw("w-other")}),
                Call(1, "delete_task", {"task_id": _raw(held_id)}),
            ]
            for call in hostile:
                answers = await _raw_exchange(url, Hello(PROTOCOL_VERSION, token=DEPLOYER), call)
                assert isinstance(answers[0], Welcome)
                assert (answers[0].role, answers[0].identity) == ("agent", "ai-deployer")
                assert isinstance(answers[1], Failure)
                assert answers[1].type == "AccessDeniedError"

            # Nothing was done: the task is still held by w-other, nothing was logged.
            assert await admin.last_seq() == before
            task = await admin.get_task(held_id)
            assert task is not None
            assert task.status is TaskStatus.ASSIGNED
            assert task.assigned_worker == "w-other"
            assert await admin.get_tasks_by_status("queued") == []

            # What is its own, it may do, and it is recorded as itself.
            await deployer.register_worker("deployer-1", "deployer", ["build"])
            own_id = await deployer.create_task("build")
            mine = await deployer.claim_task("deployer-1", "build")
            assert mine is not None
            assert mine.task.id == own_id
            await deployer.heartbeat(mine.lease)
            await deployer.release_task(mine.lease, reason="not now")
            assert (await deployer.cancel_task(own_id)).status is TaskStatus.CANCELLED
            assert await deployer.release_worker_tasks("deployer-1") == 0
            events = await admin.read_events(after=before)
            assert {e.source for e in events} <= {"ai-deployer", "deployer-1"}

            # The admin may do what the agent may not.
            assert await admin.release_worker_tasks("w-other") == 1
            assert await admin.delete_task(held_id) is True
            assert await admin.get_task(held_id) is None


@pytest.mark.anyio
async def test_an_agents_batch_endings_hold_only_by_each_items_own_lease(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    """complete_tasks and fail_tasks of an agent's token over TCP, as a hostile agent
    would send them: another worker's claims named by what any read shows (ids,
    attempt; an empty or guessed secret) are refused item by item and change nothing;
    its own lease twice in one call ends its task once; malformed items, mistyped or
    nested junk, and a million of them, refuse the whole call and the server serves on."""
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        url = served.url()
        async with (
            OrchestrationClient(url=url, token=ADMIN, source_agent="ops") as admin,
            OrchestrationClient(url=url, token=DEPLOYER) as deployer,
        ):
            await admin.register_worker("w-other", "deployer", ["deploy"])
            held_ids = await admin.create_tasks([{"task_type": "deploy"} for _ in range(2)])
            held = await admin.claim_tasks("w-other", "deploy", limit=2, start=True)
            assert sorted(c.task.id for c in held) == sorted(held_ids)
            await deployer.register_worker("deployer-1", "deployer", ["build"])
            own_id = await deployer.create_task("build")
            mine = await deployer.claim_task("deployer-1", "build", start=True)
            assert mine is not None
            # What the deployer can read of the other worker's claims: no secret.
            forged = []
            for claim in held:
                (run,) = await deployer.get_runs(claim.task.id)
                lease = {"task_id": run.task_id, "run_id": run.id, "attempt": run.run_number}
                forged += [lease, {**lease, "secret": "A" * 22}]
            before = await admin.last_seq()
            outcomes = await deployer.complete_tasks(
                [{"lease": f, "result": {"stolen": True}} for f in forged]
                + [{"lease": mine.lease}, {"lease": mine.lease}]
            )
            assert [o.refused is None for o in outcomes] == [False] * 4 + [True, False]
            for o in outcomes[:4] + outcomes[5:]:
                assert o.refused is not None
                assert o.refused.error == "LeaseLostError"
            assert outcomes[4].result().id == own_id
            failed = await deployer.fail_tasks(
                [{"lease": f, "error": "sabotage", "retryable": False} for f in forged]
            )
            assert all(o.refused is not None for o in failed)
            events = await admin.read_events(after=before)
            assert [(e.type, e.task_id) for e in events] == [("task.completed", own_id)]
            for claim in held:
                task = await admin.get_task(claim.task.id)
                assert task is not None
                assert (task.status, task.assigned_worker) == (TaskStatus.RUNNING, "w-other")
                (run,) = await admin.get_runs(claim.task.id)
                assert run.result is None
            # The other worker's own leases still hold its tasks.
            done = await admin.complete_tasks([{"lease": c.lease} for c in held])
            assert [o.result().status for o in done] == [TaskStatus.COMPLETED] * 2

            hello = Hello(PROTOCOL_VERSION, token=DEPLOYER)
            junk: list[tuple[object, str]] = [
                ("items", "items"),
                ({"lease": forged[0]}, "items"),
                ([[forged[0]]], "items[0]"),
                ([{"lease": [forged[0]]}], "items[0].lease"),
                ([{"lease": {**forged[0], "attempt": "1"}}], "items[0].lease"),
                ([{"lease": {"task_id": {"$gt": ""}, "run_id": 1}}], "items[0].lease"),
                ([{"lease": forged[0], "result": [[[[{}]]]]}], "items[0].result"),
                ([{"lease": forged[0], "lease ": 1}], "items[0].lease "),
                # 1 MB of empty maps: refused on what they would take once decoded,
                # before any is (PROTOCOL.md, "Limits")
                ([{}] * 1_000_000, "items"),
                ([{"lease": forged[0]}] * 100_000, "items"),  # 8 MB: more than 1000 items
            ]
            for items, field in junk:
                call = Call(1, "complete_tasks", {"items": _raw(items)})
                answers = await _raw_exchange(url, hello, call)
                assert isinstance(answers[1], Failure), (field, answers)
                assert answers[1].type == "InvalidInputError", (field, answers[1])
                assert answers[1].attrs["field"] == field, answers[1]
            assert await admin.last_seq() == before + 3  # the three completions only
            assert (await deployer.get_task(own_id)) is not None


@pytest.mark.anyio
async def test_agents_run_the_planning_flow_on_what_they_made_or_asked_for(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    async with serve(
        db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens
    ) as served:
        url = served.url()
        async with (
            OrchestrationClient(url=url, token=APP) as app,
            OrchestrationClient(url=url, token=PLANNER) as planner,
            OrchestrationClient(url=url, token=DEPLOYER) as deployer,
        ):
            request = await app.queue_planning_request("ship it")
            assert request.requestor == "app"
            with pytest.raises(AccessDeniedError):  # not a worker id of its own
                await deployer.claim_planning_request("ai-planner")
            claimed = await planner.claim_planning_request("ai-planner")
            assert claimed is not None
            assert claimed.id == request.id
            with pytest.raises(AccessDeniedError):  # a request it does not hold
                await deployer.create_execution_plan(
                    {"subtasks": [{"id": "a", "task_type": "deploy"}]},
                    planning_task_id=request.id,
                )
            with pytest.raises(AccessDeniedError):
                await deployer.fail_planning_request(request.id, "no")
            plan_id = await planner.create_execution_plan(
                {"subtasks": [{"id": "a", "task_type": "deploy"}]}, planning_task_id=request.id
            )
            with pytest.raises(AccessDeniedError):  # neither made nor asked for by it
                await deployer.approve_plan(plan_id)
            assert (await app.approve_plan(plan_id)).source_agent == "ai-planner"
            assert await app.mark_plan_execution_started(plan_id) is True
            subtasks = await app.get_plan_subtasks(plan_id)
            subtask_id = subtasks[0].task_id
            assert subtask_id is not None
            with pytest.raises(AccessDeniedError):
                await deployer.cancel_task(subtask_id)
            cancelled = await app.cancel_task(subtask_id)  # a subtask of a plan it asked for
            assert cancelled.status is TaskStatus.CANCELLED


@pytest.mark.anyio
async def test_past_max_connections_a_client_is_told_and_served_once_one_leaves(
    db_path: str, anyio_backend: str, tmp_path: Path, tokens: str
) -> None:
    args = ["--listen", "tcp://127.0.0.1:0", "--tokens", tokens, "--max-connections", "2"]
    async with serve(db_path, anyio_backend, tmp_path, *args) as served:
        url = served.url()
        async with (
            OrchestrationClient(url=url, token=ADMIN) as first,
            OrchestrationClient(url=url, token=ADMIN) as second,
        ):
            await second.create_task("deploy")
            with pytest.raises(ConnectionLostError, match="max_connections"):
                async with OrchestrationClient(url=url, token=ADMIN):
                    pass
            assert await first.last_seq() == 1  # the others are served on
        # Once one leaves (the server sees its connection close), the next is served.
        with anyio.fail_after(DEADLINE):
            while True:
                try:
                    async with OrchestrationClient(url=url, token=ADMIN) as third:
                        assert await third.last_seq() == 1
                        break
                except ConnectionLostError:
                    await anyio.sleep(0.05)


# -- the rules and the tokens file, without a server --------------------------------------


def test_every_operation_has_a_rule_for_agents() -> None:
    assert set(AGENT_RULES) == set(OPERATIONS)
    admin_only = {op for op, rule in AGENT_RULES.items() if rule is Rule.ADMIN}
    assert admin_only == {
        "delete_task",
        "create_run",
        "update_run_status",
        # control by hand (docs/CONTROL.md)
        "revoke_task_type",
        "restore_task_type",
        "flush_queue",
        "purge_tasks",
        "trim_events",
    }


def test_a_tokens_file_is_checked_when_loaded(tmp_path: Path) -> None:
    good = load_tokens(write_tokens(tmp_path))
    found = good.find(DEPLOYER)
    assert found is not None
    assert (found.name, found.role, found.workers) == ("ai-deployer", "agent", {"deployer-1"})
    planner = good.find(PLANNER)
    assert planner is not None
    assert planner.workers == {"ai-planner"}
    assert good.find(DEPLOYER + "x") is None
    assert good.find(None) is None
    admin = good.find(ADMIN)
    assert admin is not None
    assert admin.role == "admin"
    cases = {
        "readable": (f'[[tokens]]\ntoken = "{DEPLOYER}"\nidentity = "a"\n', 0o644),
        "short": ('[[tokens]]\ntoken = "short"\nidentity = "a"\n', 0o600),
        "both": (f'[[tokens]]\ntoken = "{DEPLOYER}"\nsha256 = "00"\nidentity = "a"\n', 0o600),
        "hash": ('[[tokens]]\nsha256 = "abc"\nidentity = "a"\n', 0o600),
        "role": (f'[[tokens]]\ntoken = "{DEPLOYER}"\nidentity = "a"\nrole = "root"\n', 0o600),
        "twice": (f'[[tokens]]\ntoken = "{DEPLOYER}"\nidentity = "a"\n' * 2, 0o600),
        "empty": ("tokens = []\n", 0o600),
        "toml": ("[[tokens]\n", 0o600),
    }
    for name, (text, mode) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        path.chmod(mode)
        with pytest.raises(ConfigError) as caught:
            load_tokens(path)
        assert caught.value.field == "tokens_file", name
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"token": APP, "identity": "app"}]}))
    path.chmod(0o600)
    assert load_tokens(path).find(APP) is not None


def test_the_clients_variables_are_not_runtime_settings() -> None:
    env = {
        "HIVE_ORCHESTRATION_URL": "hives://hive.example.com:7443",
        "HIVE_ORCHESTRATION_TOKEN": ADMIN,
        "HIVE_ORCHESTRATION_TLS_CA": "/etc/hive/ca.pem",
        "HIVE_ORCHESTRATION_LISTEN": '["tcp://127.0.0.1:0", "tcp://[::1]:0"]',
        "HIVE_ORCHESTRATION_MAX_CONNECTIONS": "8",
    }
    config = RuntimeConfig.load(env=env)
    assert config.listen == ("tcp://127.0.0.1:0", "tcp://[::1]:0")
    assert config.max_connections == 8
