"""The Prometheus metrics (``hive_orchestration.observe``) count what was done: tasks
created, run, failed, retried, cancelled and lost by their lease are created, claimed and
ended through the public API, then ``/metrics`` is scraped (the ASGI app, as an app's own
server mounts it) and every figure is checked against what the test did. Real files, both
backends."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from reliability._remote import eventually, owner
from test_remote_tcp import DEPLOYER, serve, write_tokens

pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")

from prometheus_client.parser import text_string_to_metric_families

from hive_orchestration import OrchestrationClient, Runtime
from hive_orchestration.inspector import Inspector
from hive_orchestration.messages.events import Event
from hive_orchestration.observe.metrics import Metrics, metrics_app, watch
from hive_orchestration.observe.source import Source
from hive_orchestration.remote.budget import CONNECTION_BYTES

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(metrics: Metrics) -> tuple[int, str, Samples]:
    """GET the ASGI app as a server would; the status, content type and every sample."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    await metrics_app(metrics)(scope, receive, send)
    headers = dict(sent[0]["headers"])
    text = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return sent[0]["status"], headers[b"content-type"].decode(), samples


def grafana_metrics() -> set[str]:
    """The metrics docs/grafana-dashboard.json graphs."""
    doc = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    return {
        name
        for panel in doc["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bhive_[a-z_]+", target["expr"])
    }


#: ``histogram_quantile(q, sum by (le) (rate(NAME_bucket[...])))``: a histogram graphed as
#: percentiles over its buckets' rates.
_QUANTILE = re.compile(
    r"histogram_quantile\(\s*[0-9.]+,\s*sum by \(le\) \(rate\((hive_[a-z_]+)_bucket\["
)


def grafana_quantiles() -> set[str]:
    """The histograms docs/grafana-dashboard.json graphs as percentiles."""
    doc = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    return {
        name
        for panel in doc["panels"]
        for target in panel["targets"]
        for name in _QUANTILE.findall(target["expr"])
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def caught_up(metrics: Metrics, runtime: Runtime) -> None:
    """Until every event committed so far has been folded in."""
    end = await runtime.last_seq()

    async def folded() -> bool:
        return metrics.last_seq >= end

    await eventually(folded, within=10)


async def test_scraped_figures_match_what_was_done(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        # Before the exporter starts: in the gauges, not in the counters.
        await runtime.create_task("deploy", {"n": 0})
        async with watch(runtime) as metrics:
            await runtime.register_worker("w1", "builder", ["compile", "deploy"], {})
            await runtime.register_worker("w2", "builder", ["compile"], {})
            await runtime.update_worker_heartbeat("w2", "offline")
            compiles = [await runtime.create_task("compile", {"n": n}) for n in range(5)]
            await runtime.create_task("deploy", {"n": 1})
            # 2 completed
            for _ in range(2):
                claim = await runtime.claim_task("w1", "compile", start=True)
                assert claim is not None
                await runtime.complete_task(claim.lease, {"ok": True})
            # 1 failed, retried once with reason "failed", then failed for good
            claim = await runtime.claim_task("w1", "compile", start=True)
            assert claim is not None
            failing = claim.task.id
            await runtime.fail_task(claim.lease, "boom", retry_after=0)
            claim = await runtime.claim_task("w1", "compile", start=True, wait=5)
            assert claim is not None
            assert claim.task.id == failing
            await runtime.fail_task(claim.lease, "boom again", retryable=False)
            # 1 lost: its lease expires, it is queued again (reason lease_expired)
            claim = await runtime.claim_task("w1", "compile", lease=0.2)
            assert claim is not None
            lost = claim.task.id
            assert lost == compiles[3]

            async def requeued() -> bool:
                task = await runtime.get_task(lost)
                return task is not None and task.status == "queued"

            await eventually(requeued, within=20)
            # 1 cancelled while queued
            await runtime.cancel_task(compiles[4])
            # 1 running at the scrape
            claim = await runtime.claim_task("w1", "deploy", start=True)
            assert claim is not None
            await caught_up(metrics, runtime)
            status, content_type, samples = await scrape(metrics)

    assert status == 200
    assert content_type.startswith("text/plain; version=")
    assert value(samples, "hive_tasks_created_total", task_type="compile") == 5
    assert value(samples, "hive_tasks_created_total", task_type="deploy") == 1
    assert value(samples, "hive_tasks_finished_total", task_type="compile", status="completed") == 2
    assert value(samples, "hive_tasks_finished_total", task_type="compile", status="failed") == 1
    assert value(samples, "hive_tasks_finished_total", task_type="compile", status="cancelled") == 1
    assert value(samples, "hive_task_retries_total", reason="failed") == 1
    assert value(samples, "hive_task_retries_total", reason="lease_expired") == 1
    assert value(samples, "hive_leases_lost_total", reason="lease_expired") == 1
    # Runs: 2 completed, 2 failed, 1 lost (the running one has not ended).
    assert value(samples, "hive_task_run_seconds_count", task_type="compile") == 5
    # Claims: the 5 compile runs, and the deploy claimed after the exporter started
    # (the one created before it was not seen being queued, so its wait is unknown).
    assert value(samples, "hive_task_queue_wait_seconds_count", task_type="compile") == 5
    assert value(samples, "hive_task_queue_wait_seconds_count", task_type="deploy") <= 1
    assert value(samples, "hive_events_total", event_type="task.created") == 6
    assert value(samples, "hive_events_total", event_type="task.completed") == 2
    assert value(samples, "hive_event_delivery_seconds_count") >= 20
    # Read at the scrape: the task that was created before the exporter counts here.
    assert value(samples, "hive_tasks", status="completed") == 2
    assert value(samples, "hive_tasks", status="failed") == 1
    assert value(samples, "hive_tasks", status="cancelled") == 1
    assert value(samples, "hive_tasks", status="running") == 1
    assert value(samples, "hive_tasks", status="queued") == 2  # the lost one, and a deploy
    assert value(samples, "hive_claims_in_flight") == 1
    assert value(samples, "hive_queue_depth", task_type="compile") == 1
    assert value(samples, "hive_queue_depth", task_type="deploy") == 1
    assert value(samples, "hive_queue_oldest_age_seconds", task_type="deploy") > 0
    assert value(samples, "hive_workers", status="offline") == 1
    assert (
        value(samples, "hive_workers", status="busy")
        + value(samples, "hive_workers", status="active")
        == 1
    )
    # The runtime's own statistics, in its process.
    assert value(samples, "hive_storage_commits_total") > 0
    commits = value(samples, "hive_storage_commits_total")
    assert value(samples, "hive_storage_writes_total") >= commits
    # Every commit timed and sized, in the histograms (scraped after the last commit
    # the test made, and nothing commits while it reads: the counts match exactly).
    assert value(samples, "hive_commit_seconds_count") == commits
    assert value(samples, "hive_commit_seconds_sum") > 0
    assert value(samples, "hive_commit_seconds_bucket", le="+Inf") == commits
    assert value(samples, "hive_commit_batch_size_count") == commits
    assert value(samples, "hive_commit_batch_size_sum") == value(
        samples, "hive_storage_writes_total"
    )
    assert value(samples, "hive_commit_batch_size_bucket", le="1.0") >= 1
    assert ("hive_mailbox_depth", (("actor", "tasks"),)) in samples
    assert value(samples, "hive_actor_restarts_total", actor="storage") == 0
    # The Grafana dashboard of the docs graphs only what is scraped.
    scraped = {name for name, _ in samples}
    assert grafana_metrics() - scraped == set()
    # ...and every histogram it serves, as percentiles (the commits' ones included).
    histograms = {name.removesuffix("_bucket") for name, _ in samples if name.endswith("_bucket")}
    assert {"hive_commit_seconds", "hive_commit_batch_size"} <= histograms
    assert grafana_quantiles() == histograms


def _event(seq: int, kind: str, at: float, task: str, **data: Any) -> Event:
    plan = data.pop("plan_id", None)
    return Event(
        seq=seq, type=kind, timestamp=at, source="t", task_id=task, plan_id=plan, data=data
    )


def test_waits_count_from_when_a_task_became_claimable() -> None:
    """A plan's task waits from ``plan.subtask_ready``, not from its creation; a retried
    one from the end of its backoff; a run from its claim to its end. The dashboard's
    rates divide by the time the exporter has been counting."""
    metrics = Metrics(None)  # type: ignore[arg-type]  # folded by hand: no source read
    metrics.started = 1000.0
    q, a, r = {"previous": "queued"}, {"previous": "assigned"}, {"previous": "running"}
    events = [
        _event(1, "task.created", 1000.0, "p1", task_type="b", plan_id="plan"),
        _event(2, "plan.subtask_ready", 1010.0, "p1", task_type="b", status="queued"),
        _event(3, "task.assigned", 1012.0, "p1", task_type="b", status="assigned", **q),
        _event(4, "task.started", 1013.0, "p1", task_type="b", status="running", **a),
        _event(
            5,
            "task.retrying",
            1020.0,
            "p1",
            task_type="b",
            status="queued",
            **r,
            reason="failed",
            retry_in=30.0,
        ),
        _event(6, "task.assigned", 1055.0, "p1", task_type="b", status="assigned", **q),
        _event(7, "task.completed", 1058.0, "p1", task_type="b", status="completed", **a),
    ]
    for event in events:
        metrics.observe(event)
    assert metrics.queue_wait["b"].counts[metrics.queue_wait["b"].bounds.index(2.5)] == 1
    assert metrics.queue_wait["b"].counts[metrics.queue_wait["b"].bounds.index(5.0)] == 1
    assert metrics.queue_wait["b"].sum == 2.0 + 5.0
    assert metrics.run_seconds["b"].sum == 8.0 + 3.0
    assert metrics.retries == {"failed": 1}
    assert metrics.finished == {("b", "completed"): 1}
    assert metrics.throughput(now=1060.0) == {"completed": 1.0}  # 1 in the 60 s counted
    assert metrics.created_rate(now=1060.0) == {"b": 1.0}
    assert metrics.run_percentiles((50,)) == {"p50": 3.0}


async def test_a_queue_too_deep_to_read_whole_is_not_reported_by_type(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the file alone (no runtime owns it: the read-only inspector) depth by type is
    read from one page of queued tasks: past a page's worth it would be under-reported,
    so it is left out (the total stays, in ``hive_tasks``)."""
    from hive_orchestration.observe import metrics as module

    monkeypatch.setattr(module, "MAX_READ", 3)
    async with Runtime.open(db_path) as runtime:
        await runtime.create_task("a", {})
        await runtime.create_task("b", {})
    async with Inspector.open(db_path) as inspector:
        _, _, samples = await scrape(Metrics(Source(inspector)))
    assert value(samples, "hive_queue_depth", task_type="a") == 1
    assert value(samples, "hive_queue_depth", task_type="b") == 1
    async with Runtime.open(db_path) as runtime:
        await runtime.create_task("b", {})
    async with Inspector.open(db_path) as inspector:
        _, _, samples = await scrape(Metrics(Source(inspector)))
    assert not [name for name, _ in samples if name.startswith("hive_queue_")]
    assert value(samples, "hive_tasks", status="queued") == 3


async def test_in_the_runtimes_process_queue_depth_is_exact_at_any_depth(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the runtime's process the depth by type is one aggregate query, not a page of
    rows: past a page's worth it is still reported, exactly, and the oldest age counts
    from when a retried task is due again, not from its failure."""
    from hive_orchestration.observe import metrics as module

    monkeypatch.setattr(module, "MAX_READ", 3)
    async with Runtime.open(db_path) as runtime, watch(runtime) as metrics:
        for n in range(5):
            await runtime.create_task("b", {"n": n})
        retried = await runtime.create_task("r", {})
        claim = await runtime.claim_task("w", "r", start=True)
        assert claim is not None
        assert claim.task.id == retried
        await runtime.fail_task(claim.lease, "again later", retry_after=3600)
        for _ in range(2):  # delayed: queued, outside the ready index until due
            await runtime.create_task("d", {}, delay=3600)
        _, _, samples = await scrape(metrics)
    assert value(samples, "hive_queue_depth", task_type="b") == 5
    assert value(samples, "hive_queue_depth", task_type="d") == 2
    assert value(samples, "hive_queue_oldest_age_seconds", task_type="d") == 0
    assert value(samples, "hive_queue_depth", task_type="r") == 1
    assert 0 < value(samples, "hive_queue_oldest_age_seconds", task_type="b") < 60
    # Due in an hour: claimable since no time at all (its age is not negative).
    assert value(samples, "hive_queue_oldest_age_seconds", task_type="r") == 0


async def _deep_queues(client: OrchestrationClient) -> None:
    """5 ready tasks of ``b``, one of ``r`` failed and due again in an hour, 2 of ``d``
    delayed by an hour: 8 queued, past the (patched) page of 3."""
    await client.create_tasks([{"task_type": "b", "payload": {"n": n}} for n in range(5)])
    await client.register_worker("deployer-1", "deployer", ["r"], {})
    retried = await client.create_task("r", {})
    claim = await client.claim_task("deployer-1", "r", start=True)
    assert claim is not None
    assert claim.task.id == retried
    await client.fail_task(claim.lease, "again later", retry_after=3600)
    for _ in range(2):
        await client.create_task("d", {}, delay=3600)


def _assert_exact_depths(samples: Samples) -> None:
    assert value(samples, "hive_tasks", status="queued") == 8
    assert value(samples, "hive_queue_depth", task_type="b") == 5
    assert value(samples, "hive_queue_depth", task_type="r") == 1
    assert value(samples, "hive_queue_depth", task_type="d") == 2
    assert 0 < value(samples, "hive_queue_oldest_age_seconds", task_type="b") < 600
    assert value(samples, "hive_queue_oldest_age_seconds", task_type="r") == 0
    assert value(samples, "hive_queue_oldest_age_seconds", task_type="d") == 0


@asynccontextmanager
async def _exporter(**args: object) -> AsyncIterator[Metrics]:
    """The exporter of ``hive-orchestration dashboard`` with these arguments, on the
    source it opens (the runtime that serves them, in another process)."""
    namespace = argparse.Namespace(
        **{"db": None, "url": None, "token": None, "tls_ca": None, **args}
    )
    async with Source.open(namespace, "dashboard") as source:
        assert source.runtime is None  # another process's: only what the socket serves
        yield Metrics(source)


async def test_through_the_socket_queue_depth_is_exact_at_any_depth(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dashboard --db`` of a database another process's runtime owns: depth by type
    is the owner's one aggregate query (``queue_depths``, through its socket), reported
    exactly past a page's worth of queued tasks, as in the runtime's own process."""
    from hive_orchestration.observe import metrics as module

    monkeypatch.setattr(module, "MAX_READ", 3)
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path, source_agent="t") as client:
            assert client.remote
            await _deep_queues(client)
        async with _exporter(db=db_path) as metrics:
            _, _, samples = await scrape(metrics)
        await process.stop()
    _assert_exact_depths(samples)


async def test_over_tcp_an_agent_token_reads_exact_queue_depths(
    db_path: str, anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dashboard --url`` with an agent's token: ``queue_depths`` is a read it may make."""
    from hive_orchestration.observe import metrics as module

    monkeypatch.setattr(module, "MAX_READ", 3)
    tokens = write_tokens(tmp_path)
    async with serve(db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0",
                     "--tokens", tokens) as served:  # fmt: skip
        url = served.url()
        async with OrchestrationClient(url=url, token=DEPLOYER) as client:
            await _deep_queues(client)
        async with _exporter(url=url, token=DEPLOYER) as metrics:
            _, _, samples = await scrape(metrics)
    _assert_exact_depths(samples)


async def test_a_runtime_that_serves_no_queue_depths_is_read_a_page_of(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime of an older version, through its socket, refuses ``queue_depths`` as an
    unknown operation: the exporter reads a page of queued tasks instead, as from the
    file, and does not ask again."""
    from hive_orchestration.api import wire

    older = {op: spec for op, spec in wire._OPERATIONS.items() if op != "queue_depths"}
    monkeypatch.setattr(wire, "_OPERATIONS", older)  # what this process's server serves
    async with Runtime.open(db_path) as runtime:
        await runtime.create_task("a", {})
        await runtime.create_task("a", {})
        async with _exporter(db=db_path) as metrics:
            assert metrics.source.queue_depths is not None
            _, _, samples = await scrape(metrics)
            assert metrics.source.queue_depths is None
            await runtime.create_task("b", {})
            _, _, again = await scrape(metrics)
    assert value(samples, "hive_queue_depth", task_type="a") == 2
    assert value(again, "hive_queue_depth", task_type="a") == 2
    assert value(again, "hive_queue_depth", task_type="b") == 1


_ACTORS = ("broadcast", "storage", "tasks", "workers", "plans", "schedules")


def _histogram(samples: Samples, name: str) -> tuple[float, float, list[float]]:
    """A histogram's count, sum and cumulative bucket counts (by bound, ``+Inf`` last)."""
    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (sample, labels), count in samples.items()
        if sample == f"{name}_bucket"
    )
    assert buckets, f"{name} was not served"
    return value(samples, f"{name}_count"), value(samples, f"{name}_sum"), [c for _, c in buckets]


def _assert_commit_figures(samples: Samples) -> tuple[float, float]:
    """The storage actor's figures agree with each other: every commit counted once in
    each histogram, its batches summing to the writes. Its commits and writes."""
    commits = value(samples, "hive_storage_commits_total")
    writes = value(samples, "hive_storage_writes_total")
    assert 0 < commits <= writes
    count, took, cumulative = _histogram(samples, "hive_commit_seconds")
    assert count == commits
    assert cumulative == sorted(cumulative)  # cumulative: never decreasing
    assert cumulative[-1] == count  # +Inf holds them all
    assert took > 0
    count, grouped, cumulative = _histogram(samples, "hive_commit_batch_size")
    assert count == commits
    assert cumulative == sorted(cumulative)
    assert cumulative[-1] == count
    assert grouped == writes  # each write in exactly one commit's batch
    assert value(samples, "hive_commit_batch_size_max") >= 1
    return commits, writes


async def test_through_the_socket_the_runtimes_statistics_are_served(
    db_path: str, anyio_backend: str
) -> None:
    """``dashboard --db`` of a database another process's runtime owns: its mailboxes
    (the capacity that process was configured with), restarts and the storage actor's
    commit histograms come through its socket (``statistics``), and move by what this
    test writes between two scrapes."""
    async with owner(db_path, anyio_backend, mailbox_size=77) as process:
        async with OrchestrationClient(db_path=db_path, source_agent="t") as client:
            assert client.remote
            await client.create_task("build", {"n": 0})
            async with _exporter(db=db_path) as metrics:
                _, _, before = await scrape(metrics)
                async with client.subscribe("task.created") as created:
                    for n in range(1, 8):  # one write each, the call waiting for its commit
                        await client.create_task("build", {"n": n})
                    for _ in range(7):  # the owner published them: an event each
                        await created.__anext__()
                    _, _, after = await scrape(metrics)
        await process.stop()
    for actor in _ACTORS:
        assert value(after, "hive_mailbox_capacity", actor=actor) == 77
        assert ("hive_mailbox_depth", (("actor", actor),)) in after
        assert 0 <= value(after, "hive_mailbox_depth", actor=actor) <= 77
    assert not any(name == "hive_actor_restarts_total" and n for (name, _), n in after.items())
    commits, writes = _assert_commit_figures(before)
    commits_after, writes_after = _assert_commit_figures(after)
    assert writes_after - writes == 7
    assert 1 <= commits_after - commits <= 7
    assert value(before, "hive_subscribers") == 0
    assert value(after, "hive_subscribers") == 1  # this test's, through the socket
    published = value(after, "hive_events_published_total")
    assert published - value(before, "hive_events_published_total") >= 7
    assert value(after, "hive_events_delivered_total") >= 7
    # Its socket server: this test's client and the exporter's, and the budget for
    # them and their requests (max_held_bytes, 512 MiB by default): held, the two
    # connections' shares and the scrape's own server_status call (a frame of some 80
    # bytes, counted 101 times that).
    assert value(after, "hive_server_connections") == 2
    assert value(after, "hive_server_held_bytes_max") == 512 * 1024 * 1024
    shares = 2 * CONNECTION_BYTES
    assert shares < value(after, "hive_server_held_bytes") < shares + 20_000
    assert 0 < value(after, "hive_server_held_bytes_peak") <= 512 * 1024 * 1024
    assert value(after, "hive_server_held_back") == 0


async def test_over_tcp_an_agent_token_reads_the_runtimes_statistics(
    db_path: str, anyio_backend: str, tmp_path: Path
) -> None:
    """``dashboard --url`` with an agent's token: ``statistics`` is a read it may make."""
    tokens = write_tokens(tmp_path)
    async with serve(db_path, anyio_backend, tmp_path, "--listen", "tcp://127.0.0.1:0",
                     "--tokens", tokens) as served:  # fmt: skip
        url = served.url()
        async with OrchestrationClient(url=url, token=DEPLOYER) as client:
            for n in range(3):
                await client.create_task("deploy", {"n": n})
            stats = await client.statistics()
        async with _exporter(url=url, token=DEPLOYER) as metrics:
            _, _, samples = await scrape(metrics)
    assert stats.storage.writes >= 3
    assert set(stats.mailboxes) == set(_ACTORS)
    for actor in _ACTORS:
        assert value(samples, "hive_mailbox_capacity", actor=actor) > 0
    _, writes = _assert_commit_figures(samples)
    assert writes >= stats.storage.writes


async def test_a_runtime_that_serves_no_statistics_is_left_out_quietly(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime of an older version, through its socket, refuses ``statistics`` as an
    unknown operation: the scrape goes on without those figures, and does not ask again."""
    from hive_orchestration.api import wire

    older = {op: spec for op, spec in wire._OPERATIONS.items() if op != "statistics"}
    monkeypatch.setattr(wire, "_OPERATIONS", older)  # what this process's server serves
    async with Runtime.open(db_path) as runtime:
        await runtime.create_task("a", {})
        async with _exporter(db=db_path) as metrics:
            assert metrics.source.statistics is not None
            status, _, samples = await scrape(metrics)
            assert metrics.source.statistics is None
            _, _, again = await scrape(metrics)
    assert status == 200
    for scraped in (samples, again):
        assert value(scraped, "hive_queue_depth", task_type="a") == 1
        assert not any(name.startswith("hive_mailbox") for name, _ in scraped)
        assert not any(name.startswith("hive_commit") for name, _ in scraped)
