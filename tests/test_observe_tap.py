"""The in-process event tap (``Runtime.tap``) that feeds the Prometheus exporter in the
runtime's own process: it is no public subscriber, it folds every committed event, a
fold that raises ends only its tap, and after a broadcast crash the exporter goes on
from the log without losing or double-counting an event. Real files, both backends."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from reliability._remote import eventually

pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")

from hive_orchestration import Runtime
from hive_orchestration.messages.events import Entry, Event
from hive_orchestration.observe.metrics import Metrics, watch

pytestmark = pytest.mark.anyio


async def caught_up(metrics: Metrics, runtime: Runtime) -> None:
    end = await runtime.last_seq()

    async def folded() -> bool:
        return metrics.last_seq >= end

    await eventually(folded, within=10)


async def test_the_exporter_in_the_runtimes_process_is_no_public_subscriber(
    db_path: str,
) -> None:
    async with Runtime.open(db_path) as runtime:
        before = (await runtime.statistics()).broadcast
        async with watch(runtime) as metrics:
            during = (await runtime.statistics()).broadcast
            for n in range(20):
                await runtime.create_task("job", {"n": n})
            claim = await runtime.claim_task("w", "job", start=True)
            assert claim is not None
            await runtime.complete_task(claim.lease, {})
            await caught_up(metrics, runtime)
            # Counted in the fan-out: no subscription queue, no reader task.
            assert during.subscribers == before.subscribers == 0
            assert during.internal == before.internal + 1
            assert metrics.created == {"job": 20}
            assert metrics.finished == {("job", "completed"): 1}
            assert metrics.events["task.created"] == 20
            assert metrics.delivery.sum >= 0
            assert sum(metrics.delivery.counts) == sum(metrics.events.values())

        # Leaving the block removes the tap.
        async def removed() -> bool:
            return (await runtime.statistics()).broadcast.internal == before.internal

        await eventually(removed, within=10)


async def test_a_fold_that_raises_ends_its_tap_and_nothing_else(db_path: str) -> None:
    calls: list[int] = []

    def fold(entries: Sequence[Entry]) -> None:
        calls.append(entries[0][0].seq)
        raise ValueError("observer bug")

    async with Runtime.open(db_path) as runtime:
        async with runtime.tap(fold) as tap, runtime.subscribe("*") as sub:
            first = await runtime.publish("a.one")
            with anyio.fail_after(10), pytest.raises(ValueError, match="observer bug"):
                await tap.receive()
            second = await runtime.publish("a.two")
            with anyio.fail_after(10):
                assert [(await sub.receive()).seq for _ in range(2)] == [first.seq, second.seq]
        assert calls == [first.seq]  # never called again
        assert (await runtime.statistics()).restarts["broadcast"] == 0


async def test_a_tap_ends_cleanly_when_the_runtime_stops(db_path: str) -> None:
    seen: list[int] = []
    ended = anyio.Event()

    async def owner(runtime: Runtime, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with runtime.tap(lambda entries: seen.extend(e.seq for e, _ in entries)) as tap:
            task_status.started()
            with pytest.raises(anyio.EndOfStream):
                await tap.receive()
            ended.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group, Runtime.open(db_path) as runtime:
            await group.start(owner, runtime)
            published = [(await runtime.publish("b.x", {"i": i})).seq for i in range(3)]
    assert ended.is_set()
    assert seen == published


async def test_after_a_broadcast_crash_the_exporter_goes_on_from_the_log(
    db_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hive_orchestration.actors.broadcast import BroadcastActor

    original = BroadcastActor._fan_out
    armed = {"crash": False}

    def flaky(self: BroadcastActor, entries: tuple[tuple[Event, bytes], ...]) -> None:
        if armed["crash"]:
            armed["crash"] = False
            raise RuntimeError("fan-out fault")
        original(self, entries)

    monkeypatch.setattr(BroadcastActor, "_fan_out", flaky)
    async with Runtime.open(db_path) as runtime, watch(runtime) as metrics:
        await runtime.create_task("job", {"n": 0})
        await caught_up(metrics, runtime)
        armed["crash"] = True
        await runtime.create_task("job", {"n": 1})  # its event's fan-out crashes

        async def restarted() -> bool:
            return (await runtime.statistics()).restarts["broadcast"] == 1

        await eventually(restarted, within=10)
        for n in range(2, 5):
            await runtime.create_task("job", {"n": n})
        await caught_up(metrics, runtime)
        # Every creation counted once: the one whose fan-out crashed too, from the log.
        assert metrics.created == {"job": 5}
        assert metrics.events["task.created"] == 5
    assert "event tap broke after event" in caplog.text
