"""The dashboard and ``/metrics`` mounted in an app's own ASGI app, under a prefix, beside
the app's runtime (in its process), served by Hypercorn on asyncio and trio."""

from __future__ import annotations

import urllib.request

import anyio
import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")

from starlette.applications import Starlette
from starlette.routing import Mount

from hive_orchestration import Runtime
from hive_orchestration.observe.dashboard import create_app, serve_app, watching
from hive_orchestration.observe.metrics import metrics_app
from hive_orchestration.observe.source import Source

pytestmark = pytest.mark.anyio


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


async def test_mounted_under_a_prefix_in_an_apps_own_server(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime, watching(Source.of_runtime(runtime)) as metrics:
        task_id = await runtime.create_task("compile", {"n": 1}, title="mounted")
        app = Starlette(
            routes=[
                Mount("/hive", create_app(metrics)),
                Mount("/metrics", metrics_app(metrics)),
            ]
        )
        async with anyio.create_task_group() as group:
            url = await group.start(serve_app, app, "127.0.0.1", 0)
            status, page = await anyio.to_thread.run_sync(_get, f"{url}hive/tasks/{task_id}")
            assert status == 200
            assert '<base href="/hive/">' in page  # its links stay under the prefix
            assert "mounted" in page
            status, text = await anyio.to_thread.run_sync(_get, f"{url}metrics")
            assert status == 200
            assert 'hive_tasks{status="queued"} 1.0' in text
            assert 'hive_mailbox_depth{actor="tasks"}' in text
            group.cancel_scope.cancel()
