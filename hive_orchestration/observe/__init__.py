"""Watching a hive-orchestration database: Prometheus metrics (extra ``metrics``) and a
web dashboard (extra ``dashboard``), both read-only, from the runtime's public surface.

:mod:`.metrics` needs prometheus-client, :mod:`.dashboard` Starlette and Hypercorn: each is
imported only by what uses it, so the core package needs neither.
"""
