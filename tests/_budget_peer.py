"""Child process of ``tests/test_remote_budget.py``: one client of an owner's socket.

Usage::

    python _budget_peer.py partial ADDRESS SIZE   # a raw socket
    python _budget_peer.py client BACKEND DB_PATH SIZE
    python _budget_peer.py churn ADDRESS SEED

``partial``: says hello, then sends all but the last 1000 bytes of a create_task call
whose frame is SIZE bytes, prints ``held`` and flushes; then reads a line of stdin:
``rest`` sends the rest and prints the kind of the answer (past the unasked pongs) and
its call id; anything else (or the end of stdin) closes the socket with the frame cut.

``client``: an OrchestrationClient with ``remote_timeout=2.0`` (it gives the owner up
after 2 s of silence) prints ``connected``, then creates a task of payload
``{"blob": "x" * SIZE}`` and prints its id, or the error's class name and message.

``churn``: a few connections that each do one of the things a client can leave a
server with (a frame cut mid-body, calls left in flight, claims waiting, cancels,
large calls answered) and close, abruptly or not; prints ``done``.
"""

from __future__ import annotations

import random
import socket
import struct
import sys

import anyio
import msgspec
from _frames import read_frame

from hive_orchestration import OrchestrationClient, RuntimeConfig
from hive_orchestration.remote.protocol import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Hello,
    Welcome,
    frame,
)


def connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60.0)
    target = address.removeprefix("unix:")
    if address.startswith("abstract:"):
        target = "\0" + address.removeprefix("abstract:")
    sock.connect(target)
    sock.sendall(frame(Hello(PROTOCOL_VERSION, name="budget-peer")))
    assert isinstance(read_frame(sock), Welcome)
    return sock


def create_call(call_id: int, size: int) -> bytes:
    """A create_task call whose frame (header included) is about ``size`` bytes."""
    payload = {"blob": "x" * max(size - 100, 1)}
    args = {
        "task_type": msgspec.Raw(msgspec.msgpack.encode("job")),
        "payload": msgspec.Raw(msgspec.msgpack.encode(payload)),
    }
    return frame(Call(call_id, "create_task", args))


def claim_call(call_id: int, wait: float) -> bytes:
    args = {
        "worker_id": msgspec.Raw(msgspec.msgpack.encode(f"w{call_id}")),
        "task_types": msgspec.Raw(msgspec.msgpack.encode(["nothing-queued"])),
        "wait": msgspec.Raw(msgspec.msgpack.encode(wait)),
    }
    return frame(Call(call_id, "claim_task", args))


def partial(address: str, size: int) -> None:
    sock = connect(address)
    data = create_call(1, size)
    sock.sendall(data[:-1000])
    print("held", flush=True)
    if sys.stdin.readline().strip() == "rest":
        sock.sendall(data[-1000:])
        answer = read_frame(sock)
        print(type(answer).__name__, answer.id, flush=True)
    sock.close()


async def client(db_path: str, size: int) -> None:
    config = RuntimeConfig(remote_timeout=2.0)
    async with OrchestrationClient(db_path=db_path, config=config) as hive:
        print("connected", flush=True)
        try:
            task_id = await hive.create_task("job", {"blob": "x" * size})
        except Exception as error:  # the parent reads what it was
            print(type(error).__name__, error, flush=True)
        else:
            print(task_id, flush=True)


def churn(address: str, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(4):
        sock = connect(address)
        what = rng.choice(["cut", "in flight", "claims", "cancels", "large"])
        if what == "cut":  # a large frame cut mid-body
            sock.sendall(create_call(1, rng.randrange(100_000, 900_000))[:-5000])
        elif what == "in flight":  # calls sent, the socket closed before their answers
            sock.sendall(b"".join(create_call(n, rng.randrange(100, 200_000)) for n in (1, 2, 3)))
        elif what == "claims":  # claims waiting for work when the connection goes
            sock.sendall(b"".join(claim_call(n, 30.0) for n in range(1, 6)))
        elif what == "cancels":  # calls cancelled as they run
            sock.sendall(create_call(1, 300_000) + claim_call(2, 30.0))
            sock.sendall(frame(Cancel(2)) + frame(Cancel(1)))
        else:  # large calls answered
            sock.sendall(create_call(1, 500_000) + create_call(2, 700_000))
            read_frame(sock)
            read_frame(sock)
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with SO_LINGER 0: a reset, not a clean end
    print("done", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "partial":
        partial(sys.argv[2], int(sys.argv[3]))
    elif mode == "client":
        anyio.run(client, sys.argv[3], int(sys.argv[4]), backend=sys.argv[2])
    elif mode == "churn":
        churn(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
