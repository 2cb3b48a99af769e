"""The web dashboard (extra ``dashboard``: Starlette, served by Hypercorn on asyncio or
trio): server-rendered pages over a :class:`~.source.Source`, live through server-sent
events fed from ``events(after=)``, and ``/metrics``.

It never writes: every route is a GET, and a GET only reads (the reports of the command
line, :mod:`..cli.report`, and the event log).

Who may look: on loopback, anyone on the machine (as the command line's readers), with
the ``Host`` header checked so that a web page elsewhere cannot read it through DNS
rebinding. Off loopback a token is required (:func:`create_app` refuses to build without
one): a browser opens ``/?token=TOKEN`` once and is given an HttpOnly, SameSite=Strict
cookie; a scraper sends ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlencode

import anyio
import msgspec
from anyio.abc import TaskStatus as StartStatus
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .._validate import MAX_READ, check_optional_text
from ..cli.report import plan_report, plan_summaries, status_report, task_report
from ..errors import InvalidInputError, NotFoundError
from ..events import check_pattern
from ..messages.tasks import TaskStatus
from . import pages
from .metrics import Metrics
from .source import Source

__all__ = ["DEFAULT_PORT", "TOKEN_ENV", "create_app", "is_loopback", "serve_app", "watching"]

DEFAULT_PORT = 7734
#: Where the dashboard's token is read from (not an argument: ``ps`` shows those).
TOKEN_ENV = "HIVE_ORCHESTRATION_DASHBOARD_TOKEN"
_COOKIE = "hive_dashboard"
#: Events shown when a tail or a task's page opens.
_BACKLOG = 200
#: Seconds the web server has to stop once asked (live streams are cut after 0.5 s).
_STOPPING = 10.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _EventStream(Response):
    """Server-sent events from ``source.follow``, until the browser goes away or the
    dashboard closes; then the response ends cleanly (a server that cancels an open
    response logs the cancellation as an error)."""

    def __init__(
        self,
        source: Source,
        after: int,
        filters: dict[str, str],
        closing: anyio.Event,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Its length is unknown: no Content-Length (a Response of no content says 0).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._source, self._after, self._filters, self._closing = source, after, filters, closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def chunk(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with anyio.create_task_group() as group:

            async def gone() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            async def closed() -> None:
                await self._closing.wait()
                group.cancel_scope.cancel()

            group.start_soon(gone)
            group.start_soon(closed)
            await chunk(b": hive-orchestration events\n\n")  # opens the stream at once
            async for event in self._source.follow(
                self._after,
                pattern=self._filters.get("pattern", "*"),
                task_id=self._filters.get("task_id"),
                plan_id=self._filters.get("plan_id"),
                correlation_id=self._filters.get("correlation_id"),
            ):
                await chunk(b"id: %d\ndata: %s\n\n" % (event.seq, msgspec.json.encode(event)))
            group.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), suppress(OSError, anyio.BrokenResourceError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _host_of(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """Lets a request in if it may look (see the module's docstring)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        base = scope.get("root_path", "") + "/"
        if self.token is None:
            if not is_loopback(_host_of(request.headers.get("host", ""))):
                await HTMLResponse(pages.refused("not a loopback host", base), 403)(
                    scope, receive, send
                )
                return
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None and self._valid(given):
            # Once, from the link: kept in a cookie, and the token taken out of the url
            # (out of the history and of Referer headers).
            query = urlencode(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            )
            target = request.url.path + (f"?{query}" if query else "")
            redirect = RedirectResponse(target, status_code=303)
            redirect.set_cookie(
                _COOKIE, given, httponly=True, samesite="strict", secure=scope["scheme"] == "https"
            )
            await redirect(scope, receive, send)
            return
        bearer = request.headers.get("authorization", "")
        presented = request.cookies.get(_COOKIE) or (
            bearer[7:] if bearer.lower().startswith("bearer ") else None
        )
        if presented is None or not self._valid(presented):
            reason = "a token is needed: open this page with ?token=TOKEN once"
            await HTMLResponse(pages.refused(reason, base), 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _valid(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())


def create_app(
    metrics: Metrics, *, token: str | None = None, closing: anyio.Event | None = None
) -> ASGIApp:
    """The dashboard over ``metrics.source`` (whose :meth:`Metrics.run` the caller runs:
    :func:`watching`). With ``token``, every request must present it. Its live streams
    end when ``closing`` is set (before the server stops: see :func:`serve_app`)."""
    closing = anyio.Event() if closing is None else closing
    # The reader is looked up at each request: the command swaps it when the runtime it
    # read from stops (the file is read then).
    source = metrics.source

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")) + "/"

    def page(
        request: Request, title: str, body: str, name: str, stream: dict[str, str] | None
    ) -> Response:
        fragment = request.headers.get("x-fragment")
        if fragment == "1":
            return HTMLResponse(body)
        url = None if stream is None else "stream?" + urlencode(stream)
        return HTMLResponse(pages.layout(title, body, page=name, stream=url, base=base(request)))

    def missing(request: Request, what: str) -> Response:
        body = f"<h1>Not found</h1><p>{pages.e(what)}</p>"
        return HTMLResponse(
            pages.layout("Not found", body, page="missing", stream=None, base=base(request)), 404
        )

    async def overview(request: Request) -> Response:
        report = await status_report(source.reader)
        failures = await source.reader.tasks(TaskStatus.FAILED, limit=10)
        body = pages.overview(report, metrics.throughput(), metrics.run_percentiles(), failures)
        return page(request, "Overview", body, "overview", {"pattern": "task.*"})

    async def queues(request: Request) -> Response:
        queued = await source.reader.tasks(TaskStatus.QUEUED, limit=MAX_READ)
        body = pages.queues(queued, len(queued) >= MAX_READ, metrics.created_rate())
        return page(request, "Queues", body, "queues", {"pattern": "task.*"})

    async def workers(request: Request) -> Response:
        body = pages.workers(await source.reader.workers())
        return page(request, "Workers", body, "workers", {"pattern": "worker.*"})

    async def task(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            report = await task_report(source.reader, task_id, events=_BACKLOG)
        except NotFoundError:
            return missing(request, f"no task {task_id}")
        return page(request, "Task", pages.task(report), "task", {"task_id": task_id})

    async def plans(request: Request) -> Response:
        listed = await source.reader.plans(limit=200)
        body = pages.plans(await plan_summaries(source.reader, listed))
        return page(request, "Plans", body, "plans", {"pattern": "plan.*"})

    async def plan(request: Request) -> Response:
        plan_id = request.path_params["plan_id"]
        try:
            report = await plan_report(source.reader, plan_id)
        except NotFoundError:
            return missing(request, f"no plan {plan_id}")
        if request.headers.get("x-fragment") == "side":
            return HTMLResponse(pages.plan_side(report))
        return page(request, "Plan", pages.plan(report), "plan", {"plan_id": plan_id})

    def filters(request: Request) -> dict[str, str]:
        """The event filters of the query, checked (an InvalidInputError names the bad
        one)."""
        chosen: dict[str, str] = {}
        for name in ("pattern", "task_id", "plan_id", "correlation_id"):
            value = check_optional_text(request.query_params.get(name) or None, name)
            if value is not None:
                chosen[name] = value
        if "pattern" in chosen:
            check_pattern(chosen["pattern"])
        return chosen

    async def events(request: Request) -> Response:
        try:
            chosen = filters(request)
            after = await source.reader.last_seq()
            recent = await source.reader.events(
                0,
                limit=_BACKLOG,
                pattern=chosen.get("pattern", "*"),
                task_id=chosen.get("task_id"),
                plan_id=chosen.get("plan_id"),
                correlation_id=chosen.get("correlation_id"),
                newest=True,
            )
        except InvalidInputError as exc:
            return HTMLResponse(pages.refused(str(exc), base(request)), 400)
        after = max([after, *(ev.seq for ev in recent)])
        body = pages.events(recent, chosen)
        return page(request, "Events", body, "events", {**chosen, "after": str(after)})

    async def stream(request: Request) -> Response:
        """Server-sent events: each event after ``after`` (or the browser's
        Last-Event-ID, when it reconnects; or now) that matches the filters."""
        try:
            chosen = filters(request)
            resume = request.headers.get("last-event-id") or request.query_params.get("after")
            after = int(resume) if resume else await source.reader.last_seq()
            if after < 0:
                raise InvalidInputError("after", "must be a seq (0 or more)")
        except (InvalidInputError, ValueError) as exc:
            return Response(f"{exc}\n", 400, media_type="text/plain")

        return _EventStream(
            source,
            after,
            chosen,
            closing,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            media_type="text/event-stream",
        )

    async def scrape(request: Request) -> Response:
        return Response(await metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/", overview),
        Route("/queues", queues),
        Route("/workers", workers),
        Route("/tasks/{task_id:str}", task),
        Route("/plans", plans),
        Route("/plans/{plan_id:str}", plan),
        Route("/events", events),
        Route("/stream", stream),
        Route("/metrics", scrape),
    ]  # GET (and HEAD) only: the dashboard never writes
    return _Guard(Starlette(routes=routes), token)


@asynccontextmanager
async def watching(source: Source) -> AsyncIterator[Metrics]:
    """The metrics of ``source``, counted (its events followed) for the block."""
    metrics = Metrics(source)
    async with anyio.create_task_group() as group:
        await group.start(metrics.run)
        try:
            yield metrics
        finally:
            group.cancel_scope.cancel()


async def serve_app(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    closing: anyio.Event | None = None,
    task_status: StartStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` with Hypercorn, on the running event loop (asyncio
    or trio), until cancelled; started with the url it serves at (a port 0 replaced by
    the one bound). ``closing`` is set first when it stops (the app's live streams end)."""
    from hypercorn.config import Config

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    config = Config()
    config.accesslog = None
    config.errorlog = None
    # Live streams are ended by the shutdown, not waited for.
    config.graceful_timeout = 0.5
    stop = anyio.Event()

    async def stopped() -> None:
        await stop.wait()

    serve: Callable[..., Awaitable[Any]]
    if sys.modules.get("trio") is not None and _on_trio():
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve

    # Hypercorn is stopped by its trigger, not cancelled (cancelled, it leaves its own
    # tasks' errors unretrieved): shielded, with a deadline once stopping.
    shield = anyio.CancelScope(shield=True)

    async def run() -> None:
        with shield:
            await serve(app, config, shutdown_trigger=stopped)

    fd = sock.detach()  # Hypercorn's now: it closes it
    config.bind = [f"fd://{fd}"]
    async with anyio.create_task_group() as group:
        group.start_soon(run)
        task_status.started(f"http://{shown}:{bound}/")
        try:
            await anyio.sleep_forever()
        finally:
            if closing is not None:
                closing.set()
            stop.set()
            shield.deadline = anyio.current_time() + _STOPPING


def _on_trio() -> bool:
    import sniffio

    return sniffio.current_async_library() == "trio"
