"""Bad input and faults on the owner's socket (issue 20), with real processes on both backends.

- Frames that are truncated, oversized, of a wrong version, structured wrongly or plain
  garbage, drawn by hypothesis and written to a raw socket of a real owner: each bad
  connection is closed, nothing it carried after the bad bytes runs (a call to create a
  task follows every bad frame), and the owner answers its other clients throughout.
- Peers that stall (half a hello, a hello then nothing, calls whose answers are never
  read) are cut at their deadlines while the owner serves others meanwhile (the garbage,
  4 GiB and silent cases of ``tests/test_remote.py`` are not repeated here).
- 200 remote clients in four processes create, claim and complete at once: nothing lost,
  nothing completed twice (the audit of ``_audit.py``).
- A connection dropped in the middle of a call and of a claim: a create retried with its
  idempotency key gives one task; a claim the peer did not acknowledge goes back at once,
  one it acknowledged expires with its lease, and neither can then be completed by it.
- SIGKILL of the owner under remote load: every call is answered or ends with
  OutcomeUnknownError/ConnectionLostError, and after a reopen nothing acknowledged is lost
  (the creates whose outcome was unknown are reconciled by their idempotency keys).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any, Literal

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from hive_orchestration import (
    Claim,
    ConnectionLostError,
    InvalidInputError,
    LeaseLostError,
    OrchestrationClient,
    OutcomeUnknownError,
    RunStatus,
    RuntimeConfig,
    SyncOrchestrationClient,
    TaskStatus,
)
from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    ClientFrame,
    Failure,
    Hello,
    Refused,
    Result,
    frame,
)
from hive_orchestration.remote.server import HANDSHAKE_TIMEOUT
from hive_orchestration.storage.port import STARTING
from hive_orchestration.storage.store import open_store

from ._audit import audit_tasks, read_log
from ._remote import DEADLINE, HELLO, RawPeer, call_frame, child, eventually, owner, start_owner

pytestmark = pytest.mark.anyio

BACKENDS = ("asyncio", "trio")
#: The owner's frame limit in these tests (its smallest allowed value).
MAX_FRAME = RuntimeConfig().max_frame_bytes
#: How long a bad connection may stay open once the peer has sent its last byte.
CLOSE_WITHIN = 10.0


# -- frames that are not frames --------------------------------------------------------------


class Served:
    """An owner process of one backend, and a peer that watches it between examples."""

    def __init__(self, address: str, db_path: str, backend: str) -> None:
        self.address = address
        self.db_path = db_path
        self.backend: Literal["asyncio", "trio"] = "trio" if backend == "trio" else "asyncio"
        self.probe = RawPeer(address)
        self.probe.hello()
        self.baseline = self.probe.call("last_seq")


@pytest.fixture(scope="module", params=BACKENDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    db_path = str(tmp_path_factory.mktemp("frames") / "hive.db")
    process, address = start_owner(db_path, str(request.param))
    try:
        found = Served(address, db_path, str(request.param))
        yield found
        found.probe.close()
    finally:
        with process:  # closes its pipes
            process.kill()


#: What follows every bad frame: a call that would leave a trace if it ran.
CREATE = call_frame(1, "create_task", task_type="smuggled", idempotency_key="smuggled")
_client_frames = msgspec.msgpack.Decoder(ClientFrame)


def first_frame(data: bytes) -> object | None:
    """The frame a reader of ``data`` decodes first, or None if it refuses it."""
    if len(data) < 4:
        return None
    (size,) = struct.unpack(">I", data[:4])
    if size > MAX_FRAME or len(data) < 4 + size:
        return None
    try:
        return _client_frames.decode(data[4 : 4 + size])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


_KINDS = ["hello", "call", "cancel", "received", "subscribe", "unsubscribe", "ping"]
_KINDS += ["welcome", "refused", "result", "failure", "events", "ended", "pong", "goodbye"]
_FIELDS = ["version", "name", "token", "id", "op", "args", "agent", "correlation", "kept"]
_FIELDS += ["pattern", "filters", "buffer", "overflow", "nonce", "value", "entries"]
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_structured = st.builds(
    lambda kind, fields: frame_bytes({"kind": kind, **fields}),
    st.one_of(st.sampled_from(_KINDS), st.text(max_size=10), st.integers(0, 2**32), st.none()),
    st.dictionaries(st.sampled_from(_FIELDS), _value, max_size=5),
)


def frame_bytes(value: object) -> bytes:
    body = msgspec.msgpack.encode(value)
    return struct.pack(">I", len(body)) + body


class Bad(msgspec.Struct, frozen=True):
    """What a hostile peer sends (then it closes its side), and what it is."""

    how: str
    data: bytes
    #: Whether the owner welcomes it first (its hello came before the bad part).
    welcomed: bool


@st.composite
def bad_frames(draw: st.DrawFn) -> Bad:
    how = draw(
        st.sampled_from(
            [
                "garbage",
                "garbage after hello",
                "structured",
                "structured after hello",
                "wrong version",
                "oversized",
                "oversized after hello",
                "truncated",
            ]
        )
    )
    after_hello = how.endswith("after hello")
    prefix = HELLO if after_hello else b""
    if how.startswith("garbage"):
        bad = draw(st.binary(min_size=1, max_size=300))
    elif how.startswith("structured"):
        bad = draw(_structured)
    elif how == "wrong version":
        version = draw(
            st.integers(min_value=-(2**63), max_value=2**63 - 1).filter(
                lambda v: v != PROTOCOL_VERSION
            )
        )
        bad = frame(Hello(version, name=draw(st.none() | st.text(max_size=10))))
    elif how.startswith("oversized"):
        size = draw(st.integers(min_value=MAX_FRAME + 1, max_value=2**32 - 1))
        bad = struct.pack(">I", size) + draw(st.binary(max_size=200))
    else:  # truncated: a hello and a call, cut before the call's last byte
        whole = HELLO + CREATE
        cut = draw(st.integers(min_value=1, max_value=len(whole) - 1))
        return Bad(how, whole[:cut], welcomed=cut >= len(HELLO))
    first = first_frame(bad + CREATE)
    if after_hello:
        # Bytes that happen to make a frame of the protocol are no bad frame.
        assume_not(first is not None)
    else:
        assume_not(isinstance(first, Hello) and first.version == PROTOCOL_VERSION)
    return Bad(how, prefix + bad + CREATE, welcomed=after_hello)


def assume_not(condition: bool) -> None:
    from hypothesis import assume

    assume(not condition)


def send_and_watch(address: str, bad: Bad) -> list[Any] | None:
    """Send ``bad`` on a fresh connection, close the sending side, and collect what the
    owner answers until it closes (None if it keeps the connection open)."""
    peer = RawPeer(address)
    try:
        try:
            peer.send(bad.data)
            peer.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the owner cut it off before reading it all
        return peer.frames_until_closed(CLOSE_WITHIN)
    finally:
        peer.close()


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(bad=bad_frames())
def check_bad_frame(served: Served, bad: Bad) -> None:
    note(f"{bad.how}: {bad.data[:120]!r}")
    frames = send_and_watch(served.address, bad)
    assert frames is not None, f"the owner kept a {bad.how} connection open"
    kinds = [type(f).__name__ for f in frames]
    if bad.welcomed:
        assert kinds[:1] == ["Welcome"], kinds
        frames = frames[1:]
        # Told why before the close (docs/PROTOCOL.md, "Protocol errors"): the call the
        # frame opened refused (nothing of it ran), then the connection's reason, id 0.
        # Only a stream cut just after the hello ends cleanly, with nothing to tell.
        if bad.how != "truncated":
            assert frames, f"a {bad.how} frame closed the connection without a word"
        assert all(isinstance(f, Failure) for f in frames), kinds
        assert len(frames) <= 2, kinds
        if frames:
            notice = frames[-1]
            assert (notice.id, notice.type) == (0, "HiveError"), notice
            assert "closed the connection for a frame this client sent" in notice.message
            assert all(f.type == "InvalidInputError" and f.id != 0 for f in frames[:-1])
        frames = []
    # Nothing was run: no answer of any call, only a refusal of the handshake at most.
    assert all(isinstance(f, Refused) for f in frames), kinds
    assert len(frames) <= 1
    if bad.how == "wrong version":
        assert frames, "a hello of another version is refused, in words"
        assert "protocol version" in frames[0].error.message
    # The owner is healthy and did nothing: its other connection is answered at once.
    assert served.probe.call("last_seq") == served.baseline


def test_bad_frames_close_their_connection_and_nothing_runs(served: Served) -> None:
    check_bad_frame(served)
    # A normal client afterwards: served, and the smuggled create never ran.
    with SyncOrchestrationClient(db_path=served.db_path, backend=served.backend) as client:
        assert client.remote
        assert client.last_seq() == served.baseline
        assert client.get_tasks_by_status("queued") == []
        task_id = client.create_task("after")
        assert client.get_task(task_id) is not None
    served.baseline = served.probe.call("last_seq")


def test_every_kind_of_bad_frame_is_drawn() -> None:
    """The strategy reaches every kind (a filter that swallowed one would hide it)."""
    seen: set[str] = set()

    @settings(max_examples=400, database=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(bad=bad_frames())
    def collect(bad: Bad) -> None:
        seen.add(bad.how)

    collect()
    assert len(seen) == 8, seen


# -- peers that stall ----------------------------------------------------------------------


#: "Never before its deadline", with room for two processes reading one monotonic clock.
EARLY = 0.01


def hung_up_at(sock: socket.socket, within: float) -> float | None:
    """When the owner closed ``sock`` (``time.monotonic()``), or None if it kept it open
    ``within`` seconds. Watched with poll, reading nothing: a peer that reads takes the
    frames a deaf peer must leave unread (the owner's write then goes through and the peer
    is no longer deaf), and a deaf peer's connection is cut in the middle of a frame."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)  # POLLHUP and POLLERR come unasked
    ends = time.monotonic() + within
    while (left := ends - time.monotonic()) > 0:
        if poller.poll(left * 1000):
            return time.monotonic()
    return None


async def test_stalled_peers_are_cut_at_their_deadlines_and_others_are_served(
    db_path: str, anyio_backend: str
) -> None:
    timeout = 1.0  # remote_timeout: a peer taking no frame is cut after 1 s, a silent one after 3
    deadlines = {"deaf": timeout, "silent": 3 * timeout, "half_hello": HANDSHAKE_TIMEOUT}
    # Before each peer did what its deadline counts from (its connection, its hello, its
    # first call): none is cut sooner than its deadline after that, however late this
    # process runs. Each is watched from a thread of its own from then on.
    since: dict[str, float] = {}
    cut: dict[str, float | None] = {}

    async def watch(name: str, peer: RawPeer) -> None:
        cut[name] = await anyio.to_thread.run_sync(hung_up_at, peer.sock, DEADLINE)

    async with owner(db_path, anyio_backend, remote_timeout=timeout) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            await client.create_tasks(
                [{"task_type": "big", "payload": {"pad": "x" * 2000}} for _ in range(300)]
            )
        async with anyio.create_task_group() as watchers:
            since["half_hello"] = time.monotonic()
            half_hello = RawPeer(process.address)
            half_hello.send(HELLO[:7])
            watchers.start_soon(watch, "half_hello", half_hello)
            since["silent"] = time.monotonic()
            silent = RawPeer(process.address)
            silent.hello()
            watchers.start_soon(watch, "silent", silent)
            # Asks, and never reads: a claim (answered, never acknowledged), then answers of
            # 600 KB each until the owner cannot hand it a frame.
            deaf = RawPeer(process.address)
            deaf.hello()
            since["deaf"] = time.monotonic()
            deaf.start("claim_task", worker_id="deaf", task_types=["big"])
            for _ in range(20):
                deaf.start("get_tasks_by_status", status="queued", limit=300)
            watchers.start_soon(watch, "deaf", deaf)
            started = time.monotonic()
            # Meanwhile, a client is served, and the peers are still connected.
            async with OrchestrationClient(db_path=db_path) as client:
                assert len(await client.get_queued_tasks(limit=10)) == 10
                await client.create_task("meanwhile")
        for peer in (deaf, silent, half_hello):
            peer.close()
        for name, deadline in deadlines.items():
            at = cut[name]
            assert at is not None, f"{name} never cut off"
            # Never before its deadline (timers do not fire early), and within a generous
            # margin after it.
            assert at - since[name] >= deadline - EARLY, (name, at - since[name])
            assert at - started < deadline + 15, (name, at - started)
        async with OrchestrationClient(db_path=db_path) as client:
            # The claim the deaf peer never took went back with its connection.
            await eventually(lambda: _none_assigned(client))
            assert len(await client.get_queued_tasks(limit=1000)) == 301
            _, _, _, problems = await audit_tasks(client, await read_log(client))
            assert problems == []


# -- many clients at once ------------------------------------------------------------------


async def test_two_hundred_remote_clients_lose_nothing_and_complete_nothing_twice(
    db_path: str, anyio_backend: str
) -> None:
    processes, clients, rounds = 4, 50, 4
    async with owner(db_path, anyio_backend), AsyncExitStack() as stack:
        children = [
            await stack.enter_async_context(
                child("load", anyio_backend, db_path, f"c{n}", str(clients), str(rounds))
            )
            for n in range(processes)
        ]
        for each in children:  # all 200 connected before any starts
            await each.expect("open")
        async with OrchestrationClient(db_path=db_path) as client:
            status = await client.server_status()
            assert len(status.connections) == processes * clients + 1
        for each in children:
            await each.tell()
        for each in children:
            await each.expect("done")
            assert await each.finish() == 0
        lines = [line for each in children for line in each.lines]
        created = {line["task"] for line in lines if line["op"] == "created"}
        completed = [(line["task"], line["run"]) for line in lines if line["op"] == "completed"]
        assert len(created) == processes * clients * rounds
        assert len(completed) == len(created)
        assert {task for task, _ in completed} == created  # each once: as many as tasks
        async with OrchestrationClient(db_path=db_path) as client:
            _, tasks, runs, problems = await audit_tasks(client, await read_log(client))
        assert problems == []
        assert set(tasks) == created
        assert all(task.status is TaskStatus.COMPLETED for task in tasks.values())
        for task_id, run_id in completed:
            (run,) = runs[task_id]  # one claim each, and the acknowledged one
            assert (run.id, run.status) == (run_id, RunStatus.COMPLETED)


# -- a connection dropped in the middle --------------------------------------------------


async def test_a_create_cut_off_mid_call_is_made_once_by_its_retry(
    db_path: str, anyio_backend: str
) -> None:
    keys = [f"key-{n}" for n in range(24)]

    def cut_off(address: str) -> None:
        for n, key in enumerate(keys):
            peer = RawPeer(address)
            peer.hello()
            data = call_frame(
                1, "create_task", task_type="job", payload={"n": n}, idempotency_key=key
            )
            how = n % 4
            if how == 0:  # half the call: never run
                peer.send(data[: len(data) // 2])
            elif how == 1 or how == 2:  # the whole call, gone before its answer (abortively)
                peer.send(data)
            else:  # answered, then gone
                peer.send(data)
                assert isinstance(peer.answer(1), Result)
            peer.close(reset=how == 1)

    async with owner(db_path, anyio_backend) as process:
        await anyio.to_thread.run_sync(cut_off, process.address)
        async with OrchestrationClient(db_path=db_path) as client:
            before = {task.payload["n"] for task in await client.get_queued_tasks(limit=100)}
            assert not before & {n for n in range(len(keys)) if n % 4 == 0}  # half a call: nothing
            assert {n for n in range(len(keys)) if n % 4 == 3} <= before  # answered: there
            # Retried with their keys, whatever their outcome was: one task each.
            ids = [
                await client.create_task("job", {"n": n}, idempotency_key=key)
                for n, key in enumerate(keys)
            ]
            queued = await client.get_queued_tasks(limit=100)
            assert sorted(int(str(task.payload["n"])) for task in queued) == list(range(len(keys)))
            assert {task.id for task in queued} == set(ids)
            _, _, _, problems = await audit_tasks(client, await read_log(client))
            assert problems == []


async def test_a_claim_cut_off_mid_call_goes_back_or_expires_and_is_completed_once(
    db_path: str, anyio_backend: str
) -> None:
    ways = ["unread", "unacknowledged", "refused", "kept"]
    async with owner(db_path, anyio_backend) as process:
        async with OrchestrationClient(db_path=db_path) as client:
            created = [await client.create_task("job", {"n": n}) for n in range(2 * len(ways))]

        def cut_off(address: str) -> list[tuple[str, Claim | None]]:
            """Claim one task per way, and drop the connection at that point of the call."""
            got = []
            for n in range(2 * len(ways)):
                way = ways[n % len(ways)]
                peer = RawPeer(address)
                peer.hello()
                call_id = peer.start(
                    "claim_task", worker_id=f"gone-{n}", task_types=["job"], lease=1.0
                )
                claim = None
                if way != "unread":
                    answer = peer.answer(call_id)
                    assert isinstance(answer, Result), answer
                    claim = msgspec.msgpack.decode(answer.value, type=Claim)
                    if way in ("refused", "kept"):
                        peer.acknowledge(call_id, kept=way == "kept")
                        # A later call's answer proves the receipt was read before the drop.
                        assert isinstance(peer.call("last_seq"), int)
                peer.close(reset=n % 2 == 1)
                got.append((way, claim))
            # A claim parked for work that does not exist yet, dropped while it waits.
            peer = RawPeer(address)
            peer.hello()
            peer.start("claim_task", worker_id="gone-waiting", task_types=["later"], wait=30.0)
            assert peer.call("last_seq") >= 0  # the claim is parked by now
            peer.close()
            return got

        cut = await anyio.to_thread.run_sync(cut_off, process.address)
        async with OrchestrationClient(db_path=db_path) as client:
            later = await client.create_task("later")
            # Every claim went back at once (the kept ones with the connection that carried
            # their worker): nothing stays held by a peer that is gone.
            await eventually(lambda: _none_assigned(client))
            # The gone peers' leases complete nothing.
            for way, claim in cut:
                if claim is not None:
                    with pytest.raises(LeaseLostError):
                        await client.complete_task(claim.lease, {"by": way})
            done = set()
            while (claim := await client.claim_task("here", ["job", "later"])) is not None:
                done.add((await client.complete_task(claim.lease, {"by": "here"})).id)
            assert done == {*created, later}
            _, tasks, runs, problems = await audit_tasks(client, await read_log(client))
            assert problems == []
            assert all(task.result == {"by": "here"} for task in tasks.values())
            # The parked claim of the gone peer was never handed the later task.
            assert [run.worker_id for run in runs[later]] == ["here"]
            # How each claim of a gone peer ended: handed back, or (the kept ones) taken
            # back when the connection that carried its worker ended; none is counted as
            # done.
            ended = {
                (event.data["worker_id"], event.data["reason"])
                for event in await client.read_events(0, limit=10_000, pattern="task.*")
                if "reason" in event.data
            }
            for n, (way, _) in enumerate(cut):
                if way != "unread":  # that one ran, or was cancelled before it ran
                    reason = "worker_lost" if way == "kept" else "unclaimed"
                    assert (f"gone-{n}", reason) in ended, ended


# -- the owner killed under load ---------------------------------------------------------


async def test_an_owner_killed_under_remote_load_loses_nothing_acknowledged(
    db_path: str, anyio_backend: str
) -> None:
    acked: dict[str, str] = {}  # idempotency key -> task id, as answered
    unknown: set[str] = set()  # creates in flight when the owner died
    completed: set[str] = set()  # tasks whose completion was answered
    ended: list[BaseException] = []  # how each loop ended: only the two connection errors

    async def work(client: OrchestrationClient, n: int, progress: anyio.Event) -> None:
        try:
            for r in range(10_000):
                key = f"{n}-{r}"
                try:
                    acked[key] = await client.create_task("job", {"key": key}, idempotency_key=key)
                except OutcomeUnknownError:
                    unknown.add(key)
                    raise
                claim = await client.claim_task(f"w{n}", ["job"], wait=1)
                if claim is not None:
                    await client.complete_task(claim.lease, {"by": n})
                    completed.add(claim.task.id)
                    if len(completed) >= 60:
                        progress.set()
        except ConnectionLostError as exc:  # OutcomeUnknownError too
            ended.append(exc)

    parked: list[BaseException] = []  # how a claim waiting through the kill ended

    async def park(client: OrchestrationClient) -> None:
        # A call surely in flight at the kill: the loops' calls may all have been answered
        # just then (a fast owner, a busy client process), so that none is.
        try:
            await client.claim_task("parked", ["never-created"], wait=DEADLINE)
        except ConnectionLostError as exc:
            parked.append(exc)

    async with owner(db_path, anyio_backend) as process, AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(OrchestrationClient(db_path=db_path)) for _ in range(9)
        ]
        assert all(client.remote for client in clients)
        progress = anyio.Event()
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(park, clients[8])
                for n, client in enumerate(clients[:8]):
                    group.start_soon(work, client, n, progress)
                await progress.wait()
                process.kill()
            # Every loop ended (the group is done), each with a connection error.
        assert len(ended) == 8
        assert len(parked) == 1
        assert isinstance(parked[0], OutcomeUnknownError), parked
        assert all(str(process.pid) in str(exc) for exc in ended + parked)
    async with OrchestrationClient(db_path=db_path) as client:
        assert not client.remote  # this process owns it now: recovery ran
        for key, task_id in acked.items():
            task = await client.get_task(task_id)
            assert task is not None, f"acknowledged task {task_id} ({key}) lost"
        for task_id in completed:
            task = await client.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.COMPLETED, f"acknowledged completion of {task_id} lost"
        # Reconciled: a create whose outcome was unknown, retried with its key, is one task.
        for key in unknown:
            acked[key] = await client.create_task("job", {"key": key}, idempotency_key=key)
        _, tasks, _, problems = await audit_tasks(client, await read_log(client))
        assert problems == []
        assert sorted(str(task.payload["key"]) for task in tasks.values()) == sorted(acked)
        assert set(tasks) == set(acked.values())


# -- what these tests found ----------------------------------------------------------------


async def test_more_waiting_calls_than_the_owner_runs_at_once_keep_the_connection(
    db_path: str, anyio_backend: str
) -> None:
    """The owner stops reading a connection with ``max_calls_in_flight`` calls running: it
    read no ping either, so the client took the silence for a dead owner and failed every
    call. A client keeps no more calls in flight than the owner said it runs."""
    timeout = 1.0
    async with owner(db_path, anyio_backend, max_calls_in_flight=4):
        config = RuntimeConfig(remote_timeout=timeout)
        async with OrchestrationClient(db_path=db_path, config=config) as client:
            claims: list[Claim | None] = []

            async def claim(n: int) -> None:
                claims.append(await client.claim_task(f"w{n}", ["later"], wait=30))

            async with (
                OrchestrationClient(db_path=db_path) as other,
                anyio.create_task_group() as group,
            ):
                for n in range(10):
                    group.start_soon(claim, n)
                await eventually(lambda: _in_flight_at_least(other, 4))
                # What is under test is the passage of time: past the silence that ends a
                # connection (2.5 times it), the owner still answers this one. (Its other
                # calls wait behind the claims meanwhile, as the owner asked.)
                await anyio.sleep(2.5 * timeout)
                await other.create_tasks([{"task_type": "later"} for _ in range(10)])
            assert len(claims) == 10
            assert all(claim is not None for claim in claims)
            assert await client.last_seq() > 0


async def test_a_call_cancelled_as_its_frame_goes_out_leaves_the_connection_whole(
    db_path: str, anyio_backend: str
) -> None:
    """A call cancelled while its frame (8 MB here) was being written left half a frame on
    the connection: the owner read the frames after it as the rest of it, and the
    connection was lost (every call on it failed). A frame goes out whole."""
    tasks = [{"task_type": "bulk", "payload": {"pad": "x" * 8000}} for _ in range(1100)]
    async with owner(db_path, anyio_backend), OrchestrationClient(db_path=db_path) as client:
        cancelled = 0
        for attempt in range(20):
            with anyio.move_on_after(0.01 + 0.005 * attempt) as scope:
                with pytest.raises(InvalidInputError):  # over 1000 tasks: refused whole
                    await client.create_tasks(tasks)
            cancelled += scope.cancelled_caught
            with anyio.fail_after(5.0):  # answered at once (a broken connection: after 10 s)
                assert await client.last_seq() == 0
        assert cancelled > 0


async def test_an_answer_cancelled_as_it_goes_out_leaves_the_connection_whole(
    db_path: str, anyio_backend: str
) -> None:
    """The owner wrote an answer under the call's cancel scope: a Cancel that came while a
    large answer was being written cut it short, and the client read the frames after it
    as the rest of it (the connection was lost). An answer goes out whole."""
    async with owner(db_path, anyio_backend), OrchestrationClient(db_path=db_path) as client:
        await client.create_tasks(
            [{"task_type": "bulk", "payload": {"pad": "x" * 8000}} for _ in range(1000)]
        )
        cancelled = 0
        for attempt in range(20):
            with anyio.move_on_after(0.002 * attempt) as scope:
                assert len(await client.get_tasks_by_status("queued", limit=1000)) == 1000
            cancelled += scope.cancelled_caught
            with anyio.fail_after(5.0):
                assert await client.last_seq() > 0
        assert cancelled > 0


async def _none_assigned(client: OrchestrationClient) -> bool:
    return not await client.get_tasks_by_status("assigned")


async def _in_flight_at_least(client: OrchestrationClient, calls: int) -> bool:
    status = await client.server_status()
    return sum(connection.calls_in_flight for connection in status.connections) >= calls


async def test_a_client_that_comes_as_the_owner_opens_waits_for_it(
    db_path: str, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that found the database held by a runtime not serving yet (opening:
    storage, migrations, recovery) was told at once that it serves no socket, or read the
    address a killed owner left in the lock file and could not connect: apps started
    together failed. The lock file says "starting" until the owner serves; a client waits
    (up to remote_timeout), trying the file and the socket again."""
    caplog.set_level(logging.INFO, logger="hive_orchestration.client")
    async with child("slow_owner", anyio_backend, db_path, "owner") as opening:
        await opening.expect("claimed")
        assert open_store(db_path).read_owner()[1] == STARTING
        came: list[bool] = []

        async def come() -> None:
            async with OrchestrationClient(db_path=db_path) as client:
                came.append(client.remote)
                await client.create_task("came-early")

        async with anyio.create_task_group() as group:
            group.start_soon(come)
            await eventually(lambda: _logged(caplog, "is starting"))
            await opening.tell()  # the owner goes on opening (or this client takes the file)
        assert len(came) == 1
        await opening.expect("open")


@pytest.mark.sqlite_only(
    "one owner per database: on PostgreSQL several runtimes open one database as nodes,"
    " and a client opens a node of its own when none serves (tests/test_pg_nodes.py)"
)
async def test_a_client_that_comes_as_the_owner_lets_go_waits_for_it(
    db_path: str, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An owner letting the file go clears its lock file's records, then unlocks it: a
    client in between found the lock held and no address, and was told the owner serves
    no socket (found by the take-over race of test_take_over.py). It waits instead."""
    caplog.set_level(logging.INFO, logger="hive_orchestration.client")
    async with child("slow_owner", anyio_backend, db_path, "owner") as going:
        await going.expect("claimed")
        await going.tell("clear\n")
        await going.expect("cleared")
        assert open_store(db_path).read_owner() == (None, None)
        came: list[bool] = []

        async def come() -> None:
            async with OrchestrationClient(db_path=db_path) as client:
                came.append(client.remote)

        async with anyio.create_task_group() as group:
            group.start_soon(come)
            await eventually(lambda: _logged(caplog, "is stopping"))
            await going.tell()  # it lets the lock go
        assert len(came) == 1


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)
