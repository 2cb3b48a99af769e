"""Who is calling: the defaults a client stamps on everything it creates and causes."""

from __future__ import annotations

__all__ = ["Caller"]


class Caller:
    """The base of the operation mixins.

    A :class:`Runtime` has no defaults; an :class:`OrchestrationClient` sets its
    ``source_agent`` and ``correlation_id`` here, and every operation that takes one uses
    it when the call does not name its own. That is how they reach the events.
    """

    _default_agent: str | None = None
    _default_correlation: str | None = None

    def _agent(self, given: str | None) -> str | None:
        return self._default_agent if given is None else given

    def _correlation(self, given: str | None) -> str | None:
        return self._default_correlation if given is None else given
