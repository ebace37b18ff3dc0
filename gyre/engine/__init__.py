"""The generation engine. Knows nothing of RL; imports only torch, triton, transformers, safetensors."""

from gyre.engine.config import EngineConfig
from gyre.engine.engine import Engine
from gyre.engine.request import Completion, SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams", "Completion"]
