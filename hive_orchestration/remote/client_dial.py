"""Reaching the runtime of another process: a TCP stream (with TLS when asked), and the
hello a client sends and the welcome (or refusal) it waits for, each bounded by
:data:`_HANDSHAKE`, with errors that say what to do.

Separate from :class:`~.client.RemoteRuntime`, which runs the connection once it is
welcomed.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream

from ..errors import ConnectionLostError
from .protocol import (
    PROTOCOL_VERSION,
    FrameError,
    FrameReader,
    Hello,
    Refused,
    Welcome,
    decode_error,
    frame,
)

if TYPE_CHECKING:
    from .tcp import Endpoint

__all__ = ["dial_tcp", "handshake"]

#: How long the client waits for the server's welcome.
_HANDSHAKE = 5.0


async def dial_tcp(endpoint: Endpoint, context: ssl.SSLContext | None, shown: str) -> ByteStream:
    """A TCP stream to ``endpoint`` (TLS with ``context``), within :data:`_HANDSHAKE`;
    :class:`ConnectionLostError` saying what to do if it cannot be had (``shown``: the
    address as the user knows it)."""
    try:
        with anyio.fail_after(_HANDSHAKE):
            stream: ByteStream
            if context is None:
                stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
            else:
                stream = await anyio.connect_tcp(
                    endpoint.host,
                    endpoint.port,
                    ssl_context=context,
                    tls_hostname=endpoint.host,
                    tls_standard_compatible=False,
                )
    except TimeoutError:
        raise ConnectionLostError(
            f"cannot connect to the runtime at {shown}: no answer within {_HANDSHAKE:g}s"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        advice = (
            f"connect with a name the certificate is for, not {endpoint.host!r}"
            if "mismatch" in str(exc.verify_message)
            else "give the certificate of the authority that signed it (tls_ca=,"
            " $HIVE_ORCHESTRATION_TLS_CA)"
        )
        raise ConnectionLostError(
            f"cannot connect to the runtime at {shown}: its certificate is not trusted"
            f" ({exc.verify_message}): {advice}"
        ) from None
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        hint = (
            " (the TLS handshake failed: does it serve TLS? hive:// is for a server without TLS)"
            if endpoint.tls
            else ""
        )
        raise ConnectionLostError(
            f"cannot connect to the runtime at {shown}:"
            f" {getattr(exc, 'strerror', None) or exc or type(exc).__name__}{hint}"
        ) from None
    return stream


async def handshake(
    stream: ByteStream,
    reader: FrameReader,
    address: str,
    name: str | None,
    token: str | None = None,
    hint: str = "",
) -> Welcome:
    """Say hello on ``stream`` and wait for the server's welcome; its refusal is raised
    as the error it names, no answer as :class:`ConnectionLostError`."""
    try:
        with anyio.fail_after(_HANDSHAKE):
            await stream.send(frame(Hello(PROTOCOL_VERSION, name=name, token=token)))
            answer = await reader.read()
    except TimeoutError:
        raise ConnectionLostError(
            f"the runtime at {address} did not answer within {_HANDSHAKE:g}s{hint}"
        ) from None
    except FrameError as exc:
        raise ConnectionLostError(
            f"the runtime at {address} answered with something that is not a welcome of"
            f" this protocol ({exc}): is a runtime of hive-orchestration served there?{hint}"
        ) from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise ConnectionLostError(
            f"the runtime at {address} closed the connection at once"
            f" ({str(exc) or 'no answer'}){hint}"
        ) from None
    if isinstance(answer, Refused):
        raise decode_error(answer.error)
    if not isinstance(answer, Welcome):
        raise ConnectionLostError(f"the runtime at {address} did not welcome this client")
    return answer
