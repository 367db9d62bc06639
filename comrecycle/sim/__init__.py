"""The simulator: a mechanistic environment in which every served page's effect is known."""
from .env import LoggingPolicy, Outcome, RequestBatch, SessionSimulator
from .world import World

__all__ = ["World", "SessionSimulator", "RequestBatch", "Outcome", "LoggingPolicy"]
