"""The handler of the traces' cross-process test (``hive-orchestration worker --trace
_traced:handler``, from this folder). Importing it sets up this process's OpenTelemetry
SDK, as an app's worker module would, with an exporter that appends each finished span
as a JSON line to ``$HIVE_TEST_SPANS`` (the test reads them: the SDK's in-memory
exporter cannot be read from another process)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from hive_orchestration import OrchestrationClient, TaskContext


def describe(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
    }


class LinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as out:
            for span in spans:
                out.write(json.dumps(describe(span)) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(LinesExporter(os.environ["HIVE_TEST_SPANS"])))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests._traced")


async def handler(context: TaskContext) -> dict[str, object]:
    """Works in a span of its own, and creates a follow-up task through the owner's
    socket from inside it."""
    with tracer.start_as_current_span("handler.work"):
        async with OrchestrationClient(db_path=os.environ["HIVE_TEST_DB"]) as client:
            follow_up = await client.create_task("follow_up", {"after": context.task.id})
    if context.payload.get("fail"):
        raise RuntimeError("asked to fail")
    return {"follow_up": follow_up}
