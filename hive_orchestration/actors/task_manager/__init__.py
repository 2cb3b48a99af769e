"""The TaskManager actor (:mod:`.actor`) and the index of work ready to hand out (:mod:`.ready`)."""

from .actor import LIVE, TRANSITIONS, TaskManager
from .delays import Frame

__all__ = ["LIVE", "TRANSITIONS", "Frame", "TaskManager"]
