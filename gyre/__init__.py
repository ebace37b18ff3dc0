"""gyre: an RL rollout engine for on-policy post-training."""

from gyre.engine.engine import Engine
from gyre.engine.request import Completion, SamplingParams
from gyre.engine.session import Session, Trajectory

__all__ = ["Engine", "SamplingParams", "Completion", "Session", "Trajectory"]
__version__ = "0.1.0"
