"""The TaskManager actor (:mod:`.actor`) and the index of work ready to hand out (:mod:`.ready`)."""

from .actor import LIVE, TRANSITIONS, TaskManager

__all__ = ["LIVE", "TRANSITIONS", "TaskManager"]
