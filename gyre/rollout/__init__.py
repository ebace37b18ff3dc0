"""The rollout layer: environments, episodes, samples and the RolloutManager, on engine pools.

Ray is imported only by `gyre.rollout.ray_pool` (RayPool), wandb only by `metrics.WandbLogger`.
"""

from gyre.rollout.config import RolloutConfig
from gyre.rollout.data import Batch, Group, Sample
from gyre.rollout.env import Action, Env, Observation, SingleTurnEnv, StepResult
from gyre.rollout.episode import Agent, Episode, Policy, run_episode
from gyre.rollout.manager import RolloutManager
from gyre.rollout.metrics import WandbLogger, batch_metrics
from gyre.rollout.multi_agent import SolverVerifierEnv
from gyre.rollout.pool import EngineFailure, EnginePool, LocalPool, RestartEpisode, RolloutSession
from gyre.rollout.rewards import extract_answer, is_equivalent, math_reward
from gyre.rollout.tools import Tool, ToolEnv

__all__ = [
    "Action",
    "Agent",
    "Batch",
    "EngineFailure",
    "EnginePool",
    "Env",
    "Episode",
    "Group",
    "LocalPool",
    "Observation",
    "Policy",
    "RestartEpisode",
    "RolloutConfig",
    "RolloutManager",
    "RolloutSession",
    "Sample",
    "SingleTurnEnv",
    "SolverVerifierEnv",
    "StepResult",
    "Tool",
    "ToolEnv",
    "WandbLogger",
    "batch_metrics",
    "extract_answer",
    "is_equivalent",
    "math_reward",
    "run_episode",
]


def __getattr__(name: str):
    if name == "RayPool":  # lazily: ray is optional
        from gyre.rollout.ray_pool import RayPool

        return RayPool
    raise AttributeError(f"module 'gyre.rollout' has no attribute {name!r}")
