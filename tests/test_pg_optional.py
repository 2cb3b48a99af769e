"""psycopg is an optional extra: ``import hive_orchestration`` (and the runtime, the
clients, the command line) works without it, and only a PostgreSQL URL needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A child in which psycopg cannot be imported, as where the extra is not installed.
_WITHOUT_PSYCOPG = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPsycopg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "psycopg" or name.startswith(("psycopg.", "psycopg_")):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoPsycopg())
    """
)


def run_without_psycopg(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_PSYCOPG + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_package_imports_without_psycopg() -> None:
    done = run_without_psycopg(
        """
        import hive_orchestration
        import hive_orchestration.api.client, hive_orchestration.api.embedded
        import hive_orchestration.storage.actor, hive_orchestration.storage.port
        import hive_orchestration.cli.main, hive_orchestration.remote.server
        assert "psycopg" not in sys.modules, "psycopg was imported"
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_postgresql_url_without_psycopg_says_which_extra_to_install() -> None:
    done = run_without_psycopg(
        """
        import anyio
        from hive_orchestration import Runtime
        from hive_orchestration.errors import ConfigError

        async def main():
            try:
                async with Runtime.open("postgresql://me:s3cret@db.example/hive"):
                    pass
            except ConfigError as exc:
                print(exc.field)
                print(exc)

        anyio.run(main)
        """
    )
    assert done.returncode == 0, done.stderr
    field, message = done.stdout.strip().split("\n", 1)
    assert field == "path"  # Runtime.open's parameter
    assert "pip install 'hive-orchestration[postgres]'" in message
    assert "s3cret" not in done.stdout
