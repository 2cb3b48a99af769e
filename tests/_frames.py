"""Reading a socket server's frames by hand, as the tests' crafted clients do (blocking:
run them in a thread)."""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from hive_orchestration.remote.protocol import Pong, ServerFrame


def read_one(sock: socket.socket) -> Any:
    """The next frame, whatever it is."""

    def exactly(size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"the server closed after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    size = int.from_bytes(exactly(4), "big")
    return msgspec.msgpack.decode(exactly(size), type=ServerFrame)


def read_frame(sock: socket.socket, *, unasked: list[Pong] | None = None) -> Any:
    """The next frame, past the pongs of nonce 0 the server sends unasked while it holds
    the connection's frames back (counted in ``unasked``)."""
    while True:
        message = read_one(sock)
        if message != Pong(0):
            return message
        if unasked is not None:
            unasked.append(message)


def read_until_closed(sock: socket.socket) -> list[Any]:
    """Every frame until the server closes the connection."""
    frames = []
    while True:
        try:
            frames.append(read_frame(sock))
        except EOFError:
            return frames
