"""The metric families a scrape gets, rendered from what :class:`~.metrics.Metrics` holds:
:class:`_Counted` from the counts folded from events, :class:`_SnapshotCollector` from the
figures the last scrape read, and :class:`_Histogram`, the plain buckets events are timed
into (no prometheus-client child lookup and lock per event).

Separate from :mod:`.metrics`, which decides what is counted and read: this is only how
it is written for Prometheus.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..messages.storage import Buckets
from ..messages.tasks import TaskStatus
from ..messages.workers import WorkerStatus

if TYPE_CHECKING:
    from ..remote.status import ServerStatus
    from .metrics import Metrics


class _Histogram:
    """Observations in buckets (each counted in the first whose bound holds it)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if math.isinf(bound) else repr(bound), float(total)))
        return out


def _cumulative(buckets: Buckets) -> list[tuple[str, float]]:
    total, out = 0, []
    for bound, count in zip((*buckets.bounds, math.inf), buckets.counts, strict=True):
        total += count
        out.append(("+Inf" if math.isinf(bound) else repr(bound), float(total)))
    return out


class _Counted(Collector):
    """What :meth:`Metrics.observe` counted, as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        for name, text, label, counts in (
            ("hive_events", "Events committed to the log, by type", "event_type", m.events),
            ("hive_tasks_created", "Tasks created (task.created), by type", "task_type",
             m.created),
            ("hive_task_retries", "Tasks queued again after a run ended without success"
             " (task.retrying), by reason", "reason", m.retries),
            ("hive_leases_lost", "Runs that ended because their worker's lease expired or"
             " the worker was lost", "reason", m.leases_lost),
        ):  # fmt: skip
            family = CounterMetricFamily(name, text, labels=[label])
            for key, count in sorted(counts.items()):
                family.add_metric([key], count)
            yield family
        finished = CounterMetricFamily(
            "hive_tasks_finished",
            "Tasks that reached a final status (completed, failed, cancelled, timed_out)",
            labels=["task_type", "status"],
        )
        for (task_type, status), count in sorted(m.finished.items()):
            finished.add_metric([task_type, status], count)
        yield finished
        for name, text, by in (
            ("hive_task_queue_wait_seconds", "From a task becoming queued (created, ready in"
             " its plan, or due again after a retry) to a worker claiming it", m.queue_wait),
            ("hive_task_run_seconds", "A run, from its claim to its end (completed, failed,"
             " timed out, lost, released or cancelled)", m.run_seconds),
        ):  # fmt: skip
            histograms = HistogramMetricFamily(name, text, labels=["task_type"])
            for task_type, hist in sorted(by.items()):
                histograms.add_metric([task_type], hist.cumulative(), hist.sum)
            yield histograms
        delivery = HistogramMetricFamily(
            "hive_event_delivery_seconds",
            "From an event's timestamp (taken as the runtime records it) to its arrival at"
            " this exporter's subscription",
        )
        delivery.add_metric([], m.delivery.cumulative(), m.delivery.sum)
        yield delivery


class _SnapshotCollector(Collector):
    """The figures of the last :meth:`Metrics.refresh`, as metric families (labels that
    are gone are gone, unlike a Gauge's children)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape: no fixed set to describe

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics._snapshot
        tasks = GaugeMetricFamily("hive_tasks", "Tasks by status, now", labels=["status"])
        for status in dict.fromkeys(s.value for s in TaskStatus):
            tasks.add_metric([status], snap.tasks.get(status, 0))
        yield tasks
        in_flight = snap.tasks.get("assigned", 0) + snap.tasks.get("running", 0)
        yield GaugeMetricFamily(
            "hive_claims_in_flight", "Tasks held by a worker's claim (assigned or running)",
            value=in_flight,
        )  # fmt: skip
        if snap.queue_depth is not None:
            depth = GaugeMetricFamily(
                "hive_queue_depth", "Queued tasks by type, now", labels=["task_type"]
            )
            oldest = GaugeMetricFamily(
                "hive_queue_oldest_age_seconds",
                "How long the longest-waiting queued task of each type has been claimable",
                labels=["task_type"],
            )
            for task_type, count in sorted(snap.queue_depth.items()):
                depth.add_metric([task_type], count)
                oldest.add_metric([task_type], snap.queue_oldest.get(task_type, 0.0))
            yield depth
            yield oldest
        workers = GaugeMetricFamily(
            "hive_workers", "Registered workers by status", labels=["status"]
        )
        for worker_status in WorkerStatus:
            workers.add_metric([worker_status.value], snap.workers.get(worker_status.value, 0))
        yield workers
        plans = GaugeMetricFamily("hive_plans", "Execution plans by status", labels=["status"])
        for plan_status, count in snap.plans.items():
            plans.add_metric([plan_status], count)
        yield plans
        yield from _server(snap.server)
        stats = snap.statistics
        if stats is None:
            return
        mailbox = GaugeMetricFamily(
            "hive_mailbox_depth", "Messages queued in each actor's mailbox", labels=["actor"]
        )
        capacity = GaugeMetricFamily(
            "hive_mailbox_capacity", "Each actor's mailbox capacity", labels=["actor"]
        )
        for actor, box in stats.mailboxes.items():
            mailbox.add_metric([actor], box.queued)
            capacity.add_metric([actor], box.capacity)
        yield mailbox
        yield capacity
        restarts = CounterMetricFamily(
            "hive_actor_restarts", "Actor restarts by the supervisor", labels=["actor"]
        )
        for actor, count in stats.restarts.items():
            restarts.add_metric([actor], count)
        yield restarts
        storage, broadcast = stats.storage, stats.broadcast
        for name, text, value in (
            ("hive_storage_commits", "Transactions committed by the storage actor",
             storage.transactions),
            ("hive_storage_writes", "Writes committed (a commit groups several)", storage.writes),
            ("hive_storage_failed_writes", "Writes that failed", storage.failed_writes),
            ("hive_events_published", "Events handed to the broadcast actor", broadcast.published),
            ("hive_events_delivered", "Events delivered to subscribers", broadcast.delivered),
            ("hive_events_dropped", "Events dropped for subscribers with overflow='drop'",
             broadcast.dropped),
            ("hive_subscriber_lagged", "Times a subscriber fell its buffer's worth behind",
             broadcast.lagged),
        ):  # fmt: skip
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "hive_commit_batch_size_max", "Most writes one commit has grouped",
            value=storage.largest_batch,
        )  # fmt: skip
        for name, text, buckets in (
            ("hive_commit_seconds", "How long the storage actor's commits took (statements,"
             " COMMIT and fsync)", storage.commit_seconds),
            ("hive_commit_batch_size", "Writes grouped into one commit",
             storage.commit_batch_size),
        ):  # fmt: skip
            if buckets.bounds:
                histogram = HistogramMetricFamily(name, text)
                histogram.add_metric([], _cumulative(buckets), buckets.sum)
                yield histogram
        yield GaugeMetricFamily(
            "hive_subscribers", "The app's live subscriptions", value=broadcast.subscribers
        )


def _server(status: ServerStatus | None) -> Iterable[Metric]:
    """The socket server's connections and its budget for their requests (nothing where
    the runtime serves no socket, or predates the budget)."""
    if status is None or not status.max_held_bytes:
        return
    for name, text, value in (
        ("hive_server_connections", "Clients connected to the runtime's socket server",
         len(status.connections)),
        ("hive_server_held_bytes", "What the connections (256 KiB each, for reading their"
         " sockets) and their requests in flight (their frames and the most those may decode"
         " into) are counted as holding", status.held_bytes),
        ("hive_server_held_bytes_max", "The server's budget for them (max_held_bytes)",
         status.max_held_bytes),
        ("hive_server_held_bytes_peak", "The most held at once since the server started",
         status.peak_held_bytes),
        ("hive_server_held_back", "Connections whose next frame waits unread for room",
         status.held_back),
    ):  # fmt: skip
        yield GaugeMetricFamily(name, text, value=value)
