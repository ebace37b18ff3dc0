"""The recipe of `gyre train`: one dataclass per section; YAML keys map 1:1 onto their fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gyre.engine.config import EngineConfig
from gyre.recipe_loader import RecipeError, build, load
from gyre.rollout.manager import RolloutConfig


@dataclass
class ModelSection:
    path: str | None = None  # an HF model directory ...
    tiny: str | None = None  # ... or a gyre.testing architecture built locally (no download)
    tiny_overrides: dict = field(default_factory=dict)  # HF config fields for the tiny model
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of model.path and model.tiny")


@dataclass
class DataSection:
    task: str = "arith"  # "arith" (generated) | "gsm8k" (a GSM8K-format JSONL at `path`)
    path: str | None = None
    max_operand: int = 9  # arith: operands in [0, max_operand]
    system_prompt: str | None = None
    env: str = "single_turn"  # "single_turn" | "tool" (calculator) | "multi_agent" (solver + verifier)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in ("arith", "gsm8k"):
            raise ValueError(f"data.task must be arith | gsm8k, got {self.task!r}")
        if self.task == "gsm8k" and not self.path:
            raise ValueError("data.task gsm8k needs data.path (a GSM8K-format JSONL)")
        if self.env not in ("single_turn", "tool", "multi_agent"):
            raise ValueError(f"data.env must be single_turn | tool | multi_agent, got {self.env!r}")


@dataclass
class WarmupSection:
    """Supervised warm-up on the task's reference answers before RL (0 steps: none)."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 3e-3


@dataclass
class TrainerSection:
    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    kl_coef: float = 0.0  # > 0: KL to a frozen reference (the policy at the start of RL)
    tis_cap: float | None = 2.0  # truncated importance sampling for rollout/trainer mismatch; null: off
    loss_agg: str = "token-mean"
    epochs: int = 1  # optimizer passes over each batch
    micro_batch_size: int = 64
    max_grad_norm: float = 1.0
    normalize_advantage_std: bool = True
    checkpoint_every: int = 10  # steps; 0: only at the end
    seed: int = 0
    device: str = "auto"
    # "hf": the policy is the HF transformers model; "gyre": gyre's own modules on the batch-invariant ops
    # (gyre.trainers.training_forward), whose logprobs equal an `engine: {deterministic: true}`'s bitwise
    forward: str = "hf"

    def __post_init__(self) -> None:
        if self.forward not in ("hf", "gyre"):
            raise ValueError(f"trainer.forward must be hf | gyre, got {self.forward!r}")


@dataclass
class WeightSyncSection:
    mode: str = "tensors"  # "tensors" (in-process) | "disk" (safetensors under run_dir)
    bucket_mb: int = 512

    def __post_init__(self) -> None:
        if self.mode not in ("tensors", "disk"):
            raise ValueError(f"weight_sync.mode must be tensors | disk, got {self.mode!r}")


@dataclass
class LoggingSection:
    run_dir: str = "runs"
    name: str = "run"
    wandb: bool = True  # when wandb is installed; offline unless wandb_mode / WANDB_MODE say otherwise
    wandb_mode: str = "offline"
    progress: bool = True  # a progress bar over steps (stderr)
    plot: bool = True


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=lambda: ModelSection(tiny="qwen3"))
    engine: dict = field(default_factory=dict)  # EngineConfig fields
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    weight_sync: WeightSyncSection = field(default_factory=WeightSyncSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        import dataclasses

        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model_path"}
        for key in self.engine:
            if key not in known:
                raise RecipeError(f"unknown key 'engine.{key}'")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    return load(path, Recipe, overrides)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return build(Recipe, data)
