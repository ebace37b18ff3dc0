"""RolloutConfig: every knob of the RolloutManager, validated once (a recipe's `rollout:` section)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gyre.engine.request import SamplingParams
from gyre.rollout.pool import UPDATE_MODES


@dataclass
class RolloutConfig:
    batch_size: int = 8  # groups (prompts) per batch
    n_samples_per_prompt: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "sync"  # "sync" | "async"
    max_staleness: int = 1  # async: policy versions a delivered token may lag behind
    update_mode: str = "continue"  # in-flight rollouts at an update: continue | recompute | restart
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, sample more to fill the batch
    oversample: float = 1.0  # groups in flight count 1/oversample towards the batch (start more at once)
    max_inflight_groups: int | None = None
    max_consecutive_drops: int = 256  # dynamic sampling gives up (get_batch raises) after this many
    max_retries: int = 3  # reruns of an episode after engine failures

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams.from_dict(self.sampling)
        if self.sampling.n != 1:
            raise ValueError("RolloutConfig.sampling.n must be 1; use n_samples_per_prompt")
        if self.batch_size < 1 or self.n_samples_per_prompt < 1:
            raise ValueError("batch_size and n_samples_per_prompt must be >= 1")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync | async, got {self.mode!r}")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got {self.update_mode!r}")
        if self.oversample < 1.0:
            raise ValueError("oversample must be >= 1")
        if self.dynamic_sampling and self.n_samples_per_prompt < 2:
            raise ValueError("dynamic_sampling needs n_samples_per_prompt >= 2")
        if self.max_inflight_groups is not None and self.max_inflight_groups < 1:
            raise ValueError("max_inflight_groups must be >= 1 (or None: no limit)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutConfig:
        """From a recipe section; an unknown key is a ValueError naming it."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown RolloutConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def staleness_bound(self) -> int:
        return self.max_staleness if self.mode == "async" else 0
