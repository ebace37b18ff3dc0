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
class SpecSection:
    """Speculative decoding of the rollouts. method, num_tokens, draft_path and on_weight_update become the
    engine's spec_* fields. refresh_every > 0 (method eagle) keeps the EAGLE head on-policy: every that many
    steps it is retrained on the last steps' rollouts against the current policy (gyre.engine.spec.train),
    warm-started from the head in use, and loaded into the engine (gyre.trainers.run.DraftRefresher)."""

    method: str | None = None  # "ngram" | "draft" | "eagle"; null: no speculative decoding
    num_tokens: int = 4  # draft tokens per verify step
    draft_path: str | None = None  # draft model / EAGLE head dir; eagle + null: trained at the run's start
    refresh_every: int = 0  # training steps between head refreshes; 0: never
    refresh_steps: int = 100  # optimizer steps of each refresh
    on_weight_update: str | None = None  # "disable" | "keep" the drafter after a weight push; null: engine's

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram", "draft", "eagle"):
            raise ValueError(f"spec.method must be ngram | draft | eagle, got {self.method!r}")
        if self.num_tokens < 1 or self.refresh_steps < 1:
            raise ValueError("spec.num_tokens and spec.refresh_steps must be >= 1")
        if self.refresh_every < 0:
            raise ValueError(f"spec.refresh_every must be >= 0 (0: never), got {self.refresh_every}")
        if self.refresh_every and self.method != "eagle":
            raise ValueError("spec.refresh_every needs spec.method eagle (only an EAGLE head is retrained)")
        if self.method == "draft" and not self.draft_path:
            raise ValueError("spec.method draft needs spec.draft_path (a draft model directory)")
        if self.method == "eagle" and not self.draft_path and not self.refresh_every:
            raise ValueError("spec.method eagle needs spec.draft_path (a head from `gyre train-draft`), or "
                             "spec.refresh_every > 0 to train one during the run")
        if self.method is None and self.draft_path:
            raise ValueError("spec.draft_path needs spec.method")
        if self.on_weight_update not in (None, "disable", "keep"):
            raise ValueError(f"spec.on_weight_update must be disable | keep, got {self.on_weight_update!r}")

    @property
    def refreshes(self) -> bool:
        return self.method == "eagle" and self.refresh_every > 0

    def engine_fields(self, draft_path: str | None) -> dict[str, Any]:
        """EngineConfig fields of this section, with the draft directory to start from."""
        if self.method is None:
            return {}
        out = {"spec_method": self.method, "spec_num_tokens": self.num_tokens, "spec_draft_path": draft_path}
        if self.on_weight_update is not None:
            import dataclasses
            import logging

            if "spec_on_weight_update" in {f.name for f in dataclasses.fields(EngineConfig)}:
                out["spec_on_weight_update"] = self.on_weight_update
            else:  # TODO(lead): drop once EngineConfig has spec_on_weight_update
                logging.getLogger("gyre.train").warning("spec.on_weight_update ignored: the engine has no "
                                                        "spec_on_weight_update field yet")
        return out


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
    spec: SpecSection = field(default_factory=SpecSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        import dataclasses

        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model_path"}
        for key in self.engine:
            if key not in known:
                raise RecipeError(f"unknown key 'engine.{key}'")
        both = sorted(k for k in self.engine if k.startswith("spec_")) if self.spec.method is not None else []
        if both:
            raise RecipeError(f"speculative decoding is set in spec: and in engine.{both[0]}: "
                              "give it in spec: only")


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    return load(path, Recipe, overrides)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return build(Recipe, data)
