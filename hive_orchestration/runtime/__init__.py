"""The actor kernel. Generic: it knows nothing of tasks, plans, events or SQL."""

from .actor import Actor, ActorRef, Envelope, Mailbox, Reply, Request, run_actor
from .supervisor import ChildRestart, ChildSpec, Supervisor

__all__ = [
    "Actor",
    "ActorRef",
    "ChildRestart",
    "ChildSpec",
    "Envelope",
    "Mailbox",
    "Reply",
    "Request",
    "Supervisor",
    "run_actor",
]
