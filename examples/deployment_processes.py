"""The seeds' deployment as separate processes, each with nothing but a client of the
same database file.

    python examples/deployment_processes.py [DB_PATH] [--backend trio]

``deployment/orchestrator.py`` owns the database (it embeds the runtime, which serves
the other processes on its socket) and asks for a plan for "Deploy to production";
``deployment/planner.py`` (the ai-planner) answers it with an execution plan and exits;
``deployment/deployer.py`` (the ai-deployer: ``AgentRunner`` on its client) and a
``hive-orchestration worker agents:check`` process run the plan's subtasks as their
dependencies allow. This launcher starts them, waits for the plan to end, stops the
workers with SIGTERM (they drain and unregister), then the orchestrator, and checks that
every process exited 0.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent / "deployment"


def main(db_path: str, backend: str) -> None:
    db = str(Path(db_path).absolute())  # the checker runs from another folder
    common = [db, "--backend", backend]
    python = sys.executable
    started: list[subprocess.Popen[str]] = []

    def start(command: list[str], **options: object) -> subprocess.Popen[str]:
        process = subprocess.Popen(command, text=True, **options)  # type: ignore[call-overload]
        started.append(process)
        return process

    try:
        # The owner first: whoever opens the file first owns it, the others connect.
        orchestrator = start(
            [python, str(HERE / "orchestrator.py"), *common],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert orchestrator.stdout is not None
        assert orchestrator.stdin is not None
        ready = orchestrator.stdout.readline()
        if not ready.rstrip().endswith("ready"):
            sys.exit(f"the orchestrator did not start (exit code {orchestrator.wait()})")
        print(ready, end="", flush=True)
        planner = start([python, str(HERE / "planner.py"), *common])
        workers = [
            start([python, str(HERE / "deployer.py"), *common]),
            start(
                [
                    *(python, "-m", "hive_orchestration", "worker", "agents:check"),
                    *("--db", db, "--backend", backend, "--concurrency", "2"),
                    *("--task-types", "testing", "review", "monitoring", "--worker-id", "checker"),
                ],
                cwd=HERE,  # MODULE:HANDLER is imported from the working directory
            ),
        ]
        outcome = ""
        for line in orchestrator.stdout:
            print(line, end="", flush=True)
            if line.startswith("plan "):
                outcome = line.strip()
                break
        codes = [planner.wait(timeout=30)]
        for worker in workers:
            worker.send_signal(signal.SIGTERM)  # drain, unregister, exit 0
            codes.append(worker.wait(timeout=30))
        orchestrator.stdin.close()  # the others are gone: it may stop
        codes.append(orchestrator.wait(timeout=30))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    if not outcome or any(codes):
        sys.exit(f"the deployment failed: {outcome or 'no outcome'}; exit codes {codes}")
    print(f"{outcome}; {len(codes)} processes, every one exited 0")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(args.db_path or str(Path(tmp) / "example.db"), args.backend)
