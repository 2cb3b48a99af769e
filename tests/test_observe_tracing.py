"""OpenTelemetry traces (``hive_orchestration.observe.tracing``): a trace that starts in
an app goes on, through the task it creates, into the worker that runs it in another
process (the ``worker`` command with ``--trace``), and from there into the task its
handler creates through the owner's socket. Spans are recorded with the SDK: the app's
with its in-memory exporter, the worker's as JSON lines (tests/_traced.py). Off, nothing
is recorded, stored or even imported. Real files, real processes, both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

pytest.importorskip("opentelemetry.sdk", reason="the otel test extra is not installed")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from hive_orchestration import AgentRegistry, AgentRunner, Runtime, TaskContext, TaskStatus
from hive_orchestration._trace import check_trace
from hive_orchestration.errors import InvalidInputError
from hive_orchestration.observe import tracing

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent
DEADLINE = 30.0


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """This process traced with its own provider, recording in memory, for the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield provider, exporter
    finally:
        tracing.disable()


def parent_of(traceparent: str) -> tuple[str, str]:
    """The trace id and the parent span id a traceparent names."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


async def wait_for(runtime: Runtime, task_id: str, status: TaskStatus) -> None:
    with anyio.fail_after(DEADLINE):
        while True:
            task = await runtime.get_task(task_id)
            if task is not None and task.status is status:
                return
            await anyio.sleep(0.05)


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_trace_continues_from_the_app_into_a_worker_process(
    db_path: str, anyio_backend: str, tmp_path: Path, spans: tuple[TracerProvider, Any]
) -> None:
    provider, exporter = spans
    span_file = tmp_path / "worker-spans.jsonl"
    db = db_path  # absolute: under tmp_path
    async with Runtime.open(db) as runtime:
        app = provider.get_tracer("app")
        with app.start_as_current_span("app.request") as request:
            task_id = await runtime.create_task(
                "traced", {"n": 1}, correlation_id="order-7", max_retries=0
            )
        root = request.get_span_context()
        task = await runtime.get_task(task_id)
        assert task is not None
        assert task.traceparent is not None
        assert parent_of(task.traceparent) == (f"{root.trace_id:032x}", f"{root.span_id:016x}")
        failing = await runtime.create_task("traced", {"fail": True}, max_retries=0)

        command = [sys.executable, "-m", "hive_orchestration", "worker", "_traced:handler"]
        command += ["--db", db, "--backend", anyio_backend, "--trace"]
        command += ["--task-types", "traced", "--worker-id", "tracer"]
        env = {**os.environ, "HIVE_TEST_SPANS": str(span_file), "HIVE_TEST_DB": db}
        process = await anyio.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE, env=env
        )
        try:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            with anyio.fail_after(DEADLINE):
                ready = (await lines.receive_until(b"\n", 1 << 16)).decode()
            assert ready.rstrip().endswith("ready"), ready
            await wait_for(runtime, task_id, TaskStatus.COMPLETED)
            await wait_for(runtime, failing, TaskStatus.FAILED)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(DEADLINE):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                await process.aclose()
        done = await runtime.get_task(task_id)
        assert done is not None
        assert done.result is not None
        follow_up = await runtime.get_task(str(done.result["follow_up"]))
        assert follow_up is not None

    recorded = read_spans(span_file)
    runs = {s["attributes"]["hive.task.id"]: s for s in recorded if s["name"] == "hive.run traced"}
    run = runs[task_id]
    # The worker's run of the task: the app's trace, child of and linked to the span
    # that created the task.
    assert run["trace_id"] == f"{root.trace_id:032x}"
    assert run["parent_id"] == f"{root.span_id:016x}"
    assert run["links"] == [{"trace_id": run["trace_id"], "span_id": run["parent_id"]}]
    assert run["kind"] == SpanKind.CONSUMER.name
    assert run["status"] == StatusCode.UNSET.name
    attributes = run["attributes"]
    assert attributes["hive.task.type"] == "traced"
    assert attributes["hive.correlation.id"] == "order-7"
    assert attributes["hive.worker.id"].startswith("tracer-")
    assert attributes["hive.run.outcome"] == "completed"
    assert "hive.run.id" in attributes
    # The handler ran inside the run's span.
    work = next(
        s for s in recorded if s["name"] == "handler.work" and s["trace_id"] == run["trace_id"]
    )
    assert work["parent_id"] == run["span_id"]
    # The task it created through the owner's socket continues the trace from there.
    assert follow_up.traceparent is not None
    assert parent_of(follow_up.traceparent) == (run["trace_id"], work["span_id"])
    # The failing one: a trace of its own (created outside any span), marked failed.
    failed = runs[failing]
    assert failed["parent_id"] is None
    assert failed["links"] == []
    assert failed["status"] == StatusCode.ERROR.name
    assert failed["attributes"]["hive.run.outcome"] == "failed"
    # The app's own span was recorded in this process, with the same trace id.
    assert [s.name for s in exporter.get_finished_spans()] == ["app.request"]


async def test_in_process_runs_are_spans_with_the_plan_and_outcome(
    db_path: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    registry = AgentRegistry()

    async def boom(context: TaskContext) -> dict[str, object]:
        raise ValueError("no")

    registry.register("boom", boom)
    async with Runtime.open(db_path) as runtime:
        with provider.get_tracer("app").start_as_current_span("submit") as submit:
            task_id = await runtime.create_task("boom", {}, max_retries=0)
        async with AgentRunner(runtime, registry):
            await wait_for(runtime, task_id, TaskStatus.FAILED)
    (run,) = [s for s in exporter.get_finished_spans() if s.name == "hive.run boom"]
    assert run.context is not None
    assert run.parent is not None
    assert run.context.trace_id == submit.get_span_context().trace_id
    assert run.parent.span_id == submit.get_span_context().span_id
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None
    assert run.attributes["hive.run.outcome"] == "failed"
    assert run.attributes["hive.task.id"] == task_id
    assert [e.name for e in run.events] == ["exception"]


async def test_untraced_the_runtime_records_nothing_and_imports_no_opentelemetry(
    db_path: str, anyio_backend: str
) -> None:
    """In a fresh process (this one has imported OpenTelemetry for the other tests): a
    task created and run by an AgentRunner, tracing never enabled."""
    script = f"""
import sys, anyio
from hive_orchestration import AgentRegistry, AgentRunner, Runtime

async def main():
    registry = AgentRegistry()
    async def echo(context):
        return {{"ok": True}}
    registry.register("echo", echo)
    async with Runtime.open({db_path!r}) as runtime, AgentRunner(runtime, registry):
        task_id = await runtime.create_task("echo", {{}})
        while (await runtime.get_task(task_id)).status.value != "completed":
            await anyio.sleep(0.02)
        task = await runtime.get_task(task_id)
    print(task.traceparent, task.tracestate, [m for m in sys.modules if "opentelemetry" in m])

anyio.run(main, backend={anyio_backend!r})
"""
    with anyio.fail_after(DEADLINE):
        done = await anyio.run_process([sys.executable, "-c", script])
    assert done.stdout.decode().split() == ["None", "None", "[]"]


def test_a_carried_trace_context_is_checked() -> None:
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert check_trace(good, "vendor=1") == (good, "vendor=1")
    assert check_trace(None, None) is None
    for bad in ("00-xyz", good.upper(), good + "-", 7):
        with pytest.raises(InvalidInputError) as caught:
            check_trace(bad, None)
        assert caught.value.field == "traceparent"
    with pytest.raises(InvalidInputError) as caught:
        check_trace(good, "x" * 600)
    assert caught.value.field == "tracestate"
    with pytest.raises(InvalidInputError) as caught:
        check_trace(None, "vendor=1")
    assert caught.value.field == "tracestate"


async def test_a_call_frame_carries_its_trace_context_and_a_bad_one_is_refused(
    db_path: str,
) -> None:
    """Spoken by hand on the owner's socket: the context in a ``call`` frame is what the
    task records (tracing is off in the owner's process: it comes from the frame alone),
    and a malformed one is refused with nothing created."""
    from reliability._remote import HELLO, RawPeer

    from hive_orchestration.remote.protocol import Call, Failure, Result, decode_error, frame

    good = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

    def create(peer: RawPeer, call_id: int, traceparent: str) -> Result | Failure:
        args = {"task_type": msgspec.Raw(msgspec.msgpack.encode("carried"))}
        peer.send(frame(Call(call_id, "create_task", args, traceparent=traceparent)))
        return peer.answer(call_id)

    async with Runtime.open(db_path) as runtime:
        assert runtime._server is not None
        peer = RawPeer(runtime._server.address)
        try:
            await anyio.to_thread.run_sync(peer.send, HELLO)
            await anyio.to_thread.run_sync(peer.read)
            refused = await anyio.to_thread.run_sync(create, peer, 1, "00-not-a-trace")
            created = await anyio.to_thread.run_sync(create, peer, 2, good)
        finally:
            peer.close()
        assert isinstance(refused, Failure)
        error = decode_error(refused)
        assert isinstance(error, InvalidInputError)
        assert error.field == "traceparent"
        assert isinstance(created, Result)
        task = await runtime.get_task(msgspec.msgpack.decode(created.value))
        assert task is not None
        assert (task.traceparent, task.tracestate) == (good, None)
        assert (await runtime.count_tasks()) == {"queued": 1}
