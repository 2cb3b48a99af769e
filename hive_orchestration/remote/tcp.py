"""The message API beyond this machine: TCP addresses, TLS, and what is refused.

A server listens on ``tcp://HOST:PORT`` (``RuntimeConfig.listen``, ``hive-orchestration
serve --listen``); a client connects to ``hive://HOST:PORT``, or ``hives://HOST:PORT``
for TLS. Two rules hold on both sides, checked before a socket is opened:

- **Off loopback, TLS.** A host is loopback when it is ``localhost`` or an IP address of
  the loopback range (``127.0.0.0/8``, ``::1``); any other name counts as another
  machine (no DNS is asked: a name may resolve anywhere tomorrow). A server asked to
  listen elsewhere without a certificate, or a client asked to connect elsewhere without
  ``hives://``, refuses: tokens and data would cross the network in clear.
- **A token on every TCP connection.** Even on loopback, where every user of the machine
  can reach the port (the Unix socket, by contrast, admits the owner's own user only):
  a server with a TCP address and no tokens file refuses to start.

The tokens themselves, and what each role may do, are in :mod:`.access`.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from typing import NamedTuple

from ..config import RuntimeConfig
from ..errors import ConfigError, InvalidInputError
from .access import Tokens, load_tokens

__all__ = [
    "Endpoint",
    "TcpSettings",
    "client_context",
    "is_loopback",
    "parse_listen",
    "parse_url",
    "prepare_tcp",
]

#: A client's schemes: plain TCP (loopback only), and TLS.
PLAIN = "hive"
TLS = "hives"
#: The server's scheme in ``listen`` (TLS or not is the certificate's business).
LISTEN = "tcp"


class Endpoint(NamedTuple):
    host: str
    port: int
    tls: bool

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{TLS if self.tls else PLAIN}://{host}:{self.port}"


class TcpSettings(NamedTuple):
    """What a server needs to serve on TCP, checked and loaded before anything is bound."""

    endpoints: tuple[Endpoint, ...]
    tls: ssl.SSLContext | None
    tokens: Tokens


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback, by its text
    alone: ``localhost`` or a loopback IP address. Any other name is another machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _split(text: object, field: str, schemes: tuple[str, ...]) -> tuple[str, str, int]:
    """``scheme://host:port`` as its parts, or an error on ``field`` saying what is wrong."""
    shape = f"{' or '.join(f'{s}://HOST:PORT' for s in schemes)}"
    if not isinstance(text, str):
        raise InvalidInputError(field, f"must be a string like {shape}, got {type(text).__name__}")
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidInputError(field, f"{text!r} is not {shape}: {exc}") from None
    if parts.scheme not in schemes:
        raise InvalidInputError(field, f"{text!r} is not {shape} (scheme {parts.scheme!r})")
    if parts.username or parts.password or parts.path or parts.query or parts.fragment:
        raise InvalidInputError(
            field, f"{text!r} is not {shape}: no user, path, query or fragment is taken"
        )
    host = parts.hostname
    if not host:
        raise InvalidInputError(
            field,
            f"{text!r} names no host: name one (127.0.0.1 for this machine alone, 0.0.0.0"
            " for every interface of a server)",
        )
    if port is None:
        raise InvalidInputError(field, f"{text!r} names no port: {shape}")
    return parts.scheme, host, port


def parse_url(url: object) -> Endpoint:
    """A client's ``hive://HOST:PORT`` or ``hives://HOST:PORT``; refused (InvalidInputError
    on ``url``) when malformed, or off loopback without TLS."""
    scheme, host, port = _split(url, "url", (PLAIN, TLS))
    if port == 0:
        raise InvalidInputError("url", f"{url!r} names port 0: name the port the server bound")
    endpoint = Endpoint(host, port, scheme == TLS)
    if not endpoint.tls and not is_loopback(host):
        raise InvalidInputError(
            "url",
            f"{host} is not this machine's loopback, so the connection must be encrypted"
            f" (the token and every call would cross the network in clear): use"
            f" {Endpoint(host, port, True).url()} against a server with a TLS certificate"
            " (and tls_ca= or $HIVE_ORCHESTRATION_TLS_CA for a private CA)",
        )
    return endpoint


def parse_listen(address: object) -> Endpoint:
    """A server's ``tcp://HOST:PORT`` (port 0: any free one), TLS not yet decided."""
    try:
        _, host, port = _split(address, "listen", (LISTEN,))
    except InvalidInputError as exc:
        raise ConfigError("listen", exc.reason) from None
    return Endpoint(host, port, False)


def prepare_tcp(config: RuntimeConfig) -> TcpSettings | None:
    """The config's TCP addresses, certificate and tokens, checked and loaded (files are
    read: call it from a worker thread); None when it listens on no TCP address.

    Raises :class:`ConfigError` before anything is bound: an address off loopback
    without a certificate, a certificate without its key, no tokens file, a file that
    cannot be read."""
    if not config.listen:
        return None
    endpoints = [parse_listen(address) for address in config.listen]
    if (config.tls_cert is None) != (config.tls_key is None):
        given, missing = (
            ("tls_cert", "tls_key") if config.tls_key is None else ("tls_key", "tls_cert")
        )
        raise ConfigError(missing, f"{given} is given without it: give both PEM files, or neither")
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_context(config.tls_cert, config.tls_key)
    for endpoint in endpoints:
        if tls is None and not is_loopback(endpoint.host):
            raise ConfigError(
                "listen",
                f"tcp://{endpoint.host}:{endpoint.port} is not this machine's loopback, and"
                " serving it without TLS would send tokens and data across the network in"
                " clear: give a certificate and its key (serve --tls-cert/--tls-key,"
                " RuntimeConfig.tls_cert/tls_key), or listen on 127.0.0.1",
            )
    if config.tokens_file is None:
        raise ConfigError(
            "tokens_file",
            "a TCP address needs a tokens file (serve --tokens FILE, RuntimeConfig"
            ".tokens_file): every TCP connection must present a token, on loopback too,"
            " where every user of the machine can reach the port (docs/SERVING.md)",
        )
    tokens = load_tokens(config.tokens_file)
    return TcpSettings(
        tuple(endpoint._replace(tls=tls is not None) for endpoint in endpoints), tls, tokens
    )


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context from its PEM certificate chain and private key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls_cert",
            f"cannot load the certificate {cert!r} with the key {key!r}: {exc}; give PEM"
            " files, the key matching the certificate",
        ) from None
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """A client's TLS context: the server's certificate checked against ``ca`` (a PEM
    file), or the system's certificate authorities when None, and its host name too."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(
            "tls_ca", f"cannot load {ca!r} as PEM certificates: {exc}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
