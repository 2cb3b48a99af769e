"""The actor kernel. Generic: it knows nothing of tasks, plans, events or SQL."""

from .actor import Actor, ActorRef, Envelope, Mailbox, Reply, Request, run_actor
from .alarm import Alarm
from .clock import loop_clock
from .deadlines import Deadlines
from .supervisor import ChildRestart, ChildSpec, Supervisor

__all__ = [
    "Actor",
    "Alarm",
    "ActorRef",
    "ChildRestart",
    "ChildSpec",
    "Deadlines",
    "Envelope",
    "Mailbox",
    "Reply",
    "Request",
    "Supervisor",
    "loop_clock",
    "run_actor",
]
