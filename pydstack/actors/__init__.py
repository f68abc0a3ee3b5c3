"""Actors: durable consumers with a level-triggered reconcile loop (see ``runtime``)."""

from .decode import REASONS, Malformed, decode_message
from .runtime import Actor, ActorRunner, Delivery, RuntimeConfig
from .scheduler import Contended, HostDefaults, Plan, Scheduler, SchedulerConfig

__all__ = [
    "REASONS", "Actor", "ActorRunner", "Contended", "Delivery", "HostDefaults", "Malformed",
    "Plan", "RuntimeConfig", "Scheduler", "SchedulerConfig", "decode_message",
]  # fmt: skip
