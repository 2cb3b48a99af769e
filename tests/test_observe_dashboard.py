"""The dashboard as a person uses it: a runtime in a process of its own (an owner, as an
app's), the dashboard in another (``hive-orchestration dashboard --db``, on asyncio and on
trio), an agent in the test's process (a client through the owner's socket), and headless
Chromium looking at the pages. The plan's DAG turns completed node by node without a
reload; what tasks hold (attacker-controlled text) renders as text. Screenshots go to
``artefacts/`` (gitignored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _raw import never_opened

pytest.importorskip("starlette", reason="the dashboard extra is not installed")

from _dashboard import dashboard
from _populate import PLAN
from reliability._remote import start_owner

from hive_orchestration import SyncOrchestrationClient

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(__file__).resolve().parent.parent / "artefacts"
EVIL_TITLE = "<script>window.__xss='title'</script>"
EVIL_PAYLOAD = {"note": "<img src=x onerror=\"window.__xss='payload'\">", "q": "\"'&"}
EVIL_ERROR = "</pre><script>window.__xss='error'</script>"
#: How long the page may take to show a change pushed to it (a loaded 2-core machine).
SHOWN = 15_000


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def owned(db_path: str, backend: str) -> Iterator[str]:
    """``db_path``, owned by a runtime in another process for the test."""
    process, _ = start_owner(db_path, backend)
    try:
        yield db_path
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read().decode()


def seed_evil(client: SyncOrchestrationClient) -> str:
    client.register_worker("w-evil", "agent", ["evil"], {"host": "<b>box</b>"})
    task_id = client.create_task("evil", EVIL_PAYLOAD, title=EVIL_TITLE)
    claim = client.claim_task("w-evil", "evil", start=True)
    assert claim is not None
    client.fail_task(claim.lease, EVIL_ERROR, retryable=False)
    return task_id


def test_pages_escape_what_tasks_hold_and_never_write(owned: str, backend: str) -> None:
    with SyncOrchestrationClient(db_path=owned, source_agent="<i>agent</i>") as client:
        evil = seed_evil(client)
        with dashboard("--db", owned, "--backend", backend) as board:
            end = client.last_seq()
            for path in ["", "queues", "workers", f"tasks/{evil}", "plans", "events", "metrics"]:
                status, _, body = get(board.url + path)
                assert status == 200, path
                assert "<script>window.__xss" not in body
                assert "<img src=x" not in body
                assert "<b>box</b>" not in body
            _, _, page = get(f"{board.url}tasks/{evil}")
            assert "&lt;script&gt;window.__xss=&#x27;title&#x27;&lt;/script&gt;" in page
            assert "&lt;/pre&gt;&lt;script&gt;" in page  # the error, as text
            _, _, metrics = get(board.url + "metrics")
            assert 'hive_tasks{status="failed"} 1.0' in metrics
            # It only reads: a POST is refused, and nothing was written.
            request = urllib.request.Request(board.url, data=b"x", method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            refused.value.close()
            assert refused.value.code == 405
            assert client.last_seq() == end
            # A page asked under another host name (DNS rebinding) is refused.
            status, _, _ = get(board.url, {"Host": "evil.example:80"})
            assert status == 403


def test_a_token_guards_the_pages(owned: str, backend: str) -> None:
    with dashboard(
        "--db", owned, "--backend", backend, env={"HIVE_ORCHESTRATION_DASHBOARD_TOKEN": "s3cret"}
    ) as board:
        assert get(board.url)[0] == 401
        assert get(board.url + "metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(board.url + "metrics", {"Authorization": "Bearer s3cret"})[0] == 200
        status, headers, _ = get(board.url + "plans?token=s3cret&x=1")
        assert status == 303
        assert headers["location"] == "/plans?x=1"  # the token is out of the url
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert get(board.url + "plans", {"Cookie": cookie.split(";")[0]})[0] == 200


def test_off_loopback_the_dashboard_needs_a_token(db_path: str) -> None:
    from hive_orchestration.cli import main

    env = os.environ.pop("HIVE_ORCHESTRATION_DASHBOARD_TOKEN", None)
    try:
        assert main(["dashboard", "--db", db_path, "--host", "0.0.0.0"]) == 2
    finally:
        if env is not None:
            os.environ["HIVE_ORCHESTRATION_DASHBOARD_TOKEN"] = env
    assert never_opened(db_path)  # refused before anything was opened


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)
def test_a_plan_turns_completed_in_the_browser_without_a_reload(owned: str, backend: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(exist_ok=True)
    shot = f"dashboard-{backend}"
    with (
        SyncOrchestrationClient(db_path=owned, source_agent="planner") as client,
        dashboard("--db", owned, "--backend", backend) as board,
        sync_playwright() as playwright,
    ):
        evil = seed_evil(client)
        client.register_worker("agent-1", "builder", ["build", "test", "review", "ship"], {})
        plan_id = client.create_execution_plan(PLAN)
        assert client.mark_plan_execution_started(plan_id)
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(f"{board.url}plans/{plan_id}")
            node = "#dag g.node[data-subtask='{}'][data-status='{}']"
            page.wait_for_selector(node.format("build", "queued"), timeout=SHOWN)
            page.wait_for_selector(node.format("ship", "blocked"), timeout=SHOWN)
            page.wait_for_selector("#live:text('live')", timeout=SHOWN)
            loads = page.evaluate("performance.getEntriesByType('navigation').length")
            page.evaluate("window.__same_page = true")
            for layer in (["build"], ["test", "review"], ["ship"]):
                for subtask in layer:
                    claim = client.claim_task("agent-1", subtask, start=True, wait=10)
                    assert claim is not None
                    assert claim.task.subtask_id == subtask
                    page.wait_for_selector(node.format(subtask, "running"), timeout=SHOWN)
                    if subtask == "review":
                        # The plan's progress is refreshed from the server, too.
                        page.wait_for_selector("#side:has-text('2/4 done')", timeout=SHOWN)
                        page.screenshot(path=str(ARTEFACTS / f"{shot}-plan-running.png"))
                    client.complete_task(claim.lease, {"done": subtask})
                    page.wait_for_selector(node.format(subtask, "completed"), timeout=SHOWN)
            page.wait_for_selector("#side .st-completed", timeout=SHOWN)  # the plan, too
            assert page.evaluate("window.__same_page") is True  # never reloaded
            assert page.evaluate("performance.getEntriesByType('navigation').length") == loads
            page.screenshot(path=str(ARTEFACTS / f"{shot}-plan-completed.png"))

            page.goto(board.url)
            page.wait_for_selector("#counts", timeout=SHOWN)
            page.screenshot(path=str(ARTEFACTS / f"{shot}-overview.png"), full_page=True)

            # What a task holds is shown as text: nothing of it runs.
            page.goto(f"{board.url}tasks/{evil}")
            assert page.get_by_text(EVIL_TITLE).count() >= 1
            assert page.evaluate("window.__xss") is None
            page.screenshot(path=str(ARTEFACTS / f"{shot}-task.png"), full_page=True)

            # The live tail appends what comes, filtered, and as text.
            page.goto(f"{board.url}events?pattern=app.*")
            page.wait_for_selector("#live:text('live')", timeout=SHOWN)
            client.publish("app.note", {"html": EVIL_TITLE})
            client.publish("other.note", {"n": 1})  # filtered out
            client.publish("app.note", {"n": 2})
            row = "#tail tbody tr[data-seq]"
            page.wait_for_function(
                f"document.querySelectorAll({json.dumps(row)}).length >= 2", timeout=SHOWN
            )
            texts = page.locator(row).all_inner_texts()
            assert len(texts) == 2
            assert all("app.note" in text for text in texts)
            assert any(EVIL_TITLE in text for text in texts)
            assert page.locator("#tail td.empty").count() == 0
            assert page.evaluate("window.__xss") is None
            page.screenshot(path=str(ARTEFACTS / f"{shot}-events.png"))
        finally:
            browser.close()


def test_serve_serves_the_dashboard_and_its_runtimes_statistics(db_path: str, backend: str) -> None:
    """``serve --dashboard`` runs the dashboard in the runtime's own process: /metrics has
    what only that process knows (mailboxes, restarts, commits)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hive_orchestration",
            "serve",
            "--db",
            db_path,
            "--backend",
            backend,
            "--dashboard",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = json.loads(process.stdout.readline())
        url = line["dashboard"]
        with SyncOrchestrationClient(db_path=db_path) as client:
            assert client.remote
            client.create_task("compile", {"n": 1})
        status, _, text = get(url + "metrics")
        assert status == 200
        assert 'hive_mailbox_depth{actor="tasks"}' in text
        assert 'hive_actor_restarts_total{actor="storage"} 0.0' in text
        assert 'hive_tasks{status="queued"} 1.0' in text
        assert get(url)[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert json.loads(process.stdout.readline()) == {"stopped": line["serving"]}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_the_dashboard_goes_on_from_the_file_when_its_runtime_stops(
    db_path: str, backend: str
) -> None:
    process, _ = start_owner(db_path, backend)
    try:
        with SyncOrchestrationClient(db_path=db_path) as client:
            assert client.remote
            before = client.create_task("compile", {"n": 1}, title="before")
        with dashboard("--db", db_path, "--backend", backend) as board:
            assert "before" in get(f"{board.url}tasks/{before}")[2]
            assert process.stdin is not None
            process.stdin.close()
            assert process.wait(30) == 0
            # Another program owns the file now; the dashboard reads the file.
            with SyncOrchestrationClient(db_path=db_path) as client:
                after = client.create_task("compile", {"n": 2}, title="after")
            deadline = time.monotonic() + 30
            while True:
                status, _, page = get(f"{board.url}tasks/{after}")
                _, _, metrics = get(board.url + "metrics")
                counted = 'hive_tasks_created_total{task_type="compile"} 1.0' in metrics
                if (status == 200 and "after" in page and counted) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == 200
            assert counted  # followed on from the file, without counting "before" again
            assert board.process.poll() is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_the_stream_resumes_after_the_last_event_id_and_filters(owned: str, backend: str) -> None:
    """A browser's EventSource that reconnects sends the last id it saw: the stream goes
    on from there, with no gap and no duplicate, filtered as asked."""
    with (
        SyncOrchestrationClient(db_path=owned) as client,
        dashboard("--db", owned, "--backend", backend) as board,
    ):
        seqs = [
            client.publish("app.note" if n % 2 else "other.note", {"n": n}).seq for n in range(6)
        ]
        wanted = [seq for n, seq in enumerate(seqs) if n % 2 and seq > seqs[1]]
        request = urllib.request.Request(
            board.url + "stream?pattern=app.*", headers={"Last-Event-ID": str(seqs[1])}
        )
        got: list[int] = []
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            data: dict[str, Any] = {}
            while len(got) < len(wanted):
                line = response.readline().decode()
                if line.startswith("id: "):
                    got.append(int(line[4:]))
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    assert data["type"] == "app.note"
                    assert data["seq"] == got[-1]
        assert got == wanted


def test_a_dashboard_of_a_runtime_served_over_tcp(
    db_path: str, backend: str, tmp_path: Path
) -> None:
    """``dashboard --url`` with an agent's token reads a runtime served over TCP (no file
    opened); a runtime that stops ends it, saying so."""
    from test_remote_tcp import DEPLOYER, write_tokens

    tokens = write_tokens(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_ORCHESTRATION_")}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "hive_orchestration", "serve", "--db", db_path),
            *("--backend", backend, "--listen", "tcp://127.0.0.1:0", "--tokens", tokens),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        served = json.loads(process.stdout.readline())
        url = next(a for a in served["addresses"] if a.startswith("hive://"))
        with SyncOrchestrationClient(db_path=db_path) as client:
            task_id = client.create_task("deploy", {"env": "<prod>"}, title="over tcp")
        with dashboard(
            "--url", url, "--backend", backend, env={"HIVE_ORCHESTRATION_TOKEN": DEPLOYER}
        ) as board:
            status, _, page = get(f"{board.url}tasks/{task_id}")
            assert status == 200
            assert "over tcp" in page
            assert "&lt;prod&gt;" in page
            assert 'hive_tasks{status="queued"} 1.0' in get(board.url + "metrics")[2]
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            assert board.process.wait(30) == 1
            assert board.process.stderr is not None
            assert b"stopped" in board.process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
